"""Pure engine policies: OOM machine, auto batch, early stopping, time cap, interleaving, LR schedule, log line."""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter

import pytest
import torch

from pillsnap.engine.callbacks import format_train_line
from pillsnap.engine.classification import ClassificationTask
from pillsnap.engine.detection import DetectionTask
from pillsnap.engine.early_stopping import (
    describe_best,
    early_stopping,
    new_early_stopping_state,
    time_cap_reached,
    time_cap_success,
)
from pillsnap.engine.interleave import interleave_schedule
from pillsnap.engine.oom import FakeOOM, OomDecision, auto_find_batch_size, oom_recovery_state_machine
from pillsnap.engine.optim import warmup_cosine_factor
from pillsnap.engine.spec import TaskSpec, interleave_shares
from pillsnap.utils import is_out_of_memory

OOM_CFG = {"max_retries": 4, "max_grad_accum": 8, "min_batch": 1, "cooldown_sec": 0, "escalate_to_fp16": True}
LINE = re.compile(r"^\[train\] e=\d+/\d+ s=\d+/\d+ loss=-?\d+\.\d{4} lr=\d\.\d{2}e[+-]\d{2} data=\d+\.\d{3}s "
                  r"comp=\d+\.\d{3}s thr=\d+\.\d/s cuda=\d+MB$")


def run_machine(state: dict, cfg: dict, n: int) -> list[OomDecision]:
    """Feed n consecutive OOMs through the state machine, applying each decision to `state`."""
    decisions, retries = [], 0
    for _ in range(n):
        d = oom_recovery_state_machine(retries, state, cfg)
        retries = d.retries
        decisions.append(d)
        if d.action == "amp_fp16":
            state = {**state, "did_amp_escalate": True}
        elif d.action in ("microbatching", "global_batch_change"):
            state = {**state, "batch_size": d.batch_size, "grad_accum": d.grad_accum}
    return decisions


def test_oom_machine_goes_s1_then_s2_keeping_the_global_batch_then_gives_up():
    state = {"batch_size": 32, "grad_accum": 1, "did_amp_escalate": False, "fp16_saves_memory": True}
    decisions = run_machine(state, OOM_CFG, 5)
    assert [d.action for d in decisions] == ["amp_fp16", "microbatching", "microbatching", "microbatching",
                                             "emergency_exit"]
    assert [(d.batch_size, d.grad_accum) for d in decisions[1:4]] == [(16, 2), (8, 4), (4, 8)]
    assert all(d.batch_size * d.grad_accum == 32 for d in decisions[1:4])
    assert decisions[-1].describe().startswith("OOM Recovery: giving up after 4 retries")


def test_oom_machine_skips_s1_where_fp16_saves_no_memory():
    # a task already in bf16 or fp16 autocast (activations already half size), or one that cannot autocast
    state = {"batch_size": 32, "grad_accum": 1, "did_amp_escalate": False, "fp16_saves_memory": False}
    decisions = run_machine(state, OOM_CFG, 2)
    assert [(d.action, d.batch_size, d.grad_accum) for d in decisions] == [("microbatching", 16, 2),
                                                                           ("microbatching", 8, 4)]


def test_oom_machine_s3_scales_lr_linearly():
    cfg = {**OOM_CFG, "max_retries": 10, "max_grad_accum": 4, "escalate_to_fp16": False}
    decisions = run_machine({"batch_size": 8, "grad_accum": 1}, cfg, 4)
    assert [d.action for d in decisions] == ["microbatching", "microbatching", "global_batch_change",
                                             "emergency_exit"]
    s3 = decisions[2]
    assert (s3.batch_size, s3.grad_accum) == (1, 4) and s3.lr_scale == pytest.approx(0.5)
    assert s3.describe() == ("OOM Recovery S3: Global batch change G_old=8→G_new=4, lr_scale=0.5000, "
                             "by_samples scheduling")
    assert "min_batch" in decisions[3].reason


def test_oom_machine_escalates_to_fp16_only_once():
    state = {"batch_size": 4, "grad_accum": 1, "did_amp_escalate": True}
    assert oom_recovery_state_machine(0, state, OOM_CFG).action == "microbatching"


def test_fake_oom_fires_once_per_listed_step_and_above_a_batch(monkeypatch):
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_STEPS", "2, 5")
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "8,16")
    fake = FakeOOM.from_env()
    fired = []
    for step in range(8):
        try:
            fake.check(step)
        except torch.OutOfMemoryError:
            fired.append(step)
    assert fired == [2, 5]
    fake.check_batch(8, fp16=False)
    fake.check_batch(16, fp16=True)
    for bs, fp16 in ((9, False), (17, True)):
        with pytest.raises(torch.OutOfMemoryError):
            fake.check_batch(bs, fp16)
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_STEPS", "x")
    with pytest.raises(ValueError, match="PILLSNAP_FAKE_OOM_STEPS"):
        FakeOOM.from_env()


def fake_trial(limit: int, fp16_limit: int | None = None):
    """A trial step that runs out of memory above `limit` images (`fp16_limit` under fp16)."""
    tried = []

    def trial(bs: int, fp16: bool) -> None:
        tried.append((bs, fp16))
        if bs > (fp16_limit if fp16 and fp16_limit is not None else limit):
            raise torch.OutOfMemoryError(f"bs {bs}")

    return trial, tried


def test_auto_batch_halves_on_oom_and_raises_accumulation_to_keep_the_global_batch():
    trial, tried = fake_trial(limit=20)
    choice = auto_find_batch_size(trial, init_bs=64, min_bs=1, max_bs=64, max_grad_accum=8, mem_ratio=lambda: 0.1,
                                  empty_cache=lambda: None)
    assert (choice.batch_size, choice.grad_accum, choice.force_fp16) == (16, 4, False)
    assert [bs for bs, _ in tried] == [64, 32, 16]  # no upward search after an OOM at the starting size
    assert [r for *_, r in choice.trials] == ["oom", "oom", "fits"]


def test_auto_batch_searches_upwards_when_the_start_fits():
    trial, tried = fake_trial(limit=100)
    choice = auto_find_batch_size(trial, init_bs=8, max_bs=48, mem_ratio=lambda: 0.1, empty_cache=lambda: None)
    assert (choice.batch_size, choice.grad_accum) == (48, 1) and [bs for bs, _ in tried] == [8, 16, 32, 48]


def test_auto_batch_forces_fp16_before_giving_up():
    trial, tried = fake_trial(limit=0, fp16_limit=4)
    choice = auto_find_batch_size(trial, init_bs=8, min_bs=2, amp_force_fp16=True, max_grad_accum=8,
                                  mem_ratio=lambda: 0.1, empty_cache=lambda: None)
    assert (choice.batch_size, choice.grad_accum, choice.force_fp16) == (4, 2, True)
    assert tried == [(8, False), (4, False), (2, False), (8, True), (4, True)]


def test_auto_batch_respects_headroom_empties_the_cache_and_fails_clearly():
    trial, tried = fake_trial(limit=1000)
    emptied = []
    # Memory share grows with the batch: 64 would run but leave less than 12% headroom.
    choice = auto_find_batch_size(trial, init_bs=8, max_bs=64, headroom=0.88, mem_ratio=lambda: tried[-1][0] / 40,
                                  empty_cache=lambda: emptied.append(1))
    assert choice.batch_size == 32 and choice.trials[-1] == (64, False, "over headroom")
    assert len(emptied) == len(tried) + 1  # before the first trial, then after each (the next one's own peak)
    trial, _ = fake_trial(limit=0)
    with pytest.raises(RuntimeError, match="min_bs=2"):
        auto_find_batch_size(trial, init_bs=8, min_bs=2, amp_force_fp16=True, mem_ratio=lambda: 0.1,
                             empty_cache=lambda: None)


def test_auto_batch_frees_a_failed_trial_before_the_next_one_is_measured():
    """The cache is emptied where the failed trial's tensors can go: outside the except block, whose traceback
    holds the trial's frames (emptied inside, the blocks stayed cached, and the next trial measured them)."""
    alive_at_cleanup, refs = [], []

    def trial(bs: int, fp16: bool) -> None:
        activations = torch.zeros(bs, 4)
        refs.append(weakref.ref(activations))
        if bs > 4:
            raise torch.OutOfMemoryError(f"bs {bs}")

    def empty_cache() -> None:
        alive_at_cleanup.append([ref() is not None for ref in refs])

    choice = auto_find_batch_size(trial, init_bs=8, min_bs=1, max_bs=8, mem_ratio=lambda: 0.1,
                                  empty_cache=empty_cache)
    assert choice.batch_size == 4 and [r for *_, r in choice.trials] == ["oom", "fits"]
    assert not any(any(alive) for alive in alive_at_cleanup)


def test_auto_batch_counts_allocation_failures_outside_torchs_allocator_as_oom():
    def trial(bs: int, fp16: bool) -> None:
        if bs > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    def broken(bs: int, fp16: bool) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    choice = auto_find_batch_size(trial, init_bs=8, min_bs=1, max_bs=8, mem_ratio=lambda: 0.1,
                                  empty_cache=lambda: None)
    assert choice.batch_size == 2 and [r for *_, r in choice.trials] == ["oom", "oom", "fits"]
    with pytest.raises(RuntimeError, match="mat1"):  # not an allocation: raised, not taken for an OOM
        auto_find_batch_size(broken, init_bs=2, mem_ratio=lambda: 0.1, empty_cache=lambda: None)


@pytest.mark.parametrize(("err", "oom"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    # "not supported" also names real bugs (non-contiguous input, limits): not taken for an OOM
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
                  "input."), False),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000 bytes."), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x4 and 5x3)"), False),
    (ValueError("CUDA out of memory"), False),
])
def test_is_out_of_memory_knows_allocation_failures_by_type_and_message(err, oom):
    assert is_out_of_memory(err) is oom


def test_early_stopping_counts_patience_and_min_delta():
    state = new_early_stopping_state()
    results = [early_stopping(state, m, "max", patience=2, min_delta=0.01) for m in (0.5, 0.6, 0.605, 0.59)]
    assert results == [(False, True), (False, True), (False, False), (True, False)]
    assert state["best"] == 0.6
    state = new_early_stopping_state()
    assert early_stopping(state, 1.0, "min", 3)[1] and early_stopping(state, 0.5, "min", 3)[1]
    assert not early_stopping(state, float("nan"), "min", 3)[1]
    with pytest.raises(ValueError, match="mode"):
        early_stopping(state, 1.0, "up", 3)


def test_a_tie_on_the_monitored_metric_goes_to_the_better_tie_break_and_a_resume_replays_it():
    """A detector's mAP@0.5 reaches 1.0 on a small validation set early (the demo: epoch 13 of 36) while its boxes
    go on tightening (mAP@0.5:0.95 0.83 -> 0.91): the first epoch at 1.0 stayed the best checkpoint for good."""
    from pillsnap.engine.checkpointing import replay_early_stopping

    epochs = [(0.9, 0.5), (1.0, 0.6), (1.0, 0.7), (1.0, 0.65), (0.99, 0.9), (1.0, 0.7)]
    state = new_early_stopping_state()
    results = [early_stopping(state, m, "max", patience=3, tie_break=t) for m, t in epochs]
    assert [best for _, best in results] == [True, True, True, False, False, False]  # never a lower mAP@0.5
    assert [stop for stop, _ in results] == [False] * 5 + [True]  # a tighter tie resets the patience
    assert state["best"] == 1.0 and state["tie_break"] == 0.7
    state = new_early_stopping_state()
    assert [early_stopping(state, m, "max", 2)[1] for m, _ in epochs] == [True, True, False, False, False, False]
    history = [{"epoch": i + 1, "detection": {"mAP@0.5": m, "mAP@0.5:0.95": t}} for i, (m, t) in enumerate(epochs)]
    replayed = replay_early_stopping(history[:4], "detection", "mAP@0.5", "max", 0.0, "mAP@0.5:0.95")
    assert replayed == {"best": 1.0, "tie_break": 0.7, "bad_epochs": 1}
    assert early_stopping(replayed, 1.0, "max", 2, tie_break=0.71) == (False, True)  # resumed: the tie still counts
    # with min_delta, an epoch no worse on the monitor but short of improving on it by min_delta is told apart by
    # the tie-break, which must improve by min_delta too
    state = new_early_stopping_state()
    picks = [early_stopping(state, m, "max", 3, 0.01, tie_break=t)[1]
             for m, t in [(0.9, 0.5), (0.905, 0.9), (0.905, 0.905), (0.9, 0.99), (0.914, 0.95), (0.94, 0.1)]]
    assert picks == [True, True, False, False, True, True] and state == {"best": 0.94, "tie_break": 0.1,
                                                                          "bad_epochs": 0}
    from pillsnap.engine.detection import EMPTY_METRICS, DetectionTask

    assert DetectionTask.tie_break.fget(None) in EMPTY_METRICS  # a key its validation gives
    # the early-stop log line says which of the tied epochs is the best
    tied = {"best": 1.0, "tie_break": 0.7, "bad_epochs": 3}
    assert describe_best(tied, "mAP@0.5", "mAP@0.5:0.95") == "mAP@0.5 best 1.0000 (mAP@0.5:0.95 0.7000)"
    assert describe_best({**tied, "tie_break": None}, "mAP@0.5", "mAP@0.5:0.95") == "mAP@0.5 best 1.0000"
    assert describe_best(tied, "acc", None) == "acc best 1.0000"


def test_time_cap_rule_needs_permission_samples_and_classes():
    stage = {"allow_success_on_time_cap": True, "min_samples_required": 100, "min_class_coverage": 5}
    assert time_cap_success(stage, 100, 5)["success"]
    verdict = time_cap_success(stage, 99, 4)
    assert not verdict["success"] and len(verdict["reasons"]) == 2
    assert not time_cap_success({**stage, "allow_success_on_time_cap": False}, 1000, 50)["success"]
    assert time_cap_reached(3600.0, 1.0) and not time_cap_reached(3599.0, 1.0) and not time_cap_reached(1e9, None)


SPECS = [DetectionTask.spec, ClassificationTask.spec]


def two_task_schedule(det: int, cls: int, ratio: tuple[int, int]) -> list[str]:
    shares = interleave_shares(SPECS, list(ratio))
    return list(interleave_schedule({"detection": det, "classification": cls}, shares))


@pytest.mark.parametrize(("ratio", "det", "cls"), [((1, 1), 10, 10), ((1, 3), 5, 20), ((2, 1), 7, 3), ((0, 1), 0, 4)])
def test_interleave_schedule_respects_ratio_and_counts(ratio, det, cls):
    names = two_task_schedule(det, cls, ratio)
    assert Counter(names) == Counter({"detection": det, "classification": cls}) - Counter()
    d, c = ratio
    # While both tasks have steps left, position step % (d + c) < d is detection.
    both = min(det // d if d else 0, cls // c) * (d + c)
    assert all((n == "detection") == (i % (d + c) < d) for i, n in enumerate(names[:both]))


def test_interleave_schedule_lets_the_remaining_task_finish_and_rejects_bad_ratios():
    assert two_task_schedule(1, 3, (1, 1)) == ["detection", "classification", "classification", "classification"]
    assert two_task_schedule(2, 0, (1, 1)) == ["detection", "detection"]
    assert two_task_schedule(2, 1, (0, 1)) == ["classification", "detection", "detection"]  # a zero share: the tail
    with pytest.raises(ValueError, match="interleave_ratio"):
        interleave_shares(SPECS, [0, 0])
    with pytest.raises(ValueError, match="interleave_ratio"):
        interleave_shares(SPECS, [1])


def test_interleave_schedule_takes_a_task_the_ratio_does_not_name():
    shares = interleave_shares([*SPECS, TaskSpec("regression")], [2, 1])
    assert list(shares) == ["detection", "classification", "regression"] and shares["regression"] == 1
    names = list(interleave_schedule({"classification": 3, "detection": 4, "regression": 2}, shares))
    assert names == ["detection", "detection", "classification", "regression", "detection", "detection",
                     "classification", "regression", "classification"]


def test_warmup_cosine_schedule_shape():
    factors = [warmup_cosine_factor(s, 4, 20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert math.isclose(warmup_cosine_factor(100, 4, 20), 0.0, abs_tol=1e-12)


def test_train_line_has_the_design_format():
    record = {"epoch": 1, "max_epochs": 10, "step": 20, "steps": 300, "loss": 1.23456, "lr": 3e-4,
              "data_time": 0.0123, "compute_time": 0.2, "throughput": 123.45, "cuda_mem": 1024.4}
    line = format_train_line(record)
    assert line == "[train] e=1/10 s=20/300 loss=1.2346 lr=3.00e-04 data=0.012s comp=0.200s thr=123.5/s cuda=1024MB"
    assert LINE.match(line)
