"""The stage decision as pure functions of plain values: the simple Go/No-Go gate, the performance score against
the stage's targets, the optimisation advisor, and the one verdict that reconciles them.

`results` is nested by section with PillSnap's metric keys (see eval/stage_eval.py for how a run fills it):
{"classification": {"acc": ...}, "detection": {"mAP@0.5": ...}, "system": {...}, "optimization": {...},
"advanced": {...}, "mandatory_checks": {"pipeline_complete": True, ...}, "latency_p95_ms": ..., "n_eval_samples": ...,
"n_eval_available": ..., "n_eval_undecodable": ..., "class_coverage": ..., "no_crashes": ..., "memory_stable": ...,
"repeated_oom": ..., "nan_loss": ..., "data_corruption_rate": ..., "time_cap": {"success": ...} or None,
"device": "cpu" | "cuda:0"}.
A figure whose target holds for another device class than `device` is "not comparable": reported with its value
and device, and left out of both the gate and the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pillsnap.eval.criteria import ADVISOR, EXTERNAL_CHECKS, TIME_CAP_CHECKS, StageCriteria, Target, stage_criteria
from pillsnap.eval.suggestions import FALLBACK, action_for, suggestions_for
from pillsnap.utils.run_status import FINISHED_STATUSES


def metric(results: dict | None, path: str) -> float | None:
    """results["section"]["key"] for path "section.key" (keys may contain dots: mAP@0.5); None when absent."""
    section, key = path.split(".", 1)
    block: Any = (results or {}).get(section)
    value = block.get(key) if isinstance(block, dict) else None
    return None if value is None else float(value)


# ---- the simple gate ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateCheck:
    """One check of the simple gate: its reason code, whether it passed, and what was measured against what."""

    code: str
    ok: bool
    detail: str
    comparable: bool = True

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


def latency_target(t: StageCriteria) -> Target:
    """The gate's pipeline p95 as a Target, so it is compared across devices like every other target."""
    return Target("latency_p95_ms", t.max_latency_ms, higher_is_better=False, device=t.latency_device)


def pipeline_targets(t: StageCriteria) -> dict[str, float]:
    """The stage's targets for the whole pipeline's p95: the gate's, and the production latency target's."""
    return {"LATENCY_P95_TOO_HIGH": float(t.max_latency_ms),
            **{target.path: float(target.threshold) for target in t.targets
               if target.path == "production.inference_latency_ms"}}


def _latency_check(t: StageCriteria, results: dict) -> GateCheck:
    device = results.get("device")
    p95 = float(results.get("latency_p95_ms", math.inf) or math.inf)
    detail = f"pipeline p95 {p95:.4g} ms on {device or 'an unrecorded device'} (target <= {t.max_latency_ms:g} ms"
    if device is not None and not latency_target(t).comparable(device):
        return GateCheck("LATENCY_P95_TOO_HIGH", True, detail + f" on {t.latency_device})", comparable=False)
    return GateCheck("LATENCY_P95_TOO_HIGH", p95 <= t.max_latency_ms, detail + ")")


def required_samples(t: StageCriteria, results: dict) -> int:
    """The design's sample floor, or every crop of the validation split when the split holds fewer (a real stage 1
    or 2 split is smaller than the design's figure: see docs/DESIGN_MAP.md). Crops that could not be decoded are
    forgiven up to the share of unreadable data the advisor tolerates (ADVISOR.max_corruption_rate), no more: a
    split that mostly failed to decode is not evaluated."""
    available = results.get("n_eval_available")
    if available is None:
        return t.min_eval_samples
    forgiven = min(int(results.get("n_eval_undecodable") or 0), int(ADVISOR.max_corruption_rate * int(available)))
    return min(t.min_eval_samples, int(available) - forgiven)


# How a run that reached its end leaves metrics.json; "running" and "interrupted" runs are not judged as done.


def _time_cap_check(results: dict) -> GateCheck:
    """A run the stage's time cap stopped passes only by the stage's time-cap rule (allowed, and its minimums met):
    otherwise it trained less than the stage planned, and its figures are a part run's. Before, such a run got GO
    at stage 4 (no mandatory check noticed) and a crash's advice at stage 3."""
    if results.get("run_status") != "time_capped":
        return GateCheck("TIME_CAP_REACHED", True, f"run status {results.get('run_status')}")
    verdict = results.get("time_cap") or {}
    why = "its success rule met" if verdict.get("success") else \
        ", ".join(verdict.get("reasons") or []) or "the stage's minimums unmet"
    return GateCheck("TIME_CAP_REACHED", bool(verdict.get("success")), f"the stage's time cap stopped training ({why})")


def gate_checks(stage: int, results: dict, baseline: dict | None = None) -> list[GateCheck]:
    """Every check of the simple gate, passed or not."""
    t = stage_criteria(stage)
    acc = metric(results, "classification.acc") or 0.0
    base = metric(baseline, "classification.acc")
    n, need = int(results.get("n_eval_samples", 0)), required_samples(t, results)
    coverage = float(results.get("class_coverage", 0.0))
    floor = t.min_accuracy - t.epsilon_acc  # hysteresis: a hair below still passes
    return [
        _latency_check(t, results),
        GateCheck("NOT_ENOUGH_SAMPLES", n >= need, f"{n} validation samples evaluated (need >= {need}, the design "
                                                   f"asks {t.min_eval_samples})"),
        GateCheck("COVERAGE_TOO_LOW", coverage >= t.min_coverage,
                  f"class coverage {coverage:.3g} (target >= {t.min_coverage:g})"),
        GateCheck("REGRESSION_TOO_LARGE", base is None or acc >= base - t.max_acc_drop,
                  f"classification.acc {acc:.4g} vs previous {base if base is None else f'{base:.4g}'} "
                  f"(at most {t.max_acc_drop:g} lower)"),
        GateCheck("ACC_BELOW_TARGET", acc >= floor,
                  f"classification.acc {acc:.4g} (target >= {t.min_accuracy:g}, {floor:g} with hysteresis)"),
        GateCheck("CRASH_DETECTED", bool(results.get("no_crashes", False)),
                  f"run status {results.get('run_status', 'unknown')}, NaN loss {bool(results.get('nan_loss'))}"),
        GateCheck("RUN_NOT_FINISHED", results.get("run_status") in (None, *FINISHED_STATUSES),
                  f"run status {results.get('run_status')} (a stage is judged on a run that ended: "
                  f"{', '.join(FINISHED_STATUSES)})"),
        _time_cap_check(results),
        GateCheck("MEMORY_UNSTABLE", bool(results.get("memory_stable", False)),
                  f"RSS growth {results.get('memory_growth')} (at most {ADVISOR.memory_growth_limit:g}x)"),
    ]


def simple_stage_evaluation(stage: int, results: dict, baseline: dict | None = None) -> tuple[bool, list[str]]:
    """The design's simple gate: (go, reason codes of the failed checks). A latency measured on another device
    class than the target's is not comparable and fails nothing."""
    failed = [c.code for c in gate_checks(stage, results, baseline) if not c.ok]
    return not failed, failed


# ---- the advisor ----------------------------------------------------------------------------------------------------
# Figures the training run recorded (throughput, batch sizes, memory) were measured on the device it trained on,
# which need not be the one the evaluation runs on.
RUN_RECORDED = ("optimization.", "scalability.multi_batch_size", "system.")


def measured_on(results: dict, path: str) -> str | None:
    """The device a figure of the results was measured on."""
    if path.startswith(RUN_RECORDED) and results.get("training_device"):
        return results["training_device"]
    return results.get("device")


def _note(target: Target, value: float | None, device: str | None) -> dict:
    return {"path": target.path, "value": value, "threshold": target.threshold, "target_device": target.device,
            "device": device}


def not_comparable(results: dict, stage: int) -> list[dict]:
    """Measured figures whose targets hold for another device class, with value, threshold and both devices."""
    out = []
    for target in stage_criteria(stage).targets:
        value, device = metric(results, target.path), measured_on(results, target.path)
        if value is not None and not target.comparable(device):
            out.append(_note(target, value, device))
    return out


def performance_ratios(results: dict, stage: int) -> dict[str, float]:
    """Achievement in [0, 1] of each target the results measure comparably (the rest are left out)."""
    ratios = {}
    for target in stage_criteria(stage).targets:
        value = metric(results, target.path)
        if value is not None and not math.isnan(value) and target.comparable(measured_on(results, target.path)):
            ratios[target.path] = target.ratio(value)
    return ratios


def _mean_ratio(ratios: dict[str, float]) -> float:
    return sum(ratios.values()) / len(ratios) if ratios else 0.0


def calculate_performance_score(results: dict, stage: int) -> float:
    """Mean achievement over the measured targets (0 when none is measured)."""
    return _mean_ratio(performance_ratios(results, stage))


def _critical(results: dict) -> list[str]:
    reasons = []
    if int(results.get("repeated_oom", 0)) > ADVISOR.max_oom_recoveries:
        reasons.append(f"REPEATED_OOM: {results['repeated_oom']} recoveries (at most {ADVISOR.max_oom_recoveries})")
    if results.get("nan_loss"):
        reasons.append("NAN_LOSS: a training or validation loss was NaN")
    rate = float(results.get("data_corruption_rate", 0.0))
    if rate > ADVISOR.max_corruption_rate:
        reasons.append(f"DATA_CORRUPTION: {100 * rate:.1f}% of label files unreadable "
                       f"(at most {100 * ADVISOR.max_corruption_rate:g}%)")
    return reasons


def _options(recommendation: str, stage: int) -> list[str]:
    proceed = f"[1] Proceed to stage {stage + 1}" if stage < 4 else "[1] Run the final test evaluation"
    return {
        "RECOMMEND_PROCEED": [proceed, "[2] Optimise further at this stage", "[3] Write a detailed report"],
        "SUGGEST_OPTIMIZE": ["[1] Apply the suggestions and retry", "[2] Proceed anyway (risky)",
                             "[3] Debug mode (rerun with -v)"],
        "WARN_STOP": ["[1] Apply strong optimisation and retry", "[2] Revisit the architecture",
                      "[3] Check data quality (pillsnap data scan report)"],
        "CRITICAL_FAILURE": ["[1] Fix the failure and rerun", "[2] Debug mode (rerun with -v)",
                             "[3] Inspect logs/train.err"],
    }[recommendation]


def headline(recommendation: str, reason: str, stage: int) -> dict[str, str]:
    """The advisor's `color` and `message`: the one line the terminal shows above the options."""
    if recommendation == "RECOMMEND_PROCEED":
        return {"color": "🟢", "message": f"Stage {stage}: every target met" if reason == "all_targets_met" else
                f"Stage {stage}: performance sufficient to proceed"}
    return {"SUGGEST_OPTIMIZE": {"color": "🟡", "message": f"Stage {stage}: below target; optimisation recommended"},
            "WARN_STOP": {"color": "🔴", "message": f"Stage {stage}: performance very low"},
            "CRITICAL_FAILURE": {"color": "🔴", "message": f"Stage {stage}: the run failed"}}[recommendation]


def _verdict(recommendation: str, reason: str, stage: int, score: float, reasons: list[str],
             suggestions: list[str], unmeasured: list[str], incomparable: list[dict]) -> dict:
    return {"recommendation": recommendation, "reason": reason, **headline(recommendation, reason, stage),
            "performance_score": round(score, 4), "reasons": reasons, "suggestions": suggestions,
            "unmeasured": unmeasured, "not_comparable": incomparable, "user_options": _options(recommendation, stage)}


def _score_recommendation(score: float, weak: bool) -> tuple[str, str]:
    if score >= 1.0:
        return "RECOMMEND_PROCEED", "all_targets_met"
    if score >= ADVISOR.proceed_score and not weak:
        return "RECOMMEND_PROCEED", "sufficient_performance"
    if score >= ADVISOR.optimize_score:
        return "SUGGEST_OPTIMIZE", "quality_target_far_below" if weak else "performance_below_target"
    return "WARN_STOP", "performance_too_low"


def evaluate_and_recommend(stage: int, results: dict) -> dict:
    """The advisor: the recommendation (RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP | CRITICAL_FAILURE), the
    reason code, the score, every reason behind it, the suggestions and the user's options. Never asks anything
    itself (see eval/stage_eval.py)."""
    criteria = stage_criteria(stage)
    incomparable = not_comparable(results, stage)
    critical = _critical(results)
    if critical:
        return _verdict("CRITICAL_FAILURE", "critical_failure", stage, 0.0, critical,
                        suggestions_for(results, [], {}, critical), [], incomparable)
    checks = results.get("mandatory_checks") or {}
    failed = [f"MANDATORY_CHECK_FAILED: {c}" for c in criteria.mandatory_checks
              if c not in EXTERNAL_CHECKS and checks.get(c) is not True]
    unverified = [f"UNVERIFIED: {c} (not something a training run can check)" for c in criteria.mandatory_checks
                  if c in EXTERNAL_CHECKS and checks.get(c) is not True]
    measured = performance_ratios(results, stage)
    score = _mean_ratio(measured)
    skipped = {item["path"] for item in incomparable}
    unmeasured = [t.path for t in criteria.targets if t.path not in measured and t.path not in skipped]
    unmet = [t for t in criteria.targets if measured.get(t.path, 1.0) < 1.0]
    reasons = failed + [f"TARGET_NOT_MET: {t.describe(metric(results, t.path))}" for t in unmet] + unverified
    suggestions = suggestions_for(results, [t.path for t in unmet], measured, failed, pipeline_targets(criteria))
    if failed:
        return _verdict("WARN_STOP", "mandatory_check_failed", stage, score, reasons, suggestions, unmeasured,
                        incomparable)
    if any(t.quality and not t.one_class and measured[t.path] == 0.0 for t in unmet):
        return _verdict("WARN_STOP", "model_not_learning", stage, score, reasons, suggestions, unmeasured,
                        incomparable)
    weak = any(t.quality and measured[t.path] < ADVISOR.weak_share for t in unmet)
    recommendation, reason = _score_recommendation(score, weak)
    return _verdict(recommendation, reason, stage, score, reasons, suggestions, unmeasured, incomparable)


# ---- the one verdict ------------------------------------------------------------------------------------------------
def _time_cap_go(stage: int, results: dict, advice: dict) -> bool:
    """The design's time-cap rule: a time-capped stage 1 that processed its minimum samples and classes counts as a
    success on its own checks (pipeline complete, classifier loads), unless the run failed critically."""
    checks = results.get("mandatory_checks") or {}
    return (stage == 1 and bool((results.get("time_cap") or {}).get("success"))
            and advice["recommendation"] != "CRITICAL_FAILURE"
            and all(checks.get(c) is True for c in TIME_CAP_CHECKS))


def stage_decision(stage: int, results: dict, baseline: dict | None = None, exp_dir: Path | None = None) -> dict:
    """One verdict: GO exactly when the recommendation is RECOMMEND_PROCEED. The advisor's recommendation stands
    unless the simple gate fails, which turns a score-based "proceed" into SUGGEST_OPTIMIZE naming what to change;
    a time-capped stage 1 meeting the time-cap rule proceeds on its own checks. Every reason carries its value and
    threshold; `action` is the one next step (`exp_dir`: the run's folder, which a GO's next stage starts from)."""
    checks = gate_checks(stage, results, baseline)
    gate_failed = [c for c in checks if not c.ok]
    advice = evaluate_and_recommend(stage, results)
    recommendation, reason, suggestions = advice["recommendation"], advice["reason"], list(advice["suggestions"])
    if _time_cap_go(stage, results, advice):
        recommendation, reason = "RECOMMEND_PROCEED", "time_cap_rule"
        rule = "time cap reached with the minimum samples and classes: the stage counts as a success"
    else:
        rule = "GO needs the simple gate to pass and the advisor to recommend proceeding"
        if gate_failed and recommendation == "RECOMMEND_PROCEED":
            recommendation, reason = "SUGGEST_OPTIMIZE", "go_no_go_failed"
    if recommendation != "RECOMMEND_PROCEED":
        gate_advice = suggestions_for(results, [], {}, [c.code for c in gate_failed],
                                      pipeline_targets(stage_criteria(stage)))
        # What stopped the stage comes first: the gate when the score alone would have proceeded.
        ordered = gate_advice + suggestions if reason == "go_no_go_failed" else suggestions + gate_advice
        suggestions = list(dict.fromkeys(ordered)) or [FALLBACK]
    status = "GO" if recommendation == "RECOMMEND_PROCEED" else "NO_GO"
    verdict = {**advice, "recommendation": recommendation, "reason": reason, **headline(recommendation, reason, stage),
               "suggestions": suggestions, "user_options": _options(recommendation, stage),
               "score_recommendation": advice["recommendation"]}
    gate_notes = [_note(latency_target(stage_criteria(stage)), results.get("latency_p95_ms"), results.get("device"))
                  for c in checks if not c.comparable]
    return {"stage": stage, "status": status, "rule": rule, "recommendation": recommendation, "reason": reason,
            "action": action_for(status, recommendation, stage, suggestions, exp_dir),
            "reasons": [c.reason for c in gate_failed] + advice["reasons"], "suggestions": suggestions,
            "not_comparable": gate_notes + advice["not_comparable"],
            "go_no_go": {"go": not gate_failed, "reasons": [c.code for c in gate_failed],
                         "details": [c.reason for c in gate_failed]},
            "advisor": verdict}


def verdict_line(decision: dict) -> str:
    """The one line every surface prints: decision, recommendation, next step."""
    return (f"stage {decision['stage']} decision {decision['status']} ({decision['recommendation']}); "
            f"next step: {decision.get('action') or '-'}")
