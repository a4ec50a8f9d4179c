"""CUDA-only paths (skipped without a GPU): AMP dtype policy, GradScaler only for fp16, fused AdamW, S1 escalation,
TF32 and channels_last, the detector under bf16, auto batch and OOM recovery against real device memory, and
torch.compile of the classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fakes import fake_build_loaders, fake_det_batch, make_cfg

from pillsnap.engine import ClassificationTask, DetectionTask, OomDecision
from pillsnap.engine.loop import EpochRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def classification_task(tmp_path, *overrides: str) -> ClassificationTask:
    cfg = make_cfg(tmp_path, *overrides)
    train, val, *_, meta = fake_build_loaders(cfg)
    return ClassificationTask(cfg, train, val, meta, "cuda")


@pytest.fixture
def tf32_flags():
    """TF32 switches are process-wide: put back what the next test expects."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_step_uses_amp_scaler_policy_and_fused_adamw(tmp_path, amp_dtype):
    cfg = make_cfg(tmp_path, f"train.classification.amp_dtype={amp_dtype}", "optimization.channels_last=true")
    train, val, *_, meta = fake_build_loaders(cfg)
    task = ClassificationTask(cfg, train, val, meta, "cuda")
    assert task.precision.autocast and task.scaler.is_enabled() == (amp_dtype == "fp16")
    assert task.optimizer.defaults["fused"] is True
    out = task.train_step(next(iter(train)))
    assert out.n == 8 and out.loss == out.loss  # not NaN
    assert task.validate(1)["n"] == 16


def test_s1_escalation_switches_fp32_to_fp16_with_a_scaler_and_leaves_bf16_as_it_is(tmp_path):
    """S1 halves the activations of a task in fp32; one already in bf16 autocast has half-size activations, so it
    stays bf16 (only the flag is set) and recovery goes on to S2."""
    cfg = make_cfg(tmp_path, "train.classification.amp=false")
    train, val, *_, meta = fake_build_loaders(cfg)
    task = ClassificationTask(cfg, train, val, meta, "cuda")
    assert not task.precision.autocast and task.fp16_saves_memory
    task.apply_oom_decision(OomDecision("amp_fp16", 1))
    assert task.precision.dtype == torch.float16 and task.scaler.is_enabled() and task.knobs.did_amp_escalate
    task.train_step(next(iter(train)))
    bf16 = classification_task(tmp_path / "bf16", "train.classification.amp_dtype=bf16")
    assert not bf16.fp16_saves_memory
    bf16.apply_oom_decision(OomDecision("amp_fp16", 1))
    assert bf16.precision.dtype == torch.bfloat16 and not bf16.scaler.is_enabled() and bf16.knobs.did_amp_escalate


@pytest.mark.usefixtures("tf32_flags")
@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_follows_the_config_and_the_classifier_runs_channels_last(tmp_path, tf32):
    task = classification_task(tmp_path, f"train.classification.tf32={str(tf32).lower()}",
                               "optimization.channels_last=true")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    stem = next(p for p in task.raw_model.parameters() if p.ndim == 4)
    assert stem.is_cuda and stem.is_contiguous(memory_format=torch.channels_last)
    x, y = task.to_device(next(iter(task.train_loader)))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


def test_detector_step_under_bf16_needs_no_scaler_and_validates(tmp_path):
    cfg = make_cfg(tmp_path, "train.detection.amp_dtype=bf16", "train.strategy=interleaved")
    rng = np.random.default_rng(0)
    train, val = [fake_det_batch(rng, 2) for _ in range(2)], [fake_det_batch(rng, 2)]
    task = DetectionTask(cfg, train, val, "cuda")
    assert task.precision.autocast and task.precision.dtype == torch.bfloat16 and not task.scaler.is_enabled()
    assert next(task.raw_model.parameters()).is_cuda
    out = task.train_step(train[0])
    assert out.n == 2 and math.isfinite(out.loss) and task.optimizer_steps == 1
    metrics = task.validate(1)
    assert 0.0 <= metrics["mAP@0.5"] <= 1.0


def test_auto_batch_search_reads_real_cuda_memory_and_restores_the_weights(tmp_path):
    task = classification_task(tmp_path)
    before = {k: v.clone() for k, v in task.raw_model.state_dict().items()}
    choice = task.find_batch_size(max_bs=64, headroom=0.88)
    # A 32 px test model at batch 64 takes a sliver of any GPU: the search doubles from 8 up to the bound.
    assert choice.batch_size == 64 and choice.grad_accum == 1 and not choice.force_fp16
    assert [t[0] for t in choice.trials] == [8, 16, 32, 64] and all(t[2] == "fits" for t in choice.trials)
    assert all(torch.equal(before[k], v) for k, v in task.raw_model.state_dict().items())


def test_a_real_cuda_oom_is_recovered_by_micro_batching(tmp_path):
    """Cap this process's CUDA memory at about twice what a batch of 32 needs, then train a batch of 512: the
    allocator raises a real torch.OutOfMemoryError and the step loop halves the micro-batch until it fits."""
    task = classification_task(tmp_path, "model.image_size=128", "train.classification.amp_dtype=bf16",
                               "train.oom.escalate_to_fp16=false", "train.oom.max_retries=6",
                               "train.oom.max_grad_accum=16", "train.ema.enabled=false")
    runner = EpochRunner({"classification": task}, task.cfg)
    big = task.random_batch(512)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    task.knobs.batch_size = 32
    task.train_step(task.random_batch(32))
    need_32 = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((base + 2.5 * need_32) / total)
        task.knobs.batch_size = 512
        out = runner.guarded_step("classification", big)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert out.n == 512 and math.isfinite(out.loss)
    assert runner.state.oom_retries["classification"] >= 2
    assert task.knobs.batch_size <= 64 and task.knobs.batch_size * task.knobs.grad_accum == 512


@pytest.mark.slow
def test_compiled_classifier_accumulates_gradients_over_chunks(tmp_path, tf32_flags):
    """With CUDA graphs, the second chunk's backward overwrote the first one's gradients and torch stopped the run
    (pytorch/pytorch#169545); training compiles without them. The accumulated step moves the weights as eager does.
    (reduce-overhead was CUDA graphs alone; max-autotune, whose compile takes minutes, is trained with accumulation
    by bench/gpu_check.py's train_max_autotune step, which also stands for this test there: its cuda_tests step
    leaves the compile tests out, marked slow, to keep within its minute.)"""
    mode = "reduce-overhead"
    plain = ("train.grad_accum_steps=2", "train.ema.enabled=false", "train.classification.amp=false",
             "train.classification.tf32=false")
    compiled = classification_task(tmp_path, f"optimization.torch_compile={mode}", *plain)
    eager = classification_task(tmp_path, *plain)
    assert hasattr(compiled.model, "_orig_mod"), "torch.compile fell back to eager"
    eager.raw_model.load_state_dict(compiled.raw_model.state_dict())
    for batch in list(compiled.train_loader)[:3]:
        assert math.isfinite(compiled.train_step(batch).loss) and math.isfinite(eager.train_step(batch).loss)
    for (name, a), b in zip(compiled.raw_model.state_dict().items(), eager.raw_model.state_dict().values(),
                            strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), name


@pytest.mark.slow
def test_compiled_classifier_announces_itself_and_trains(tmp_path, caplog):
    caplog.set_level("INFO", logger="pillsnap")
    task = classification_task(tmp_path, "optimization.torch_compile=reduce-overhead")
    assert hasattr(task.model, "_orig_mod"), "torch.compile fell back to eager"
    assert "compiling" in caplog.text
    for batch in list(task.train_loader)[:3]:
        out = task.train_step(batch)
        assert math.isfinite(out.loss)
