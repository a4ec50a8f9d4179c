"""Run files the trainer owns: checkpoints committed one generation at a time, classes.json, and resume.

A generation is every checkpoint file one epoch writes (every task's, last and best).
Commit protocol: each state is serialized once to a staged file; then a journal naming the moves and links is
written atomically (the commit point); then the staged files are renamed into place and `best` and the plain
`last.pt`/`best.pt` names are hard-linked. A kill before the journal leaves the previous generation intact (the
staged files are deleted at the next start); a kill after it is completed at the next start. Either way resume
sees every task at one and the same epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pillsnap.engine.early_stopping import judge_epoch, new_early_stopping_state
from pillsnap.engine.spec import TaskSpec
from pillsnap.utils import read_json, save_ckpt, save_json
from pillsnap.utils.io import fsync_path

LOGGER = logging.getLogger(__name__)
JOURNAL = ".commit.json"
# In a checkpoint's task_state: the validation metrics of an epoch the stage's time cap cut short, whose weights a
# best checkpoint may hold while the history records that epoch only once it is finished (by a resume); that
# epoch's record then keeps them under this key, in the task's entry, for later resumes to replay
CUT_SHORT_METRICS = "cut_short_metrics"


class Save(NamedTuple):
    """One task's state in a generation: written once under kinds[0], linked under the other kinds and under the
    aliases of those kinds (the task spec's checkpoint_aliases, e.g. last.pt / best.pt)."""

    task: str
    kinds: tuple[str, ...]
    state: dict
    aliases: Mapping[str, str] = {}


def ckpt_path(ckpt_dir: str | Path, task: str, kind: str) -> Path:
    """{ckpt_dir}/{task}_{kind}.pt (kind: last | best | emergency)."""
    return Path(ckpt_dir) / f"{task}_{kind}.pt"


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src`: a hard link, or a copy where the file system has none (FAT, some
    network shares). Replaces `dst` atomically. Already linked (a rerun of the work after training), nothing is
    done: renaming a second link of one file onto it does nothing, and would leave the temporary link behind."""
    if dst.exists() and os.path.samefile(src, dst):
        return
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
                alias = save.aliases.get(kind)
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


def checkpoint_beside(given: Path, task: str, specs: Sequence[TaskSpec]) -> Path | None:
    """`task`'s checkpoint of the same generation as `given`: the file named like `given` with its task's name
    replaced ({t}_{kind}.pt, stage{N}_{t}_best.pt; an alias such as best.pt stands for its task's file). A file
    that names no task belongs to the task with aliases (the one the plain last.pt/best.pt name)."""
    name = given.name
    for spec in specs:
        for kind, alias in spec.checkpoint_aliases.items():
            if name == alias:
                name = f"{spec.name}_{kind}.pt"
    owner = next((s.name for s in specs if s.name in name), None)
    if owner is None:
        primary = next((s for s in specs if s.checkpoint_aliases), specs[0])
        return given if task == primary.name else None
    return given.with_name(name.replace(owner, task, 1))


def resume_source(resume: Any, ckpt_dir: str | Path, task: str, specs: Sequence[TaskSpec]) -> Path | None:
    """Checkpoint for `task`: train.resume=last -> its last checkpoint; a path -> that file's generation (the
    checkpoint of each task beside it). None (with a warning) when the task has none: it starts fresh."""
    if not resume:
        return None
    if str(resume) == "last":
        path: Path | None = ckpt_path(ckpt_dir, task, "last")
    else:
        given = Path(str(resume))
        if not given.is_file():
            raise FileNotFoundError(f"train.resume points to a missing checkpoint: {given}")
        path = checkpoint_beside(given, task, specs)
    if path is None or not path.is_file():
        LOGGER.warning("train.resume=%s: no %s checkpoint (%s), %s starts fresh", resume, task,
                       path or "none beside it", task)
        return None
    return path


def previous_summary(metrics_json: Path) -> dict:
    """An earlier run's metrics.json ({} when there is none)."""
    return read_json(metrics_json) if metrics_json.is_file() else {}


def previous_history(metrics_json: Path, upto_epoch: int) -> list[dict]:
    """Epoch records of an earlier run, cut at the resumed epoch (later ones are being redone)."""
    history = previous_summary(metrics_json).get("history", [])
    return [h for h in history if int(h.get("epoch", 0)) <= upto_epoch]


def replay_early_stopping(history: list[dict], task: str, monitor: str, mode: str, min_delta: float,
                          tie_break: str | None = None) -> dict:
    """Rebuild the early-stopping state (best, its tie-break metric, bad epochs) from the history so patience
    survives a resume."""
    state = new_early_stopping_state()
    for record in history:
        if task not in record:  # an epoch this task did not train
            continue
        cut = (record[task] or {}).get(CUT_SHORT_METRICS)
        if cut:  # the part of this epoch a time cap had cut short was judged first, live
            judge_epoch(state, cut, monitor, mode, 10**9, min_delta, tie_break)
        judge_epoch(state, record[task] or {}, monitor, mode, 10**9, min_delta, tie_break)  # as the live check does
    return state


def saved_peak_lr(ckpt: dict) -> float | None:
    """The configured peak lr a checkpoint was trained with. Checkpoints from before it was recorded: the
    schedule's base lr, unless OOM recovery had scaled it (then unknown)."""
    recorded = (ckpt.get("task_state") or {}).get("peak_lr")
    if recorded is not None:
        return float(recorded)
    if (ckpt.get("oom_state") or {}).get("sched_mode") == "by_samples":
        return None
    return float(ckpt["scheduler_state"]["base_lrs"][0])


def same_generation(resume: Any, found: dict[str, tuple[Path, dict]],
                    logger: logging.Logger) -> dict[str, tuple[Path, dict]]:
    """The checkpoints to restore of those `found` per task: with train.resume=PATH (`resume`), the tasks' files of
    that file's epoch only.

    `best` files of two tasks are rarely of one epoch; restoring both would give one task a schedule and an
    early-stopping history of epochs its weights never saw. A task whose file is of another epoch starts fresh
    (with a warning naming both epochs); a path to a last file (last.pt, TASK_last.pt) or train.resume=last keep
    every task."""
    if str(resume) == "last" or len(found) < 2:
        return found
    given = Path(str(resume)).resolve()
    if given.name == "last.pt" or given.name.endswith("_last.pt"):
        return found
    # best.pt is a hard link to a task's best file: the same file, though no path resolves to the other
    anchor = next((ckpt for path, ckpt in found.values() if _same_file(path, given)), None)
    if anchor is None:
        return found
    kept = {}
    for name, (path, ckpt) in found.items():
        if int(ckpt["epoch"]) == int(anchor["epoch"]):
            kept[name] = (path, ckpt)
        else:
            logger.warning("%s is from epoch %d, not epoch %d like %s: %s starts fresh (resume from the last "
                           "checkpoints, or their last files, to keep every task)", path, int(ckpt["epoch"]),
                           int(anchor["epoch"]), given.name, name)
    return kept


def earlier_run(ckpt_dir: Path) -> str | None:
    """What an earlier run left in `ckpt_dir` ("stage 1's run, trained to epoch 12"), None when it holds no last
    checkpoint: a fresh run there replaces its checkpoints, classes.json and reports as it goes."""
    from pillsnap.utils import load_ckpt

    found = sorted(ckpt_dir.glob("*_last.pt")) if ckpt_dir.is_dir() else []
    for path in found:
        try:
            ckpt = load_ckpt(path, mmap=True)
        except (OSError, ValueError, RuntimeError):
            continue
        stage = ((((ckpt.get("config_snapshot") or {}).get("data") or {}).get("progressive_validation") or {})
                 .get("current_stage"))
        label = "an earlier run" if stage is None else f"stage {stage}'s run"
        return f"{label}, trained to epoch {int(ckpt.get('epoch') or 0)}"
    return f"checkpoints of an earlier run ({found[0].name})" if found else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone: not the same file
        return a.resolve() == b.resolve()


def resumed_progress(ckpts: dict[str, dict], start_epoch: int, logger: logging.Logger) -> Any:
    """The position inside the next epoch (pillsnap.engine.loop.EpochProgress) that the restored checkpoints
    `ckpts` were saved at (Trainer.save_progress), when every task it names was restored from one and the same
    save; else None (the epoch after `start_epoch` starts over)."""
    from pillsnap.engine.loop import EpochProgress

    saved = next((c["progress"] for c in ckpts.values() if c.get("progress")), None)
    if saved is None:
        return None
    progress = EpochProgress.from_dict(saved)
    whole = all(name in ckpts and same_save(ckpts[name].get("progress"), saved) for name in progress.drawn)
    if progress.epoch != start_epoch + 1 or not whole:
        logger.warning("the checkpoints' position inside epoch %d is not theirs all (another save's, or of another "
                       "epoch than %d): epoch %d starts over", progress.epoch, start_epoch + 1, start_epoch + 1)
        return None
    return progress


def same_save(a: dict | None, b: dict) -> bool:
    """Whether two checkpoints' positions come from one save. Compared as JSON text: a NaN loss is not equal to
    itself but reads the same; the random states (tensors, each file its own copy) are left out."""
    return a is not None and _position_text(a) == _position_text(b)


def _position_text(progress: dict) -> str:
    return json.dumps({k: v for k, v in progress.items() if k != "rng"}, sort_keys=True)
