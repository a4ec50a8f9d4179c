"""CUDA-only paths (skipped without a GPU): AMP dtype policy, GradScaler only for fp16, fused AdamW, S1 escalation."""

from __future__ import annotations

import pytest
import torch
from fakes import fake_build_loaders, make_cfg

from pillsnap.engine import ClassificationTask, OomDecision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


def test_s1_escalation_switches_bf16_to_fp16_with_a_scaler(tmp_path):
    cfg = make_cfg(tmp_path, "train.classification.amp_dtype=bf16")
    train, val, *_, meta = fake_build_loaders(cfg)
    task = ClassificationTask(cfg, train, val, meta, "cuda")
    task.apply_oom_decision(OomDecision("amp_fp16", 1))
    assert task.precision.dtype == torch.float16 and task.scaler.is_enabled() and task.knobs.did_amp_escalate
    task.train_step(next(iter(train)))
