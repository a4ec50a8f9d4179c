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
    assert hard_case_reasons("single", "single", 0.2, 1) == ["low_single_confidence"]
    assert hard_case_reasons("single", "single", 0.9, 1) == []
    assert hard_case_reasons("auto", "combo", 0.9, 3) == ["auto_fallback_to_combo"]
    assert hard_case_reasons("auto", "combo", 0.4, 1) == ["auto_fallback_to_combo", "misroute_suspected"]
    assert hard_case_reasons("combo", "combo", None, 0) == ["no_pill_found"]
    assert hard_case_reasons("auto", "single", 0.29, 1, single_conf_below=0.3) == ["low_single_confidence"]
    disagree = decide_route("auto", 0.9, 1, threshold=0.5, detector_agrees=False)
    assert hard_case_reasons("auto", "combo", 0.9, 1, decision=disagree)[0] == "detector_disagrees"
    nothing = decide_route("auto", 0.9, 0, threshold=0.5)
    assert hard_case_reasons("auto", "single", 0.9, 1, decision=nothing) == ["no_pill_detected"]
