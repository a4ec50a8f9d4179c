"""Go/No-Go gate and advisor: each reason fires on its own condition; scores follow the targets."""

import math

import pytest

from pillsnap.eval.gates import calculate_performance_score, evaluate_and_recommend, simple_stage_evaluation

PASSING = {"latency_p95_ms": 100, "n_eval_samples": 2500, "class_coverage": 0.5, "accuracy": 0.80,
           "no_crashes": True, "memory_stable": True}


def test_all_checks_pass():
    assert simple_stage_evaluation(1, PASSING) == (True, [])


@pytest.mark.parametrize("change, reason", [
    ({"latency_p95_ms": 500}, "LATENCY_P95_TOO_HIGH"),
    ({"n_eval_samples": 10}, "NOT_ENOUGH_SAMPLES"),
    ({"class_coverage": 0.1}, "COVERAGE_TOO_LOW"),
    ({"accuracy": 0.70}, "ACC_BELOW_TARGET"),
    ({"no_crashes": False}, "CRASH_DETECTED"),
    ({"memory_stable": False}, "MEMORY_UNSTABLE"),
])
def test_each_reason(change, reason):
    go, reasons = simple_stage_evaluation(1, PASSING | change)
    assert not go and reasons == [reason]


def test_hysteresis_and_regression_guard():
    assert simple_stage_evaluation(1, PASSING | {"accuracy": 0.779})[0]  # within epsilon of 0.78
    go, reasons = simple_stage_evaluation(1, PASSING, baseline={"accuracy": 0.90})
    assert not go and reasons == ["REGRESSION_TOO_LARGE"]


def test_missing_latency_fails_and_unknown_stage():
    results = dict(PASSING)
    del results["latency_p95_ms"]
    assert simple_stage_evaluation(1, results)[1] == ["LATENCY_P95_TOO_HIGH"]
    with pytest.raises(ValueError, match="stage 9"):
        simple_stage_evaluation(9, PASSING)


def test_performance_score_and_recommendation():
    good = {"classification": {"accuracy": 0.9}, "detection": {"mAP_0.5": 0.5}}
    assert calculate_performance_score(good, 1) == 1.0
    assert evaluate_and_recommend(1, good)["recommendation"] == "RECOMMEND_PROCEED"
    mid = {"classification": {"accuracy": 0.24}, "detection": {"mAP_0.5": 0.30}}  # 0.6 and 1.0 -> 0.8
    assert calculate_performance_score(mid, 1) == pytest.approx(0.8)
    low = {"classification": {"accuracy": 0.1}, "detection": {"mAP_0.5": 0.06}}
    verdict = evaluate_and_recommend(1, low)
    assert verdict["recommendation"] == "WARN_STOP"
    assert any("class_weights" in s for s in verdict["suggestions"])
    assert evaluate_and_recommend(1, {"loss": math.nan})["recommendation"] == "CRITICAL_FAILURE"
