"""Core utilities, one module per concern: files and checkpoints (io), logging (logs), torch settings
(torch_utils), image reading (images), box formats (boxes), keeping ultralytics offline (offline), arrays
filled batch by batch (arrays), one writer at a time (locks) and stop signals (signals).

The lowest layer: nothing here imports another part of pillsnap. Names resolve lazily so that torch-free
users (the data scan, the CLI's --help, the HTTP app's image decoding) do not import torch.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "pillsnap.utils.io": ("CKPT_REQUIRED_KEYS", "append_jsonl", "atomic_path", "ensure_dir", "load_ckpt",
                          "read_json", "save_ckpt", "save_json"),
    "pillsnap.utils.logs": ("LOG_LEVELS", "StepTimer", "TBWriter", "build_logger", "get_git_sha", "set_log_level"),
    "pillsnap.utils.torch_utils": ("COMPILE_MODES", "CUDA_PEAKS", "cuda_mem_ratio", "cuda_peak_ratio",
                                   "enable_tf32", "host_rng_states", "is_out_of_memory", "memory_snapshot",
                                   "release_cuda_cache", "restore_host_rng", "select_amp_dtype",
                                   "set_seed", "try_torch_compile"),
    "pillsnap.utils.devices": ("DeviceError", "resolve_device"),
    "pillsnap.utils.images": ("DECODE_ERRORS", "decode_image", "read_bytes", "read_image", "split_zip_path"),
    "pillsnap.utils.boxes": ("cxcywh_to_xyxy", "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh"),
    "pillsnap.utils.offline": ("ultralytics_offline",),
    "pillsnap.utils.arrays": ("RowFiller",),
    "pillsnap.utils.locks": ("BusyError", "file_lock", "holder_alive", "read_holder"),
    "pillsnap.utils.signals": ("STOP_SIGNALS", "held_signals", "loader_worker_signals", "pool_worker_signals",
                                "stops_as_interrupt"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
