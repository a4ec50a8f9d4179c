"""The machine's vital signs for the dashboard's system panel: CPU, RAM, free disk under the experiment, and GPU
memory where there is an NVIDIA GPU.

GPUs are read through NVML (nvidia-ml-py, which ultralytics already installs) or `nvidia-smi`, not through torch:
asking torch for device memory opens a CUDA context, which costs a few hundred MB on the very GPU the training run
is using, and importing torch would make the dashboard slow to start. Where neither is there, the panel says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import psutil

from pillsnap.utils.logs import FailureRun

LOGGER = logging.getLogger(__name__)
GiB = 1024**3
SMI_QUERY = "index,name,memory.used,memory.total,utilization.gpu"


class GpuReadError(RuntimeError):
    """A GPU reading failed after the GPU was found (a driver hiccup): shown on the panel, never fatal."""


def nvml_reader() -> Callable[[], list[dict]] | None:
    """A function listing the GPUs through NVML, or None when NVML is missing or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as err:  # no driver, no device, no permission
        LOGGER.debug("NVML unavailable: %s", err)
        return None
    if count == 0:
        return None

    def read() -> list[dict]:
        try:
            return [nvml_gpu(pynvml, index) for index in range(count)]
        except pynvml.NVMLError as err:
            raise GpuReadError(f"NVML: {err}") from err

    return read


def nvml_gpu(pynvml: ModuleType, index: int) -> dict:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    try:
        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except pynvml.NVMLError:  # "Not Supported" on a MIG-partitioned GPU: the memory is still worth showing
        util = None
    return gpu_entry(index, name if isinstance(name, str) else name.decode(), mem.used, mem.total, util)


def smi_reader() -> Callable[[], list[dict]] | None:
    """A function listing the GPUs through `nvidia-smi`, or None when it is not on the PATH or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None

    def read() -> list[dict]:
        try:
            out = subprocess.run([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
        except (subprocess.SubprocessError, OSError) as err:
            raise GpuReadError(f"nvidia-smi: {err}") from err
        gpus = []
        for line in out.strip().splitlines():
            index, name, used, total, util = (part.strip() for part in line.split(","))
            gpus.append(gpu_entry(int(index), name, float(used) * 2**20, float(total) * 2**20,
                                  float(util) if util.replace(".", "").isdigit() else None))
        return gpus

    try:
        return read if read() else None
    except (GpuReadError, ValueError) as err:
        LOGGER.debug("nvidia-smi unusable: %s", err)
        return None


def idle_time(times: NamedTuple) -> float:
    """Seconds a CPU did nothing, waiting for disk included (Linux reports it apart as iowait)."""
    return times.idle + getattr(times, "iowait", 0.0)


def gpu_entry(index: int, name: str, used: float, total: float, util: float | None) -> dict:
    return {"index": index, "name": name, "mem_used_gb": round(used / GiB, 2), "mem_total_gb": round(total / GiB, 2),
            "mem_percent": round(100 * used / total, 1) if total else None, "util_percent": util}


class SystemProbe:
    """Samples the machine; a sample is cached for `min_interval` seconds, so many open pages cost one reading."""

    def __init__(self, disk_path: str | Path = ".", min_interval: float = 1.0) -> None:
        self.disk_path, self.min_interval = Path(disk_path), min_interval
        self._gpu_reader: Callable[[], list[dict]] | None = None
        self._gpu_checked = False
        self._last: tuple[float, dict] | None = None
        self._lock = threading.Lock()
        self._gpu_failures = FailureRun(LOGGER)  # the 1st, 10th, 100th failed reading in a row, not every one
        # CPU % is measured between two readings of the CPU times, kept here: psutil's own cpu_percent(None)
        # keeps its last reading per thread, and the web server samples from whichever worker thread is free.
        self._cpu_times = (time.monotonic(), psutil.cpu_times())

    def sample(self) -> dict:
        with self._lock:  # pages sample from several server threads; one reading serves them all
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= self.min_interval:
                self._last = (now, self._read())
            return self._last[1]

    def _read(self) -> dict:
        ram = psutil.virtual_memory()
        gpus, note = self._gpus()
        return {"time": time.time(), "cpu_percent": self._cpu_percent(),
                "cpu_count": psutil.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
                "ram_used_gb": round((ram.total - ram.available) / GiB, 2), "ram_total_gb": round(ram.total / GiB, 2),
                "ram_percent": ram.percent, "disk": self._disk(), "gpus": gpus, "gpu_note": note}

    def _cpu_percent(self) -> float:
        """Busy share of all CPUs since the last sample (over at least 0.1 s: a few ms read as 0 or 100)."""
        since, before = self._cpu_times
        time.sleep(max(0.0, 0.1 - (time.monotonic() - since)))
        after = psutil.cpu_times()
        self._cpu_times = (time.monotonic(), after)
        total = sum(after) - sum(before)
        return round(100 * (1 - (idle_time(after) - idle_time(before)) / total), 1) if total > 0 else 0.0

    def _disk(self) -> dict | None:
        """Free space where checkpoints are written (the nearest existing folder above the experiment)."""
        path = self.disk_path
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return None
        return {"free_gb": round(usage.free / GiB, 1), "total_gb": round(usage.total / GiB, 1),
                "percent": round(100 * usage.used / usage.total, 1)}

    def _gpus(self) -> tuple[list[dict], str | None]:
        if not self._gpu_checked:  # looked up on first use only, so a page without GPUs pays nothing after
            self._gpu_checked = True
            self._gpu_reader = nvml_reader() or smi_reader()
        if self._gpu_reader is None:
            return [], "no NVIDIA GPU found (NVML and nvidia-smi unavailable)"
        try:
            gpus = self._gpu_reader()
        except (GpuReadError, ValueError) as err:  # a driver hiccup must not take the dashboard down
            self._gpu_failures.failed(f"reading GPU memory failed: {err}")
            return [], f"GPU reading failed: {err}"
        self._gpu_failures.passed()
        return gpus, None
