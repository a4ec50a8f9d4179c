"""Calibration fit on the validation photos cut as inference cuts them, with a temperature and an evidence scale per
crop source (this code: pillsnap.eval.outputs.InferenceCrops cuts a single-pill photo where its pill is located and
a combination photo's pill at the detector's box; pillsnap.eval.calibration.fit_temperatures and
pillsnap.eval.answer_calibration.fit_evidence_scales fit each on a source's own crops) against the code before it
(combination pills at their labelled boxes, one temperature and one evidence scale for every crop), the changes one
after the other, and every crop at its labelled box (the code before that), on a trained experiment, in the same
run.

1. Calibration once per arm: the temperatures, the validation answers' ECE and its floor, the unknown-pill
   thresholds and the held-out drugs' unknown-pill answers (AUROC, rejected shares); with the detector's boxes,
   how many validation combination pills were cut at one.
2. The experiment's test photos through the pipeline in auto mode under each calibration (one thread): single-photo
   accuracy, the combination photos, the prediction sets (coverage, mean size, sure share and accuracy) and the
   ECE of the named test pills' stated probabilities (known drugs; on single photos, on combination photos and on
   all), with its sampling floor: whether a probability means on test photos what calibration says it means.

The experiment's calibration files are rewritten; the last pass leaves this code's.

    .venv/bin/python bench/calibration_crops.py --exp runs/demo/exp
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# (single photos located, combination pills at the detector's boxes, a temperature and an evidence scale per crop
# source)
ARMS = {"every crop at its labelled box, one temperature": (False, False, False),
        "labelled boxes, one temperature (before)": (True, False, False),
        "detector boxes, one temperature": (True, True, False),
        "detector boxes, temperature per source, one evidence scale": (True, True, "temperature"),
        "detector boxes, temperature and evidence scale per source (now)": (True, True, True)}
BEFORE = "labelled boxes, one temperature (before)"


@contextlib.contextmanager
def cut_as(arm: str) -> Iterator[None]:
    """Calibration as the arm says: single photos where the pill is located or at their labelled boxes,
    combination pills at the detector's boxes or at their labelled boxes, a temperature and an evidence scale per
    crop source or one for all."""
    from pillsnap.eval import answer_calibration as answers
    from pillsnap.eval import calibration
    from pillsnap.infer.artefacts import Temperatures
    from pillsnap.metrics.calibration import fit_temperature

    located, detector, per_source = ARMS[arm]
    saved = (calibration.inference_crops, calibration.detector_boxes, calibration.fit_temperatures,
             answers.fit_evidence_scales)
    if not located:
        calibration.inference_crops = lambda dataset, sources, cfg, detected=None: dataset
    if not detector:
        calibration.detector_boxes = lambda *args, **kwargs: ({}, None)
    if not per_source:
        calibration.fit_temperatures = lambda log_p, labels, sources: Temperatures(fit_temperature(log_p, labels))
    if per_source is not True:
        answers.fit_evidence_scales = lambda items, class_map: (answers.fit_evidence_scale(items, class_map), None)
    try:
        yield
    finally:
        (calibration.inference_crops, calibration.detector_boxes, calibration.fit_temperatures,
         answers.fit_evidence_scales) = saved


def calibrate(cfg, arm: str) -> dict:
    from pillsnap.eval import calibration

    with cut_as(arm):
        report = calibration.calibrate_classifier(cfg, cfg.paths.exp_dir)
    answers, unknown = report.get("answers") or {}, report.get("unknown_eval_answers") or {}
    by_source = report["unknown_thresholds_by_source"] or {}
    cut = report.get("combination_boxes") or {}
    by_temperature = report.get("temperature_by_source") or {}
    figures = {"temperature": report["temperature"], "temperature_single": by_temperature.get("single"),
               "temperature_combination": by_temperature.get("combination"),
               "evidence_scale": report.get("evidence_scale"),
               "evidence_scale_single": (report.get("evidence_scale_by_source") or {}).get("single"),
               "evidence_scale_combination": (report.get("evidence_scale_by_source") or {}).get("combination"),
               "ece": answers.get("ece"),
               "ece_floor": answers.get("ece_sampling_floor"), "accuracy": answers.get("accuracy"),
               "single_threshold": (by_source.get("single") or {}).get(report["unknown_rule"]),
               "combination_threshold": (by_source.get("combination") or {}).get(report["unknown_rule"]),
               "auroc": unknown.get("auroc"), "unknown_rejected": unknown.get("unknown_rejected"),
               "known_rejected": unknown.get("known_rejected"),
               "val_combination_pills_at_detector_boxes": cut.get("at_detector_boxes"),
               "val_combination_pills": cut.get("pills")}
    return figures


def test_figures(cfg) -> tuple[dict, list[dict]]:
    import torch

    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import _photo_outcome, photo_groups, set_figures
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.metrics.calibration import ece_of, ece_sampling_floor

    torch.set_num_threads(1)
    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), "test")
    predictor = Predictor(cfg.paths.exp_dir, cfg, "cpu")
    known = set(predictor.class_names)
    done = [_photo_outcome(photo, predictor.predict(photo["image_path"], mode="auto"), known) for photo in photos]
    combos = [o for o in done if o["image_type"] != "single"]
    figures = {"single": float(np.mean([o["all_right"] for o in done if o["image_type"] == "single"])),
               "combo_all_right": float(np.mean([o["all_right"] for o in combos])),
               "combo_pills": float(np.mean([p["right"] for o in combos for p in o["pills"]])),
               **{k: set_figures(done)[k] for k in ("coverage", "mean_set_size", "sure_share", "sure_accuracy")}}
    for name, kinds in (("single", ("single",)), ("combination", ("combination",)),
                        ("all", ("single", "combination"))):
        named = [p for o in done if o["image_type"] in kinds for p in o["pills"] if p["known"] and p["named"]]
        confidence = np.array([p["topk"][0][1] for p in named])
        right = np.array([p["right"] for p in named])
        figures[f"test_ece_{name}"] = ece_of(confidence, right)
        figures[f"test_ece_{name}_floor"] = ece_sampling_floor(confidence)
    return figures, done


def main() -> None:
    from pillsnap.config import load_run_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment (its calibration files are rewritten)")
    args = parser.parse_args()
    # its predictions are not a user's: they stay out of the run's hard-case log
    cfg = load_run_config(args.exp, ["inference.hard_cases.enabled=false"], None, required=("manifest_dir",))
    results: dict[str, dict] = {}
    outcomes = {}
    for name in ARMS:
        validation = calibrate(cfg, name)
        test, outcomes[name] = test_figures(cfg)
        results[name] = {**validation, **test}
    for name, values in results.items():
        print(name)
        print("  " + "  ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in values.items()))
    names = list(ARMS)
    before = results[BEFORE]
    for name in names:
        print(f"ratio ({name} / before): " + ", ".join(
            f"{k} {results[name][k] / before[k]:.3f}x" for k in (
                "ece", "single", "combo_pills", "mean_set_size", "sure_share", "test_ece_single",
                "test_ece_combination", "test_ece_all") if before[k]))
    changed = 0
    for old, new in zip(outcomes[BEFORE], outcomes[names[-1]], strict=True):
        for p, q in zip(old["pills"], new["pills"], strict=True):
            if p["right"] != q["right"] or p["set"] != q["set"] or p["named"] != q["named"]:
                changed += 1
                print(f"  {Path(new['image_path']).name} {p['code']}: right {p['right']} -> {q['right']}, named "
                      f"{p['named']} -> {q['named']}, set {len(p['set'] or [])} -> {len(q['set'] or [])}")
    print(f"pills answered differently: {changed}")


if __name__ == "__main__":
    main()
