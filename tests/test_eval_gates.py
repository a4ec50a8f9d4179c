"""The stage decision as pure functions: each gate reason fires on its own condition, the advisor's verdict follows
the targets and checks, and the combined GO/NO_GO honours the time-cap rule."""

import math
from pathlib import Path

import numpy as np
import pytest

from pillsnap.eval.criteria import ADVISOR, BUSINESS_GOALS, STAGES, StageCriteria, Target, stage_criteria
from pillsnap.eval.gates import (
    calculate_performance_score,
    evaluate_and_recommend,
    metric,
    simple_stage_evaluation,
    stage_decision,
    verdict_line,
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
    assert (decision["advisor"]["color"], decision["advisor"]["message"]) == ("🟢", "Stage 1: every target met")


@pytest.mark.parametrize("change, reason", [
    ({"latency_p95_ms": 500}, "LATENCY_P95_TOO_HIGH"),
    ({"n_eval_samples": 10}, "NOT_ENOUGH_SAMPLES"),
    ({"class_coverage": 0.1}, "COVERAGE_TOO_LOW"),
    ({"classification": {"acc": 0.70}}, "ACC_BELOW_TARGET"),
    ({"no_crashes": False}, "CRASH_DETECTED"),
    ({"run_status": "interrupted"}, "RUN_NOT_FINISHED"),
    ({"run_status": "running"}, "RUN_NOT_FINISHED"),
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
    assert decision["recommendation"] == "RECOMMEND_PROCEED" and decision["reason"] == "time_cap_rule"
    assert "ACC_BELOW_TARGET" in decision["go_no_go"]["reasons"]  # still reported, with the figures
    assert any(r.startswith("ACC_BELOW_TARGET: classification.acc 0.1 ") for r in decision["reasons"])
    assert stage_decision(1, with_(capped, nan_loss=True))["status"] == "NO_GO"  # a critical failure still stops
    failed_load = with_(capped, mandatory_checks={**STAGE1_CHECKS, "classification_model_loading": False})
    assert stage_decision(1, failed_load)["status"] == "NO_GO"
    assert stage_decision(2, with_(capped, mandatory_checks={}))["status"] == "NO_GO"  # the rule is stage 1's


def test_every_stage_has_checks_and_targets_as_data():
    for stage in (1, 2, 3, 4):
        criteria = stage_criteria(stage)
        assert len(criteria.mandatory_checks) == 4 and criteria.targets
        assert all("." in t.path and not math.isnan(t.threshold) for t in criteria.targets)


# ---- device-aware targets, one verdict, reasons with their numbers ------------------------------------------------
ON_CPU = with_(PASSING, device="cpu", latency_p95_ms=806.0,
               classification={"inference_time_ms": 7.6}, detection={"inference_time_ms": 120.0})


def test_a_cpu_run_with_gpu_targets_reports_latency_as_not_comparable_and_passes_the_gate():
    go, reasons = simple_stage_evaluation(1, ON_CPU)
    assert go and reasons == []
    decision = stage_decision(1, ON_CPU)
    assert decision["status"] == "GO" and decision["recommendation"] == "RECOMMEND_PROCEED"
    notes = {n["path"]: n for n in decision["not_comparable"]}
    assert notes["latency_p95_ms"] == {"path": "latency_p95_ms", "value": 806.0, "threshold": 220,
                                       "target_device": "cuda", "device": "cpu"}
    assert notes["detection.inference_time_ms"]["value"] == 120.0 and notes["detection.inference_time_ms"][
        "device"] == "cpu"
    # Neither scored nor "unmeasured": reported apart, with the figure and the device.
    assert "detection.inference_time_ms" not in decision["advisor"]["unmeasured"]
    assert not any("inference_time_ms" in r for r in decision["reasons"])
    on_gpu = with_(ON_CPU, device="cuda:0")
    assert simple_stage_evaluation(1, on_gpu) == (False, ["LATENCY_P95_TOO_HIGH"])
    assert stage_decision(1, on_gpu)["status"] == "NO_GO"


def test_a_cpu_run_still_fails_on_accuracy():
    short = with_(ON_CPU, classification={"acc": 0.70})
    decision = stage_decision(1, short)
    assert decision["status"] == "NO_GO"
    assert "ACC_BELOW_TARGET: classification.acc 0.7 (target >= 0.78, 0.778 with hysteresis)" in decision["reasons"]


def test_the_same_checkpoints_on_a_loaded_machine_get_the_same_decision():
    # The figures of two real CPU evaluations of the same checkpoints, idle and under load.
    idle = with_(ON_CPU, latency_p95_ms=806.0, classification={"inference_time_ms": 7.6})
    busy = with_(ON_CPU, latency_p95_ms=4398.0, classification={"inference_time_ms": 93.0})
    first, second = stage_decision(1, idle), stage_decision(1, busy)
    keys = ("status", "recommendation", "reason", "action", "reasons")
    assert [first[k] for k in keys] == [second[k] for k in keys]
    assert first["advisor"]["performance_score"] == second["advisor"]["performance_score"]


def test_a_failed_gate_turns_proceed_into_optimize_with_what_to_change():
    few = with_(PASSING, n_eval_samples=500)
    assert evaluate_and_recommend(1, few)["recommendation"] == "RECOMMEND_PROCEED"  # the score alone
    decision = stage_decision(1, few)
    assert decision["status"] == "NO_GO" and decision["recommendation"] == "SUGGEST_OPTIMIZE"
    assert decision["reason"] == "go_no_go_failed" and decision["advisor"]["recommendation"] == "SUGGEST_OPTIMIZE"
    assert decision["advisor"]["score_recommendation"] == "RECOMMEND_PROCEED"
    assert decision["advisor"]["color"] == "🟡" != evaluate_and_recommend(1, few)["color"]  # the final verdict's
    assert decision["reasons"] == ["NOT_ENOUGH_SAMPLES: 500 validation samples evaluated (need >= 2000, the design "
                                   "asks 2000)"]
    assert "data.val_ratio" in decision["suggestions"][0] and "data.val_ratio" in decision["action"]
    assert decision["advisor"]["user_options"][0] == "[1] Apply the suggestions and retry"


@pytest.mark.parametrize("change", [
    {}, {"n_eval_samples": 10}, {"classification": {"acc": 0.3}}, {"detection": {"mAP@0.5": 0.0}},
    {"nan_loss": True}, {"time_cap": {"success": True}, "classification": {"acc": 0.1}},
    {"mandatory_checks": {**STAGE1_CHECKS, "onnx_conversion_success": False}}, {"device": "cpu"},
    {"classification": {"acc": 0.79}, "detection": {"mAP@0.5": 0.2}},
])
def test_one_verdict_everywhere(change):
    decision = stage_decision(1, with_(PASSING, **change))
    go = decision["status"] == "GO"
    assert go == (decision["recommendation"] == "RECOMMEND_PROCEED") == (decision["advisor"]["recommendation"]
                                                                         == "RECOMMEND_PROCEED")
    assert decision["action"].startswith("proceed to stage 2") == go
    if not go:
        assert decision["suggestions"] and decision["suggestions"][0] in decision["action"]
    assert verdict_line(decision) == (f"stage 1 decision {decision['status']} ({decision['recommendation']}); "
                                      f"next step: {decision['action']}")


def test_suggest_optimize_always_names_what_to_change():
    # Only a target with no knob of its own is short: the verdict still says what to change.
    odd = {"classification": {"acc": 0.95, "macro_f1": 0.9, "top5": 0.99, "per_class_min_acc": 0.9},
           "production": {"api_uptime": 0.5}, "detection": {"mAP@0.5": 0.9},
           "mandatory_checks": {"full_dataset_processing": True}}
    decision = stage_decision(4, odd)
    assert decision["recommendation"] == "SUGGEST_OPTIMIZE" and decision["suggestions"]


def test_a_real_stage_1_split_can_meet_the_sample_floor():
    # 5,000 stage-1 photos with 15 % held out give ~750 validation crops, never the design's 2,000: every crop of the
    # split must then be evaluated, and fewer still fails.
    whole = with_(PASSING, n_eval_samples=812, n_eval_available=812)
    assert simple_stage_evaluation(1, whole) == (True, [])
    part = with_(PASSING, n_eval_samples=700, n_eval_available=812)
    assert simple_stage_evaluation(1, part) == (False, ["NOT_ENOUGH_SAMPLES"])
    assert "need >= 812" in stage_decision(1, part)["reasons"][0]
    big = with_(PASSING, n_eval_samples=2500, n_eval_available=9000)
    assert simple_stage_evaluation(1, big)[0]  # a large split: the design's 2,000 is the floor
    # a crop that cannot be decoded cannot be evaluated: every crop that can be read is the floor
    damaged = with_(PASSING, n_eval_samples=811, n_eval_available=812, n_eval_undecodable=1)
    assert simple_stage_evaluation(1, damaged) == (True, [])
    assert simple_stage_evaluation(1, with_(damaged, n_eval_samples=700))[1] == ["NOT_ENOUGH_SAMPLES"]
    # ... up to the share of unreadable data the advisor tolerates (1 %): a split that mostly failed is not evaluated
    lost = with_(PASSING, n_eval_samples=3, n_eval_available=5000, n_eval_undecodable=4997)
    assert simple_stage_evaluation(1, lost) == (False, ["NOT_ENOUGH_SAMPLES"])
    small = with_(PASSING, n_eval_samples=1490, n_eval_available=1500, n_eval_undecodable=10)  # 10 within 1 %
    assert simple_stage_evaluation(1, small)[0]
    assert not simple_stage_evaluation(1, with_(small, n_eval_samples=1400, n_eval_undecodable=100))[0]


def test_stage_3_follows_its_own_detection_floor():
    stage3 = {"classification": {"acc": 0.86, "macro_f1": 0.75, "top5": 0.95, "per_class_min_f1": 0.4},
              "detection": {"mAP@0.5": 0.35, "mAP@0.5:0.95": 0.2, "recall": 0.6, "precision": 0.6},
              "scalability": {"multi_batch_size": 64}, "mandatory_checks": {c: True for c in
                                                                             STAGES[3].mandatory_checks},
              "latency_p95_ms": 120, "n_eval_samples": 18525, "class_coverage": 0.9, "no_crashes": True,
              "memory_stable": True, "device": "cuda:0"}
    decision = stage_decision(3, stage3)
    assert decision["status"] == "GO", decision["reasons"]
    assert "TARGET_NOT_MET: detection.mAP@0.5:0.95 0.2 (target >= 0.5)" in decision["reasons"]  # still on record
    assert stage_decision(3, with_(stage3, detection={"mAP@0.5": 0.1}))["status"] == "NO_GO"
    # one class whose few crops were all missed is that class failing, not the model failing to learn
    one_class = stage_decision(3, with_(stage3, classification={**stage3["classification"], "per_class_min_f1": 0.0}))
    assert one_class["advisor"]["reason"] != "model_not_learning"
    assert "TARGET_NOT_MET: classification.per_class_min_f1 0 (target >= 0.3)" in one_class["reasons"]


def test_the_lowest_class_f1_counts_classes_with_enough_crops_to_measure_it():
    """1,000 classes right 85 % of the time, with 1 to 29 validation crops each (drugs seen mostly in combination
    photos have one or two): the observed lowest F1 is 0 for such a classifier; over classes of 5 crops or more
    it measures the classifier. A class of 10 crops that is never right still shows."""
    from pillsnap.eval.stage_measure import MIN_F1_CROPS, per_class_floors

    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(1000), rng.integers(1, 30, 1000))
    wrong = rng.random(len(y_true)) > 0.85
    y_pred = np.where(wrong, (y_true + rng.integers(1, 1000, len(y_true))) % 1000, y_true)
    floors = per_class_floors(y_true, y_pred)
    assert floors["per_class_min_f1_observed"] == 0.0 and floors["per_class_min_f1"] > 0.3
    assert floors["per_class_f1_classes"] == int((np.bincount(y_true) >= MIN_F1_CROPS).sum())
    dead = np.where(y_true == 7, 8, y_pred)  # class 7, with 10 more crops, is never right
    floors = per_class_floors(np.concatenate([y_true, np.full(10, 7)]), np.concatenate([dead, np.full(10, 8)]))
    assert floors["per_class_min_f1"] == 0.0


def test_criteria_are_built_by_keyword_and_the_advisor_numbers_live_with_them():
    with pytest.raises(TypeError):
        StageCriteria(0.78, 220, 0.2, 2000, 0.02, 0.002, (), ())  # type: ignore[misc]
    assert ADVISOR.max_oom_recoveries == 5 and ADVISOR.gpu_memory_high_gb == 14
    at_limit = with_(PASSING, repeated_oom=ADVISOR.max_oom_recoveries)
    assert evaluate_and_recommend(1, at_limit)["recommendation"] != "CRITICAL_FAILURE"
    assert BUSINESS_GOALS == {"classification.macro_f1": 0.92, "detection.mAP@0.5": 0.85}
    hot = with_(PASSING, system={"gpu_memory_gb": ADVISOR.gpu_memory_high_gb + 1})
    assert any("batch_size" in s for s in evaluate_and_recommend(1, hot)["suggestions"])


def test_figures_the_training_run_recorded_are_judged_on_its_device():
    """Throughput and batch size come from the training stream: a GPU run evaluated on a CPU box keeps them
    comparable, and a CPU run evaluated where CUDA exists does not hold its CPU throughput to a GPU target."""
    from pillsnap.eval.gates import not_comparable, performance_ratios

    stage = next(s for s in (1, 2, 3, 4) if any(t.path == "optimization.throughput_img_s" and t.device
                                                 for t in stage_criteria(s).targets))
    gpu_trained = with_(ON_CPU, training_device="cuda:0", optimization={"throughput_img_s": 1.0})
    assert "optimization.throughput_img_s" in performance_ratios(gpu_trained, stage)
    assert "optimization.throughput_img_s" not in {n["path"] for n in not_comparable(gpu_trained, stage)}
    cpu_trained = with_(ON_CPU, device="cuda:0", training_device="cpu", optimization={"throughput_img_s": 1.0})
    assert "optimization.throughput_img_s" not in performance_ratios(cpu_trained, stage)
    note = next(n for n in not_comparable(cpu_trained, stage) if n["path"] == "optimization.throughput_img_s")
    assert note["device"] == "cpu"


def test_a_run_the_time_cap_stopped_short_is_told_so_not_to_read_train_err():
    capped = with_(PASSING, mandatory_checks={**STAGE1_CHECKS, "pipeline_complete": False}, run_status="time_capped",
                   time_cap={"success": False, "reasons": ["CLASSES_8_BELOW_30"]})
    decision = stage_decision(1, capped)
    assert decision["status"] == "NO_GO"
    tips = " ".join(decision["suggestions"])
    assert "time cap stopped training (CLASSES_8_BELOW_30 when it did)" in tips and "train.err" not in tips
    crashed = with_(capped, run_status="crashed")
    assert "read logs/train.err" in " ".join(stage_decision(1, crashed)["suggestions"])


def test_class_weights_are_suggested_only_where_the_classes_are_unbalanced():
    """An accuracy shortfall names the classifier's knobs; class weights only when the stage's training classes
    are measurably unbalanced (the demo's 8 drugs at 1.32 got "Counter class imbalance" before)."""
    weights = "Counter class imbalance (loss.use_class_weights=true)"
    for ratio, suggested in ((1.3, False), (ADVISOR.imbalance_worth_weighting + 0.5, True), (None, True)):
        results = with_(PASSING, classification={"acc": 0.5}, advanced={"class_imbalance_ratio": ratio})
        decision = stage_decision(1, results)
        assert decision["status"] == "NO_GO" and decision["suggestions"]
        assert (weights in decision["suggestions"]) == suggested, (ratio, decision["suggestions"])


def test_a_pipeline_slow_for_its_imprint_reads_is_told_so_not_to_shrink_the_models():
    """On a GPU the models take ~10 ms of a photo and each imprint read ~130 ms of CPU: a p95 over the target there
    is the reads', and a smaller backbone or an fp16 export would not move it."""
    def slow(without_reading: float) -> list[str]:
        latency = {"pipeline": {"p95_ms": 540.0}, "pipeline_without_imprint": {"p95_ms": without_reading}}
        results = with_(PASSING, device="cuda:0", latency_p95_ms=540.0, latency=latency)
        decision = stage_decision(1, results)
        assert decision["status"] == "NO_GO" and any(r.startswith("LATENCY_P95_TOO_HIGH") for r in decision["reasons"])
        return decision["suggestions"]

    reads = slow(62.0)
    assert "Imprint reading takes most" in reads[0] and "inference.imprint.parallel_reads" in reads[0]
    assert not any("Speed up inference" in tip for tip in reads)  # not the models: they take ~10 ms of it
    assert "Imprint reading takes most" not in " ".join(slow(400.0))  # the models' own time: the usual advice
    assert any("Speed up inference" in tip for tip in slow(400.0))
    # the reads are most of it, yet the pipeline without them (250 ms) would still miss the gate's 220 ms: both
    both = slow(250.0)
    assert "Imprint reading takes most" in both[0] and any("Speed up inference" in tip for tip in both)


def test_a_model_that_trained_from_random_weights_where_pretrained_were_asked_for_is_named_first():
    """An offline GPU box trains a 5,000-class model from scratch for hours and "looks fine"; training longer, the
    usual advice for an accuracy shortfall, would not make up for the missing pretrained weights."""
    results = with_(PASSING, classification={"acc": 0.5}, init_weights={
        "classification": "random: pretrained tf_efficientnetv2_s weights could not be fetched (offline)",
        "detection": "file /root/.cache/yolo11m.pt"})
    tips = stage_decision(1, results)["suggestions"]
    assert tips[0].startswith("The classification model trained from random weights (pretrained "
                              "tf_efficientnetv2_s weights could not be fetched (offline))")
    assert "model.weights_path" in tips[0]
    assert not any("detection model trained from random" in tip for tip in tips)
    asked_for = with_(results, init_weights={"classification": "random (model.pretrained=false)"})
    assert not any("random weights" in tip for tip in stage_decision(1, asked_for)["suggestions"])


def test_a_slow_loader_is_told_to_use_the_crop_cache_only_where_the_run_had_none():
    from pillsnap.eval.suggestions import suggestions_for

    slow = ADVISOR.data_loading_slow_s + 1
    plain = suggestions_for({"system": {"data_loading_s": slow, "crop_cache": None}}, [], {}, [])
    cached = suggestions_for({"system": {"data_loading_s": slow, "crop_cache": "jpeg"}}, [], {}, [])
    assert any("data.cache.enabled=true" in tip for tip in plain)
    assert not any("data.cache.enabled=true" in tip for tip in cached)
    assert any("already come from the crop cache" in tip for tip in cached) and len(cached) == len(plain)


def test_a_stage_the_time_cap_stopped_without_its_rule_is_no_go_at_every_stage():
    """A run the time cap stopped trained less than its stage planned: unless the stage's time-cap rule holds, it
    is NO_GO whatever its checks, and told to raise the cap, not to read train.err. Before, stage 4 (no mandatory
    check noticed the cap) gave GO, and stage 3 a crash's advice."""
    for stage in (3, 4):
        checks = {c: True for c in STAGES[stage].mandatory_checks}
        capped = with_(PASSING, mandatory_checks=checks, run_status="time_capped",
                       time_cap={"success": False, "reasons": ["TIME_CAP_SUCCESS_NOT_ALLOWED"]})
        decision = stage_decision(stage, capped)
        assert decision["status"] == "NO_GO" and "TIME_CAP_REACHED" in decision["go_no_go"]["reasons"], stage
        tips = " ".join(decision["suggestions"])
        assert "time_limit_hours" in tips and "train.err" not in tips, tips
        allowed = stage_decision(stage, with_(capped, time_cap={"success": True}))
        assert "TIME_CAP_REACHED" not in allowed["go_no_go"]["reasons"]
        assert "TIME_CAP_REACHED" not in stage_decision(stage, with_(capped, run_status="completed"))["go_no_go"][
            "reasons"]


def test_a_gos_next_step_continues_from_any_folder_into_a_folder_of_its_own(tmp_path):
    """The next step read 'bash scripts/train.sh --stage 2': the repository's config from the repository's root,
    whatever config and folders the run had, and by default into the same folder, replacing the stage's
    checkpoints. It now names the run's saved config, the script by its path and a folder for the next stage."""
    import shlex

    from pillsnap.config import load_config
    from pillsnap.eval.suggestions import next_stage_command

    exp = tmp_path / "runs" / "stage1" / "exp"
    decision = stage_decision(1, PASSING, exp_dir=exp)
    assert decision["status"] == "GO"
    command = decision["action"].removeprefix("proceed to stage 2 (").removesuffix(")")
    words = shlex.split(command)
    assert words[:2] == ["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "train.sh")]
    assert words[2:] == ["--cfg", str(exp / "config.yaml"), "--stage", "2",
                         f"paths.exp_dir={tmp_path / 'runs' / 'stage2' / 'exp'}", "train.resume=null"]
    load_config(None, words[-2:], dotenv_path=None)  # the overrides it names are the config's
    assert shlex.split(next_stage_command(3, tmp_path / "my run"))[-2] == f"paths.exp_dir={tmp_path / 'my run'}_stage4"


def test_a_memory_check_on_too_few_epochs_says_it_was_not_measured_not_that_memory_grew():
    from pillsnap.eval.suggestions import suggestions_for

    unmeasured = suggestions_for({"memory_growth": None}, [], {}, ["MANDATORY_CHECK_FAILED: memory_leak_test"])
    grew = suggestions_for({"memory_growth": 1.4}, [], {}, ["MANDATORY_CHECK_FAILED: memory_leak_test"])
    assert "fewer than 3 epochs were trained: train 3 or more (train.epochs" in unmeasured[0]
    assert "Memory grew" not in unmeasured[0]
    assert grew[0].startswith("Memory grew across epochs")
