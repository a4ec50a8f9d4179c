"""Auto-mode gating and the hard-case rule (pure functions)."""

from __future__ import annotations

import pytest

from pillsnap.infer.gating import decide_route, gating_score, hard_case_reasons


def test_manual_modes_are_taken_as_asked() -> None:
    single = decide_route("single", 0.1, 5, threshold=0.5)
    assert single.mode_used == "single" and single.fallback_reason is None
    combo = decide_route("combo", None, 3, threshold=0.5)
    assert combo.mode_used == "combo" and combo.fallback_reason == "manual_combo"


def test_auto_low_confidence_falls_back_to_combo_unless_the_detector_confirmed_the_pill() -> None:
    d = decide_route("auto", 0.49, 1, threshold=0.5)  # one box, agreement not checked
    assert (d.mode_used, d.fallback_reason, d.single_confidence) == ("combo", "low_confidence", 0.49)
    assert d.num_detections == 1 and d.flags == ()
    assert decide_route("auto", 0.49, None, threshold=0.5).fallback_reason == "low_confidence"  # no detector
    confirmed = decide_route("auto", 0.2, 1, threshold=0.5, detector_agrees=True)
    assert (confirmed.mode_used, confirmed.fallback_reason) == ("single", None)


def test_auto_multi_object_hint_falls_back_even_when_confident() -> None:
    d = decide_route("auto", 0.95, 3, threshold=0.5)
    assert (d.mode_used, d.fallback_reason) == ("combo", "multi_object_hint")
    assert d.gating_score == pytest.approx(0.95 / 3)


def test_auto_single_needs_one_detected_pill_that_agrees() -> None:
    d = decide_route("auto", 0.8, 1, threshold=0.5, detector_agrees=True)
    assert (d.mode_used, d.fallback_reason, d.gating_score, d.flags) == ("single", None, 0.8, ())
    d = decide_route("auto", 0.95, 1, threshold=0.5, detector_agrees=False)  # one box, but another pill or place
    assert (d.mode_used, d.fallback_reason) == ("combo", "detector_disagrees")


def test_no_detected_pill_keeps_the_whole_photo_answer_with_a_flag() -> None:
    for confidence in (0.9, 0.2):
        d = decide_route("auto", confidence, 0, threshold=0.5)
        assert (d.mode_used, d.flags) == ("single", ("no_pill_detected",))
    d = decide_route("auto", 0.9, None, threshold=0.5)
    assert d.mode_used == "single" and d.flags == ("detector_unavailable",)


def test_several_detected_pills_win_over_everything() -> None:
    # A confident whole-photo answer must never hide the other pills.
    for confidence in (0.2, 0.99):
        assert decide_route("auto", confidence, 4, threshold=0.5, detector_agrees=True).fallback_reason == \
            "multi_object_hint"


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        decide_route("both", 0.5, None, threshold=0.5)


def test_gating_score_without_single_confidence() -> None:
    assert gating_score(None, None) == 1.0
    assert gating_score(None, 2) == 0.5


def test_hard_case_conditions() -> None:
    pill = {"unknown": False, "imprint_unresolved": False, "hints_conflict": False}
    confident, unsure = decide_route("single", 0.9, None, threshold=0.5), decide_route("single", 0.2, None, 0.5)
    assert hard_case_reasons(confident, [pill]) == []
    assert hard_case_reasons(unsure, [pill]) == ["low_single_confidence"]
    assert hard_case_reasons(decide_route("auto", 0.29, 1, 0.5, True), [pill], single_conf_below=0.3) == \
        ["low_single_confidence"]
    disagree = decide_route("auto", 0.9, 1, threshold=0.5, detector_agrees=False)
    assert hard_case_reasons(disagree, [pill]) == ["detector_disagrees"]
    nothing = decide_route("auto", 0.9, 0, threshold=0.5)
    assert hard_case_reasons(nothing, [pill]) == ["no_pill_detected"]
    assert hard_case_reasons(decide_route("combo", None, 0, threshold=0.5), []) == ["no_pill_detected"]


def test_routine_routing_is_not_a_hard_case() -> None:
    """A photo of several pills going to combo is what auto is for: it used to be logged (with its upload kept)
    as auto_fallback_to_combo, 306 of 419 records in one session."""
    pills = [{"unknown": False, "imprint_unresolved": False, "hints_conflict": False}] * 3
    for mode in ("auto", "combo"):
        for confidence in (0.95, 0.1):  # the whole-photo confidence means nothing for a photo of several pills
            assert hard_case_reasons(decide_route(mode, confidence, 3, threshold=0.5), pills) == []
    no_detector = decide_route("auto", 0.9, None, threshold=0.5)
    assert no_detector.flags == ("detector_unavailable",) and hard_case_reasons(no_detector, pills[:1]) == []


def test_a_pill_that_may_be_wrong_makes_a_hard_case() -> None:
    routine = decide_route("auto", 0.9, 3, threshold=0.5)
    plain = {"unknown": False, "imprint_unresolved": False, "hints_conflict": False}
    for field, reason in (("unknown", "unknown_pill"), ("imprint_unresolved", "imprint_unresolved"),
                          ("hints_conflict", "hints_conflict")):
        assert hard_case_reasons(routine, [plain, {**plain, field: True}, plain]) == [reason]
    odd = {"unknown": True, "imprint_unresolved": False, "hints_conflict": True}
    assert hard_case_reasons(decide_route("auto", 0.9, 0, threshold=0.5), [odd]) == \
        ["no_pill_detected", "unknown_pill", "hints_conflict"]
    # an unresolved imprint that the pill's sure (one-drug) set settled anyway is not a case; an open set's is
    unresolved = {**plain, "imprint_unresolved": True}
    assert hard_case_reasons(routine, [{**unresolved, "sure": True}]) == []
    assert hard_case_reasons(routine, [{**unresolved, "sure": False}]) == ["imprint_unresolved"]
    assert hard_case_reasons(routine, [{**unresolved, "sure": None}]) == ["imprint_unresolved"]  # no calibrated sets
