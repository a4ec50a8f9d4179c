"""Whether a detector box holds a pill at all.

The detector also boxes what is not a pill (the rim of a dish, a tray's corner, a reflection), and the classifier
then names a drug for it as readily as for a pill: it was only ever shown pills. The detector's confidence alone
does not say which boxes those are (it is not calibrated), and raising the detection threshold would hide real
pills. So calibration (pillsnap.eval.box_calibration) stores the detector's confidence in each labelled pill of the
validation combination photos, and a box is doubted when the detector is less sure of it than of all but
`miss_rate` of those pills (the ones the inference threshold keeps): a one-sided conformal bound, so a real pill's
box is doubted with probability at most `miss_rate` when photos are like the validation photos. A doubted box is
still shown, with its nearest drugs, but named as no drug (pillsnap.infer.answer.decide_answer).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pillsnap.metrics.conformal import lower_bound

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoxCheck:
    """The detector's confidences in the labelled pills of validation photos (ascending) and the share of real
    pills that may be doubted."""

    pill_confidences: tuple[float, ...]
    miss_rate: float
    conf_floor: float = 0.0  # the lowest confidence calibration kept: below it, pills were not counted

    def __post_init__(self) -> None:
        if not 0.0 < self.miss_rate < 1.0:
            raise ValueError(f"inference.box_check.miss_rate must be between 0 and 1, got {self.miss_rate}")

    @classmethod
    def from_stored(cls, stored: Mapping, miss_rate: float) -> BoxCheck:
        """The check from calibration.json's `box_check` (pillsnap.eval.box_calibration), at `miss_rate`."""
        return cls(tuple(sorted(float(c) for c in stored.get("pill_confidences") or ())), miss_rate,
                   float(stored.get("conf_floor") or 0.0))

    def kept(self, conf_threshold: float) -> tuple[float, ...]:
        """The validation pills (ascending) that a detection threshold of `conf_threshold` keeps, no lower than the
        calibration's floor (below it nothing was counted)."""
        return self.pill_confidences[bisect.bisect_left(self.pill_confidences, max(conf_threshold, self.conf_floor)):]

    def bound(self, conf_threshold: float) -> tuple[float, int]:
        """(the confidence below which a box is doubted, the validation pills it was drawn from: `kept`). Minus
        infinity when they are too few for the miss rate; a box below the calibration's floor is doubted."""
        kept = self.kept(conf_threshold)
        return lower_bound(kept, self.miss_rate), len(kept)

    def doubt(self, confidence: float | None, conf_threshold: float) -> str | None:
        """Why a box of this detector confidence may hold no pill, or None (no box: a whole-photo answer)."""
        if confidence is None:
            return None
        bound, pills = self.bound(conf_threshold)
        if confidence >= bound:
            return None
        above = pills - bisect.bisect_right(self.kept(conf_threshold), confidence)
        than = f"every one of the {pills}" if above == pills else f"{above} of the {pills}"
        return (f"the detector is less sure of this box (confidence {confidence:.3f}) than it was of {than} pills "
                f"on the validation photos (below {bound:.3f}, where at most {self.miss_rate:.1%} of real pills "
                f"fall): it may hold no pill (a dish's rim, a shadow, a reflection); nearest candidates in topk")


def load_box_check(calibration: Mapping | None, detector_sha256: str, miss_rate: float,
                   ) -> tuple[BoxCheck | None, str | None]:
    """(the box check, None) from a loaded calibration, or (None, why not) when it holds none for this detector."""
    stored = (calibration or {}).get("box_check")
    if not isinstance(stored, Mapping):
        return None, "the calibration has no detector confidences (recalibrate: pillsnap calibrate --exp EXP)"
    if stored.get("detector_sha256") != detector_sha256:
        return None, ("the calibration's detector confidences were measured for other detector weights "
                      "(recalibrate: pillsnap calibrate --exp EXP)")
    return BoxCheck.from_stored(stored, miss_rate), None


def check_box_settings(settings: Mapping) -> tuple[bool, float]:
    """(enabled, miss_rate) of inference.box_check; a ValueError names a wrong value."""
    enabled, miss_rate = settings.get("enabled", True), settings.get("miss_rate", 0.02)
    if not isinstance(enabled, bool):
        raise ValueError(f"inference.box_check.enabled must be true or false, got {enabled!r}")
    try:
        return enabled, BoxCheck((), float(miss_rate)).miss_rate
    except (TypeError, ValueError) as err:
        raise ValueError(f"inference.box_check.miss_rate must be a number between 0 and 1, got {miss_rate!r}") from err


def box_check_for(calibration: Mapping | None, detector_path: str | Path, enabled: bool,
                  miss_rate: float) -> BoxCheck | None:
    """The box check for the detector at `detector_path`; None when it is off or cannot be had (said once in the
    log, with what to do)."""
    from pillsnap.utils.io import file_sha256

    if not enabled or calibration is None:
        return None
    check, problem = load_box_check(calibration, file_sha256(detector_path), miss_rate)
    if problem:
        LOGGER.warning("predictor: detector boxes are not checked for holding a pill: %s", problem)
    return check


def describe(check: BoxCheck, conf_threshold: float, other_confidences: Sequence[float] = ()) -> dict:
    """The check at `conf_threshold`: its bound, the pills it was drawn from, the share of those it doubts (at
    most the miss rate, by construction) and, of the other boxes (on no labelled pill), how many the threshold
    keeps and the share it doubts."""
    bound, pills = check.bound(conf_threshold)
    kept = check.kept(conf_threshold)
    others = [c for c in other_confidences if c >= max(conf_threshold, check.conf_floor)]
    def doubted(confidences: list[float]) -> float | None:
        return sum(c < bound for c in confidences) / len(confidences) if confidences else None

    return {"miss_rate": check.miss_rate, "conf_threshold": conf_threshold,
            "bound": bound if math.isfinite(bound) else None, "pills": pills, "pills_doubted": doubted(kept),
            "other_boxes": len(others), "other_boxes_doubted": doubted(others)}
