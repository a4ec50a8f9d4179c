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

    def for_answer(self, num_known: int) -> UnknownRule:
        """What the answer policy needs of this rule (its threshold None when the rule cannot run)."""
        return UnknownRule(self.rule, self.threshold if self.active else None, num_known)
