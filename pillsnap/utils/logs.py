"""Loggers, step timing and a TensorBoard writer that degrades to a no-op when tensorboard is missing."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pillsnap.utils.io import ensure_dir

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The chosen level travels in the environment, so that every logger of this process and of the processes it
# starts (DDP ranks, loader workers, scripts) follows --log-level / -v.
LOG_LEVEL_ENV = "PILLSNAP_LOG_LEVEL"
LOGGED = "pillsnap_logged"  # set (True) on an exception whose traceback a run's log already holds
# Set by scripts/train.sh, which writes the process's stdout and stderr to logs/train.out and train.err: progress
# then goes to stdout and warnings, errors and tracebacks to stderr, and the trainer adds no file handlers of its own.
STREAMS_ARE_LOGS_ENV = "PILLSNAP_STREAMS_ARE_LOGS"
# Third-party loggers whose DEBUG lines bury ours (PIL alone logs every PNG chunk it reads: most of a DEBUG log);
# they stay at WARNING whatever --log-level says.
QUIET_LOGGERS = ("PIL", "matplotlib", "urllib3", "fsspec", "filelock", "httpx", "httpcore", "asyncio", "h5py",
                 "multipart", "python_multipart", "numexpr", "graphviz", "git")


def streams_are_logs() -> bool:
    return os.environ.get(STREAMS_ARE_LOGS_ENV) == "1"


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _console_handlers() -> list[logging.Handler]:
    if not streams_are_logs():
        return [logging.StreamHandler(sys.stderr)]
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_BelowWarning())
    err.setLevel(logging.WARNING)
    return [out, err]


def log_level() -> int:
    """The level set by set_log_level (or PILLSNAP_LOG_LEVEL), INFO by default."""
    name = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    return logging.getLevelName(name) if name in LOG_LEVELS else logging.INFO


def set_log_level(level: str) -> None:
    """Console logging at `level` for the root logger and PillSnap's loggers (and, via the environment, for the
    processes this one starts). Library code only calls getLogger; the CLI calls this once."""
    level = level.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    os.environ[LOG_LEVEL_ENV] = level
    handlers = _console_handlers()
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=level, handlers=handlers)
    logging.getLogger().setLevel(level)
    logging.getLogger("pillsnap").setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class FailureRun:
    """Failures alike in a row (a full disk fails every request the same way): `failed` warns at the 1st, 10th,
    100th ... of them, so that the log says it without flooding; `passed` starts the count again."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.count = logger, 0

    def failed(self, message: str) -> None:
        self.count += 1
        if math.log10(self.count).is_integer():
            self.logger.warning("%s%s", message, "" if self.count == 1 else f" ({self.count} times in a row)")

    def passed(self) -> None:
        self.count = 0


def progress(items: Iterable[T], desc: str, unit: str, logger: logging.Logger, every_s: float = 60.0) -> Iterator[T]:
    """`items`, with their progress shown: a tqdm bar on a terminal, else (a logged run: train.sh, nohup, a job
    scheduler) a line in the log every `every_s` seconds (`desc: 1200/18000 photos, 20.1/s, about 14 min left`).
    A pass of the work after training over a Stage 4 split takes tens of minutes, and was silent in the log.
    Items without a length: a bar without an end, no log lines."""
    try:
        total = len(items)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a loader over a data set of unknown length
        total = 0
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total or None, desc=desc, unit=unit, leave=False)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s and done < total:
            last, rate = now, done / max(now - start, 1e-9)
            left = (total - done) / rate
            logger.info("%s: %d/%d %s, %.3g/s, about %s left", desc, done, total, unit, rate,
                        f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s")


def build_logger(exp_dir: str | Path, name: str = "pillsnap") -> logging.Logger:
    """Logger that also writes to {exp_dir}/logs/{name}.log; idempotent per name.

    Console output is the root logger's job (the CLI configures it once); only when nothing configured
    logging does this add a console handler, so that library use still shows progress. Propagation stays
    on, so pytest's caplog and user handlers keep seeing our records.
    """
    logger = logging.getLogger(name)
    logger.setLevel(log_level())
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

    def purge_from(self, step: int) -> None:
        """A resumed run goes on at `step`: TensorBoard hides what earlier runs logged at this step or later (the
        work the resume redoes), instead of drawing both runs' points over each other. A fresh run in a folder
        that has runs before it purges from 0: their curves are hidden, their files kept."""
        if self._writer is None or step < 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer.close()
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=int(step))

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


# The packages a run's figures depend on beyond torch (pinned): the data generator draws with Pillow and NumPy, the
# detector trains through ultralytics and OpenCV, the classifier comes from timm, imprints are read with onnxruntime.
# Two demos in one environment give the same figures; a fresh environment with newer versions may not.
FIGURE_PACKAGES = ("torch", "torchvision", "timm", "ultralytics", "numpy", "pillow", "opencv-python",
                   "opencv-python-headless", "onnxruntime", "rapidocr-onnxruntime")


def package_versions(names: tuple[str, ...] = FIGURE_PACKAGES) -> dict[str, str]:
    """{"python": "3.11.2", "torch": "2.14.1", ...}: the installed version of each package (those not installed are
    left out)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # left out: e.g. one of OpenCV's two wheels
            continue
    return versions


def get_git_sha(cwd: str | Path | None = None) -> str:
    """Short git SHA of `cwd` (default: this process's directory), or 'nogit'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return out.stdout.strip() or "nogit"
