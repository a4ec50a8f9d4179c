"""What the dashboard shows, built from metrics-stream records: per-task training series and validation history,
progress and ETA, OOM events, the run's status and its stage evaluation. Plain values in, plain dict out; no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pillsnap.utils.run_status import is_fresh_start

TRAIN_COLUMNS = ("x", "epoch", "loss", "lr", "throughput", "data_time", "compute_time", "cuda_mem")
NOT_METRICS = {"type", "time", "task", "epoch", "n", "num_images", "num_targets", "num_predictions"}
# The validation metric a task's "best" badge follows: the first one present (the trainer's defaults). Among epochs
# equal on it, as the trainer picks its best checkpoint: the higher tie-break metric (the detector's), then the first.
BEST_METRIC = {"classification": ("macro_f1", "acc"), "detection": ("mAP@0.5",)}
TIE_BREAK = {"detection": "mAP@0.5:0.95"}
MAX_OOM_EVENTS = 50
# the ends after which torchrun, with restarts left, starts the job's processes again (a worker's non-zero exit)
RESTARTED_STATUSES = ("oom_emergency_exit", "crashed")


def clean(value: object) -> object:
    """A JSON-safe copy: numbers to 6 significant digits (smaller payloads), NaN/inf as text (JSON has none; a
    NaN loss must still show), dicts and lists cleaned item by item."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        return str(value)
    return short(value) if isinstance(value, float) else value


def short(value: float) -> float:
    """6 significant digits, but never coarser than a millisecond (Unix times are ~1.8e9)."""
    return round(value, 3) if abs(value) >= 1e5 else float(f"{value:.6g}")


def finite_or_none(value: object) -> float | None:
    """A chart point: a finite number, else a gap."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return short(float(value))


def progress_of(step: dict) -> float:
    """Epochs done at this step record, e.g. 2.5 half-way through epoch 3."""
    return (step.get("epoch", 1) - 1) + step.get("step", 0) / max(step.get("steps") or 1, 1)


class Table:
    """Columns that share one row index, thinned by half whenever they pass `max_rows`, so a week-long run still
    ships a few hundred points per chart; after thinning only every `stride`-th new row is kept, so the density
    stays even along the x axis. `peaks` ({column: source column}): a column that keeps the worst of the source's
    values over the rows its row stands for (the largest, a gap where any was NaN or infinite), beside the source
    sampled as it was: at a stride of 256 a loss spike or a NaN loss minutes long fell between the kept rows and
    never reached the chart."""

    def __init__(self, columns: tuple[str, ...], max_rows: int, peaks: dict[str, str] | None = None) -> None:
        self.peaks = dict(peaks or {})
        self.columns: dict[str, list] = {c: [] for c in (*columns, *self.peaks)}
        self.max_rows, self.stride, self._seen = max_rows, 1, 0
        self._pending: dict[str, float | None] = {}  # each peak column's worst since the last kept row
        self._pending_x = -math.inf  # the furthest x among those rows

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def append(self, row: dict) -> None:
        self._seen += 1
        for name, source in self.peaks.items():
            self._pending[name] = _worse(self._pending.get(name, math.nan), finite_or_none(row.get(source)))
        self._pending_x = max(self._pending_x, _finite(row.get("x")))
        if (self._seen - 1) % self.stride:
            return
        for name, values in self.columns.items():
            values.append(_shown(self._pending[name]) if name in self.peaks else finite_or_none(row.get(name)))
        self._pending.clear()
        self._pending_x = -math.inf
        if len(self) > self.max_rows:
            # A kept row stands for the rows since the one kept before it: a dropped row's worst goes to the next
            # row kept, or, for the last row, to the next one appended (a gap, a NaN loss, still wins).
            for name in self.peaks:
                values = self.columns[name]
                for i in range(1, len(values), 2):
                    if i + 1 < len(values):
                        values[i + 1] = _worse(values[i], values[i + 1])
                    else:
                        self._pending[name], self._pending_x = values[i], _finite(self.columns["x"][i])
            for values in self.columns.values():
                del values[1::2]
            self.stride *= 2

    def copy(self) -> dict[str, list]:
        """The columns as new lists: a snapshot is serialised while the next records may already be arriving."""
        return {name: list(values) for name, values in self.columns.items()}

    def drop_after_epoch(self, epoch: int, upto: float | None = None) -> None:
        """Forget rows of epochs after `epoch`, or after `upto` epochs done when the resume is inside an epoch (a
        resumed run redoes them)."""
        if upto is not None:
            keep = [i for i, x in enumerate(self.columns["x"]) if x is None or x <= upto + 1e-9]
        else:
            keep = [i for i, e in enumerate(self.columns["epoch"]) if e is None or e <= epoch]
        for name, values in self.columns.items():
            self.columns[name] = [values[i] for i in keep]
        if self._pending_x > (epoch if upto is None else upto) + 1e-9:
            self._pending.clear()  # the worst of rows the resume redoes
            self._pending_x = -math.inf


@dataclass
class TaskState:
    """One task's view: the latest step, the training series, one validation record per epoch."""

    name: str
    max_rows: int
    train: Table = field(init=False)
    val: dict[int, dict] = field(default_factory=dict)
    last_step: dict | None = None
    anchor: tuple[float, float] | None = None  # (time, progress) of the first step since the run (re)started
    last_epoch: int | None = None  # the last epoch the run plans to train this task in (start record)
    stopped_early: bool = False

    def __post_init__(self) -> None:
        self.train = Table(TRAIN_COLUMNS, self.max_rows, peaks={"loss_peak": "loss"})

    def add_step(self, record: dict) -> None:
        progress = progress_of(record)
        self.last_step = record
        if self.anchor is None and "time" in record:
            self.anchor = (record["time"], progress)
        self.train.append({**record, "x": progress})

    def add_val(self, record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k not in NOT_METRICS and isinstance(v, (int, float))}
        self.val[int(record.get("epoch", len(self.val) + 1))] = {**metrics, "time": record.get("time")}

    def rewind(self, epoch: int, upto: float | None = None) -> None:
        """A resume from `epoch` (`upto`: from that many epochs done, inside the next one): drop what came after it
        and restart the ETA clock."""
        self.train.drop_after_epoch(epoch, upto)
        self.val = {e: v for e, v in self.val.items() if e <= epoch}
        self.anchor = None
        if self.last_step is not None and progress_of(self.last_step) > (epoch if upto is None else upto) + 1e-9:
            self.last_step = None

    @property
    def max_epochs(self) -> int | None:
        """The last epoch this task trains in: the plan's for it where the start record says, else the run's."""
        return self.last_epoch or (self.last_step.get("max_epochs") if self.last_step else None)

    def finished(self) -> bool:
        """Trained all it will: its last planned epoch validated, or stopped early (the run may go on with the
        other task)."""
        return self.stopped_early or (bool(self.max_epochs) and max(self.val, default=0) >= self.max_epochs)

    def eta(self) -> float | None:
        """Seconds left, from this task's average pace since its first step of this run: the pace includes
        validation once an epoch has ended (so the first epoch's ETA is a little optimistic)."""
        if self.finished():
            return 0.0
        if self.last_step is None or self.anchor is None or not self.max_epochs:
            return None
        done, elapsed = progress_of(self.last_step) - self.anchor[1], self.last_step.get("time", 0) - self.anchor[0]
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.max_epochs - progress_of(self.last_step)) * elapsed / done)

    def best(self) -> dict | None:
        tie = TIE_BREAK.get(self.name)
        for metric in BEST_METRIC.get(self.name, ()):
            scored = [(v[metric], _finite(v.get(tie)), -e) for e, v in self.val.items()
                      if isinstance(v.get(metric), (int, float))]
            if scored:
                value, _, epoch = max(scored)
                return {"metric": metric, "value": clean(value), "epoch": -epoch}
        return None

    def snapshot(self) -> dict:
        last = self.last_step or {}
        epochs = sorted(self.val)
        names = sorted({k for v in self.val.values() for k in v if k != "time"})
        return {
            "name": self.name, "epoch": last.get("epoch"), "max_epochs": self.max_epochs,
            "stopped_early": self.stopped_early,
            "step": last.get("step"), "steps": last.get("steps"), "global_step": last.get("global_step"),
            "progress": clean(progress_of(last)) if last else None, "eta": clean(self.eta()),
            "finished": self.finished(), "last": clean(last),
            "train": self.train.copy(),
            "val": {"epoch": epochs, **{k: [finite_or_none(self.val[e].get(k)) for e in epochs] for k in names}},
            "last_val": clean(self.val[epochs[-1]]) if epochs else None,
            "best": self.best(),
        }


class MonitorState:
    """Everything the dashboard shows, updated one record at a time; `version` changes whenever it does."""

    def __init__(self, max_rows: int = 400) -> None:
        self.max_rows = max_rows
        self.version = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything: the stream was replaced, or a new run (not a resume) started."""
        self.tasks: dict[str, TaskState] = {}
        self.run: dict = {"status": "waiting", "stage": None, "tasks": [], "epochs": None, "epoch": None,
                          "start_epoch": None, "inside_epoch": None, "started": None, "elapsed_before": 0.0,
                          "ended": None, "last_time": None, "resumes": 0, "time_limit_s": None, "after": None,
                          "after_failed": [], "world_size": 1, "restart": 0, "max_restarts": 0, "restarting": None,
                          "last_epochs": {}}
        self.oom: list[dict] = []
        self.evaluation: dict | None = None
        self.records = 0
        self.version += 1

    def apply_all(self, records: list[dict], reset: bool = False) -> None:
        if reset:
            self.reset()
        for record in records:
            self.apply(record)

    def apply(self, record: dict) -> None:
        handler = getattr(self, "_on_" + str(record.get("type")), None)
        if handler is None:
            return  # a record type this dashboard does not know yet: ignore it, do not fail
        handler(record)
        self.records += 1
        if isinstance(record.get("time"), (int, float)):
            self.run["last_time"] = max(self.run["last_time"] or 0, record["time"])
        self.version += 1

    def task(self, name: str) -> TaskState:
        if name not in self.tasks:
            self.tasks[name] = TaskState(name, self.max_rows)
        return self.tasks[name]

    def _on_start(self, record: dict) -> None:
        start_epoch = int(record.get("start_epoch") or 0)
        inside = record.get("resumed_at") or {}  # a resume inside epoch start_epoch + 1: epochs done per task
        if is_fresh_start(record):
            self.reset()  # a fresh run appends to the same file: its history is not this run's
        else:
            self.run["resumes"] += 1
            self.evaluation = None  # the verdict of the training before the resume: this one is not decided yet
            for name, task in self.tasks.items():
                task.rewind(start_epoch, inside.get(name))
        self.run.update(status="running", stage=record.get("stage"), tasks=list(record.get("tasks", [])),
                        epochs=record.get("epochs"), start_epoch=start_epoch,
                        inside_epoch=start_epoch + 1 if inside else None, started=record.get("time"),
                        elapsed_before=float(record.get("elapsed_s") or 0.0), ended=None, epoch=start_epoch or None,
                        time_limit_s=_seconds(record.get("time_limit_hours")), after=None, after_failed=[],
                        world_size=int(record.get("world_size") or 1), restart=int(record.get("restart") or 0),
                        max_restarts=int(record.get("max_restarts") or 0), restarting=None)
        for name in self.run["tasks"]:
            self.task(name)
        self.run["last_epochs"] = {name: int(last) for name, last in (record.get("last_epochs") or {}).items()}
        for name, last in self.run["last_epochs"].items():
            self.task(name).last_epoch = last or None
        self._stopped(record)

    def _on_step(self, record: dict) -> None:
        self.task(record.get("task", "classification")).add_step(record)
        if self.run["status"] == "waiting":
            self.run["status"] = "running"  # a stream whose start record was cut off

    def _on_val(self, record: dict) -> None:
        self.task(record.get("task", "classification")).add_val(record)

    def _on_epoch(self, record: dict) -> None:
        self.run["epoch"] = record.get("epoch")
        self._stopped(record)

    def _stopped(self, record: dict) -> None:
        for name, task in self.tasks.items():
            task.stopped_early = name in (record.get("stopped_early") or ())

    def _on_oom(self, record: dict) -> None:
        task = self.tasks.get(record.get("task", ""))
        epoch = task.last_step.get("epoch") if task and task.last_step else None
        self.oom.append({**record, "epoch": epoch})
        del self.oom[:-MAX_OOM_EVENTS]

    def _on_end(self, record: dict) -> None:
        status = record.get("status") or "finished"
        self.run.update(status=status, ended=record.get("time"))
        if status in RESTARTED_STATUSES and self.run["restart"] < self.run["max_restarts"]:
            # torchrun starts the job again by itself (a rank's OOM saved its recovery for it): not an end
            self.run.update(status="restarting", restarting={
                "after": status, "next": self.run["restart"] + 1, "max": self.run["max_restarts"]})

    def _on_after_training(self, record: dict) -> None:
        """The work after training (calibration, reports, the stage's evaluation, the final test): the step under
        way and since when, or the one that failed; None once a step is done. A step that fails costs that step
        only and the others go on, so the steps that failed are kept apart (`after_failed`) until a later run
        does them."""
        event, step = record.get("event"), record.get("step")
        failed = self.run["after_failed"]
        if event == "failed" and step not in failed:
            failed.append(step)
        elif event == "done" and step in failed:
            failed.remove(step)
        self.run["after"] = {"step": step, "since": record.get("time"), "failed": event == "failed"} \
            if event in ("start", "failed") else None

    def _on_stage_evaluation(self, record: dict) -> None:
        self.evaluation = {**record, "source": "stream"}

    def eta(self) -> float | None:
        """The run's: tasks are interleaved, so it ends with its slowest task. A task with no step yet has no pace
        and is left out (eta_waiting names it): under train.strategy=sequential the detector's epochs come after
        the classifier's, and the ETA is then the classifier's alone, a lower bound."""
        if self.run["status"] != "running":
            return None
        etas = [t.eta() for t in self.tasks.values() if t.last_step is not None]
        return max(etas) if etas and None not in etas else None

    def eta_waiting(self) -> list[str]:
        """The tasks the run's ETA leaves out: planned (the start record gives them epochs: `--only detection`
        plans none for the classifier), not finished, and with no step of this run yet."""
        return [name for name, task in self.tasks.items()
                if name in self.run["tasks"] and task.last_step is None and not task.finished()
                and self.run["last_epochs"].get(name) != 0]

    def snapshot(self) -> dict:
        return {"version": self.version, "records": self.records,
                "run": clean({**self.run, "eta": self.eta(), "eta_waiting": self.eta_waiting()}),
                "tasks": {name: task.snapshot() for name, task in self.tasks.items()},
                "oom": clean(self.oom), "evaluation": clean(self.evaluation)}


# A peak column's values while rows are merged: a number, None for a NaN or infinite value (which wins), NaN for
# nothing merged yet.
def _worse(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if math.isnan(a):
        return b
    return a if math.isnan(b) else max(a, b)


def _shown(value: float | None) -> float | None:
    """A merged peak as a chart point: a gap for a NaN loss or for no value at all."""
    return None if value is None or math.isnan(value) else value


def _seconds(hours: object) -> float | None:
    """A time cap in hours as seconds; None for none (or not a positive number)."""
    value = finite_or_none(hours)
    return 3600.0 * value if value is not None and value > 0 else None


def _finite(value: object) -> float:
    """A number to rank by; anything else (missing, NaN, text) ranks below every number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return -math.inf
