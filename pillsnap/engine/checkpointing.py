"""Run files the trainer owns: checkpoints committed one generation at a time, classes.json, and resume.

A generation is every checkpoint file one epoch writes (the classifier's and the detector's, last and best).
Commit protocol: each state is serialized once to a staged file; then a journal naming the moves and links is
written atomically (the commit point); then the staged files are renamed into place and `best` and the plain
`last.pt`/`best.pt` names are hard-linked. A kill before the journal leaves the previous generation intact (the
staged files are deleted at the next start); a kill after it is completed at the next start. Either way resume
sees the classifier and detector of one and the same epoch.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from pillsnap.engine.early_stopping import early_stopping, new_early_stopping_state
from pillsnap.utils import read_json, save_ckpt, save_json
from pillsnap.utils.io import fsync_path

LOGGER = logging.getLogger(__name__)
JOURNAL = ".commit.json"
# The classifier is also reachable under the plain last.pt / best.pt names (hard links, not copies).
ALIASES = {"classification": {"last": "last.pt", "best": "best.pt"}}


class Save(NamedTuple):
    """One task's state in a generation: written once under kinds[0], linked under the other kinds."""

    task: str
    kinds: tuple[str, ...]
    state: dict


def ckpt_path(ckpt_dir: str | Path, task: str, kind: str) -> Path:
    """{ckpt_dir}/{task}_{kind}.pt (kind: last | best | emergency)."""
    return Path(ckpt_dir) / f"{task}_{kind}.pt"


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`: a hard link, or a copy where the file system has none (FAT, some
    network shares). Replaces `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as err:
        LOGGER.debug("hard link %s -> %s impossible (%s): copying", src, dst, err)
        shutil.copyfile(src, tmp)
        fsync_path(tmp)
    os.replace(tmp, dst)


class CheckpointStore:
    """The checkpoints folder of a run."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)

    def commit(self, epoch: int, saves: list[Save]) -> None:
        """Write one generation so that any kill leaves either all of it or none of it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        moves, links = [], []
        for save in saves:
            staged = self.dir / f".{save.task}_{save.kinds[0]}.pt.staged"
            save_ckpt(staged, save.state)
            first = ckpt_path(self.dir, save.task, save.kinds[0])
            moves.append([staged.name, first.name])
            for kind in save.kinds:
                target = ckpt_path(self.dir, save.task, kind)
                if target != first:
                    links.append([first.name, target.name])
                alias = ALIASES.get(save.task, {}).get(kind)
                if alias:
                    links.append([target.name, alias])
        save_json(self.dir / JOURNAL, {"epoch": epoch, "moves": moves, "links": links})
        self._apply(moves, links)

    def _apply(self, moves: list[list[str]], links: list[list[str]]) -> None:
        for staged, final in moves:
            if (self.dir / staged).exists():  # already moved when a commit is being completed
                os.replace(self.dir / staged, self.dir / final)
        for src, dst in links:
            link_or_copy(self.dir / src, self.dir / dst)
        fsync_path(self.dir)
        (self.dir / JOURNAL).unlink()

    def recover(self) -> None:
        """At the start of a run: complete a commit a kill interrupted, then delete every leftover temp file."""
        journal = self.dir / JOURNAL
        if journal.is_file():
            plan = read_json(journal)
            LOGGER.warning("completing the checkpoint commit of epoch %s that a previous run left unfinished",
                           plan.get("epoch"))
            self._apply(plan["moves"], plan["links"])
        for leftover in [*self.dir.glob(".*.tmp"), *self.dir.glob(".*.staged")]:
            LOGGER.warning("removing %s, left by an interrupted save", leftover)
            leftover.unlink()


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
