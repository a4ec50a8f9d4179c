"""Loggers, step timing and a TensorBoard writer that degrades to a no-op when tensorboard is missing."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pillsnap.utils.io import ensure_dir

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_logger(exp_dir: str | Path, name: str = "pillsnap") -> logging.Logger:
    """Logger that also writes to {exp_dir}/logs/{name}.log; idempotent per name.

    Console output is the root logger's job (the CLI configures it once); only when nothing configured
    logging does this add a console handler, so that library use still shows progress. Propagation stays
    on, so pytest's caplog and user handlers keep seeing our records.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    log_file = ensure_dir(Path(exp_dir) / "logs") / f"{name}.log"
    have = {getattr(h, "baseFilename", None) for h in logger.handlers}
    if str(log_file.resolve()) not in have:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(file_handler)
    if not logging.getLogger().handlers and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    return logger


class StepTimer:
    """Splits each step into data time (waiting for the batch) and compute time."""

    def __init__(self) -> None:
        self._mark = time.perf_counter()
        self.data_time = 0.0
        self.compute_time = 0.0

    def data_done(self) -> None:
        now = time.perf_counter()
        self.data_time, self._mark = now - self._mark, now

    def compute_done(self) -> None:
        now = time.perf_counter()
        self.compute_time, self._mark = now - self._mark, now

    def reset(self) -> None:
        self._mark = time.perf_counter()

    @property
    def step_time(self) -> float:
        return self.data_time + self.compute_time


class TBWriter:
    """TensorBoard SummaryWriter under {exp_dir}/tb; every method is a safe no-op without tensorboard."""

    def __init__(self, exp_dir: str | Path, enabled: bool = True) -> None:
        self.log_dir = Path(exp_dir) / "tb"
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logging.getLogger(__name__).warning("tensorboard not installed: TB logging disabled")
            return
        self._writer = SummaryWriter(log_dir=str(ensure_dir(self.log_dir)))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def add_scalars(self, values: dict[str, Any], step: int) -> None:
        for tag, value in values.items():
            self.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def get_git_sha(cwd: str | Path | None = None) -> str:
    """Short git SHA of `cwd` (default: this process's directory), or 'nogit'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return out.stdout.strip() or "nogit"
