"""Run files the trainer owns: per-task last/best checkpoints, classes.json, and resume (seed D-7 / Annex 8)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pillsnap.engine.early_stopping import early_stopping, new_early_stopping_state
from pillsnap.utils import atomic_path, read_json, save_ckpt, save_json

LOGGER = logging.getLogger(__name__)
# classification also writes the seed's plain last.pt / best.pt names.
ALIASES = {"classification": {"last": "last.pt", "best": "best.pt"}}


def ckpt_path(ckpt_dir: str | Path, task: str, kind: str) -> Path:
    """{ckpt_dir}/{task}_{kind}.pt (kind: last | best | emergency)."""
    return Path(ckpt_dir) / f"{task}_{kind}.pt"


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_task_checkpoint(ckpt_dir: str | Path, task: str, kind: str, state: dict) -> Path:
    """Write one checkpoint atomically, plus its alias (last.pt/best.pt) for classification."""
    path = ckpt_path(ckpt_dir, task, kind)
    save_ckpt(path, state)
    alias = ALIASES.get(task, {}).get(kind)
    if alias:
        _atomic_copy(path, Path(ckpt_dir) / alias)
    return path


def write_classes_json(ckpt_dir: str | Path, meta: dict) -> Path:
    """{ckpt_dir}/classes.json: class names in index order and their class_map entries (for inference)."""
    path = Path(ckpt_dir) / "classes.json"
    names = list(meta.get("class_names") or [])
    class_map = meta.get("class_map") or {}
    save_json(path, {"class_names": names, "class_map": {c: class_map.get(c, {}) for c in names}})
    return path


def resume_source(resume: Any, ckpt_dir: str | Path, task: str) -> Path | None:
    """Checkpoint for `task`: train.resume=last -> its last checkpoint; a path -> that file (classification only)."""
    if not resume:
        return None
    if str(resume) == "last":
        path = ckpt_path(ckpt_dir, task, "last")
        if not path.is_file():
            LOGGER.warning("train.resume=last: no %s, %s starts fresh", path, task)
            return None
        return path
    path = Path(str(resume))
    if task != "classification":
        return None
    if not path.is_file():
        raise FileNotFoundError(f"train.resume points to a missing checkpoint: {path}")
    return path


def previous_history(metrics_json: Path, upto_epoch: int) -> list[dict]:
    """Epoch records of an earlier run, cut at the resumed epoch (later ones are being redone)."""
    if not metrics_json.is_file():
        return []
    history = read_json(metrics_json).get("history", [])
    return [h for h in history if int(h.get("epoch", 0)) <= upto_epoch]


def replay_early_stopping(history: list[dict], task: str, monitor: str, mode: str, min_delta: float) -> dict:
    """Rebuild the early-stopping state (best, bad epochs) from the history so patience survives a resume."""
    state = new_early_stopping_state()
    for record in history:
        value = (record.get(task) or {}).get(monitor)
        if value is not None:
            early_stopping(state, float(value), mode, patience=10**9, min_delta=min_delta)
    return state
