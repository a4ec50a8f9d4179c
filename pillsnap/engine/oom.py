"""OOM policies: the recovery state machine (seed D-8 / Annex 6), auto batch search (Annex 1), fake OOM injection.

Policies are pure: plain values in, a decision dict out. The trainer applies decisions, sleeps the
cooldown, and catches only torch.OutOfMemoryError.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

LOGGER = logging.getLogger(__name__)
# Comma-separated classification micro-step numbers (0-based, counted over the whole run) at which a
# torch.OutOfMemoryError is raised once each: exercises the recovery path on CPU.
FAKE_OOM_ENV = "PILLSNAP_FAKE_OOM_STEPS"


def oom_recovery_state_machine(retries: int, current_state: Mapping[str, Any], oom_cfg: Mapping[str, Any]) -> dict:
    """Decide the next recovery step after an OOM.

    current_state: {"batch_size", "grad_accum", "did_amp_escalate"}; oom_cfg: the train.oom section.
    Returns {"action", "retries", ...}: "emergency_exit" after max_retries; S1 "amp_fp16" once;
    S2 "microbatching" (global batch kept); S3 "global_batch_change" (linear LR scaling, by-samples schedule).
    """
    retries += 1
    if retries > int(oom_cfg["max_retries"]):
        return {"action": "emergency_exit", "save_checkpoint": True, "retries": retries}
    bs, accum = int(current_state["batch_size"]), int(current_state["grad_accum"])
    min_bs, max_accum = int(oom_cfg["min_batch"]), int(oom_cfg["max_grad_accum"])
    g_old = bs * accum
    if oom_cfg.get("escalate_to_fp16") and not current_state.get("did_amp_escalate"):
        return {"action": "amp_fp16", "preserve_schedules": True, "retries": retries,
                "next_state": {**current_state, "did_amp_escalate": True}}
    bs_new = max(bs // 2, min_bs)
    if accum < max_accum:
        accum_new = min(math.ceil(g_old / bs_new), max_accum)
        if bs_new * accum_new == g_old and (bs_new, accum_new) != (bs, accum):
            return {"action": "microbatching", "batch_size": bs_new, "grad_accum": accum_new,
                    "preserve_schedules": True, "replay_batch": True, "retries": retries}
    accum_new = min(max_accum, math.ceil(g_old / bs_new))
    g_new = bs_new * accum_new
    if g_new >= g_old:
        # Nothing smaller is allowed (min_batch and max_grad_accum reached): recovery cannot help.
        return {"action": "emergency_exit", "save_checkpoint": True, "retries": retries,
                "reason": f"min_batch={min_bs} and max_grad_accum={max_accum} reached"}
    lr_scale = g_new / g_old
    steps_ratio = g_old / g_new
    return {
        "action": "global_batch_change", "batch_size": bs_new, "grad_accum": accum_new, "lr_scale": lr_scale,
        # AdamW decays by lr*wd per step: with the linear LR rule and steps_ratio x more steps the per-epoch
        # decay is already kept, so wd_scale is 1 (the seed's G_old/G_new would double the total decay).
        "wd_scale": 1.0 / (lr_scale * steps_ratio), "steps_per_epoch_ratio": steps_ratio,
        "scheduler_mode": "by_samples", "replay_batch": True, "retries": retries,
        "audit_log": {"G_old": g_old, "G_new": g_new, "lr_scale": lr_scale},
    }


def describe_decision(decision: Mapping[str, Any]) -> str:
    """One log line for a recovery decision."""
    action = decision["action"]
    if action == "amp_fp16":
        return "OOM Recovery S1: escalating AMP to fp16 (schedules preserved)"
    if action == "microbatching":
        return (f"OOM Recovery S2: micro-batching bs={decision['batch_size']} accum={decision['grad_accum']} "
                "(global batch preserved)")
    if action == "global_batch_change":
        audit = decision["audit_log"]
        return (f"OOM Recovery S3: global batch {audit['G_old']}->{audit['G_new']} lr_scale={audit['lr_scale']:.4f} "
                "by-samples scheduling")
    return f"OOM Recovery: giving up after {decision['retries'] - 1} retries ({decision.get('reason', 'max_retries')})"


def _fits(fn_train_step: Callable[[int], Any], bs: int, headroom: float, mem_ratio: Callable[[], float]) -> bool:
    try:
        fn_train_step(bs)
    except torch.OutOfMemoryError:
        LOGGER.info("auto batch: bs=%d -> OOM", bs)
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratio = mem_ratio()
    LOGGER.info("auto batch: bs=%d fits (memory %.0f%%)", bs, 100 * ratio)
    return ratio <= headroom


def auto_find_batch_size(
    fn_train_step: Callable[[int], Any],
    init_bs: int,
    min_bs: int = 1,
    max_bs: int | None = None,
    amp_force_fp16: bool = False,
    headroom: float = 0.88,
    mem_ratio: Callable[[], float] | None = None,
) -> int:
    """Largest batch in [min_bs, max_bs] for which `fn_train_step(bs)` runs without OOM within `headroom` (Annex 1).

    Halves from `init_bs` until a batch fits, then doubles while it still fits (bounded by max_bs,
    default init_bs*4). `amp_force_fp16` is recorded for the caller's log: fn_train_step owns precision.
    """
    from pillsnap.utils import cuda_mem_ratio

    mem_ratio = mem_ratio or cuda_mem_ratio
    max_bs = max_bs or init_bs * 4
    bs = max(min(init_bs, max_bs), min_bs)
    while not _fits(fn_train_step, bs, headroom, mem_ratio):
        if bs <= min_bs:
            raise RuntimeError(f"auto batch: even min_bs={min_bs} does not fit (amp_force_fp16={amp_force_fp16})")
        bs = max(bs // 2, min_bs)
    while bs < max_bs:
        trial = min(bs * 2, max_bs)
        if not _fits(fn_train_step, trial, headroom, mem_ratio):
            break
        bs = trial
    LOGGER.info("auto batch: chose bs=%d (range %d..%d, fp16=%s)", bs, min_bs, max_bs, amp_force_fp16)
    return bs


class FakeOOM:
    """Raises torch.OutOfMemoryError at chosen micro-step numbers, once each (test and drill hook)."""

    def __init__(self, steps: set[int] | None = None) -> None:
        self.steps = set(steps or ())

    @classmethod
    def from_env(cls) -> FakeOOM:
        raw = os.environ.get(FAKE_OOM_ENV, "").strip()
        try:
            steps = {int(s) for s in raw.split(",") if s.strip()}
        except ValueError as err:
            raise ValueError(f"{FAKE_OOM_ENV} must be comma-separated integers, got {raw!r}") from err
        if steps:
            LOGGER.warning("Fake OOM injection armed at classification micro-steps %s", sorted(steps))
        return cls(steps)

    def check(self, step: int) -> None:
        if step in self.steps:
            self.steps.discard(step)
            raise torch.OutOfMemoryError(f"fake CUDA out of memory injected at micro-step {step}")
