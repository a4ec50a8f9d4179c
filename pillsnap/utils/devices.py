"""The device a command runs on: the best one here, or the one asked for, checked against this machine. Imports
torch only when called, so that the CLI can check --device before any command without loading it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's cpuset, which os.cpu_count ignores)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class DeviceError(ValueError):
    """A device asked for that this machine does not have, or that PillSnap does not run on."""


def resolve_device(device: str | None = None) -> torch.device:
    """'cuda' when available unless `device` says otherwise; a device this machine does not have (a name torch does
    not know, CUDA on a machine without it, cuda:N past its devices) is a DeviceError that says so, before any
    model loads, rather than torch's error from deep inside the first transfer."""
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as err:  # torch's own message lists every device type it knows
        raise DeviceError(f"device {device!r}: not a device (cpu, cuda, cuda:N)") from err
    if chosen.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: PillSnap runs on cpu or cuda")
    if chosen.type == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        # a GPU may well be there: this torch cannot use it (a ROCm build drives AMD GPUs as "cuda")
        raise DeviceError(f"device {device!r}: this torch {torch.__version__} is a CPU-only build; install a CUDA "
                          "build of torch (pytorch.org) to use the GPU, or use cpu")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: no CUDA device on this machine (use cpu)")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return chosen
