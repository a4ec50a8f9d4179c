"""Core utilities named by seed Part D §1 (`src/utils/core.py`), split by concern."""

from pillsnap.utils.io import (
    CKPT_REQUIRED_KEYS,
    append_jsonl,
    atomic_path,
    ensure_dir,
    load_ckpt,
    read_json,
    save_ckpt,
    save_json,
)
from pillsnap.utils.logs import StepTimer, TBWriter, build_logger, get_git_sha
from pillsnap.utils.torch_utils import (
    COMPILE_MODES,
    cuda_mem_mb,
    cuda_mem_ratio,
    enable_tf32,
    resolve_device,
    select_amp_dtype,
    set_seed,
    try_torch_compile,
)

__all__ = [
    "CKPT_REQUIRED_KEYS", "COMPILE_MODES", "StepTimer", "TBWriter", "append_jsonl", "atomic_path", "build_logger",
    "cuda_mem_mb", "cuda_mem_ratio", "enable_tf32", "ensure_dir", "get_git_sha", "load_ckpt", "read_json",
    "resolve_device", "save_ckpt", "save_json", "select_amp_dtype", "set_seed", "try_torch_compile",
]
