"""`pillsnap monitor --terminal`: the dashboard's snapshot as a rich table, for a shell without a browser."""

from __future__ import annotations

import time

from rich.table import Table

VAL_SHOWN = {"classification": ("acc", "macro_f1", "top5"), "detection": ("mAP@0.5", "mAP@0.5:0.95", "recall")}


def duration(seconds: float | None) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def number(value: object, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value if value is not None else "—")


# How long after an end record torchrun's restart may take to start the trainer again (its new rank 0 takes the
# folder early in its start) before the job counts as stopped: a restart that fails before its start record (a
# set-up error, a rendezvous that never completes, torchrun killed) left the run "restarting" for good.
RESTART_GRACE_S = 300.0


def _trainer_ended(snap: dict) -> bool:
    """The process that held the folder for training has ended (where the folder names one on this machine)."""
    trainer = snap.get("trainer")
    return bool(trainer) and trainer.get("alive") is False


def trainer_gone(snap: dict, now: float | None = None) -> bool:
    """The stream says "running" but the process that held the folder for training has ended (no end record), or
    torchrun's restart, expected after an end record, has not come within RESTART_GRACE_S."""
    run = snap["run"]
    if run["status"] == "restarting":
        return _trainer_ended(snap) and (now or time.time()) - (run.get("ended") or 0) > RESTART_GRACE_S
    return run["status"] == "running" and _trainer_ended(snap) and not restart_may_come(snap, now)


def restart_may_come(snap: dict, now: float | None = None) -> bool:
    """The trainer ended without an end record while torchrun has restarts left, within RESTART_GRACE_S of its last
    record: how an OOM on another rank ends rank 0 under NCCL (it waits in a collective until torchrun kills it),
    before torchrun starts the job again."""
    run = snap["run"]
    return (run["status"] == "running" and _trainer_ended(snap)
            and int(run.get("restart") or 0) < int(run.get("max_restarts") or 0)
            and (now or time.time()) - (run.get("last_time") or 0) <= RESTART_GRACE_S)


def after_training_under_way(snap: dict) -> bool:
    """Whether the work after training goes on: a step started (neither done nor failed) and its process, where
    the folder names it, alive; or a step that failed while the trainer still holds the folder (each step fails
    alone: the next one comes)."""
    after, trainer = snap["run"].get("after"), snap.get("trainer")
    if not after or _trainer_ended(snap):
        return False
    return not after.get("failed") or bool(trainer and trainer.get("alive") is True)


def title(snap: dict) -> str:
    run, evaluation = snap["run"], snap["evaluation"]
    age = time.time() - run["last_time"] if run["last_time"] else None
    after = run.get("after")
    decision = "pending"
    if after_training_under_way(snap):
        decision = f"pending (after training: {after['step']})"
    elif after and after.get("failed"):
        decision = f"none (the work after training failed at {after['step']})"
    elif run.get("after_failed"):
        decision = f"none (the work after training failed at {', '.join(run['after_failed'])})"
    if evaluation:  # the one verdict: decision and recommendation of the same evaluation
        decision = evaluation.get("status", "?") + (f" ({evaluation['recommendation']})"
                                                    if evaluation.get("recommendation") else "")
        if run.get("after_failed"):
            decision += f"; the work after training failed at {', '.join(run['after_failed'])}"
    status, gone, again = run["status"], trainer_gone(snap), run.get("restarting")
    if gone and again:
        status = f"stopped (torchrun's restart {again['next']} has not come)"
    elif gone:  # killed or crashed: no end record
        status = f"stopped (the trainer, pid {snap['trainer']['pid']}, has ended without an end record)"
    elif again:
        status = f"restarting (after {again['after']}: torchrun's restart {again['next']} of {again['max']})"
    elif restart_may_come(snap):
        status = (f"restarting? (the trainer ended without an end record; torchrun may start the job again: restart "
                  f"{int(run.get('restart') or 0) + 1} of {run['max_restarts']})")
    eta = duration(run["eta"])
    if run["eta"] is not None and run.get("eta_waiting"):  # a lower bound: a task with no step yet has no pace
        eta = f">= {eta} (not counting {', '.join(run['eta_waiting'])}: no step yet)"
    return (f"PillSnap {snap['exp']}: {status}  stage {run['stage'] or '—'}  ETA {eta}"
            f"{'' if gone else cap_note(run)}  Go/No-Go {decision}  OOM {len(snap['oom'])}  "
            f"last record {duration(age)} ago")


def cap_note(run: dict, now: float | None = None) -> str:
    """What the stage's time cap says beside the ETA of a running run: when it comes first, that it ends the run
    (an 8 or 48 h cap, an ETA past it, and nothing said until the verdict), else how long is left on it."""
    limit, started = run.get("time_limit_s"), run.get("started")
    if limit is None or started is None or run.get("status") != "running":
        return ""
    now = time.time() if now is None else now
    left = limit - (run.get("elapsed_before") or 0.0) - (now - started)
    eta = run.get("eta")
    if eta is not None and eta - (now - (run.get("last_time") or now)) > left:
        return f" (the {duration(limit)} time cap ends it first, in {duration(max(left, 0.0))})"
    return f" (time cap in {duration(max(left, 0.0))})"


def _job_rate(rank0: object, snap: dict) -> object:
    """The job's images a second: the step records are rank 0's, and DDP's ranks step together on equal batches."""
    ranks = int(snap["run"].get("world_size") or 1)
    return rank0 * ranks if isinstance(rank0, (int, float)) else rank0


def render(snap: dict) -> Table:
    table = Table(title=title(snap))
    for col in ("task", "epoch", "step", "loss", "lr", "img/s", "data %", "validation", "ETA"):
        table.add_column(col, justify="left" if col in ("task", "validation") else "right")
    for name, task in snap["tasks"].items():
        last, val = task["last"], task["last_val"] or {}
        total = (last.get("data_time") or 0) + (last.get("compute_time") or 0)
        shown = " ".join(f"{k}={number(val[k], '.3f')}" for k in VAL_SHOWN.get(name, ()) if k in val)
        table.add_row(name, f"{task['epoch'] or '—'}/{task['max_epochs'] or '—'}",
                      f"{task['step'] or '—'}/{task['steps'] or '—'}", number(last.get("loss")),
                      number(last.get("lr"), ".2e"), number(_job_rate(last.get("throughput"), snap), ".1f"),
                      f"{100 * last['data_time'] / total:.0f}" if total else "—", shown or "—",
                      "done" if task["finished"] else "stopped" if trainer_gone(snap) else duration(task["eta"]))
    if not snap["tasks"]:
        table.add_row("waiting for the first step…", *[""] * 8)
    return table
