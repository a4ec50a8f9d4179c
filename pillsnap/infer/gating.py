"""Routing policy of `auto` mode and the hard-case rule (seed D-3), as pure functions of plain values."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("single", "combo", "auto")
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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
    """Seed D-3 hard-case conditions: (single & confidence < 0.30) | (auto routed to combo) | a suspected
    misroute (the combo path found at most one pill). Empty list = not a hard case."""
    reasons = []
    if mode_used == "single" and single_confidence is not None and single_confidence < single_conf_below:
        reasons.append("low_single_confidence")
    if mode == "auto" and mode_used == "combo":
        reasons.append("auto_fallback_to_combo")
    if mode_used == "combo" and num_pills <= 1:
        reasons.append("misroute_suspected" if num_pills == 1 else "no_pill_found")
    return reasons
