"""The stage decision as pure functions: each gate reason fires on its own condition, the advisor's verdict follows
the targets and checks, and the combined GO/NO_GO honours the time-cap rule."""

import math

import pytest

from pillsnap.eval.criteria import STAGES, Target, stage_criteria
from pillsnap.eval.gates import (
    calculate_performance_score,
    evaluate_and_recommend,
    metric,
    simple_stage_evaluation,
    stage_decision,
)

STAGE1_CHECKS = {c: True for c in STAGES[1].mandatory_checks}
PASSING = {
    "classification": {"acc": 0.80, "inference_time_ms": 5.0}, "detection": {"mAP@0.5": 0.5, "inference_time_ms": 20},
    "system": {"gpu_memory_gb": 6.0, "data_loading_s": 0.5}, "mandatory_checks": STAGE1_CHECKS,
    "latency_p95_ms": 100, "n_eval_samples": 2500, "class_coverage": 0.5, "no_crashes": True, "memory_stable": True,
}


def with_(base: dict, **sections) -> dict:
    """A copy of `base` with some sections' keys replaced."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(section), dict):
            out[section].update(value)
        else:
            out[section] = value
    return out


def test_all_checks_pass_and_the_stage_is_go():
    assert simple_stage_evaluation(1, PASSING) == (True, [])
    decision = stage_decision(1, PASSING)
    assert decision["status"] == "GO" and decision["recommendation"] == "RECOMMEND_PROCEED"
    assert decision["advisor"]["reason"] == "all_targets_met" and decision["reasons"] == []


@pytest.mark.parametrize("change, reason", [
    ({"latency_p95_ms": 500}, "LATENCY_P95_TOO_HIGH"),
    ({"n_eval_samples": 10}, "NOT_ENOUGH_SAMPLES"),
    ({"class_coverage": 0.1}, "COVERAGE_TOO_LOW"),
    ({"classification": {"acc": 0.70}}, "ACC_BELOW_TARGET"),
    ({"no_crashes": False}, "CRASH_DETECTED"),
    ({"memory_stable": False}, "MEMORY_UNSTABLE"),
])
def test_each_gate_reason(change, reason):
    go, reasons = simple_stage_evaluation(1, with_(PASSING, **change))
    assert not go and reasons == [reason]
    assert stage_decision(1, with_(PASSING, **change))["status"] == "NO_GO"


def test_hysteresis_and_regression_guard():
    assert simple_stage_evaluation(1, with_(PASSING, classification={"acc": 0.779}))[0]  # within epsilon of 0.78
    go, reasons = simple_stage_evaluation(1, PASSING, baseline={"classification": {"acc": 0.90}})
    assert not go and reasons == ["REGRESSION_TOO_LARGE"]
    assert simple_stage_evaluation(1, PASSING, baseline={"classification": {"acc": 0.81}})[0]  # drop 0.01 <= 0.02


def test_missing_latency_fails_and_unknown_stage():
    results = {k: v for k, v in PASSING.items() if k != "latency_p95_ms"}
    assert simple_stage_evaluation(1, results)[1] == ["LATENCY_P95_TOO_HIGH"]
    with pytest.raises(ValueError, match="stage 9"):
        simple_stage_evaluation(9, PASSING)


def test_targets_score_in_both_directions_and_skip_what_is_not_measured():
    assert Target("x.y", 0.4).ratio(0.2) == 0.5 and Target("x.y", 0.4).ratio(0.9) == 1.0
    assert Target("x.y", 10, higher_is_better=False).ratio(20) == 0.5
    mid = with_(PASSING, classification={"acc": 0.24}, detection={"mAP@0.5": 0.30})
    # acc 0.24 / 0.40 = 0.6; the other five measured targets are met: (0.6 + 5) / 6
    assert calculate_performance_score(mid, 1) == pytest.approx(5.6 / 6)
    assert calculate_performance_score({"classification": {"acc": 0.2}}, 1) == pytest.approx(0.5)
    assert metric({"detection": {"mAP@0.5:0.95": 0.3}}, "detection.mAP@0.5:0.95") == 0.3


def test_a_detector_that_finds_nothing_stops_the_stage_whatever_the_average():
    dead = with_(PASSING, detection={"mAP@0.5": 0.0})
    assert calculate_performance_score(dead, 1) == pytest.approx(5 / 6)  # the average alone would proceed
    verdict = evaluate_and_recommend(1, dead)
    assert verdict["recommendation"] == "WARN_STOP" and verdict["reason"] == "model_not_learning"
    assert verdict["reasons"] == ["TARGET_NOT_MET: detection.mAP@0.5 0 (target >= 0.3)"]
    assert any("train.detection.lr" in s for s in verdict["suggestions"])
    assert stage_decision(1, dead)["status"] == "NO_GO"


def test_a_quality_target_far_below_caps_the_recommendation():
    weak = with_(PASSING, classification={"acc": 0.15})  # 0.375 of the target
    verdict = evaluate_and_recommend(1, weak)
    assert verdict["recommendation"] == "SUGGEST_OPTIMIZE" and verdict["reason"] == "quality_target_far_below"
    assert any("class_weights" in s for s in verdict["suggestions"])
    near = with_(PASSING, classification={"acc": 0.35})  # 0.875 of the target: proceeding is sound
    assert evaluate_and_recommend(1, near)["reason"] == "sufficient_performance"


def test_failed_mandatory_checks_are_named_and_external_ones_are_only_unverified():
    broken = with_(PASSING, mandatory_checks={**STAGE1_CHECKS, "onnx_conversion_success": False})
    verdict = evaluate_and_recommend(1, broken)
    assert verdict["recommendation"] == "WARN_STOP" and verdict["reason"] == "mandatory_check_failed"
    assert "MANDATORY_CHECK_FAILED: onnx_conversion_success" in verdict["reasons"]
    stage4 = {"classification": {"acc": 0.95, "macro_f1": 0.9, "top5": 0.99, "per_class_min_acc": 0.9},
              "mandatory_checks": {"full_dataset_processing": True}}
    verdict = evaluate_and_recommend(4, stage4)
    assert verdict["recommendation"] == "RECOMMEND_PROCEED"
    assert sum(r.startswith("UNVERIFIED: ") for r in verdict["reasons"]) == 3
    assert "detection.mAP@0.5" in verdict["unmeasured"]


@pytest.mark.parametrize("broken, reason", [({"repeated_oom": 6}, "REPEATED_OOM"), ({"nan_loss": True}, "NAN_LOSS"),
                                            ({"data_corruption_rate": 0.05}, "DATA_CORRUPTION")])
def test_critical_failures(broken, reason):
    verdict = evaluate_and_recommend(1, with_(PASSING, **broken))
    assert verdict["recommendation"] == "CRITICAL_FAILURE" and verdict["reasons"][0].startswith(reason)


def test_a_time_capped_stage_1_meeting_the_rule_is_go_on_its_own_checks():
    capped = with_(PASSING, classification={"acc": 0.1}, n_eval_samples=5, time_cap={"success": True})
    decision = stage_decision(1, capped)
    assert decision["status"] == "GO" and "time cap" in decision["rule"]
    assert "ACC_BELOW_TARGET" in decision["reasons"]  # still reported
    failed_load = with_(capped, mandatory_checks={**STAGE1_CHECKS, "classification_model_loading": False})
    assert stage_decision(1, failed_load)["status"] == "NO_GO"
    assert stage_decision(2, with_(capped, mandatory_checks={}))["status"] == "NO_GO"  # the rule is stage 1's


def test_every_stage_has_checks_and_targets_as_data():
    for stage in (1, 2, 3, 4):
        criteria = stage_criteria(stage)
        assert len(criteria.mandatory_checks) == 4 and criteria.targets
        assert all("." in t.path and not math.isnan(t.threshold) for t in criteria.targets)
