"""Routing policy of `auto` mode and the hard-case rule, as pure functions of plain values.

Also the one list of inference modes, which the predictor, `pillsnap predict` and the HTTP API all check against;
this module imports nothing heavy, so the CLI and the API can import it at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# single: classify the whole photo as one pill; combo: detect pills, classify each; auto: the detector looks at every
# photo and the answer is single only when it sees one pill that agrees with the whole-photo answer (decide_route).
INFERENCE_MODES = ("single", "combo", "auto")
LOW_CONFIDENCE, MULTI_OBJECT_HINT, MANUAL_COMBO = "low_confidence", "multi_object_hint", "manual_combo"
DETECTOR_DISAGREES = "detector_disagrees"  # one pill detected, but not the one the whole-photo answer names/places
NO_PILL_DETECTED = "no_pill_detected"  # flag: the detector saw no pill; the whole-photo answer stands, flagged
# flag: auto saw one pill, a box that may hold no pill (the box check) away from the whole-photo pill: that answer
# stands, flagged, and the box is answered beside it
NO_SURE_PILL = "no_sure_pill_detected"
DETECTOR_UNAVAILABLE = "detector_unavailable"  # flag: no trained detector, so nothing could hide-check the photo
# flag and hard case: the detector found inference.max_pills boxes, so there may be more than were answered (only
# the most confident that many are): a photo of a blister pack or a heap, not of the few pills a person holds
PILL_LIMIT = "pill_limit_reached"
LOW_SINGLE_CONFIDENCE = "low_single_confidence"  # hard case: a single answer below hard_cases.single_confidence_below
# Hard cases read off the answered pills: (reason, the pill's field that says so).
PILL_HARD_CASES = (("unknown_pill", "unknown"), ("imprint_unresolved", "imprint_unresolved"),
                   ("hints_conflict", "hints_conflict"))
MAYBE_NO_PILL = "maybe_no_pill"  # hard case: a detector box that may hold no pill (pillsnap.infer.box_check)


@dataclass(frozen=True)
class GatingDecision:
    """Where a photo goes and why. gating_score: how much the photo looks like one pill, in [0, 1] (from the distinct
    pills auto counted, which may be fewer than `num_detections`, the boxes found); flags: what the answer must say
    about how it was reached (no pill detected, no pill the detector is sure of, no detector)."""

    mode_used: str
    fallback_reason: str | None
    gating_score: float
    single_confidence: float | None
    num_detections: int | None = None
    flags: tuple[str, ...] = ()
    num_doubted: int = 0  # of the detections, boxes that may hold no pill (the box check)

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags)}  # a list, as JSON gives it back


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


def decide_route(mode: str, single_confidence: float | None, num_detections: int | None, threshold: float,
                 detector_agrees: bool | None = None, has_detector: bool | None = None) -> GatingDecision:
    """single/combo are taken as asked. auto never hides a pill: more than one detected pill -> combo
    (multi_object_hint); one detected pill that disagrees with the whole-photo answer -> combo (detector_disagrees);
    a whole-photo answer below `threshold` that the detector did not confirm -> combo (low_confidence); otherwise
    single. A pill the detector confirmed stays single however unsure the classifier is: another crop of the same
    pill would not know more, and the calibrated probability (or the unknown answer) says how sure it is. No
    detected pill keeps the whole-photo answer with the no_pill_detected flag.

    num_detections is None when the detector did not run; detector_agrees is None when not checked. has_detector
    says whether one exists (None: it exists exactly when it ran); only a missing detector is flagged, not one that
    single mode never asked.
    """
    check_mode(mode)
    score = gating_score(single_confidence, num_detections)
    unavailable = num_detections is None if has_detector is None else not has_detector
    flags = (DETECTOR_UNAVAILABLE,) if unavailable else (NO_PILL_DETECTED,) if num_detections == 0 else ()

    def route(mode_used: str, reason: str | None) -> GatingDecision:
        return GatingDecision(mode_used, reason, score, single_confidence, num_detections, flags)

    if mode in ("single", "combo"):
        return route(mode, None if mode == "single" else MANUAL_COMBO)
    if num_detections is not None and num_detections > 1:
        return route("combo", MULTI_OBJECT_HINT)
    if num_detections == 1 and detector_agrees is False:
        return route("combo", DETECTOR_DISAGREES)
    unconfirmed = num_detections is None or (num_detections == 1 and detector_agrees is not True)
    if single_confidence is not None and single_confidence < threshold and unconfirmed:
        return route("combo", LOW_CONFIDENCE)
    return route("single", None)


def _says(pill: Mapping, field: str) -> bool:
    """Whether a pill's answer raises this hard case: an unresolved imprint that a sure (one-drug) prediction set
    settled anyway is not one (the answer shows it as sure)."""
    return bool(pill.get(field)) and not (field == "imprint_unresolved" and pill.get("sure") is True)


def hard_case_reasons(decision: GatingDecision, pills: Sequence[Mapping], single_conf_below: float = 0.30) -> list[str]:
    """Why a prediction deserves review; empty = it does not. Only answers that may be wrong count: the detector
    disagreeing with the whole-photo answer, no pill detected, a single answer below `single_conf_below`, a box
    that may hold no pill, a pill answered unknown, an imprint read that settles nothing (imprint_unresolved), the
    user's hints contradicting the answer. Routing as designed is not one: a photo of several pills going to combo
    (multi_object_hint) or a combo the user asked for is what those paths are for, and a detector that is simply
    absent would flag every photo."""
    reasons = []
    if decision.fallback_reason == DETECTOR_DISAGREES:
        reasons.append(DETECTOR_DISAGREES)
    reasons += [flag for flag in (NO_PILL_DETECTED, NO_SURE_PILL, PILL_LIMIT) if flag in decision.flags]
    low = decision.single_confidence is not None and decision.single_confidence < single_conf_below
    if decision.mode_used == "single" and low:
        reasons.append(LOW_SINGLE_CONFIDENCE)
    doubted = [pill.get("unknown_by") == "box" for pill in pills]
    if any(doubted):  # a doubted box is its own case: whether it holds a pill at all, not which drug it is
        reasons.append(MAYBE_NO_PILL)
    pills = [pill for pill, box in zip(pills, doubted, strict=True) if not box]
    reasons += [reason for reason, field in PILL_HARD_CASES if any(_says(pill, field) for pill in pills)]
    return reasons


SAME_PILL_SHARE = 0.5  # a doubted box lying this much inside another counted box is a faint second box of that pill


def _share_inside(box: np.ndarray, outer: np.ndarray) -> float:
    """The share of xyxy `box`'s area inside xyxy `outer`."""
    w = max(0.0, min(box[2], outer[2]) - max(box[0], outer[0]))
    h = max(0.0, min(box[3], outer[3]) - max(box[1], outer[1]))
    return w * h / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)


def distinct_pills(dets: np.ndarray, doubts: Sequence[str | None]) -> list[int]:
    """The detected boxes ([N, 5] x, y, w, h, confidence) that are distinct pills: every box the detector is sure
    of (`doubts` None), then the boxes that may hold no pill (most confident first) unless one lies mostly
    (SAME_PILL_SHARE) inside a box counted before: a faint second box of that pill. Nothing is hidden by this: it
    only counts pills for routing."""
    import numpy as np

    from pillsnap.utils.boxes import xywh_to_xyxy

    boxes = xywh_to_xyxy(np.asarray(dets[:, :4], float))
    counted = [i for i, doubt in enumerate(doubts) if doubt is None]
    for i in sorted((i for i, doubt in enumerate(doubts) if doubt is not None), key=lambda i: -dets[i, 4]):
        if all(_share_inside(boxes[i], boxes[k]) < SAME_PILL_SHARE for k in counted):
            counted.append(i)
    return counted
