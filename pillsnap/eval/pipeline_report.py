"""The demo's closing evaluation: held-out figures of the trained pipeline on the test split's photos (after
training is over), saved and formatted for the console."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pillsnap.eval.answer_calibration import finite
from pillsnap.eval.pipeline_eval import (
    Answered,
    detection_map,
    drawn_test_photos,
    evaluate_pipeline,
    set_figures,
    with_sets,
    without_hard_cases,
    without_imprint_reading,
)
from pillsnap.eval.stage_measure import best_checkpoint_metrics
from pillsnap.infer.hard_cases import HARD_CASES_DIR
from pillsnap.utils.boxes import xywh_to_xyxy
from pillsnap.utils.images import read_image
from pillsnap.utils.logs import package_versions

LOGGER = logging.getLogger(__name__)


def _progress(label: str) -> Any:
    def report(done: int, total: int) -> None:
        if done == total or done % 20 == 0:
            LOGGER.info("%s: %d/%d photos", label, done, total)
    return report


def _examples(predictor: Any, photos: list[dict]) -> list[dict]:
    """predict_pipeline on the first held-out single photo and the first held-out combination photo."""
    from pillsnap.infer.pipeline import predict_pipeline

    picks = [next((p for p in photos if p["image_type"] == kind), None) for kind in ("single", "combination")]
    out = []
    for photo in filter(None, picks):
        result = predict_pipeline(photo["image_path"], mode="auto", predictor=predictor)
        out.append({"expected": photo["codes"], "image_type": photo["image_type"], "result": result})
    return out


def _detection_figures(predictor: Any, photos: list[dict], onnx_path: Path | None) -> dict:
    figures = {"torch": detection_map(predictor, photos)} if predictor.has_detector else {}
    if onnx_path is not None and predictor.has_detector:
        from pillsnap.models.export import OnnxDetector

        figures["onnx"] = detection_map(predictor, photos, forward=OnnxDetector(onnx_path))
    return figures


def _overlays(predictor: Any, photos: list[dict], out_dir: Path, limit: int = 4) -> list[str]:
    """Predicted boxes and K-codes drawn on the first `limit` held-out combination photos (reports/detections/)."""
    from pillsnap.eval.reports import plot_detection_results

    combos = [p for p in photos if p["image_type"] != "single"][:limit]
    if not combos or not predictor.has_detector:
        return []
    images = [read_image(p["image_path"]) for p in combos]
    preds = []
    for image in images:
        pills = predictor.predict(image, mode="combo")["pills"]
        boxes = xywh_to_xyxy(np.asarray([p["bbox"] for p in pills], dtype=np.float64).reshape(-1, 4))
        preds.append({"boxes": boxes.tolist(),
                      "labels": [p["mapping_code"] or ("no pill?" if p.get("unknown_by") == "box" else "unknown")
                                 for p in pills],
                      "scores": [p["probability"] for p in pills]})
    return [str(path) for path in plot_detection_results(images, preds, out_dir)]


def evaluate_and_report(cfg: Any, onnx_path: Path | None, device: str | None,
                        started: float) -> tuple[dict, Answered]:
    """Evaluate on the test split (auto routing, single accuracy, all-pills-right on combinations, each with and
    without imprint reading; test mAP in torch and ONNX); writes {exp_dir}/reports/demo_summary.json and returns the
    summary, with the auto pass's answers (their outcomes, and the drugs they were judged against) for a later
    measure of the same photos to start from (pillsnap.eval.enrol_eval)."""
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.utils import read_json, save_json

    exp_dir = Path(cfg.paths.exp_dir)
    photos = drawn_test_photos(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), int(cfg.train.seed))
    predictor = Predictor(exp_dir, copy.deepcopy(cfg), device)  # its settings change below, the caller's do not
    # the first pass fills an empty hard-case log, to show what one holds; a rerun's, or the passes below over the
    # same photos, would only repeat them
    predictor.settings.hard_cases.enabled = bool(cfg.inference.hard_cases.enabled) and not any(
        (exp_dir / HARD_CASES_DIR).glob("*.jsonl"))
    known = set(predictor.class_names)
    auto = evaluate_pipeline(predictor, photos, "auto", _progress("auto"), known)
    predictor.settings.hard_cases.enabled = False
    combos = [p for p in photos if p["image_type"] != "single"]
    combo = evaluate_pipeline(predictor, combos, "combo", _progress("combo"), known) if predictor.has_detector else {}
    # no sets: calibrated with reading on, they would be refused with a warning to recalibrate about this pass
    unread = Predictor(exp_dir, without_imprint_reading(without_hard_cases(cfg)), device, sets=False)
    plain = evaluate_pipeline(unread, photos, "auto", _progress("auto without imprint reading"), known)
    calibration = exp_dir / "reports" / "calibration.json"
    auto["prediction_sets_by_method"] = _sets_by_method(predictor, auto["outcomes"])
    # the crop sources answered with their own set threshold (the rest with the one over all answers)
    auto["sources_with_own_threshold"] = sorted((predictor.set_rule and predictor.set_rule.by_source) or {})
    summary = {
        # the validation figures of the weights evaluated here (the best checkpoints), not of the last epoch
        "validation": best_checkpoint_metrics(read_json(exp_dir / "reports" / "metrics.json"),
                                              exp_dir / "checkpoints"),
        "calibration": {k: v for k, v in read_json(calibration).items() if not k.startswith("bins_")}
        if calibration.is_file() else {},
        "test": {
            "auto": {k: v for k, v in auto.items() if k != "outcomes"},
            "combo_mode": {k: v for k, v in combo.items() if k != "outcomes"},
            "auto_without_imprint_reading": {k: v for k, v in plain.items() if k != "outcomes"},
            "detection": _detection_figures(predictor, photos, onnx_path),
        },
        "examples": _examples(predictor, photos),
        "overlays": _overlays(predictor, photos, exp_dir / "reports" / "detections"),
        "paths": {name: str(exp_dir / name) for name in ("checkpoints", "logs", "tb", "reports", "export",
                                                         "hard_cases")},
        "elapsed_s": round(time.perf_counter() - started, 1),
        "environment": package_versions(),  # what the figures were measured with (utils.logs.FIGURE_PACKAGES)
    }
    summary["validation"].pop("history", None)
    save_json(exp_dir / "reports" / "demo_summary.json", summary)
    return summary, Answered(auto, frozenset(known))


def _sets_by_method(predictor: Any, outcomes: list[dict]) -> dict:
    """The test pills' set figures under each conformal method at the configured coverage, from the same answers
    (what choosing another inference.prediction_set.method, fill_to_coverage or by_source would have given)."""
    from dataclasses import replace

    from pillsnap.infer.artefacts import load_set_rule
    from pillsnap.metrics.conformal import SET_METHODS

    if predictor.set_rule is None:
        return {}
    rule, reading = predictor.set_rule, bool(predictor.settings.imprint.enabled)
    per_source = bool(predictor.settings.prediction_set.get("by_source", True))

    def figures(method: str, fill: bool, by_source: bool) -> dict:
        # the predictor's own set rule loaded, so every method's scores are there
        loaded, problem = load_set_rule(predictor.calibration, method, rule.coverage, reading,
                                        predictor.check_unknown, fill, by_source)
        if loaded is None:
            return {"problem": problem}
        return {"threshold": finite(loaded.threshold), "threshold_by_source": loaded.by_source,
                **set_figures(with_sets(outcomes, replace(loaded, fill=fill)))}

    by_method = {}
    for method in SET_METHODS:  # the configured fill_to_coverage, then the other choice
        for fill in (rule.fill, not rule.fill):
            other = f"filled to {rule.coverage:.2f}" if fill else "not filled"
            by_method[method if fill == rule.fill else f"{method} {other}"] = figures(method, fill, per_source)
    # the configured method with one threshold over both crop sources, or one per source
    by_method[f"{rule.method} {'one threshold' if per_source else 'per source'}"] = figures(rule.method, rule.fill,
                                                                                          not per_source)
    return by_method


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _example_lines(example: dict) -> list[str]:
    r = example["result"]
    lines = [f"  {example['image_type']} photo {Path(r['image']).name}: expected {', '.join(example['expected'])}",
             f"    -> mode_used={r['mode_used']} (fallback={r['fallback_reason'] or '-'}, "
             f"single_conf={_fmt(r['single_confidence'])}), {r['num_pills']} pill(s):"]
    from pillsnap.infer.cli import answer_text

    for pill in r["pills"]:
        lines.append(f"       {answer_text(pill)} bbox={pill['bbox']}")
    return lines


def _calibration_lines(cal: dict) -> list[str]:
    if not cal:
        return ["calibration not fitted (no validation split)"]
    from pillsnap.infer.artefacts import Temperatures

    cut = cal.get("combination_boxes")
    cut_text = (f"; {cut['at_detector_boxes']} of {cut['pills']} combination pills cut at the detector's boxes"
                if cut else "")
    lines = [f"validation  calibration: temperature={Temperatures.from_stored(cal).text(2)} ECE "
             f"{_fmt(cal['ece_before'])} -> {_fmt(cal['ece_after'])} over {cal['n_val']} crops (a perfectly "
             f"calibrated model: {_fmt(cal.get('ece_sampling_floor'))}){cut_text}; unknown pill by "
             f"{cal['unknown_rule']}"]
    answers = cal.get("answers")
    if answers:
        lines.append(f"validation  answers after the imprint evidence: accuracy={_fmt(answers['accuracy'])} "
                     f"ECE={_fmt(answers['ece'])} over {answers['n']} crops (a perfectly calibrated model: "
                     f"{_fmt(answers['ece_sampling_floor'])})")
    unknown, by_rule = cal.get("unknown_eval"), cal.get("unknown_eval_by_rule") or {}
    if unknown:
        others = ", ".join(f"{name} {_fmt(r['auroc'])}" for name, r in by_rule.items() if name != cal["unknown_rule"])
        every = cal.get("unknown_eval_all_crops") or {}
        against = (f" against known single-pill crops (every validation crop: {_fmt(every.get('auroc'))})"
                   if every else "")
        lines.append(f"held-out    unknown-pill AUROC={_fmt(unknown['auroc'])} over {unknown['held_out_classes']} "
                     f"classes never trained{against}{f' (by {others})' if others else ''} | coverage="
                     f"{_fmt(unknown['coverage'])} accuracy answered={_fmt(unknown['accuracy_answered'])} unknowns "
                     f"rejected={_fmt(unknown['unknown_rejected'])}")
    final = cal.get("unknown_eval_answers")
    if final:
        plain = final.get("without_imprint_check") or {}
        lines.append(f"held-out    unknown pills, final answers (imprint read and held against the drugs each looks "
                     f"like): AUROC={_fmt(final['auroc'])} unknowns rejected={_fmt(final['unknown_rejected'])} (by the "
                     f"imprint {_fmt(final['unknown_rejected_by_imprint'])}) known pills rejected="
                     f"{_fmt(final['known_rejected'])} over {final['known']} known and {final['unknown']} held-out "
                     f"single photos | without the imprint check: AUROC={_fmt(plain.get('auroc'))} rejected="
                     f"{_fmt(plain.get('unknown_rejected'))} known rejected={_fmt(plain.get('known_rejected'))}")
    return lines


SOURCE_NAMES = {"single": "single photos", "combination": "combination pills"}


def _set_lines(auto: dict, calibrated: dict) -> list[str]:
    sets = auto.get("prediction_sets") or {}
    if not sets:
        why = calibrated.get("no_threshold") or "no calibrated set scores; pillsnap calibrate --exp EXP"
        return [f"test        prediction sets: none ({why})"]
    def other(method: str, f: dict) -> str:
        if "problem" in f:  # a rule the calibration cannot give
            return f"{method}: {f['problem']}"
        return (f"{method}: coverage {_fmt(f.get('coverage'))} mean size {_fmt(f.get('mean_set_size'))} sure "
                f"{_fmt(f.get('sure_share'))} right {_fmt(f.get('sure_accuracy'))}")

    others = "; ".join(other(method, f) for method, f in (auto.get("prediction_sets_by_method") or {}).items()
                       if method != calibrated.get("method"))
    own = auto.get("sources_with_own_threshold") or ()
    per_source = ", ".join(f"{SOURCE_NAMES.get(source, source)} {_fmt(f['coverage'])} of {f['named']}"
                           f"{'' if source in own else ' (threshold over all answers)'}"
                           for source, f in (sets.get("by_source") or {}).items())
    return [f"test        prediction sets ({calibrated.get('method')}, {_fmt(calibrated.get('coverage'))} asked, "
            f"calibrated on {calibrated.get('n')} validation answers): coverage={_fmt(sets['coverage'])} over "
            f"{sets['named']} pills named{f' ({per_source})' if per_source else ''}, "
            f"{_fmt(sets['coverage_all'])} of all {sets['known_pills']} known pills "
            f"({_fmt(sets['withheld_known'])} withheld as unknown) | mean set size={_fmt(sets['mean_set_size'])}",
            f"test        sure (one-drug) answers: share={_fmt(sets['sure_share'])} accuracy="
            f"{_fmt(sets['sure_accuracy'])} | pills of untrained drugs with an empty set: "
            f"{_fmt(sets['unknown_empty'])} of {sets['unknown_pills']}"
            + (f" | other rules, same answers: {others}" if others else "")]


def _box_lines(auto: dict, check: dict | None) -> list[str]:
    """The box check on the test photos: the boxes answered "maybe no pill", and whether each held a pill."""
    if not check:
        return []
    doubted = auto.get("doubted_boxes") or {}
    bound = "none: too few validation pills" if check.get("bound") is None else f"{check['bound']:.3f}"
    return [f"test        boxes answered 'maybe no pill' (detector confidence below {bound}, from {check['pills']} "
            f"validation pills at miss rate {check['miss_rate']:.0%}): {doubted.get('no_pill', 0)} on no labelled "
            f"pill, {doubted.get('pill', 0)} on a labelled pill (photos with every pill labelled)"]


def format_headline(summary: dict) -> str:
    """The closing block the demo prints."""
    val, test = summary["validation"], summary["test"]
    cls, det = val.get("classification") or {}, val.get("detection") or {}
    auto, combo, dmap = test["auto"], test["combo_mode"], test["detection"]
    plain = test.get("auto_without_imprint_reading") or {}
    epochs = val.get("validated_epochs") or {}

    def at(task: str) -> str:  # the epoch of the best checkpoint whose figures these are
        return f" (epoch {epochs[task]} of {val.get('epoch')})" if task in epochs else ""

    lines = [
        "", "=== PillSnap demo: headline figures ===",
        f"validation  classifier{at('classification')} accuracy={_fmt(cls.get('acc'))} "
        f"macro_F1={_fmt(cls.get('macro_f1'))} top5={_fmt(cls.get('top5'))} | detector{at('detection')} "
        f"mAP@0.5={_fmt(det.get('mAP@0.5'))} mAP@0.5:0.95={_fmt(det.get('mAP@0.5:0.95'))}",
        f"test        auto routing accuracy={_fmt(auto.get('routing_accuracy'))} over {auto.get('num_photos')} photos"
        f" | single-photo accuracy (auto)={_fmt(auto.get('single_accuracy'))} "
        f"({_fmt(plain.get('single_accuracy'))} without imprint reading)",
        f"test        all pills right on combination photos: auto={_fmt(auto.get('combo_all_right_rate'))} "
        f"({_fmt(plain.get('combo_all_right_rate'))} without imprint reading) "
        f"combo mode={_fmt(combo.get('combo_all_right_rate'))} over {combo.get('num_combination', 0)} photos",
        f"test        pills right on those photos, one by one: auto={_fmt(auto.get('combo_pill_accuracy'))} "
        f"({_fmt(plain.get('combo_pill_accuracy'))} without imprint reading) "
        f"combo mode={_fmt(combo.get('combo_pill_accuracy'))}",
        f"test        detector mAP@0.5 torch={_fmt((dmap.get('torch') or {}).get('mAP@0.5'))} "
        f"onnx={_fmt((dmap.get('onnx') or {}).get('mAP@0.5'))} (same NMS)",
    ]
    lines += _box_lines(auto, (summary.get("calibration") or {}).get("box_check"))
    lines += _set_lines(auto, (summary.get("calibration") or {}).get("prediction_sets") or {})
    lines += _calibration_lines(summary.get("calibration") or {})
    if "enrolment" in summary:
        from pillsnap.eval.enrol_eval import format_enrolment

        lines += format_enrolment(summary["enrolment"])
    lines.append("examples (predict_pipeline, mode=auto):")
    for example in summary["examples"]:
        lines += _example_lines(example)
    if summary.get("environment"):
        lines.append("environment " + " ".join(f"{k} {v}" for k, v in summary["environment"].items()))
    lines.append("where things are:")
    lines += [f"  {name:<12}{path}" for name, path in summary["paths"].items()]
    lines.append(f"  tensorboard --logdir {summary['paths']['tb']}")
    lines.append(f"done in {summary['elapsed_s']:.0f} s")
    return "\n".join(lines)
