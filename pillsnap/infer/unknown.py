"""The "unknown pill" rule at inference: each crop's score under the run's rule (pillsnap.eval.calibration fits the
threshold on validation data; pillsnap.infer.answer decides what a score past it means for the answer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pillsnap.infer.answer import UnknownRule
from pillsnap.metrics.novelty import ClassGaussians, check_unknown_rule, unknown_scores


@dataclass(frozen=True)
class UnknownAnswer:
    """The rule in force: its name (pillsnap.metrics.novelty.UNKNOWN_RULES), the calibrated threshold (None: no
    pill is answered as unknown) and, for feature_distance, the class Gaussians it measures against."""

    rule: str
    threshold: float | None
    gaussians: ClassGaussians | None = None
    # Thresholds fit on each crop source's validation answers (CROP_SOURCES), where the calibration had them: a
    # detector's crop of a combination photo (varied backdrops, dishes, falloff) lies farther from the class means
    # than a single-pill photo's crop, so one threshold for both would let single-photo unknowns through.
    by_source: dict[str, float | None] | None = None

    def __post_init__(self) -> None:
        check_unknown_rule(self.rule)

    @property
    def active(self) -> bool:
        return self.threshold is not None and (self.rule != "feature_distance" or self.gaussians is not None)

    def scores(self, probs: np.ndarray, features: np.ndarray | None,
               distances: np.ndarray | None = None) -> list[float | None]:
        """Per crop, from calibrated probabilities [N, C] and pre-logit features [N, D] (None: not available).
        `distances` [N], when given, are the feature distances already measured (to enrolled drugs too)."""
        if not self.active or (self.rule == "feature_distance" and features is None):
            return [None] * len(probs)
        if self.rule == "feature_distance" and distances is None:
            distances = self.gaussians.score(features)
        return [float(v) for v in unknown_scores(self.rule, probs, distances)]

    def for_answer(self, num_known: int, source: str | None = None) -> UnknownRule:
        """What the answer policy needs of this rule for a crop from `source` (one of CROP_SOURCES; None: the
        threshold over all crops); its threshold None when the rule cannot run."""
        threshold = self.threshold
        if source is not None and self.by_source and source in self.by_source:
            threshold = self.by_source[source]
        return UnknownRule(self.rule, threshold if self.active else None, num_known)


CROP_SOURCES = ("single", "combination")  # a whole single-pill photo's crop; a detector's crop of a combination


def crop_source(det_confidence: float | None) -> str:
    """The crop source of a pill's answer: a whole-photo answer has no detector confidence, a detector's crop has."""
    return "single" if det_confidence is None else "combination"
