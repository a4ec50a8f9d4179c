"""The stage decision as pure functions of plain values: the simple Go/No-Go gate, the performance score against
the stage's targets, the optimisation advisor, and the two combined.

`results` is nested by section with PillSnap's metric keys (see eval/stage_eval.py for how a run fills it):
{"classification": {"acc": ...}, "detection": {"mAP@0.5": ...}, "system": {...}, "optimization": {...},
"mandatory_checks": {"pipeline_complete": True, ...}, "latency_p95_ms": ..., "n_eval_samples": ...,
"class_coverage": ..., "no_crashes": ..., "memory_stable": ..., "repeated_oom": ..., "nan_loss": ...,
"data_corruption_rate": ..., "time_cap": {"success": ...} or None}.
"""

from __future__ import annotations

import math
from typing import Any

from pillsnap.eval.criteria import EXTERNAL_CHECKS, TIME_CAP_CHECKS, stage_criteria


def metric(results: dict | None, path: str) -> float | None:
    """results["section"]["key"] for path "section.key" (keys may contain dots: mAP@0.5); None when absent."""
    section, key = path.split(".", 1)
    block: Any = (results or {}).get(section)
    value = block.get(key) if isinstance(block, dict) else None
    return None if value is None else float(value)


def simple_stage_evaluation(stage: int, results: dict, baseline: dict | None = None) -> tuple[bool, list[str]]:
    """The simple gate: (go, reasons), one reason code per failed check (latency, samples, coverage, regression
    against `baseline`, accuracy with hysteresis, crashes, memory)."""
    t = stage_criteria(stage)
    acc = metric(results, "classification.acc") or 0.0
    base = metric(baseline, "classification.acc")
    checks = {
        "LATENCY_P95_TOO_HIGH": float(results.get("latency_p95_ms", math.inf)) <= t.max_latency_ms,
        "NOT_ENOUGH_SAMPLES": int(results.get("n_eval_samples", 0)) >= t.min_eval_samples,
        "COVERAGE_TOO_LOW": float(results.get("class_coverage", 0.0)) >= t.min_coverage,
        "REGRESSION_TOO_LARGE": base is None or acc >= base - t.max_acc_drop,
        "ACC_BELOW_TARGET": acc >= t.min_accuracy - t.epsilon_acc,  # hysteresis: a hair below still passes
        "CRASH_DETECTED": bool(results.get("no_crashes", False)),
        "MEMORY_UNSTABLE": bool(results.get("memory_stable", False)),
    }
    reasons = [reason for reason, ok in checks.items() if not ok]
    return not reasons, reasons


def performance_ratios(results: dict, stage: int) -> dict[str, float]:
    """Achievement in [0, 1] of each target the results measure (unmeasured targets are left out)."""
    ratios = {}
    for target in stage_criteria(stage).targets:
        value = metric(results, target.path)
        if value is not None and not math.isnan(value):
            ratios[target.path] = target.ratio(value)
    return ratios


def calculate_performance_score(results: dict, stage: int) -> float:
    """Mean achievement over the measured targets (0 when none is measured)."""
    ratios = performance_ratios(results, stage)
    return sum(ratios.values()) / len(ratios) if ratios else 0.0


def generate_optimization_suggestions(results: dict, stage: int) -> list[str]:
    """Concrete knobs to turn, from what the results show."""
    suggestions = []
    ratios = performance_ratios(results, stage)
    if (metric(results, "system.gpu_memory_gb") or 0) > 14:
        suggestions.append("Reduce train.batch_size or model.image_size (GPU memory use is high)")
    if ratios.get("detection.mAP@0.5", 1.0) < 0.8:
        suggestions.append("Tune the detector: train.detection.lr, more detection steps (train.interleave_ratio), "
                           "more train.detection.epochs")
        suggestions.append("Strengthen data augmentation or add combination photos")
    if ratios.get("classification.acc", 1.0) < 0.8:
        suggestions.append("Regularise the classifier (loss.label_smoothing, train.ema.enabled) and train longer")
        suggestions.append("Counter class imbalance (loss.use_class_weights=true)")
    if (metric(results, "system.data_loading_s") or 0) > 3:
        suggestions.append("Tune dataloader.num_workers (dataloader.autotune_workers=true)")
        suggestions.append("Enable the preprocessed cache (data.cache.enabled=true)")
    return suggestions


def _critical(results: dict) -> list[str]:
    reasons = []
    if int(results.get("repeated_oom", 0)) > 5:
        reasons.append(f"REPEATED_OOM ({results['repeated_oom']} recoveries)")
    if results.get("nan_loss"):
        reasons.append("NAN_LOSS")
    if float(results.get("data_corruption_rate", 0.0)) > 0.01:
        reasons.append(f"DATA_CORRUPTION ({100 * results['data_corruption_rate']:.1f}% of records unreadable)")
    return reasons


def _options(recommendation: str, stage: int) -> list[str]:
    return {
        "RECOMMEND_PROCEED": [f"[1] Proceed to stage {stage + 1}", "[2] Optimise further at this stage",
                              "[3] Write a detailed report"],
        "SUGGEST_OPTIMIZE": ["[1] Apply the suggestions and retry", "[2] Proceed anyway (risky)",
                             "[3] Debug mode (rerun with -v)"],
        "WARN_STOP": ["[1] Apply strong optimisation and retry", "[2] Revisit the architecture",
                      "[3] Check data quality (pillsnap data scan report)"],
        "CRITICAL_FAILURE": ["[1] Fix the failure and rerun", "[2] Debug mode (rerun with -v)",
                             "[3] Inspect logs/train.err"],
    }[recommendation]


def _verdict(recommendation: str, reason: str, stage: int, score: float, reasons: list[str],
             suggestions: list[str], unmeasured: list[str]) -> dict:
    return {"recommendation": recommendation, "reason": reason, "performance_score": round(score, 4),
            "reasons": reasons, "suggestions": suggestions, "unmeasured": unmeasured,
            "user_options": _options(recommendation, stage)}


def evaluate_and_recommend(stage: int, results: dict) -> dict:
    """The advisor: the recommendation (RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP | CRITICAL_FAILURE), the
    reason code, the score, every reason behind it, the suggestions and the user's options. Never asks anything
    itself (see eval/stage_eval.py)."""
    criteria = stage_criteria(stage)
    critical = _critical(results)
    if critical:
        return _verdict("CRITICAL_FAILURE", "critical_failure", stage, 0.0, critical,
                        ["Inspect logs/train.err and the scan report before retrying"], [])
    checks = results.get("mandatory_checks") or {}
    failed = [f"MANDATORY_CHECK_FAILED: {c}" for c in criteria.mandatory_checks
              if c not in EXTERNAL_CHECKS and checks.get(c) is not True]
    unverified = [f"UNVERIFIED: {c} (not something a training run can check)" for c in criteria.mandatory_checks
                  if c in EXTERNAL_CHECKS and checks.get(c) is not True]
    score = calculate_performance_score(results, stage)
    suggestions = generate_optimization_suggestions(results, stage)
    measured = performance_ratios(results, stage)
    unmeasured = [t.path for t in criteria.targets if t.path not in measured]
    unmet = [t for t in criteria.targets if measured.get(t.path, 1.0) < 1.0]
    reasons = failed + [f"TARGET_NOT_MET: {t.describe(metric(results, t.path))}" for t in unmet] + unverified
    if failed:
        return _verdict("WARN_STOP", "mandatory_check_failed", stage, score, reasons, suggestions, unmeasured)
    dead = [t for t in unmet if t.quality and measured[t.path] == 0.0]
    weak = [t for t in unmet if t.quality and measured[t.path] < 0.5]
    if dead:
        return _verdict("WARN_STOP", "model_not_learning", stage, score, reasons, suggestions, unmeasured)
    if score >= 1.0:
        return _verdict("RECOMMEND_PROCEED", "all_targets_met", stage, score, reasons, suggestions, unmeasured)
    if score >= 0.7 and not weak:
        return _verdict("RECOMMEND_PROCEED", "sufficient_performance", stage, score, reasons, suggestions,
                        unmeasured)
    if score >= 0.5:
        reason = "quality_target_far_below" if weak else "performance_below_target"
        return _verdict("SUGGEST_OPTIMIZE", reason, stage, score, reasons, suggestions, unmeasured)
    return _verdict("WARN_STOP", "performance_too_low", stage, score, reasons, suggestions, unmeasured)


def stage_decision(stage: int, results: dict, baseline: dict | None = None) -> dict:
    """GO when the simple gate passes and the advisor recommends proceeding. A time-capped stage 1 that meets the
    time-cap rule is GO on its own mandatory checks; its metrics are still reported."""
    go, gate_reasons = simple_stage_evaluation(stage, results, baseline)
    advice = evaluate_and_recommend(stage, results)
    time_cap = results.get("time_cap") or {}
    checks = results.get("mandatory_checks") or {}
    if stage == 1 and time_cap.get("success"):
        status = "GO" if all(checks.get(c) is True for c in TIME_CAP_CHECKS) else "NO_GO"
        rule = "time cap reached with the minimum samples and classes: the stage counts as a success"
    else:
        status = "GO" if go and advice["recommendation"] == "RECOMMEND_PROCEED" else "NO_GO"
        rule = "GO needs the simple gate to pass and the advisor to recommend proceeding"
    return {"stage": stage, "status": status, "rule": rule, "recommendation": advice["recommendation"],
            "reasons": gate_reasons + advice["reasons"], "go_no_go": {"go": go, "reasons": gate_reasons},
            "advisor": advice}
