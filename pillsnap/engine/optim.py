"""Loss, optimizer and learning-rate schedule: one builder of each, shared by both tasks."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

LOGGER = logging.getLogger(__name__)
SCHEDULERS = ("cosine", "none")
# Device types with fused AdamW kernels in torch >= 2.4 (CPU included).
FUSED_DEVICES = frozenset({"cuda", "cpu", "xpu", "mps", "hpu"})


def build_criterion_classification(cfg: DictConfig, class_weights: torch.Tensor | None = None) -> nn.Module:
    """CrossEntropy with loss.label_smoothing; class weights only when loss.use_class_weights is set."""
    weight = class_weights if cfg.loss.use_class_weights else None
    if cfg.loss.use_class_weights and class_weights is None:
        LOGGER.warning("loss.use_class_weights=true but the loaders gave no class_weights: using uniform weights")
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=float(cfg.loss.label_smoothing))


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights decayed, biases and norm scales (1-D tensors) not (decaying them only hurts)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's fastest implementation for these parameters: fused where every parameter is a floating tensor on a
    device with fused kernels (CUDA, and CPU since torch 2.4), else foreach (one kernel per group, not per tensor)."""
    devices = {p.device.type for p in params}
    fused_ok = bool(params) and all(p.is_floating_point() for p in params) and devices <= FUSED_DEVICES
    return {"fused": True} if fused_ok else {"foreach": True}


def build_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decay on weights only, in its fastest implementation for where the parameters live."""
    groups = param_groups(params, float(weight_decay))
    impl = optimizer_implementation([p for g in groups for p in g["params"]])
    LOGGER.info("AdamW lr=%.2e wd=%.3g %s", lr, weight_decay, next(iter(impl)))
    return torch.optim.AdamW(groups, lr=float(lr), **impl)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(kind: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """train.scheduler: "cosine" (linear warmup, then cosine to 0 at `total_steps`) or "none"; stepped once per
    optimizer step."""
    if kind not in SCHEDULERS:
        raise ValueError(f"train.scheduler must be one of {SCHEDULERS}, got {kind!r}")
    if kind == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    total = max(int(total_steps), 1)
    warmup = min(int(warmup_steps), total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total))
