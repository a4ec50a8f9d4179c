"""Calibrating a trained classifier at the end of training: fit the temperature on the validation split, choose the
"unknown pill" threshold there (pillsnap.eval.unknown_calibration), measure the final answers
(pillsnap.eval.answer_calibration) and the detector's boxes (pillsnap.eval.box_calibration), and store it all
beside the model for inference, where pillsnap.infer.artefacts reads it: ECE before and after with a reliability
diagram, AUROC, coverage and accuracy against classes held out of training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.after_training import mark_done
from pillsnap.eval.answer_calibration import answer_calibration, own_thresholds_text, set_summary
from pillsnap.eval.box_calibration import box_line, box_summary, calibrate_boxes, detector_boxes, detector_of
from pillsnap.eval.outputs import eval_loader, inference_crops, model_outputs
from pillsnap.eval.probe import build_probe
from pillsnap.eval.unknown_calibration import (
    crop_sources,
    held_out_loader,
    held_out_report,
    rule_thresholds,
    source_thresholds,
    unknown_line,
)
from pillsnap.infer.artefacts import CALIBRATION_FILE, FEATURES_FILE, FEATURES_PREFIX, Temperatures
from pillsnap.infer.enrolment import PROBE_FILE, PROBE_PREFIX, Probe
from pillsnap.infer.thresholds import READING_REFERENCE
from pillsnap.infer.unknown import CROP_SOURCES, UnknownAnswer
from pillsnap.metrics.calibration import (
    calibrated_probs,
    ece_sampling_floor,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from pillsnap.metrics.novelty import UNKNOWN_RULES, ClassGaussians, check_unknown_rule, unknown_scores
from pillsnap.utils import save_json
from pillsnap.utils.io import file_sha256, prune_hashed, write_hashed

LOGGER = logging.getLogger(__name__)
# A source takes the temperature fit over all crops unless it has this many validation crops (a fit on a few dozen
# is mostly noise) and this many wrong top-1 answers among them (with next to none, the NLL keeps falling as the
# temperature does, and the fit runs to its lower bound: every answer of that path would say 1.0).
MIN_SOURCE_CROPS = 50
MIN_SOURCE_WRONG = 5


def load_manifest_if_any(cfg: DictConfig) -> Any:
    from pillsnap.data import load_manifest

    try:
        return load_manifest(cfg.paths.manifest_dir)
    except FileNotFoundError:
        return None


class Validation(NamedTuple):
    """The classifier on the validation split: labels, features, the temperatures fit on its log-probabilities, and
    per crop the answer and its probability calibrated by them (each crop at its source's), and each row's crop
    source (None: not known), rows of crops that failed to decode left out of all of them. The [N, C] arrays are
    not kept: at 5,000 classes and 140,000 crops each is 2.8 GB, and the passes after the fit need only these."""

    labels: np.ndarray
    features: np.ndarray
    temperatures: Temperatures
    top_probs: np.ndarray
    answers: np.ndarray
    sources: np.ndarray | None


def fit_temperatures(log_p: np.ndarray, labels: np.ndarray, sources: np.ndarray | None) -> Temperatures:
    """The temperature over every crop and, where `sources` names each crop's source and a source has
    MIN_SOURCE_CROPS crops with MIN_SOURCE_WRONG wrong top-1 answers, one fit on that source's crops alone (else the
    overall one stands for it)."""
    overall = fit_temperature(log_p, labels)
    if sources is None or len(sources) != len(labels):  # not known, or photos failed to decode and left fewer
        return Temperatures(overall)
    wrong = log_p.argmax(axis=1) != labels
    return Temperatures(overall, {source: fit_temperature(log_p[sources == source], labels[sources == source])
                                  if (sources == source).sum() >= MIN_SOURCE_CROPS
                                  and wrong[sources == source].sum() >= MIN_SOURCE_WRONG else overall
                                  for source in CROP_SOURCES})


def _temperature(model: Any, loader: Any, device: Any, sources: np.ndarray | None) -> tuple[Validation, dict]:
    """The validation outputs with the temperatures fit on them (`sources`: each crop's source, None: not known),
    and the report's figures before and after them."""
    labels, log_p, features, rows = model_outputs(model, loader, device)
    if sources is not None and len(labels) != len(sources):
        # photos that failed to decode left no row: their sources go with them (the rows say which are left)
        LOGGER.warning("calibration: %d of %d validation crops could not be decoded and are left out%s",
                       len(sources) - len(labels), len(sources), "" if rows is not None else
                       " (this data set does not say which: one temperature and one unknown-pill threshold serve "
                       "both crop sources)")
        sources = None if rows is None else np.asarray(sources)[rows]
    temperatures = fit_temperatures(log_p, labels, sources)
    per_row = (temperatures.per_row(sources) if temperatures.by_source is not None and sources is not None
               else temperatures.overall)
    raw = calibrated_probs(log_p, 1.0)
    figures = {"ece_before": expected_calibration_error(raw, labels), "bins_before": reliability_bins(raw, labels)}
    del raw  # one [N, C] array at a time: at 5,000 classes each is gigabytes
    cal = calibrated_probs(log_p, per_row)
    figures = {"nll_before": nll(log_p, labels), "nll_after": nll(log_p, labels, per_row),
               "ece_before": figures["ece_before"], "ece_after": expected_calibration_error(cal, labels),
               "ece_sampling_floor": ece_sampling_floor(cal.max(axis=1)),
               "bins_before": figures["bins_before"], "bins_after": reliability_bins(cal, labels)}
    return Validation(labels, features, temperatures, cal.max(axis=1), cal.argmax(axis=1), sources), figures


class UnknownRules(NamedTuple):
    """The unknown-pill rules fit on the validation answers: the class Gaussians (on `n_fit` training crops), each
    rule's validation scores and threshold, per crop source too (`by_source`; `scored`: each scored crop's source,
    None when not known) and which answers were right."""

    gaussians: ClassGaussians
    n_fit: int
    val_scores: dict[str, np.ndarray]
    correct: np.ndarray
    thresholds: dict[str, float | None]
    by_source: dict[str, dict[str, float | None]] | None
    scored: np.ndarray | None


def _unknown_rules(model: Any, loaders: Any, val: Validation, cfg: DictConfig, keep: float, device: Any,
                   sources: np.ndarray | None) -> UnknownRules:
    """Fit the class Gaussians on the training crops and each rule's threshold on the validation answers (`sources`:
    each one's crop source, None: not known)."""
    fit_view = loaders.cls_train.dataset.evaluation_view(int(cfg.inference.unknown_fit_per_class),
                                                         int(cfg.train.seed))
    fit_labels, _, fit_features, _ = model_outputs(model, eval_loader(fit_view, cfg), device, keep_log_probs=False)
    gaussians = ClassGaussians.fit(fit_features, fit_labels)
    correct = val.answers == val.labels
    val_distances = gaussians.score(val.features)
    # the probability rule reads each answer's top probability alone: one column holds it
    val_scores = {name: unknown_scores(name, val.top_probs[:, None], val_distances) for name in UNKNOWN_RULES}
    thresholds = rule_thresholds(val_scores, correct, keep)
    return UnknownRules(gaussians, int(len(fit_labels)), val_scores, correct, thresholds,
                        source_thresholds(val_scores, correct, keep, sources, thresholds), sources)


def calibrate_classifier(cfg: DictConfig, exp_dir: str | Path, build_loaders: Callable[[DictConfig], Any] | None = None,
                         keep_correct: float | None = None, device: Any = None) -> dict:
    """Fit and store the calibration of EXP's classification_best.pt; returns the report (also in reports/).

    Everything is fit on the validation split's crops cut as inference cuts them (InferenceCrops: a single-pill
    photo where its pill is located), starting with the temperature. The class Gaussians of the feature_distance
    rule are fit on up to inference.unknown_fit_per_class training crops per class (without augmentation). Each
    unknown-pill rule's threshold keeps `keep_correct` of the right validation answers, and both rules are measured
    on the classes held out of the stage; inference uses the one inference.unknown_rule names. With
    inference.imprint.enabled, `answers` measures the final answers (after the imprint evidence) on answer_crops
    of the validation crops, and with inference.imprint.unknown_check too, `unknown_eval_answers` the final
    answers' unknown-pill decision on the held-out drugs' photos (answers_unknown_report). With a detector,
    `box_check` holds its confidences in the labelled pills of the validation combination photos
    (pillsnap.eval.box_calibration)."""
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.data.loaders import workers_for_this_rank
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference
    from pillsnap.utils import resolve_device

    exp_dir = Path(exp_dir)
    rule = check_unknown_rule(str(cfg.inference.unknown_rule))  # a typo fails before any work
    device = resolve_device(None if device is None else str(device))
    ckpt = exp_dir / "checkpoints" / "classification_best.pt"
    loaders = (build_loaders or build_dataloaders_twostage)(cfg)
    if loaders.cls_val is None:
        raise ValueError("no validation split to calibrate on: raise data.val_ratio")
    keep = float(cfg.inference.unknown_keep_correct if keep_correct is None else keep_correct)
    model = WithFeatures(load_classifier_for_inference(ckpt, device)[0]).eval()
    manifest = load_manifest_if_any(cfg)
    sources = crop_sources(loaders.cls_val.dataset, manifest)  # per crop of the data set (the answers index it)
    # Everything inference applies is fit on the crops inference makes: a single-pill photo where its pill is
    # located, a pill of a combination photo at the detector's box, not at the annotators' boxes (the validation of
    # training, and its early stopping, use those).
    detect = detector_of(cfg, exp_dir, device)
    detected, cut = detector_boxes(detect, loaders.cls_val.dataset, sources, float(cfg.inference.conf_threshold),
                                   workers_for_this_rank(int(cfg.dataloader.num_workers)))
    crops = inference_crops(loaders.cls_val.dataset, sources, cfg, detected)
    val, figures = _temperature(model, loaders.cls_val if crops is loaders.cls_val.dataset
                                else eval_loader(crops, cfg), device, sources)

    rules = _unknown_rules(model, loaders, val, cfg, keep, device, val.sources)
    thresholds, by_source = rules.thresholds, rules.by_source
    # One threshold per rule: the single `unknown_threshold` of older files is only read (pillsnap.infer.artefacts).
    stored = {"temperature": val.temperatures.overall,
              "temperature_by_source": None if val.temperatures.by_source is None else dict(val.temperatures.by_source),
              "unknown_rule": rule, "unknown_thresholds": thresholds,
              "unknown_thresholds_by_source": by_source,
              "unknown_rule_description": UNKNOWN_RULES[rule],
              "unknown_keep_correct": keep, "classifier_sha256": file_sha256(ckpt),
              "n_val": int(len(val.labels)), "n_features_fit": rules.n_fit}
    report = {**stored, **figures}
    held_out = None if manifest is None else held_out_loader(cfg, set(loaders.meta["class_names"]), manifest)
    if held_out is not None:
        held_classes = len(set(held_out.dataset.rows.column("mapping_code")))
        held_out = eval_loader(inference_crops(held_out.dataset, np.full(len(held_out.dataset), "single"), cfg), cfg)
        # The held-out photos are single-pill photos: they are compared with the known drugs' single-pill crops,
        # under the single-pill threshold (and, for the record, with every validation crop under the one threshold).
        _, held_log_p, held_features, _ = model_outputs(model, held_out, device)
        report.update(held_out_report(
            rule, (held_log_p, held_features), val.temperatures.of("single"), rules.gaussians, rules.val_scores,
            rules.correct,
            np.ones(len(rules.correct), bool) if rules.scored is None else rules.scored == "single", thresholds,
            thresholds if by_source is None else by_source["single"], held_classes))
    _answers(model, crops, sources, loaders.meta, val.temperatures, rule, rules, keep, held_out, cfg, stored, report)
    if cut is not None:
        report["combination_boxes"] = cut
    # the detector's confidences, for the box check (none without a detector checkpoint)
    boxes = None if detect is None else calibrate_boxes(cfg, exp_dir, manifest, device, detect)
    if boxes is not None:
        stored["box_check"] = boxes
        report["box_check"] = box_summary(boxes, cfg.inference)
    # what an enrolment would take from the trained drugs is measured on a few of these validation crops of each
    probe = build_probe(model, crops, val, rules.gaussians, cfg, device)
    report["validation_probe_crops"] = None if probe is None else int(len(probe.labels))
    _write(exp_dir, stored, report, rules.gaussians, probe)
    mark_done(exp_dir, "calibration")
    return report


def _answers(model: Any, dataset: Any, sources: np.ndarray | None, meta: dict, temperatures: Temperatures, rule: str,
             rules: UnknownRules, keep: float, held_out: Any, cfg: DictConfig, stored: dict, report: dict) -> None:
    """The answers inference gives on the validation crops (`dataset`, cut as inference cuts them), the unknown-pill
    rule in force: their accuracy and ECE after the imprint evidence, the evidence's scale, and the scores the
    prediction sets are calibrated on, into `stored` (what inference reads) and `report`. Nothing to answer with a
    tensor-only data set (no photos)."""
    from pillsnap.infer.thresholds import WEIGHTS

    outcome = {"answers": None, "evidence_scale": 1.0, "evidence_scale_by_source": None, "prediction_sets": None}
    if hasattr(dataset, "load_crop"):
        by_source = rules.by_source
        unknown = UnknownAnswer(rule, rules.thresholds[rule], rules.gaussians, None if by_source is None else {
            source: values[rule] for source, values in by_source.items()}) if keep > 0 else None
        outcome = answer_calibration(
            model, dataset, temperatures, list(meta["class_names"]), dict(meta.get("class_map") or {}),
            int(cfg.inference.topk), int(cfg.inference.imprint.threads),
            read_imprints=bool(cfg.inference.imprint.enabled), check_unknown=bool(cfg.inference.imprint.unknown_check),
            held_out=None if held_out is None else held_out.dataset, unknown=unknown, sources=sources,
            seed=int(cfg.train.seed), by_source=bool(cfg.inference.prediction_set.get("by_source", True)),
            parallel=int(cfg.inference.imprint.get("parallel_reads", 0)))  # reads side by side, as inference
    if outcome["answers"] is not None:
        report["answers"] = outcome["answers"]
    if outcome.get("unknown_answers") is not None:
        report["unknown_eval_answers"] = outcome["unknown_answers"]
    stored["evidence_scale"] = report["evidence_scale"] = outcome["evidence_scale"]
    stored["evidence_scale_by_source"] = report["evidence_scale_by_source"] = outcome["evidence_scale_by_source"]
    # the weights the scale and the sets were fit with: an older calibration, fit without the candidates'
    # likelihoods, is answered without them (pillsnap.infer.pipeline)
    stored["likelihood_weight"], stored["likelihood_cap"] = WEIGHTS.likelihood, WEIGHTS.likelihood_cap
    stored["imprint_recall"] = True  # fit with drugs below the top-k brought back by their imprint
    # fit with the recogniser's own reading measured as an imprint (RapidOcrModels.reading_log_likelihood)
    stored["reading_reference"] = READING_REFERENCE
    if outcome["prediction_sets"] is not None:
        stored["prediction_sets"] = outcome["prediction_sets"]
        settings = cfg.inference.prediction_set
        report["prediction_sets"] = set_summary(outcome["prediction_sets"], str(settings.method),
                                                float(settings.coverage), bool(settings.get("by_source", True)))


def _write(exp_dir: Path, stored: dict, report: dict, gaussians: ClassGaussians, probe: Probe | None) -> None:
    """The class Gaussians and the thresholds fit on them are written together with the enrolment probe, the JSON
    last, naming the files' hashes; then the report, its reliability diagram and the log's summary."""
    from pillsnap.eval.reports import plot_reliability

    ckpt_dir = exp_dir / "checkpoints"
    # each data file under a name of its own hash, then the JSON naming them, then the files it no longer names
    # (utils.io.write_hashed): a kill in between leaves the old calibration or the new one whole, never a JSON
    # naming a file fit with other thresholds (which would turn the unknown-pill rule off)
    features, stored["features_sha256"] = write_hashed(ckpt_dir, FEATURES_PREFIX, ".npz", gaussians.save)
    stored["features_file"] = report["features_file"] = features.name
    report["features_sha256"] = stored["features_sha256"]
    kept = [features]
    if probe is not None:
        probe_file, stored["validation_probe_sha256"] = write_hashed(ckpt_dir, PROBE_PREFIX, ".npz", probe.save)
        stored["validation_probe_file"] = probe_file.name
        kept.append(probe_file)
    save_json(ckpt_dir / CALIBRATION_FILE, stored)
    for prefix, legacy in ((FEATURES_PREFIX, FEATURES_FILE), (PROBE_PREFIX, PROBE_FILE)):
        prune_hashed(ckpt_dir, prefix, ".npz", kept)
        (ckpt_dir / legacy).unlink(missing_ok=True)  # the fixed name older versions wrote
    save_json(exp_dir / "reports" / "calibration.json", report)
    temperatures = Temperatures.from_stored(stored)
    plot_reliability(report["bins_before"], report["bins_after"], temperatures.text(2),
                     exp_dir / "reports" / "reliability.png", (report["ece_before"], report["ece_after"]),
                     report.get("answers"), report["ece_sampling_floor"])
    LOGGER.info("calibration: temperature %s, ECE %.4f -> %.4f, NLL %.4f -> %.4f; unknown pills by %s%s",
                temperatures.text(), report["ece_before"], report["ece_after"], report["nll_before"],
                report["nll_after"], stored["unknown_rule"], unknown_line(report.get("unknown_eval")))
    cut = report.get("combination_boxes")
    if cut:
        LOGGER.info("calibration: %d of %d validation combination pills cut at the detector's boxes (%d missed by it "
                    "and %d on unreadable photos: at their labelled boxes)", cut["at_detector_boxes"], cut["pills"],
                    cut["missed"], cut["unreadable"])
    if report.get("box_check"):
        LOGGER.info("calibration: %s", box_line(report["box_check"]))
    sets = report.get("prediction_sets")
    if sets:
        LOGGER.info("calibration: prediction sets (%s) at coverage %.2f from %d validation answers named: "
                    "threshold %s%s", sets["method"], sets["coverage"], sets["n"],
                    (f"none over every answer ({sets['no_threshold']}), so "
                     + ("only the crop sources with their own carry sets" if sets.get("threshold_by_source")
                        else "answers carry no set")) if sets["threshold"] is None
                    else f"{sets['threshold']:.4f}" + (f" (its coverage at least {sets['coverage_5th_percentile']:.3f} "
                                                       "in 19 calibrations of 20)"
                                                       if sets.get("coverage_5th_percentile") else ""),
                    own_thresholds_text(sets))
