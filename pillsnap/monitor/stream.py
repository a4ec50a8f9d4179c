"""Read the training metrics stream ({exp_dir}/reports/metrics.jsonl) incrementally and summarise it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def read_new_records(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Records appended since byte `offset`, and the new offset. A trailing partial line is left for next time."""
    path = Path(path)
    if not path.is_file():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1  # only whole lines; a writer may be mid-line
    records = []
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            LOGGER.warning("skipping malformed metrics line in %s: %.80r", path, line)
    return records, offset + end


def summarize(records: list[dict]) -> dict:
    """Latest step and validation per task, epoch, OOM count and run status."""
    summary: dict = {"status": "running" if records else "waiting", "epoch": None, "oom_events": 0,
                     "last_step": {}, "last_val": {}, "loss_history": {}}
    for rec in records:
        kind, task = rec.get("type"), rec.get("task", "classification")
        if kind == "step":
            summary["last_step"][task] = rec
            summary["loss_history"].setdefault(task, []).append([rec.get("global_step"), rec.get("loss")])
        elif kind == "val":
            summary["last_val"][task] = {k: v for k, v in rec.items() if k not in ("type", "task")}
        elif kind == "epoch":
            summary["epoch"] = rec.get("epoch")
        elif kind == "oom":
            summary["oom_events"] += 1
        elif kind == "end":
            summary["status"] = rec.get("status") or "finished"
    return summary


class MetricsFollower:
    """Keeps every record seen so far from one stream; `poll()` reads what was appended since."""

    def __init__(self, path: str | Path, max_records: int = 20000) -> None:
        self.path, self.offset, self.max_records = Path(path), 0, max_records
        self.records: list[dict] = []

    def poll(self) -> list[dict]:
        new, self.offset = read_new_records(self.path, self.offset)
        self.records.extend(new)
        del self.records[: max(0, len(self.records) - self.max_records)]  # bounded memory on long runs
        return new

    def summary(self) -> dict:
        return summarize(self.records)
