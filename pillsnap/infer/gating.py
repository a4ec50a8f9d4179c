"""Routing policy of `auto` mode and the hard-case rule, as pure functions of plain values.

Also the one list of inference modes, which the predictor, `pillsnap predict` and the HTTP API all check against;
this module imports nothing heavy, so the CLI and the API can import it at start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# single: classify the whole photo as one pill; combo: detect pills, classify each; auto: single, falling back to
# combo when the photo does not look like one pill (decide_route).
INFERENCE_MODES = ("single", "combo", "auto")
LOW_CONFIDENCE, MULTI_OBJECT_HINT, MANUAL_COMBO = "low_confidence", "multi_object_hint", "manual_combo"


@dataclass(frozen=True)
class GatingDecision:
    """Where a photo goes and why. gating_score: how much the photo looks like one pill, in [0, 1]."""

    mode_used: str
    fallback_reason: str | None
    gating_score: float
    single_confidence: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def check_mode(mode: str) -> str:
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    return mode


def gating_score(single_confidence: float | None, num_detections: int | None) -> float:
    """Top-1 single-pill confidence, divided by the number of pills the detector saw when it saw several."""
    score = 1.0 if single_confidence is None else float(single_confidence)
    if num_detections is not None and num_detections > 1:
        score /= num_detections
    return score


def decide_route(mode: str, single_confidence: float | None, num_detections: int | None,
                 threshold: float) -> GatingDecision:
    """single/combo are taken as asked; auto falls back to combo when the whole-image classification is
    below `threshold` (low_confidence) or the detector saw more than one pill (multi_object_hint).

    num_detections is None when the detector was not consulted (or is unavailable).
    """
    check_mode(mode)
    score = gating_score(single_confidence, num_detections)
    if mode == "single":
        return GatingDecision("single", None, score, single_confidence)
    if mode == "combo":
        return GatingDecision("combo", MANUAL_COMBO, score, single_confidence)
    if single_confidence is not None and single_confidence < threshold:
        return GatingDecision("combo", LOW_CONFIDENCE, score, single_confidence)
    if num_detections is not None and num_detections > 1:
        return GatingDecision("combo", MULTI_OBJECT_HINT, score, single_confidence)
    return GatingDecision("single", None, score, single_confidence)


def hard_case_reasons(mode: str, mode_used: str, single_confidence: float | None, num_pills: int,
                      single_conf_below: float = 0.30) -> list[str]:
    """Why a prediction is a hard case worth reviewing: a single-pill answer with confidence below
    `single_conf_below`, an auto photo that fell back to combo, or a suspected misroute (the combo path found at
    most one pill). Empty list = not a hard case."""
    reasons = []
    if mode_used == "single" and single_confidence is not None and single_confidence < single_conf_below:
        reasons.append("low_single_confidence")
    if mode == "auto" and mode_used == "combo":
        reasons.append("auto_fallback_to_combo")
    if mode_used == "combo" and num_pills <= 1:
        reasons.append("misroute_suspected" if num_pills == 1 else "no_pill_found")
    return reasons
