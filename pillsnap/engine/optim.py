"""Loss, optimizer and LR schedule for the classifier (seed D-3)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

LOGGER = logging.getLogger(__name__)


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


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Fused AdamW needs every parameter on CUDA in a floating dtype."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def build_optimizer(cfg: DictConfig, named_params: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """AdamW(train.lr, train.weight_decay), fused where the parameters live on CUDA."""
    groups = param_groups((p for _, p in named_params), float(cfg.train.weight_decay))
    flat = [p for g in groups for p in g["params"]]
    fused = fused_supported(flat)
    LOGGER.info("AdamW lr=%.2e wd=%.3g fused=%s", cfg.train.lr, cfg.train.weight_decay, fused)
    return torch.optim.AdamW(groups, lr=float(cfg.train.lr), fused=fused or None)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """train.scheduler: "cosine" (warmup_steps linear warmup) or "none"; stepped once per optimizer step."""
    kind = str(cfg.train.scheduler)
    if kind == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if kind != "cosine":
        raise ValueError(f"train.scheduler must be 'cosine' or 'none', got {kind!r}")
    total = max(int(cfg.train.epochs) * max(steps_per_epoch, 1), 1)
    warmup = min(int(cfg.train.warmup_steps), total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total))
