"""Out-of-memory policies: the recovery state machine, the auto batch search, fake OOM injection, and the recovery
a DDP run saves for its restart.

Policies are pure: plain values in, a decision out. The tasks apply decisions; the loop sleeps the cooldown and
catches only out-of-memory errors (`utils.torch_utils.is_out_of_memory`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pillsnap.utils.io import read_json, save_json
from pillsnap.utils.torch_utils import cuda_peak_ratio, is_out_of_memory, release_cuda_cache

LOGGER = logging.getLogger(__name__)
# Comma-separated micro-step numbers (0-based, counted per task over the whole run) at which a
# torch.OutOfMemoryError is raised once each: exercises the recovery path on CPU.
FAKE_OOM_ENV = "PILLSNAP_FAKE_OOM_STEPS"
# "N" or "N,M": auto batch trials above N images (above M under fp16) raise torch.OutOfMemoryError, as a GPU of
# that size would: exercises the batch search on CPU.
FAKE_OOM_BATCH_ENV = "PILLSNAP_FAKE_OOM_MAX_BATCH"


@dataclass(frozen=True)
class OomDecision:
    """What to do after an OOM. batch_size/grad_accum are the new knobs for the two re-batching actions."""

    action: str
    retries: int
    batch_size: int = 0
    grad_accum: int = 0
    lr_scale: float = 1.0  # global_batch_change: the learning rate follows the global batch (linear rule)
    reason: str = ""
    global_batch_before: int = 0  # the re-batching actions: batch_size x grad_accum before them

    def describe(self) -> str:
        """One log line, in the design's words for the recovery log."""
        g_old, g_new = self.global_batch_before, self.batch_size * self.grad_accum
        if self.action == "amp_fp16":
            return "OOM Recovery S1: Escalating to fp16 (preserving schedules)"
        if self.action == "microbatching":
            return (f"OOM Recovery S2: Microbatching bs={self.batch_size}, accum={self.grad_accum} "
                    f"(global batch preserved: {g_old or g_new})")
        if self.action == "global_batch_change":
            return (f"OOM Recovery S3: Global batch change G_old={g_old or '?'}→G_new={g_new}, "
                    f"lr_scale={self.lr_scale:.4f}, by_samples scheduling")
        return f"OOM Recovery: giving up after {self.retries - 1} retries ({self.reason or 'max_retries'})"


def oom_recovery_state_machine(retries: int, current_state: Mapping[str, Any], oom_cfg: Mapping[str, Any]
                               ) -> OomDecision:
    """Decide the next recovery step after an OOM.

    current_state: {"batch_size", "grad_accum", "did_amp_escalate", "fp16_saves_memory"}; oom_cfg: the train.oom
    section. Order: give up after max_retries; S1 train in fp16 autocast, once, where that saves memory (a task in
    fp32 on a device that autocasts: bf16 and fp16 activations are the same size, so a task already in either
    gains nothing); S2 halve the micro-batch and raise accumulation so the global batch is kept; S3 (accumulation
    capped) a smaller global batch with the learning rate scaled linearly and the schedule stepped by samples.
    """
    retries += 1
    if retries > int(oom_cfg["max_retries"]):
        return OomDecision("emergency_exit", retries)
    if (oom_cfg.get("escalate_to_fp16") and not current_state.get("did_amp_escalate")
            and current_state.get("fp16_saves_memory")):
        return OomDecision("amp_fp16", retries)
    bs, accum = int(current_state["batch_size"]), int(current_state["grad_accum"])
    min_bs, max_accum = int(oom_cfg["min_batch"]), int(oom_cfg["max_grad_accum"])
    g_old = bs * accum
    bs_new = max(bs // 2, min_bs)
    accum_new = min(math.ceil(g_old / bs_new), max_accum)
    g_new = bs_new * accum_new
    if g_new == g_old and (bs_new, accum_new) != (bs, accum):
        return OomDecision("microbatching", retries, bs_new, accum_new, global_batch_before=g_old)
    if g_new >= g_old:
        # Nothing smaller is allowed (min_batch and max_grad_accum reached): recovery cannot help.
        return OomDecision("emergency_exit", retries, reason=f"min_batch={min_bs} and max_grad_accum={max_accum} "
                                                             "reached")
    return OomDecision("global_batch_change", retries, bs_new, accum_new, lr_scale=g_new / g_old,
                       global_batch_before=g_old)


# Under DDP a rank that runs out of memory cannot replay its step alone (see engine.loop.RankOutOfMemory): the run
# stops, and where recovery had brought the knobs waits in this file, beside the checkpoints, for the restart to
# apply on every rank.
RECOVERY_FILE = "oom_recovery.json"


@dataclass(frozen=True)
class SavedRecovery:
    """Where OOM recovery had brought a task's knobs when a DDP run stopped, relative to the checkpoint its restart
    resumes: `made_for` are that checkpoint's knobs (epoch `epoch`; 0 before the first), `knobs` the ones to train
    with, `lr_scale` the learning-rate scale they bring (all recoveries since that checkpoint together), `retries`
    the recoveries so far (they count towards max_retries). Whole states, not single steps: a restart that runs out
    of memory again before the next checkpoint saves the state both recoveries reached."""

    task: str
    made_for: dict[str, Any]
    knobs: dict[str, Any]
    lr_scale: float
    retries: int
    epoch: int
    rank: int
    gave_up: bool = False  # recovery gave up (max_retries, nothing left to shrink): a restart cannot mend it

    def decisions(self) -> list[OomDecision]:
        """The recovery steps that take knobs `made_for` to `knobs`: fp16 first, then one re-batching."""
        steps = []
        if self.knobs.get("did_amp_escalate") and not self.made_for.get("did_amp_escalate"):
            steps.append(OomDecision("amp_fp16", self.retries))
        bs, accum = int(self.knobs["batch_size"]), int(self.knobs["grad_accum"])
        bs_was, accum_was = int(self.made_for["batch_size"]), int(self.made_for["grad_accum"])
        if (bs, accum) != (bs_was, accum_was):
            action = "microbatching" if bs * accum == bs_was * accum_was else "global_batch_change"
            steps.append(OomDecision(action, self.retries, bs, accum, lr_scale=self.lr_scale,
                                     global_batch_before=bs_was * accum_was))
        return steps


def recovered_state(decision: OomDecision, knobs: Mapping[str, Any], lr_scale: float) -> tuple[dict[str, Any], float]:
    """The knobs and the learning-rate scale after `decision` is applied to `knobs` (reached with `lr_scale`)."""
    after = dict(knobs)
    if decision.action == "amp_fp16":
        after["did_amp_escalate"] = True
    elif decision.action in ("microbatching", "global_batch_change"):
        after.update(batch_size=decision.batch_size, grad_accum=decision.grad_accum)
    if decision.action == "global_batch_change":
        lr_scale *= decision.lr_scale
    return after, lr_scale


def save_recovery(ckpt_dir: str | Path, saved: SavedRecovery) -> Path:
    """Write (atomically) `saved` for its task, keeping any other task's."""
    path = Path(ckpt_dir) / RECOVERY_FILE
    tasks = read_json(path).get("tasks", {}) if path.is_file() else {}
    tasks[saved.task] = {k: v for k, v in asdict(saved).items() if k != "task"}
    save_json(path, {"tasks": tasks})
    return path


def load_recovery(ckpt_dir: str | Path) -> dict[str, SavedRecovery]:
    """The saved states by task; {} when there is no file (ValueError naming the file when it is broken)."""
    path = Path(ckpt_dir) / RECOVERY_FILE
    if not path.is_file():
        return {}
    try:
        return {name: SavedRecovery(task=name, made_for=dict(entry["made_for"]), knobs=dict(entry["knobs"]),
                                    lr_scale=float(entry["lr_scale"]), retries=int(entry["retries"]),
                                    epoch=int(entry["epoch"]), rank=int(entry["rank"]),
                                    gave_up=bool(entry.get("gave_up", False)))
                for name, entry in read_json(path)["tasks"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not an OOM recovery file ({err!r}); delete it to start without it") from err


@dataclass(frozen=True)
class BatchChoice:
    """The result of the auto batch search: micro-batch, accumulation, whether fp16 was forced, and the trials."""

    batch_size: int
    grad_accum: int = 1
    force_fp16: bool = False
    trials: list[tuple[int, bool, str]] = field(default_factory=list)  # (batch, fp16, "fits"|"oom"|"over headroom")
    configured: int | None = None  # the batch the config asked for before the search wrote its pick there


def _try(trial: Callable[[int, bool], Any], bs: int, fp16: bool, headroom: float, mem_ratio: Callable[[], float],
         empty_cache: Callable[[], None], log: list) -> bool:
    try:
        trial(bs, fp16)
        ratio: float | None = mem_ratio()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        ratio = None  # cleaned up below: until this block ends, the traceback keeps the trial's tensors alive
    empty_cache()  # the next trial starts from an empty cache and its own peak: this trial's blocks are not its own
    if ratio is None:
        log.append((bs, fp16, "oom"))
        LOGGER.info("auto batch: bs=%d fp16=%s -> OOM", bs, fp16)
        return False
    fits = ratio <= headroom
    log.append((bs, fp16, "fits" if fits else "over headroom"))
    LOGGER.info("auto batch: bs=%d fp16=%s -> memory %.0f%% at its peak (%s)", bs, fp16, 100 * ratio,
                "fits" if fits else f"over the {100 * headroom:.0f}% headroom")
    return fits


def auto_find_batch_size(
    trial: Callable[[int, bool], Any],
    init_bs: int,
    min_bs: int = 1,
    max_bs: int | None = None,
    amp_force_fp16: bool = False,
    headroom: float = 0.88,
    max_grad_accum: int = 1,
    mem_ratio: Callable[[], float] | None = None,
    empty_cache: Callable[[], None] | None = None,
) -> BatchChoice:
    """The largest batch that `trial(bs, fp16)` runs without OOM within `headroom` of device memory.

    From `init_bs`: on OOM halve down to `min_bs`; when even that fails and `amp_force_fp16` allows it, force fp16
    and search again from `init_bs`. A batch that fits at `init_bs` is doubled while it fits (up to `max_bs`,
    default 4 x init_bs). A batch below `init_bs` gets accumulation (up to `max_grad_accum`) so the global batch
    stays near `init_bs`. Raises RuntimeError when nothing fits.

    `empty_cache` runs before the first trial and after every trial (by default: free the cache, start a new peak)
    and `mem_ratio` reads the trial's peak share of device memory (by default the peak reserved).
    """
    mem_ratio = mem_ratio or cuda_peak_ratio
    empty_cache = empty_cache or release_cuda_cache
    empty_cache()
    max_bs = max_bs or init_bs * 4
    start = max(min(init_bs, max_bs), min_bs)
    log: list[tuple[int, bool, str]] = []
    for fp16 in (False, True) if amp_force_fp16 else (False,):
        bs = start
        while not _try(trial, bs, fp16, headroom, mem_ratio, empty_cache, log):
            if bs <= min_bs:
                break
            bs = max(bs // 2, min_bs)
        else:
            if bs == start:
                while bs < max_bs and _try(trial, min(bs * 2, max_bs), fp16, headroom, mem_ratio, empty_cache, log):
                    bs = min(bs * 2, max_bs)
            accum = min(max(math.ceil(init_bs / bs), 1), max(max_grad_accum, 1))
            LOGGER.info("auto batch: chose bs=%d grad_accum=%d fp16=%s after %d trials", bs, accum, fp16, len(log))
            return BatchChoice(bs, accum, fp16, log)
    raise RuntimeError(f"auto batch: even min_bs={min_bs} does not fit (fp16 tried: {amp_force_fp16}); "
                       "lower model.image_size or use a smaller model")


class FakeOOM:
    """Raises torch.OutOfMemoryError at chosen micro-steps (once each) or above a batch size (drill hooks)."""

    def __init__(self, steps: set[int] | None = None, max_batch: tuple[int, int] | None = None) -> None:
        self.steps = set(steps or ())
        self.max_batch = max_batch

    @classmethod
    def from_env(cls) -> FakeOOM:
        return cls(_int_set(FAKE_OOM_ENV), _batch_limits(FAKE_OOM_BATCH_ENV))

    def check(self, step: int) -> None:
        if step in self.steps:
            self.steps.discard(step)
            raise torch.OutOfMemoryError(f"fake CUDA out of memory injected at micro-step {step}")

    def check_batch(self, batch_size: int, fp16: bool) -> None:
        if self.max_batch and batch_size > self.max_batch[1 if fp16 else 0]:
            raise torch.OutOfMemoryError(f"fake CUDA out of memory: batch {batch_size} (fp16={fp16})")


def _ints(name: str) -> list[int]:
    raw = os.environ.get(name, "").strip()
    try:
        return [int(s) for s in raw.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"{name} must be comma-separated integers, got {raw!r}") from err


def _int_set(name: str) -> set[int]:
    steps = set(_ints(name))
    if steps:
        LOGGER.warning("Fake OOM injection armed at micro-steps %s", sorted(steps))
    return steps


def _batch_limits(name: str) -> tuple[int, int] | None:
    limits = _ints(name)
    if not limits:
        return None
    LOGGER.warning("Fake OOM injection armed for auto batch trials above %s", limits)
    return limits[0], limits[-1]
