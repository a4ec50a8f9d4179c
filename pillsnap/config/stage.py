"""Stage-specific hardware overrides (the design's per-stage settings): a stage is a config entry, never a module."""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig

LOGGER = logging.getLogger(__name__)


def apply_stage_overrides(cfg: DictConfig, current_stage: int) -> DictConfig:
    """Return a copy of `cfg` with `train.stage_overrides.stage_{k}` applied; the input is not modified."""
    overrides = (cfg.train.get("stage_overrides") or {}).get(f"stage_{current_stage}") or {}
    if not overrides:
        LOGGER.info("Stage %d: no overrides configured", current_stage)
        return cfg
    cfg = copy.deepcopy(cfg)
    applied = []
    if "batch_size_override" in overrides:
        cfg.train.batch_size = int(overrides.batch_size_override)
        applied.append(f"batch_size: {cfg.train.batch_size}")
    if "compile_mode" in overrides:
        cfg.optimization.torch_compile = str(overrides.compile_mode)
        applied.append(f"torch_compile: {cfg.optimization.torch_compile}")
    if "memory_format" in overrides:
        cfg.optimization.channels_last = overrides.memory_format == "channels_last"
        applied.append(f"channels_last: {cfg.optimization.channels_last}")
    if "num_workers_override" in overrides:
        cfg.dataloader.num_workers = int(overrides.num_workers_override)
        applied.append(f"num_workers: {cfg.dataloader.num_workers}")
    LOGGER.info("Stage %d overrides applied: %s", current_stage, ", ".join(applied))
    return cfg


def stage_settings(cfg: DictConfig, stage: int | None = None) -> DictConfig:
    """The `data.progressive_validation.stage_k` block for `stage` (default: current_stage)."""
    pv = cfg.data.progressive_validation
    stage = pv.current_stage if stage is None else stage
    key = f"stage_{stage}"
    if key not in pv:
        raise ValueError(f"Unknown stage {stage}: data.progressive_validation has no '{key}' (stages 1-4).")
    return pv[key]
