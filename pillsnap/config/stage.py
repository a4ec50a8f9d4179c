"""Stage-specific hardware overrides (the design's per-stage settings): a stage is a config entry, never a module.

A setting the user gave on the command line is never replaced by a stage override: the loader drops those
overrides (`drop_overridden`) before anything applies them, so the saved config shows what really ran.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

LOGGER = logging.getLogger(__name__)

# stage override key -> the config key it sets
STAGE_OVERRIDE_TARGETS = {
    "batch_size_override": "train.batch_size",
    "compile_mode": "optimization.torch_compile",
    "memory_format": "optimization.channels_last",
    "num_workers_override": "dataloader.num_workers",
    # the design's large-data optimisation for stages 3-4: the auto batch search may fill 92 % of the GPU's memory
    "auto_batch_vram_headroom": "train.auto_batch_vram_headroom",
    # stages 3-4 read the classifier's crops from a JPEG crop cache: decoding a whole photo for each crop would keep
    # the GPU waiting, and the npy cache would take 221 GB at Stage 4
    "cache_enabled": "data.cache.enabled",
    "cache_format": "data.cache.format",
    # and the detector's training photos resized to its input size as JPEGs (decoding a 976x1280 PNG was most of a
    # detector training image's cost)
    "detection_export": "data.detection_export",
}
# The values two keys take (checked when the config loads, where a stage sets them, and where they are used)
CACHE_FORMATS = ("npy", "jpeg")  # data.cache.format
DETECTION_EXPORTS = ("photos", "jpeg")  # data.detection_export
_CHOICES = {"cache_format": CACHE_FORMATS, "detection_export": DETECTION_EXPORTS}


def converted_override(key: str, value: object) -> object:
    """A stage override's value as its config key takes it; ValueError or TypeError for one it cannot take."""
    if key == "memory_format":
        return value == "channels_last"
    if key == "cache_enabled":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if key in _CHOICES:
        if str(value) not in _CHOICES[key]:
            raise ValueError(f"must be one of {', '.join(_CHOICES[key])}")
        return str(value)
    if key == "compile_mode":
        return str(value)
    if key == "auto_batch_vram_headroom":
        return float(value)  # type: ignore[arg-type]
    return int(value)  # type: ignore[call-overload]


def apply_stage_overrides(cfg: DictConfig, current_stage: int) -> DictConfig:
    """Return a copy of `cfg` with `train.stage_overrides.stage_{k}` applied; the input is not modified."""
    overrides = (cfg.train.get("stage_overrides") or {}).get(f"stage_{current_stage}") or {}
    if not overrides:
        LOGGER.info("Stage %d: no overrides configured", current_stage)
        return cfg
    cfg = copy.deepcopy(cfg)
    applied = []
    for key, target in STAGE_OVERRIDE_TARGETS.items():
        if key in overrides:
            OmegaConf.update(cfg, target, converted_override(key, overrides[key]))
            applied.append(f"{target.split('.', 1)[1]}: {OmegaConf.select(cfg, target)}")
    LOGGER.info("Stage %d overrides applied: %s", current_stage, ", ".join(applied))
    return cfg


def drop_overridden(cfg: DictConfig, explicit: Iterable[str]) -> list[str]:
    """Remove, in place, every stage override whose target key is in `explicit` (the command line's dotted keys),
    so an explicit setting beats the stage's; returns what was dropped as 'stage_k.key' strings."""
    explicit = set(explicit)
    dropped = []
    for stage, overrides in (cfg.train.get("stage_overrides") or {}).items():
        for key in [k for k in (overrides or {}) if STAGE_OVERRIDE_TARGETS.get(str(k)) in explicit]:
            if f"train.stage_overrides.{stage}.{key}" in explicit:
                continue  # the stage override itself came from the command line
            del overrides[key]
            dropped.append(f"{stage}.{key}")
    current = f"stage_{cfg.data.progressive_validation.current_stage}."
    skipped = [d for d in dropped if d.startswith(current)]
    if skipped:
        LOGGER.info("Stage overrides skipped (set on the command line): %s", ", ".join(
            f"{d} -> {STAGE_OVERRIDE_TARGETS[d.split('.', 1)[1]]}" for d in skipped))
    return dropped


def stage_settings(cfg: DictConfig, stage: int | None = None) -> DictConfig:
    """The `data.progressive_validation.stage_k` block for `stage` (default: current_stage)."""
    pv = cfg.data.progressive_validation
    stage = pv.current_stage if stage is None else stage
    key = f"stage_{stage}"
    if key not in pv:
        raise ValueError(f"Unknown stage {stage}: data.progressive_validation has no '{key}' (stages 1-4).")
    return pv[key]
