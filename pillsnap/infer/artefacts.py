"""The files of a run that inference reads: its checkpoints and classes.json, and the files fit for the classifier
at the end of training: calibration.json (temperature, unknown-pill thresholds, prediction-set scores) and
unknown_features-<hash>.npz (the class Gaussians of the feature_distance rule). Each fit file is bound to the weights it
was fit on by a hash: a stale file is reported and skipped, never silently used.

pillsnap.eval.calibration fits and writes them; this module only reads them, so inference needs nothing from eval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pillsnap.infer.thresholds import stored_number
from pillsnap.metrics.novelty import ClassGaussians, check_unknown_rule
from pillsnap.utils import read_json
from pillsnap.utils.io import file_sha256, read_hashed

LOGGER = logging.getLogger(__name__)
CLASSIFIER_CKPTS = ("classification_best.pt", "best.pt", "classification_last.pt", "last.pt")
DETECTOR_CKPTS = ("detection_best.pt", "detection_last.pt")
CALIBRATION_FILE = "calibration.json"  # in checkpoints/, beside the classifier it was fit for
# beside it: the class Gaussians the feature_distance rule measures against, in unknown_features-<hash>.npz as
# calibration.json's `features_file` names it (FEATURES_FILE: the fixed name of calibrations written before)
FEATURES_PREFIX = "unknown_features-"
FEATURES_FILE = "unknown_features.npz"


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def find_checkpoints(exp_dir: str | Path) -> tuple[Path, Path | None]:
    """(classifier, detector or None) checkpoints of an experiment, best before last; no classifier is an error."""
    ckpt_dir = Path(exp_dir) / "checkpoints"
    cls_path = _first_existing(ckpt_dir, CLASSIFIER_CKPTS)
    if cls_path is None:
        raise FileNotFoundError(f"No classifier checkpoint in {ckpt_dir} (looked for "
                                f"{', '.join(CLASSIFIER_CKPTS)}); train first (pillsnap train / pillsnap demo)")
    return cls_path, _first_existing(ckpt_dir, DETECTOR_CKPTS)


def load_classes(path: Path) -> tuple[list[str], dict]:
    """(class names in the classifier's order, class map) from the classes.json the trainer writes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the trainer writes it next to the checkpoints")
    data = read_json(path)
    return list(data["class_names"]), dict(data.get("class_map") or {})


def _upgrade(stored: dict, path: Path) -> dict:
    """A calibration written before there were two unknown-pill rules kept one top-1 probability threshold
    (`unknown_threshold`, the probability below which a pill was unknown); it becomes the probability rule's
    threshold (scores are 1 - probability), and the feature-distance rule stays off until recalibrated."""
    old = float(stored.get("unknown_threshold") or 0.0)
    stored["unknown_thresholds"] = {"probability": 1.0 - old if old > 0 else None, "feature_distance": None}
    LOGGER.warning("%s was written by an older PillSnap: its temperature and top-1 probability threshold are used; "
                   "for the feature-distance rule recalibrate (pillsnap calibrate --exp EXP)", path)
    return stored


def load_calibration(ckpt_dir: str | Path, classifier: str | Path, classifier_sha256: str | None = None) -> dict | None:
    """The calibration stored for `classifier` (whose SHA-256 is hashed here unless given), or None when there is
    none or it was fit for other weights (said once in the log). One written by an older PillSnap is read in
    today's form."""
    path = Path(ckpt_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    stored = read_json(path)
    if stored.get("classifier_sha256") != (classifier_sha256 or file_sha256(classifier)):
        LOGGER.warning("%s was fit for other classifier weights: probabilities are shown uncalibrated "
                       "(recalibrate: pillsnap calibrate --exp EXP)", path)
        return None
    return stored if isinstance(stored.get("unknown_thresholds"), dict) else _upgrade(stored, path)


@dataclass(frozen=True)
class Temperatures:
    """The calibration's temperature: one fit on every validation crop (`overall`) and, where calibration had enough
    crops of each source (pillsnap.infer.unknown.CROP_SOURCES), one per source (`by_source`): a single-pill photo's
    crop and a detector's crop of a combination photo are not equally right at the same top score, so one
    temperature for both leaves each off (bench/calibration_crops.py)."""

    overall: float = 1.0
    by_source: Mapping[str, float] | None = None

    @classmethod
    def from_stored(cls, calibration: Mapping | None) -> Temperatures:
        """From a loaded calibration (None: uncalibrated, 1.0); one written before per-source temperatures has
        the one."""
        if not calibration:
            return cls()
        by_source = calibration.get("temperature_by_source")
        if by_source is not None and not isinstance(by_source, Mapping):
            raise ValueError(f"calibration.json: temperature_by_source must map crop sources to temperatures, got "
                             f"{by_source!r} (recalibrate: pillsnap calibrate --exp EXP)")
        return cls(stored_number(calibration.get("temperature"), "temperature", positive=True),
                   None if by_source is None else {k: stored_number(v, f"temperature_by_source.{k}", positive=True)
                                                   for k, v in by_source.items() if v is not None})

    def of(self, source: str | None) -> float:
        """The temperature for a crop from `source` (None, or a source without its own: the overall one)."""
        return float((self.by_source or {}).get(source, self.overall)) if source is not None else self.overall

    def per_row(self, sources: Sequence[str | None]) -> np.ndarray:
        """One temperature per crop, by each one's source."""
        return np.array([self.of(source) for source in sources], dtype=np.float64)

    def text(self, digits: int = 3) -> str:
        """'0.800 (single 0.750, combination 0.900)', or the one temperature alone."""
        by_source = ", ".join(f"{k} {v:.{digits}f}" for k, v in (self.by_source or {}).items())
        return f"{self.overall:.{digits}f}" + (f" ({by_source})" if by_source else "")


def unknown_thresholds_by_source(calibration: dict, rule: str) -> dict[str, float | None] | None:
    """The rule's threshold per crop source (single, combination) from a loaded calibration; None when it was
    written before there were per-source thresholds (the one threshold then holds for every crop)."""
    by_source = calibration.get("unknown_thresholds_by_source")
    if not isinstance(by_source, dict):
        return None
    return {source: thresholds.get(check_unknown_rule(rule)) for source, thresholds in by_source.items()}


def load_unknown_rule(ckpt_dir: str | Path, calibration: dict,
                      rule: str) -> tuple[float | None, ClassGaussians | None]:
    """(threshold, ClassGaussians or None) of `rule` from a loaded calibration; threshold None: the rule is off
    (unknown_keep_correct was 0, or the feature file is missing or not the one fit with these thresholds, which is
    said in the log)."""
    threshold = calibration["unknown_thresholds"].get(check_unknown_rule(rule))
    if rule != "feature_distance" or threshold is None:
        return threshold, None
    gaussians, path, problem = load_class_gaussians(ckpt_dir, calibration)
    if problem:
        LOGGER.warning("inference.unknown_rule=feature_distance needs %s, which is %s: no pill is answered as "
                       "unknown (recalibrate: pillsnap calibrate --exp EXP, or set inference.unknown_rule=probability)",
                       path, problem)
        return None, None
    return threshold, gaussians


def load_class_gaussians(ckpt_dir: str | Path, calibration: Mapping) -> tuple[ClassGaussians | None, Path, str | None]:
    """(the class Gaussians the calibration was fit with, their file, None), or (None, the file, what is wrong with
    it: missing, or not the file the calibration names by hash)."""
    path = Path(ckpt_dir) / str(calibration.get("features_file") or FEATURES_FILE)
    gaussians, problem = read_hashed(path, calibration.get("features_sha256"), ClassGaussians.load)
    return gaussians, path, "not the file fit with these thresholds" if problem == "not named" else problem


MIN_SOURCE_SET_ANSWERS = 50  # a crop source's own set threshold needs this many of its answers named by calibration


def set_thresholds(scores: np.ndarray, sources: Sequence[str | None] | None,
                   coverage: float) -> tuple[float, dict[str, float]]:
    """The conformal threshold over every scored answer at `coverage` and, where `sources` names each answer's crop
    source, the own thresholds of the sources with MIN_SOURCE_SET_ANSWERS answers (metrics.conformal)."""
    from pillsnap.metrics.conformal import conformal_threshold, group_thresholds

    own = group_thresholds(scores, sources, coverage, MIN_SOURCE_SET_ANSWERS) if sources is not None else {}
    return conformal_threshold(scores, coverage), own


def load_set_rule(calibration: dict | None, method: str, coverage: float, imprint_reading: bool,
                  imprint_check: bool = False, fill: bool = False, by_source: bool = True) -> tuple[Any, str | None]:
    """(the prediction-set rule `method` at `coverage` from a loaded calibration (pillsnap.infer.answer.SetRule),
    None) or (None, why there is none). With `by_source`, a crop source with at least MIN_SOURCE_SET_ANSWERS
    calibration answers gets its own threshold (metrics.conformal.group_thresholds); calibrations that did not
    record each answer's source have one threshold. The scores were measured on answers made with or without
    imprint reading, and with reading on, with or without the imprint check (every pill read, some withheld);
    answers made the other way have other probabilities, so their sets would not keep the coverage."""
    from pillsnap.infer.answer import SetRule
    from pillsnap.infer.unknown import CROP_SOURCES
    from pillsnap.metrics.conformal import check_set_method, group_refusals, no_threshold_reason, scores_from_json

    stored = (calibration or {}).get("prediction_sets")
    if not stored:
        return None, "the calibration has no prediction-set scores (recalibrate: pillsnap calibrate --exp EXP)"
    if bool(stored.get("imprint_reading")) != bool(imprint_reading):
        return None, (f"the prediction sets were calibrated with imprint reading "
                      f"{'on' if stored.get('imprint_reading') else 'off'} and it is now "
                      f"{'on' if imprint_reading else 'off'} (recalibrate: pillsnap calibrate --exp EXP)")
    if imprint_reading and bool(stored.get("imprint_check")) != bool(imprint_check):  # older files: no check
        return None, (f"the prediction sets were calibrated with the imprint check (inference.imprint.unknown_check) "
                      f"{'on' if stored.get('imprint_check') else 'off'} and it is now "
                      f"{'on' if imprint_check else 'off'} (recalibrate: pillsnap calibrate --exp EXP)")
    scores = scores_from_json(stored["scores"][check_set_method(method)])
    sources = stored.get("sources") if by_source else None
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(scores)
                                or not all(s is None or isinstance(s, str) for s in sources)):
        return None, (f"calibration.json: prediction_sets.sources does not name the crop source of each of the "
                      f"{len(scores)} scored answers (recalibrate: pillsnap calibrate --exp EXP)")
    threshold, own = set_thresholds(scores, sources, coverage)
    refused = group_refusals(scores, sources, coverage, MIN_SOURCE_SET_ANSWERS) if sources is not None else {}
    problem = no_threshold_reason(scores, coverage)
    if problem is not None and not own:  # sets of every candidate would claim a coverage they do not have
        return None, f"no set at {coverage:.0%} coverage: {problem}"
    if problem is not None:
        # The threshold over every answer serves only the sources without one of their own: they get none. The
        # answers of one source whose candidates miss too often (detector crops, drawn at a larger share than
        # they have) must not take the sets away from a source calibrated on its own.
        refused = {**{source: f"no set at {coverage:.0%} coverage: over every calibration answer, {problem}"
                      for source in CROP_SOURCES if source not in own}, **refused}
    return SetRule(method, coverage, threshold, fill=fill, by_source=own or None, refused=refused or None), None


def configured_set_rule(calibration: dict | None, settings: Any, imprint_reading: bool,
                        imprint_check: bool, topk: int | None = None, unknown_rule: str | None = None) -> Any:
    """The prediction-set rule (pillsnap.infer.answer.SetRule) at inference.prediction_set's coverage (`settings`),
    from the scores calibrated for these weights; None without them (answers carry no set, said once in the
    log). Settings that make no sense are a ValueError whether or not there is a calibration. The scores were
    measured on answers with `topk` candidates, withheld by the unknown-pill rule `unknown_rule` (None: off):
    answered otherwise (fewer candidates cut the sets short), they carry no set."""
    from pillsnap.metrics.conformal import check_set_method

    method, coverage = check_set_method(str(settings.method)), float(settings.coverage)
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"inference.prediction_set.coverage must be between 0 and 1, got {coverage}")
    fill, by_source = settings.get("fill_to_coverage", True), settings.get("by_source", True)
    for key, value in (("fill_to_coverage", fill), ("by_source", by_source)):
        if not isinstance(value, bool):
            raise ValueError(f"inference.prediction_set.{key} must be true or false, got {value!r}")
    if calibration is None:
        return None
    rule, problem = load_set_rule(calibration, method, coverage, imprint_reading, imprint_check, fill, by_source)
    stored = calibration.get("prediction_sets") or {}
    for key, name, now in (("topk", "inference.topk", topk), ("unknown_rule", "the unknown-pill rule in force",
                                                                   unknown_rule)):
        if not problem and key in stored and stored[key] != now:  # older calibrations did not record them
            problem = (f"the prediction sets were calibrated with {name} {stored[key] or 'off'} and it is now "
                       f"{now or 'off'} (recalibrate: pillsnap calibrate --exp EXP)")
    if problem:
        LOGGER.warning("predictor: answers carry no prediction set: %s", problem)
        return None
    for source, reason in (rule.refused or {}).items():
        LOGGER.warning("predictor: %s pills carry no prediction set: %s", source, reason)
    return rule


def load_calibration_for(ckpt_dir: Path, classifier: Path, sha256: str, imprint_check: bool = False) -> dict | None:
    """The calibration fit for the classifier file `classifier` (load_calibration), or None, said once in the log:
    probabilities are then raw softmax, answers carry no prediction set, and no pill is answered as unknown by its
    look (by its imprint it still is, with the imprint check on: `imprint_check`)."""
    calibration = load_calibration(ckpt_dir, classifier, sha256)
    if calibration is None:
        # a warning: such a predictor names a drug for whatever it is shown (a blank photo, a coin)
        LOGGER.warning("predictor: no calibration for %s: probabilities are raw softmax, answers carry no "
                       "prediction set, and no pill is answered as unknown by its look%s (pillsnap calibrate --exp "
                       "EXP fits them)", classifier.name, "; the imprint check still answers a pill whose imprint no "
                       "look-alike carries as unknown" if imprint_check else "")
    return calibration


def configured_unknown_rule(calibration: dict | None, ckpt_dir: Path, settings: Any) -> Any:
    """The unknown-pill rule inference.unknown_rule names (`settings`: the inference section) with the threshold
    calibrated for it, per crop source too (pillsnap.infer.unknown.UnknownAnswer); off without a calibration or
    with inference.unknown_keep_correct at 0."""
    from pillsnap.infer.unknown import UnknownAnswer

    rule, keep = str(settings.unknown_rule), float(settings.unknown_keep_correct)
    if calibration is None or keep <= 0:
        return UnknownAnswer(rule, None)
    calibrated = calibration.get("unknown_keep_correct")
    if calibrated is not None and not math.isclose(float(calibrated), keep):
        LOGGER.warning("predictor: the unknown-pill thresholds were calibrated to keep %.3g of the right answers and "
                       "inference.unknown_keep_correct is now %.3g: the calibrated thresholds stay in force "
                       "(recalibrate to apply it: pillsnap calibrate --exp EXP)", float(calibrated), keep)
    threshold, gaussians = load_unknown_rule(ckpt_dir, calibration, rule)
    by_source = unknown_thresholds_by_source(calibration, rule) if threshold is not None else None
    return UnknownAnswer(rule, threshold, gaussians, by_source)
