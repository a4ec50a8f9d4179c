"""Stage Go/No-Go gate and the optimisation advisor of the design: pure functions of plain values.

The design's advisor waits for terminal input; ours returns the recommendation and options so that the CLI,
a report or the dashboard can present them, and never blocks a training job.
"""

from __future__ import annotations

import math
from typing import Any

STAGE_TARGETS: dict[int, dict[str, float]] = {
    1: {"min_accuracy": 0.78, "max_latency_ms": 220, "min_coverage": 0.20,
        "min_eval_samples": 2000, "max_acc_drop": 0.02, "epsilon_acc": 0.002},
    2: {"min_accuracy": 0.82, "max_latency_ms": 220, "min_coverage": 0.40,
        "min_eval_samples": 5000, "max_acc_drop": 0.02, "epsilon_acc": 0.002},
    3: {"min_accuracy": 0.85, "max_latency_ms": 200, "min_coverage": 0.70,
        "min_eval_samples": 10000, "max_acc_drop": 0.01, "epsilon_acc": 0.002},
    4: {"min_accuracy": 0.85, "max_latency_ms": 200, "min_coverage": 0.70,
        "min_eval_samples": 10000, "max_acc_drop": 0.01, "epsilon_acc": 0.002},
}

# The design's performance targets per stage ("metric path" -> minimum).
PERFORMANCE_TARGETS: dict[int, dict[str, float]] = {
    1: {"detection.mAP_0.5": 0.30, "classification.accuracy": 0.40},
    2: {"detection.mAP_0.5": 0.50, "detection.mAP_0.5_0.95": 0.35, "classification.accuracy": 0.60,
        "classification.macro_f1": 0.55, "classification.top5_accuracy": 0.80},
    3: {"detection.mAP_0.5": 0.70, "detection.mAP_0.5_0.95": 0.50, "classification.accuracy": 0.75,
        "classification.macro_f1": 0.70, "classification.top5_accuracy": 0.90},
    4: {"detection.mAP_0.5": 0.85, "detection.mAP_0.5_0.95": 0.65, "classification.accuracy": 0.92,
        "classification.macro_f1": 0.88, "classification.top5_accuracy": 0.98},
}


def simple_stage_evaluation(stage: int, results: dict, baseline: dict | None = None) -> tuple[bool, list[str]]:
    """Go/No-Go for a stage: (go, reasons). Every failed check adds its reason code."""
    if stage not in STAGE_TARGETS:
        raise ValueError(f"Unknown stage {stage}; expected one of {sorted(STAGE_TARGETS)}")
    t = STAGE_TARGETS[stage]
    acc = float(results.get("accuracy", 0.0))
    checks = {
        "LATENCY_P95_TOO_HIGH": results.get("latency_p95_ms", math.inf) <= t["max_latency_ms"],
        "NOT_ENOUGH_SAMPLES": int(results.get("n_eval_samples", 0)) >= t["min_eval_samples"],
        "COVERAGE_TOO_LOW": results.get("class_coverage", 0.0) >= t["min_coverage"],
        "REGRESSION_TOO_LARGE": not baseline or "accuracy" not in baseline
        or acc >= baseline["accuracy"] - t["max_acc_drop"],
        "ACC_BELOW_TARGET": acc >= t["min_accuracy"] - t["epsilon_acc"],  # hysteresis
        "CRASH_DETECTED": bool(results.get("no_crashes", False)),
        "MEMORY_UNSTABLE": bool(results.get("memory_stable", False)),
    }
    reasons = [reason for reason, ok in checks.items() if not ok]
    return not reasons, reasons


def _lookup(results: dict, path: str) -> float | None:
    """results["section"]["metric"] for path "section.metric" (metric names may contain dots: mAP_0.5)."""
    section, metric = path.split(".", 1)
    value: Any = results.get(section, {})
    return float(value[metric]) if isinstance(value, dict) and metric in value else None


def calculate_performance_score(results: dict, stage: int) -> float:
    """Mean of min(achieved / target, 1) over the stage's targets that `results` reports (0 if none)."""
    ratios = []
    for path, target in PERFORMANCE_TARGETS[stage].items():
        achieved = _lookup(results, path)
        if achieved is not None:
            ratios.append(min(achieved / target, 1.0))
    return sum(ratios) / len(ratios) if ratios else 0.0


def generate_optimization_suggestions(results: dict, stage: int) -> list[str]:
    """Concrete knobs to turn, from what the results show."""
    suggestions = []
    targets = PERFORMANCE_TARGETS[stage]
    if results.get("gpu_memory_gb", 0) > 14:
        suggestions.append("Reduce train.batch_size (GPU memory use is high)")
    det_map = _lookup(results, "detection.mAP_0.5")
    if det_map is not None and det_map < targets["detection.mAP_0.5"] * 0.8:
        suggestions.append("Tune the detector (train.detection.lr, more detection steps in train.interleave_ratio)")
        suggestions.append("Strengthen data augmentation")
    acc = _lookup(results, "classification.accuracy")
    if acc is not None and acc < targets["classification.accuracy"] * 0.8:
        suggestions.append("Regularise the classifier (loss.label_smoothing, train.ema.enabled)")
        suggestions.append("Counter class imbalance (loss.use_class_weights=true)")
    if results.get("data_loading_time_s", 0) > 3:
        suggestions.append("Tune dataloader.num_workers (dataloader.autotune_workers=true)")
        suggestions.append("Enable the preprocessed cache (data.cache.enabled=true)")
    return suggestions


def evaluate_and_recommend(stage: int, results: dict) -> dict:
    """Advisor verdict: RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP | CRITICAL_FAILURE, with options."""
    loss = results.get("loss", 0.0)
    if (results.get("repeated_oom", 0) > 5 or (isinstance(loss, float) and math.isnan(loss))
            or results.get("data_corruption_rate", 0) > 0.01):
        return {"recommendation": "CRITICAL_FAILURE", "performance_score": 0.0,
                "suggestions": ["Inspect logs/train.err and the scan report before retrying"],
                "user_options": ["[1] Fix the failure and rerun", "[2] Debug mode (-v)"]}
    score = calculate_performance_score(results, stage)
    suggestions = generate_optimization_suggestions(results, stage)
    if score >= 0.7:
        verdict, options = "RECOMMEND_PROCEED", [f"[1] Proceed to stage {stage + 1}", "[2] Optimise further",
                                                 "[3] Write a detailed report"]
    elif score >= 0.5:
        verdict, options = "SUGGEST_OPTIMIZE", ["[1] Apply suggestions and retry", "[2] Proceed anyway (risky)",
                                                "[3] Debug mode"]
    else:
        verdict, options = "WARN_STOP", ["[1] Apply strong optimisation and retry", "[2] Revisit the architecture",
                                         "[3] Check data quality"]
    return {"recommendation": verdict, "performance_score": score, "suggestions": suggestions,
            "user_options": options}
