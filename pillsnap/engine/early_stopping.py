"""Early stopping as a policy on plain values, plus the Stage 1 time-cap success rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def new_early_stopping_state() -> dict:
    """Initial state for early_stopping: no best yet (nor its tie-break metric), no bad epochs."""
    return {"best": None, "tie_break": None, "bad_epochs": 0}


def is_improvement(metric: float, best: float | None, mode: str, min_delta: float) -> bool:
    """True when `metric` beats `best` by more than `min_delta` in direction `mode` ("max" | "min")."""
    if mode not in ("max", "min"):
        raise ValueError(f"early_stopping mode must be 'max' or 'min', got {mode!r}")
    if metric is None or math.isnan(metric):
        return False
    if best is None:
        return True
    return metric > best + min_delta if mode == "max" else metric < best - min_delta


def early_stopping(
    state: dict, metric: float, mode: str = "max", patience: int = 7, min_delta: float = 0.0,
    tie_break: float | None = None,
) -> tuple[bool, bool]:
    """Record one epoch's `metric` in `state` (updated in place); return (stop, is_best).

    stop is True once `patience` consecutive epochs passed without improvement. `tie_break`: a second metric in the
    same direction that decides between epochs whose `metric` is no worse than the best's but short of improving on
    it by `min_delta` (a detector's mAP@0.5 reaches 1.0 on a small validation set while its boxes still tighten);
    beating the best's by `min_delta` counts as an improvement. A lower `metric` never wins.
    """
    best = state.get("best")
    improved = is_improvement(metric, best, mode, min_delta)
    no_worse = best is not None and (metric >= best if mode == "max" else metric <= best)  # False for NaN
    if not improved and tie_break is not None and no_worse:
        improved = is_improvement(tie_break, state.get("tie_break"), mode, min_delta)
    if improved:
        state["best"], state["bad_epochs"] = float(metric), 0
        state["tie_break"] = None if tie_break is None or math.isnan(tie_break) else float(tie_break)
    else:
        state["bad_epochs"] = int(state.get("bad_epochs", 0)) + 1
    return state["bad_epochs"] >= patience, improved


def judge_epoch(state: dict, metrics: Mapping[str, Any], monitor: str, mode: str, patience: int, min_delta: float,
                tie_break: str | None = None) -> tuple[bool, bool]:
    """early_stopping on one epoch's validation `metrics` (live, or a history record replayed on resume): `monitor`
    missing is no improvement (NaN); the `tie_break` metric missing decides nothing."""
    value = metrics.get(monitor)
    second = metrics.get(tie_break) if tie_break else None
    return early_stopping(state, float("nan") if value is None else float(value), mode, patience, min_delta,
                          None if second is None else float(second))


def describe_best(state: Mapping[str, Any], monitor: str, tie_break: str | None = None) -> str:
    """The best epoch's value for a log line: "mAP@0.5 best 1.0000 (mAP@0.5:0.95 0.9170)", the tie-break metric
    shown where it was recorded (epochs tied on the monitored metric were told apart by it)."""
    best, second = state.get("best"), state.get("tie_break")
    if best is None:
        return f"{monitor} best none (never measured)"
    return f"{monitor} best {best:.4f}" + (f" ({tie_break} {second:.4f})" if tie_break and second is not None else "")


def time_cap_reached(elapsed_s: float, time_limit_hours: float | None) -> bool:
    """Whether the stage's wall-clock cap is spent (a missing or non-positive cap never triggers)."""
    return bool(time_limit_hours) and time_limit_hours > 0 and elapsed_s >= time_limit_hours * 3600.0


def time_cap_success(stage_cfg: Mapping[str, Any], samples_seen: int, classes_seen: int) -> dict:
    """The design's Stage 1 time-cap rule: a time-capped run still passes when allowed and the minimums hold."""
    min_samples = int(stage_cfg.get("min_samples_required", 0) or 0)
    min_classes = int(stage_cfg.get("min_class_coverage", 0) or 0)
    reasons = []
    if not stage_cfg.get("allow_success_on_time_cap", False):
        reasons.append("TIME_CAP_SUCCESS_NOT_ALLOWED")
    if samples_seen < min_samples:
        reasons.append(f"SAMPLES_{samples_seen}_BELOW_{min_samples}")
    if classes_seen < min_classes:
        reasons.append(f"CLASSES_{classes_seen}_BELOW_{min_classes}")
    return {"success": not reasons, "samples_seen": samples_seen, "classes_seen": classes_seen, "reasons": reasons}
