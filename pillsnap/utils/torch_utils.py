"""Device, precision, reproducibility and compile helpers."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(__name__)
COMPILE_MODES = ("none", "reduce-overhead", "max-autotune")


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; deterministic=True trades speed for repeatable kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def select_amp_dtype(policy: str = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """Pick the autocast dtype: "auto" prefers bf16 where the device supports it, else fp16."""
    if policy not in ("auto", "fp16", "bf16"):
        raise ValueError(f"amp_dtype must be 'auto', 'fp16' or 'bf16', got {policy!r}")
    if policy == "fp16":
        return torch.float16
    if policy == "bf16":
        return torch.bfloat16
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    LOGGER.info("AMP auto on %s: chose bfloat16 (CPU autocast supports bf16 only)", device_type)
    return torch.bfloat16


def enable_tf32(flag: bool) -> None:
    """Allow TF32 matmul/cudnn (Ampere+) and 'high' float32 matmul precision."""
    torch.backends.cuda.matmul.allow_tf32 = flag
    torch.backends.cudnn.allow_tf32 = flag
    torch.set_float32_matmul_precision("high" if flag else "highest")


def try_torch_compile(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile with one of COMPILE_MODES; on failure warn and return the eager model.

    Compilation is lazy, so errors usually surface at the first call: engine/compiling.py warms the compiled
    model up on a training chunk and falls back there.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"torch_compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    try:
        return torch.compile(model, mode=mode)
    except Exception as err:  # compile backends fail in many ways; eager always works
        LOGGER.warning("torch.compile(mode=%s) failed, falling back to eager: %s", mode, err)
        return model


def cuda_mem_mb() -> float:
    """Currently allocated CUDA memory in MB (0.0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.memory_allocated() / 2**20


def cuda_mem_ratio() -> float:
    """Reserved / total memory of the current CUDA device (0.0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return torch.cuda.memory_reserved() / total


def memory_snapshot() -> dict[str, float]:
    """Process memory now and at its peak (RSS), and the CUDA allocator's peak, in MB (0.0 without CUDA)."""
    import resource

    import psutil

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "peak_rss_mb": round(peak_rss, 1),
            "peak_cuda_mem_mb": round(cuda_peak, 1)}


def resolve_device(device: str | None = None) -> torch.device:
    """'cuda' when available unless `device` says otherwise."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
