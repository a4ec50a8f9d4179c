"""Device, precision, reproducibility and compile helpers."""

from __future__ import annotations

import gc
import logging
import os
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(__name__)
COMPILE_MODES = ("none", "reduce-overhead", "max-autotune")
# torch's mode each one trains with: the same, without CUDA graphs. A CUDA graph's outputs are overwritten by its next
# replay, and a parameter's first gradient of an optimizer step is such an output, which autograd keeps as .grad:
# the next chunk's backward overwrites it, and torch stops the run ("accessing gradient tensor output of CUDAGraphs
# that has been overwritten", pytorch/pytorch#169545). Training accumulates gradients over chunks whenever
# train.grad_accum_steps > 1, the auto batch search picks less than the batch, or an OOM recovery splits it.
TRAINING_COMPILE_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


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


def host_rng_states() -> dict:
    """Python's, numpy's and torch's random states (CUDA's where it is in use), as plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_host_rng(states: dict) -> None:
    """Put back what host_rng_states saved (a part it lacks is left as it is)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        # a checkpoint loaded with map_location=cuda brings these to the GPU; torch takes them on the CPU only
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


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
        # native bf16 only: older GPUs (V100, T4) "support" it by emulation, slower than fp16 or fp32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    LOGGER.info("AMP auto on %s: chose bfloat16 (CPU autocast supports bf16 only)", device_type)
    return torch.bfloat16


def enable_tf32(flag: bool) -> None:
    """Allow TF32 matmul/cudnn (Ampere+) and 'high' float32 matmul precision."""
    torch.backends.cuda.matmul.allow_tf32 = flag
    torch.backends.cudnn.allow_tf32 = flag
    torch.set_float32_matmul_precision("high" if flag else "highest")


def training_compile_mode(mode: str) -> str:
    """torch's mode that training compiles `mode` (one of COMPILE_MODES other than none) as; ValueError otherwise."""
    if mode not in TRAINING_COMPILE_MODES:
        raise ValueError(f"optimization.torch_compile must be one of {COMPILE_MODES}, got {mode!r}")
    return TRAINING_COMPILE_MODES[mode]


def try_torch_compile(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile with one of COMPILE_MODES; on failure warn and return the eager model.

    Compilation is lazy, so errors usually surface at the first call: engine/compiling.py warms the compiled
    model up on a training chunk and falls back there.

    The graphs are specialised to each batch size (dynamic=False). Training batches are all one size; with torch's
    default, one batch of another size (a batch that lost an undecodable photo, an OOM recovery chunk) compiles a
    graph for any size, and every later batch runs that one instead of the one tuned for the real size.

    The model is compiled for training, without CUDA graphs (TRAINING_COMPILE_MODES): max-autotune keeps its
    tuned kernels, reduce-overhead, CUDA graphs and nothing else, compiles as torch's default.
    """
    if mode == "none":
        return model
    torch_mode = training_compile_mode(mode)
    try:
        return torch.compile(model, mode=torch_mode, dynamic=False)
    except Exception as err:  # compile backends fail in many ways; eager always works
        LOGGER.warning("torch.compile(mode=%s) failed, falling back to eager: %s", mode, err)
        return model


def _share_of_device(reserved: Callable[[], int]) -> float:
    if not torch.cuda.is_available():
        return 0.0
    return reserved() / torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def cuda_mem_ratio() -> float:
    """Reserved / total memory of the current CUDA device (0.0 without CUDA)."""
    return _share_of_device(torch.cuda.memory_reserved)


def cuda_peak_ratio() -> float:
    """Peak reserved / total memory of the current CUDA device since its peaks were last reset (`release_cuda_cache`,
    a step's window; 0.0 without CUDA): what a piece of work needed at its worst, free blocks the allocator kept for
    later included."""
    return _share_of_device(torch.cuda.max_memory_reserved)


def release_cuda_cache() -> None:
    """Hand the CUDA allocator's free blocks back to the device and start its peaks again (no-op without CUDA).

    Collects garbage first, so that tensors kept alive only by reference cycles are freed too. Call it outside an
    `except` block: until the block ends, the exception's traceback keeps the failed work's tensors alive.
    """
    if not torch.cuda.is_available():
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


class CudaPeaks:
    """Peak CUDA memory allocated, in MB: over a window (`start_window`, then `window_mb` reads the peak since) and
    over the run (`run_mb`: every window and what ran between them, except an attempt that ran out of memory, whose
    recovery starts the peaks again). torch keeps one peak per device, so the process has one meter, `CUDA_PEAKS`.
    0.0 without CUDA."""

    def __init__(self) -> None:
        self.run_mb = 0.0

    @staticmethod
    def _since_reset_mb() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0

    def reset(self) -> None:
        """Start the run's peak again (after work that is not the run's own, such as the auto batch search)."""
        self.run_mb = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def start_window(self) -> None:
        """A new window from here (what came since the last one, a validation say, still counts for the run)."""
        self.run_mb = self.peak_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def window_mb(self) -> float:
        """The peak since `start_window`."""
        peak = self._since_reset_mb()
        self.run_mb = max(self.run_mb, peak)
        return peak

    def peak_mb(self) -> float:
        """The run's peak so far, the window still open included (does not start a new window)."""
        return max(self.run_mb, self._since_reset_mb())


CUDA_PEAKS = CudaPeaks()

# Allocation failures outside PyTorch's caching allocator raise RuntimeError (or its subclass
# torch.AcceleratorError), not torch.OutOfMemoryError: cuBLAS and cuDNN handles and workspaces, the CUDA runtime
# itself, and the CPU allocator. (cuDNN's "not supported" is left out: it also names real bugs, which recovery
# would hide behind smaller batches.)
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError whose message is one of an allocation that failed."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(message in str(err) for message in OOM_MESSAGES)


def memory_snapshot() -> dict[str, float]:
    """Process memory now and at its peak (RSS), and the run's peak of CUDA memory allocated (`CUDA_PEAKS`), in MB
    (0.0 without CUDA)."""
    import resource

    import psutil

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "peak_rss_mb": round(peak_rss, 1),
            "peak_cuda_mem_mb": round(CUDA_PEAKS.peak_mb(), 1)}
