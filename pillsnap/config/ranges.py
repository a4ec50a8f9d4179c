"""The numbers a setting can take. A value outside its range is a typo (`memory_warning_ratio: 80`, a batch of 0)
caught when the config loads, with the key, the value and what it must be, instead of a crash or a silent
misbehaviour hours into a run. The type of every key is checked elsewhere (pillsnap.config.loader)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple


class Range(NamedTuple):
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # the bound itself excluded
    high_open: bool = False
    what: str = ""  # why, in the error message

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(b for b in (low, high) if b) + (f" ({self.what})" if self.what else "")


SHARE = Range(0, 1, what="a share")
PROBABILITY = Range(0, 1, what="a probability")
OPEN_SHARE = Range(0, 1, low_open=True, what="a share above 0")
AT_LEAST_1 = Range(1)
NOT_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)

# Patterns (fnmatch) over dotted keys; the first that matches a key is its range. A `*` stands only where the keys
# it covers are of one kind (stages, sections): `train.*lr` would also take `train.detection.augment.fliplr`.
RANGES: tuple[tuple[str, Range], ...] = (
    ("data.val_ratio", Range(0, 1, high_open=True, what="a share of the photos")),
    ("data.test_ratio", Range(0, 1, high_open=True, what="a share of the photos")),
    ("data.crop_margin", NOT_NEGATIVE),
    ("data.crop_jitter.scale", Range(0, 0.5, what="a share of the crop's side")),
    ("data.crop_jitter.shift", Range(0, 0.25, what="a share of the pill's size")),
    ("data.detection_singles", NOT_NEGATIVE),
    ("data.scan_workers", Range(0, what="0 = all cores")),
    ("data.progressive_validation.current_stage", Range(1, 4, what="stages 1-4")),
    ("data.progressive_validation.stage_*.max_samples", AT_LEAST_1),
    ("data.progressive_validation.stage_*.max_classes", AT_LEAST_1),
    ("data.progressive_validation.stage_*.time_limit_hours", Range(0, what="0: no cap")),
    ("data.progressive_validation.stage_*.min_*", NOT_NEGATIVE),
    ("dataloader.num_workers", NOT_NEGATIVE),
    ("dataloader.autotune_*", NOT_NEGATIVE),
    ("dataloader.prefetch_factor", AT_LEAST_1),
    ("model.num_classes", Range(0, what="0 = the stage's classes")),
    ("model.image_size", Range(8, what="pixels")),
    ("model.det_image_size", Range(32, what="pixels")),
    ("train.epochs", NOT_NEGATIVE),
    ("train.detection.epochs", NOT_NEGATIVE),
    ("train.batch_size", AT_LEAST_1),
    ("train.detection.batch_size", AT_LEAST_1),
    ("train.lr", POSITIVE),
    ("train.detection.lr", POSITIVE),
    ("train.weight_decay", NOT_NEGATIVE),
    ("train.detection.weight_decay", NOT_NEGATIVE),
    ("train.max_steps_per_epoch", Range(1, what="null: every step")),
    ("train.warmup_steps", NOT_NEGATIVE),
    ("train.grad_accum_steps", AT_LEAST_1),
    ("train.grad_clip", Range(0, what="0 or null: no clipping")),
    ("train.ddp_timeout_minutes", POSITIVE),
    ("train.checkpoint_interval_minutes", Range(0, what="minutes between checkpoints inside an epoch; 0: at epoch "
                                                        "ends only")),
    ("train.step_log_interval", AT_LEAST_1),
    ("train.interleave_ratio", Range(0, what="steps per task in each cycle")),
    ("train.profile_interval", AT_LEAST_1),
    ("train.auto_batch_vram_headroom", OPEN_SHARE),
    ("train.memory_warning_ratio", OPEN_SHARE),
    ("train.*.auto_batch_max", AT_LEAST_1),
    ("train.detection.conf_threshold", PROBABILITY),
    ("train.detection.iou_threshold", PROBABILITY),
    ("train.detection.augment.hsv_*", SHARE),
    ("train.detection.augment.degrees", Range(0, 180, what="degrees")),
    ("train.detection.augment.translate", SHARE),
    ("train.detection.augment.scale", NOT_NEGATIVE),
    ("train.detection.augment.flip*", PROBABILITY),
    ("train.detection.augment.mosaic", PROBABILITY),
    ("train.detection.augment.close_mosaic", NOT_NEGATIVE),
    ("train.oom.max_retries", NOT_NEGATIVE),
    ("train.oom.max_grad_accum", AT_LEAST_1),
    ("train.oom.min_batch", AT_LEAST_1),
    ("train.oom.cooldown_sec", NOT_NEGATIVE),
    ("train.ema.decay", Range(0, 1, high_open=True, what="a decay below 1")),
    ("train.early_stopping.patience", AT_LEAST_1),
    ("train.early_stopping.min_delta", NOT_NEGATIVE),
    ("train.stage_overrides.*.num_workers_override", NOT_NEGATIVE),
    ("train.stage_overrides.*.batch_size_override", AT_LEAST_1),
    ("train.stage_overrides.*.auto_batch_vram_headroom", OPEN_SHARE),
    ("loss.label_smoothing", Range(0, 1, high_open=True, what="a share below 1")),
    ("inference.conf_threshold", PROBABILITY),
    ("inference.iou_threshold", PROBABILITY),
    ("inference.single_confidence_threshold", PROBABILITY),
    ("inference.topk", AT_LEAST_1),
    ("inference.max_pills", AT_LEAST_1),
    ("inference.unknown_keep_correct", Range(0, 1, what="a share; 0 = off")),
    ("inference.unknown_fit_per_class", Range(2, what="crops per class")),
    ("inference.prediction_set.coverage", Range(0, 1, low_open=True, high_open=True, what="a coverage level")),
    ("inference.box_check.miss_rate", Range(0, 1, low_open=True, high_open=True, what="a miss rate")),
    ("inference.imprint.threads", Range(0, what="0 = the machine's cores")),
    ("inference.imprint.parallel_reads", Range(0, what="0 = the cores over the threads per read")),
    ("inference.single_crop", OPEN_SHARE),
    ("inference.hard_cases.single_confidence_below", Range(0, what="a probability; above 1: every photo")),
    ("inference.hard_cases.max_files", AT_LEAST_1),
    ("inference.hard_cases.max_mb", POSITIVE),
    ("inference.hard_cases.retention_days", POSITIVE),
    ("serving.port", Range(0, 65535, what="a TCP port; 0: any free one")),
    ("serving.*_s", POSITIVE),
    ("serving.max_upload_mb", AT_LEAST_1),
    ("serving.max_batch_files", AT_LEAST_1),
    ("serving.max_image_pixels", AT_LEAST_1),
    ("serving.min_image_side", AT_LEAST_1),
    ("serving.workers", AT_LEAST_1),
    ("serving.max_queue", AT_LEAST_1),
    ("serving.max_inflight_upload_mb", POSITIVE),
    ("serving.max_connections", AT_LEAST_1),
)


def range_of(key: str) -> Range | None:
    return next((r for pattern, r in RANGES if fnmatchcase(key, pattern)), None)


def out_of_range(values: dict[str, object]) -> list[str]:
    """One message per numeric value outside its key's range, from {dotted key: value} (None and booleans are
    not numbers here); a list's numbers are each held to its key's range (train.interleave_ratio[1])."""
    bad = []
    for key, value in values.items():
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, Sequence) and not \
            isinstance(value, str) else [(key, value)]
        expected = range_of(key)
        for name, item in items:
            if expected is None or isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not expected.holds(float(item)):
                bad.append(f"{name}={item!r} is out of range: it must be {expected.text()}")
    return bad
