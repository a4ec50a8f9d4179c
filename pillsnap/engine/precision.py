"""Mixed precision of a task: autocast on or off, its dtype, and whether the loss needs scaling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from pillsnap.utils import enable_tf32, select_amp_dtype


@dataclass(frozen=True)
class Precision:
    """Autocast on or off and its dtype; loss scaling is needed only for fp16 (bf16 has fp32's exponent range)."""

    autocast: bool
    dtype: torch.dtype = torch.float32

    @property
    def scaled(self) -> bool:
        return self.autocast and self.dtype == torch.float16

    def __str__(self) -> str:
        return f"autocast {str(self.dtype).removeprefix('torch.')}" if self.autocast else "fp32"

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast)


def resolve_precision(section: DictConfig, device: torch.device, cpu_amp: bool) -> Precision:
    """A task's precision from its own config section (amp, amp_dtype, tf32).

    Autocast runs on CUDA; on CPU only with train.cpu_amp (slower than fp32 for convolutions there, but it runs
    the GPU's mixed-precision code path on any machine).
    """
    if device.type == "cuda":
        enable_tf32(bool(section.tf32))
    if not section.amp or (device.type != "cuda" and not cpu_amp):
        return Precision(False)
    return Precision(True, select_amp_dtype(str(section.amp_dtype), device))
