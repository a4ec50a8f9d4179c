"""The "unknown pill" answer at inference: each crop's score under the run's rule, and the reason an answer gives
when the score passes the threshold chosen on validation data (pillsnap.eval.calibration fits both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pillsnap.metrics.novelty import ClassGaussians, check_unknown_rule, unknown_scores


class Classified(NamedTuple):
    """One crop through the classifier: its candidates best first (calibrated probabilities) and how unknown it
    looks under the run's rule (higher: less like any known drug; None when the rule is off)."""

    topk: list[dict]
    unknown_score: float | None


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

    def scores(self, probs: np.ndarray, features: np.ndarray | None) -> list[float | None]:
        """Per crop, from calibrated probabilities [N, C] and pre-logit features [N, D] (None: not available)."""
        if not self.active or (self.rule == "feature_distance" and features is None):
            return [None] * len(probs)
        distances = self.gaussians.score(features) if self.rule == "feature_distance" else None
        return [float(v) for v in unknown_scores(self.rule, probs, distances)]

    def reason(self, answer: Classified, num_known: int) -> str | None:
        """Why this answer is "unknown pill", or None when it is not."""
        score = answer.unknown_score
        if score is None or self.threshold is None or score <= self.threshold:
            return None
        if self.rule == "probability":
            return (f"top-1 probability {1 - score:.2f} is below {1 - self.threshold:.2f}: not one of the {num_known} "
                    f"known drugs, or too unclear to name; nearest candidates in topk")
        return (f"its look is farther from every one of the {num_known} known drugs (distance {score:.0f}) than the "
                f"right validation answers (up to {self.threshold:.0f}): not a known drug; nearest candidates in topk")
