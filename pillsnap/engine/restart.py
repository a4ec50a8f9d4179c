"""What a torchrun restart resumes. torchrun --max-restarts starts every rank again after a failure (an OOM under
DDP stops the run on purpose: engine.loop.RankOutOfMemory); each restart must go on from the checkpoints this job
wrote, and from none an older run left in the folder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pillsnap.engine import checkpointing as ck
from pillsnap.engine.distributed import DistInfo, all_ranks, broadcast_object
from pillsnap.utils.io import read_json, save_json


def restart_count() -> int:
    """How many times torchrun has restarted this job's processes (0: its first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    """How many restarts torchrun allows this job (its --max-restarts; 0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) if "TORCHELASTIC_RUN_ID" in os.environ else 0


JOB_MARKER = "torchrun_job.json"  # beside the checkpoints: when this torchrun job first started, and its run id


def mark_torchrun_job(ckpt_dir: Path) -> None:
    """At a torchrun job's first start (rank 0): note when it began, so that its restarts can tell the checkpoints
    it wrote from those an older run left in the folder (both written by this machine's clock)."""
    save_json(ckpt_dir / JOB_MARKER, {"run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "started": time.time()})


def torchrun_job_started(ckpt_dir: Path) -> float | None:
    """When this torchrun job first started (its marker, same run id), or None when no marker of it is there."""
    path = ckpt_dir / JOB_MARKER
    try:
        marker = read_json(path)
        if marker.get("run_id") != os.environ.get("TORCHELASTIC_RUN_ID"):
            return None
        return float(marker["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_for_restart(resume: Any, ckpt_dir: Path, job_started: float | None) -> tuple[Any, str]:
    """train.resume for a torchrun restart, and why: `last` when last checkpoints were written since the job began
    (the restart goes on from them, whatever the first start resumed); otherwise what was configured, so that a
    fresh run that failed before its first checkpoint starts fresh again rather than resuming files an older run
    left in the folder (also when the job's start is unknown: then it wrote nothing yet)."""
    if job_started is None:
        return resume, f"no mark of this job's first start in {ckpt_dir}: train.resume={resume} as configured"
    written = [p.stat().st_mtime for p in ckpt_dir.glob("*_last.pt")] if ckpt_dir.is_dir() else []
    if written and max(written) >= job_started:
        return "last", "resuming the last checkpoints this job wrote (train.resume=last), not starting over"
    if written:
        return resume, (f"the last checkpoints in {ckpt_dir} are older than this job: keeping train.resume="
                        f"{resume} ({'a fresh start' if not resume else 'as configured'})")
    return resume, f"no checkpoint written yet: train.resume={resume} as configured"


# torchrun's agent shares its rendezvous store with the ranks; on a restart a rank can read an address the previous
# attempt left there and never connect (pytorch/pytorch#135712, #167288). One store per attempt avoids it; the
# agent reads this variable, so it must be set for the torchrun command itself.
SEPARATE_STORES_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def settle_restart(cfg: DictConfig, info: DistInfo, logger: logging.Logger) -> tuple[int, float | None]:
    """Before the trainer starts: on a torchrun restart, set cfg.train.resume as rank 0 decides (after completing
    any checkpoint commit a kill left half done) and log why; at a job's first start, mark it (and warn when its
    restarts could not reconnect). Returns (the restart, 0 at the job's first start, the time before which `last`
    files are an older run's: set only when the restart resumes `last` of its own accord, not when the job was
    started with train.resume=last).

    A restart is one when any rank's torchrun counts it: each node's agent keeps its own count, and a node that
    replaced a failed one starts at 0 while the others count 1. Every rank takes the same branch, so rank 0's
    decision reaches all of them (one rank in the restart's broadcast and another past it waited for good, and a
    rank 0 on the new node would have started the job over, its checkpoints overwritten)."""
    ckpt_dir = Path(cfg.paths.exp_dir) / "checkpoints"
    count = max(all_ranks(info, restart_count()))
    if not count:
        if "TORCHELASTIC_RUN_ID" in os.environ and info.is_main:
            mark_torchrun_job(ckpt_dir)
            if max_restarts() > 0 and os.environ.get(SEPARATE_STORES_ENV) != "1":
                logger.warning("torchrun --max-restarts: its restarts may never reconnect in this PyTorch (a "
                               "restarted rank can read the previous attempt's address from the shared "
                               "rendezvous store); launch with %s=1 torchrun ... (bench/torchrun_restart.py)",
                               SEPARATE_STORES_ENV)
        return 0, None
    configured = cfg.train.resume
    decided = None
    if info.is_main:
        ck.CheckpointStore(ckpt_dir).recover()
        job_started = torchrun_job_started(ckpt_dir)
        decided = (*resume_for_restart(configured, ckpt_dir, job_started), job_started)
        if job_started is None:  # the attempts before wrote nothing (refused at the folder's lock, say): this one
            mark_torchrun_job(ckpt_dir)  # is the job's first to run, and its own restarts must find its mark
    resume, why, job_started = broadcast_object(info, decided)  # every rank resumes the same way
    cfg.train.resume = resume
    logger.warning("torchrun restart %s: %s", count, why)
    return count, job_started if resume == "last" and str(configured) != "last" else None
