"""Side concerns of a training run (log line, TensorBoard, metrics.json, metrics JSONL stream, progress bar,
memory watch) as callbacks on named events, so that the loop itself has no `if tb:` branches."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pillsnap.engine.spec import TaskSpec, lookup
from pillsnap.metrics.names import tb_val_tag
from pillsnap.utils import TBWriter, append_jsonl, cuda_mem_ratio, save_json

LOGGER = logging.getLogger(__name__)
C = TypeVar("C", bound="Callback")
EVENTS = ("on_train_start", "on_epoch_start", "on_step_end", "on_validation_end", "on_epoch_end", "on_oom",
          "on_train_end")


def format_train_line(r: dict) -> str:
    """The design's log line: `[train] e=1/10 s=20/300 loss=... lr=... data=...s comp=...s thr=.../s cuda=...MB`."""
    return (f"[train] e={r['epoch']}/{r['max_epochs']} s={r['step']}/{r['steps']} loss={r['loss']:.4f} "
            f"lr={r['lr']:.2e} data={r['data_time']:.3f}s comp={r['compute_time']:.3f}s "
            f"thr={r['throughput']:.1f}/s cuda={r['cuda_mem']:.0f}MB")


class Callback:
    """Base class: every event is a no-op; subclasses override the ones they need."""

    def on_train_start(self, info: dict) -> None: ...
    def on_epoch_start(self, epoch: int, info: dict) -> None: ...
    def on_step_end(self, record: dict) -> None: ...
    def on_validation_end(self, task: str, epoch: int, metrics: dict) -> None: ...
    def on_epoch_end(self, epoch: int, summary: dict) -> None: ...
    def on_oom(self, event: dict) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...


class CallbackList:
    """Dispatches an event to every callback in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def fire(self, event: str, *args: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"Unknown callback event {event!r}; known: {EVENTS}")
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def of_type(self, kind: type[C]) -> list[C]:
        return [cb for cb in self.callbacks if isinstance(cb, kind)]


class LogLineCallback(Callback):
    """The [train] line every train.step_log_interval steps (after the task's log_prefix), and one line per
    validation."""

    def __init__(self, logger: logging.Logger, specs: Mapping[str, TaskSpec] | None = None) -> None:
        self.logger, self.specs = logger, dict(specs or {})

    def on_step_end(self, record: dict) -> None:
        if record["log"]:
            self.logger.info(lookup(self.specs, record["task"]).log + format_train_line(record))

    def on_validation_end(self, task: str, epoch: int, metrics: dict) -> None:
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.logger.info("[val] %s e=%d %s", task, epoch, shown)

    def on_oom(self, event: dict) -> None:
        self.logger.warning("[oom] retry=%d action=%s state=%s", event["retries"], event["action"], event["state"])


class TensorBoardCallback(Callback):
    """The design's tags: train/loss, train/lr, perf/*, val/*, oom/retries, under each task's tb_prefix."""

    def __init__(self, tb: TBWriter, specs: Mapping[str, TaskSpec] | None = None) -> None:
        self.tb, self.specs = tb, dict(specs or {})

    def on_step_end(self, record: dict) -> None:
        if not record["log"]:
            return
        p, step = lookup(self.specs, record["task"]).tb, record["global_step"]
        tags = {"train/loss": "loss", "train/lr": "lr", "perf/data_time": "data_time",
                "perf/compute_time": "compute_time", "perf/throughput": "throughput", "perf/cuda_mem": "cuda_mem"}
        self.tb.add_scalars({p + tag: record[key] for tag, key in tags.items()}, step)

    def on_validation_end(self, task: str, epoch: int, metrics: dict) -> None:
        p = lookup(self.specs, task).tb
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "n":
                self.tb.add_scalar(p + tb_val_tag(key), value, epoch)
        self.tb.flush()

    def on_oom(self, event: dict) -> None:
        p = lookup(self.specs, event["task"]).tb
        self.tb.add_scalar(p + "oom/retries", event["retries"], event["global_step"])
        self.tb.add_scalar(p + "perf/batch_size", event["state"]["batch_size"], event["global_step"])

    def on_epoch_start(self, epoch: int, info: dict) -> None:
        self.tb.add_scalar("perf/mem_ratio", info.get("mem_ratio", 0.0), epoch)  # the device's, not a task's
        for task, batch_size in info.get("batch_sizes", {}).items():  # each task's under its own prefix
            self.tb.add_scalar(lookup(self.specs, task).tb + "perf/batch_size", batch_size, epoch)

    def on_train_end(self, summary: dict) -> None:
        self.tb.flush()


class MetricsFilesCallback(Callback):
    """reports/metrics.json rewritten (atomically) each epoch; reports/metrics.jsonl appended for live dashboards.
    Every JSONL record carries `type` and `time` (Unix seconds)."""

    def __init__(self, exp_dir: str | Path) -> None:
        self.json_path = Path(exp_dir) / "reports" / "metrics.json"
        self.jsonl_path = Path(exp_dir) / "reports" / "metrics.jsonl"

    def _append(self, kind: str, record: dict) -> None:
        append_jsonl(self.jsonl_path, {"type": kind, "time": round(time.time(), 3), **record})

    def on_train_start(self, info: dict) -> None:
        self._append("start", info)

    def on_step_end(self, record: dict) -> None:
        if record["log"]:
            self._append("step", {k: v for k, v in record.items() if k != "log"})

    def on_validation_end(self, task: str, epoch: int, metrics: dict) -> None:
        self._append("val", {"task": task, "epoch": epoch, **metrics})

    def on_epoch_end(self, epoch: int, summary: dict) -> None:
        save_json(self.json_path, summary)
        self._append("epoch", {"epoch": epoch, "stopped_early": summary.get("stopped_early", [])})

    def on_oom(self, event: dict) -> None:
        self._append("oom", event)

    def on_train_end(self, summary: dict) -> None:
        # a run that trains nothing and ends as its training did leaves the file as it was (Trainer.summary)
        save_json(self.json_path, summary, keep_same=True)
        self._append("end", {"status": summary.get("status")})


class MemoryWatchCallback(Callback):
    """Prevention before recovery: warn (oom/memory_warning) at an epoch's start when the CUDA memory the allocator
    holds (what the epochs before needed at their worst) passes train.memory_warning_ratio, or, where the auto
    batch search sized the batches, the share it sized them for (`sized_for`)."""

    def __init__(self, ratio: float, tb: TBWriter, mem_ratio: Any = cuda_mem_ratio) -> None:
        self.ratio, self.tb, self.mem_ratio = ratio, tb, mem_ratio
        self.limit_name = "train.memory_warning_ratio"

    def sized_for(self, headroom: float) -> None:
        """Batches that the auto batch search sized to `headroom` of the device fill it that far by design: warn
        only beyond it (a warning at every epoch of a healthy run teaches people to ignore it)."""
        if headroom > self.ratio:
            self.ratio, self.limit_name = headroom, "the auto batch's train.auto_batch_vram_headroom"

    def on_epoch_start(self, epoch: int, info: dict) -> None:
        used = self.mem_ratio()
        info["mem_ratio"] = used
        if used > self.ratio:
            LOGGER.warning("oom/memory_warning: CUDA memory at %.0f%% (> %.0f%%, %s) at epoch %d, batch %s",
                           100 * used, 100 * self.ratio, self.limit_name, epoch, info.get("batch_size"))
            self.tb.add_scalar("oom/memory_warning", used, epoch)


class ProfileCallback(Callback):
    """Every train.profile_interval steps of a task: mean data/compute time, throughput, peak CUDA memory, RSS."""

    def __init__(self, interval: int, logger: logging.Logger) -> None:
        self.interval, self.logger = max(int(interval), 1), logger
        self.window: dict[str, list[dict]] = {}

    def on_step_end(self, record: dict) -> None:
        window = self.window.setdefault(record["task"], [])
        window.append(record)
        if len(window) < self.interval:
            return
        import psutil

        n = len(window)
        data, comp = sum(r["data_time"] for r in window) / n, sum(r["compute_time"] for r in window) / n
        imgs = sum(r["n"] for r in window)
        peak = max(r["cuda_mem"] for r in window)
        rss = psutil.Process().memory_info().rss / 2**20
        self.logger.info("[profile] %s steps=%d data=%.4fs comp=%.4fs data_share=%.0f%% thr=%.1f/s cuda_peak=%.0fMB "
                         "rss=%.0fMB", record["task"], n, data, comp, 100 * data / max(data + comp, 1e-12),
                         imgs / max(n * (data + comp), 1e-12), peak, rss)
        window.clear()


class ProgressBarCallback(Callback):
    """tqdm bar per epoch, only on an interactive terminal (never in logs or CI)."""

    def __init__(self) -> None:
        self.bar = None

    def on_epoch_start(self, epoch: int, info: dict) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info.get("steps_done", 0),  # resumed inside the epoch
                        desc=f"epoch {epoch}/{info['max_epochs']}", leave=False, file=sys.stderr, dynamic_ncols=True)

    def on_step_end(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(task=record["task"][:3], loss=f"{record['loss']:.3f}", refresh=False)

    def on_epoch_end(self, epoch: int, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def default_callbacks(exp_dir: str | Path, logger: logging.Logger, tb: TBWriter, memory_ratio: float,
                      profile_interval: int = 50, specs: Mapping[str, TaskSpec] | None = None) -> CallbackList:
    """The callbacks of a rank-0 training run; `specs` (task name -> TaskSpec) give log and TensorBoard prefixes."""
    # MemoryWatch first: it fills info["mem_ratio"] that the TensorBoard callback records.
    cbs: list[Callback] = [MemoryWatchCallback(memory_ratio, tb), LogLineCallback(logger, specs),
                           TensorBoardCallback(tb, specs),
                           MetricsFilesCallback(exp_dir), ProfileCallback(profile_interval, logger)]
    if sys.stderr.isatty():
        cbs.append(ProgressBarCallback())
    return CallbackList(cbs)
