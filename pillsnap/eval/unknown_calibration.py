"""The unknown-pill rules' thresholds, fit on the validation answers (per crop source where each has enough right
answers), and how they do on single-pill photos of drugs held out of training."""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.answer_calibration import finite
from pillsnap.eval.outputs import eval_loader
from pillsnap.infer.unknown import CROP_SOURCES
from pillsnap.metrics.calibration import calibrated_probs
from pillsnap.metrics.novelty import UNKNOWN_RULES, rejection_report, rejection_threshold, unknown_scores

# Held-out crops the unknown-pill rules are measured on. Early stages of the real data leave thousands of classes
# out; a bounded sample spread over them measures AUROC as well as all of them would, in minutes instead of hours.
HELD_OUT_CROPS = 2000
MIN_SOURCE_RIGHT = 20  # right validation answers of a crop source below which it takes the threshold over all


def rule_thresholds(val_scores: dict[str, np.ndarray], correct: np.ndarray, keep: float) -> dict[str, float | None]:
    """Each rule's threshold keeping `keep` of the right answers (None: off, or nothing to reject)."""
    return {name: finite(rejection_threshold(scores, correct, keep)) if keep > 0 else None
            for name, scores in val_scores.items()}


def source_thresholds(val_scores: dict[str, np.ndarray], correct: np.ndarray, keep: float, scored: np.ndarray | None,
                      overall: dict[str, float | None]) -> dict[str, dict[str, float | None]] | None:
    """Per crop source (`scored`: each validation crop's; None: not known), each rule's threshold fit on that
    source's answers alone, or `overall` where the source has fewer than MIN_SOURCE_RIGHT right answers."""
    if scored is None:
        return None
    return {source: rule_thresholds({k: v[scored == source] for k, v in val_scores.items()},
                                    correct[scored == source], keep)
            if (correct & (scored == source)).sum() >= MIN_SOURCE_RIGHT else dict(overall)
            for source in CROP_SOURCES}


def held_out_report(rule: str, held: tuple[np.ndarray, np.ndarray], temperature: float, gaussians: Any,
                    val_scores: dict[str, np.ndarray], correct: np.ndarray, single: np.ndarray,
                    thresholds: dict[str, float | None], single_thresholds: dict[str, float | None],
                    held_out_classes: int) -> dict:
    """How the rules do on the held-out drugs' photos (`held`: their log-probabilities and features): each rule
    against the known drugs' single-pill crops (`single`) under the single-pill threshold (`unknown_eval_by_rule`,
    the rule in force as `unknown_eval`), and, for the record, the rule in force against every validation crop
    under its one threshold (`unknown_eval_all_crops`)."""
    probs, distances = calibrated_probs(held[0], temperature), gaussians.score(held[1])
    by_rule = {}
    for name in UNKNOWN_RULES:
        threshold = float("inf") if single_thresholds[name] is None else single_thresholds[name]
        by_rule[name] = rejection_report(val_scores[name][single], correct[single],
                                         unknown_scores(name, probs, distances), threshold)
        by_rule[name].update(threshold=single_thresholds[name], held_out_classes=held_out_classes,
                             known_crops="single")
    overall = float("inf") if thresholds[rule] is None else thresholds[rule]
    every = {**rejection_report(val_scores[rule], correct, unknown_scores(rule, probs, distances), overall),
             "threshold": thresholds[rule], "known_crops": "all"}
    return {"unknown_eval_all_crops": every, "unknown_eval": by_rule[rule], "unknown_eval_by_rule": by_rule}


def crop_sources(dataset: Any, manifest: Any) -> np.ndarray | None:
    """Per crop of a ClassificationDataset: "single" (a single-pill photo) or "combination" (a pill cut from a
    combination photo), from the manifest's image_type; None without a manifest or manifest rows."""
    if manifest is None or not hasattr(dataset, "rows"):
        return None
    single = set(manifest.loc[manifest["image_type"] == "single", "image_path"])
    return np.array(["single" if path in single else "combination" for path in dataset.rows.column("image_path")])


def held_out_loader(cfg: DictConfig, known: set[str], manifest: Any) -> Any:
    """Single-pill photos of manifest classes the classifier never saw (None when the stage used them all): at most
    HELD_OUT_CROPS, spread evenly over those classes."""
    from pillsnap.data.datasets import ClassificationDataset

    rows = manifest[(manifest["image_type"] == "single") & ~manifest["mapping_code"].isin(known)]
    if rows.empty:
        return None
    per_class = max(1, HELD_OUT_CROPS // rows["mapping_code"].nunique())
    rows = rows.sample(frac=1.0, random_state=int(cfg.train.seed)).groupby("mapping_code", sort=False).head(per_class)
    rows = rows.head(HELD_OUT_CROPS)
    index = dict.fromkeys(rows["mapping_code"].unique(), 0)  # labels are unused: these classes have no index
    dataset = ClassificationDataset(rows, index, int(cfg.model.image_size), False, float(cfg.data.crop_margin))
    return eval_loader(dataset, cfg)


def unknown_line(unknown: dict | None) -> str:
    """The log's words on the rule in force against the held-out drugs."""
    if not unknown:
        return " (no held-out classes to test it on)"
    return (f"; held-out classes: AUROC {unknown['auroc']:.3f}, coverage {unknown['coverage']:.3f}, accuracy answered "
            f"{unknown['accuracy_answered']:.3f}, unknowns rejected {unknown['unknown_rejected']:.3f}")
