"""Calibrating a trained classifier at the end of training: fit the temperature on the validation split, choose the
"unknown pill" threshold there, measure both (ECE before and after, a reliability diagram; AUROC, coverage and
accuracy against classes held out of training), and store them beside the model for inference."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pillsnap.metrics.calibration import (
    calibrated_probs,
    expected_calibration_error,
    fit_temperature,
    nll,
    rejection_report,
    rejection_threshold,
    reliability_bins,
)
from pillsnap.models.export import file_sha256
from pillsnap.utils import read_json, save_json

LOGGER = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"  # in checkpoints/, beside the classifier it was fit for
UNKNOWN_RULE = "top-1 calibrated probability below the threshold: answered as an unknown pill"


def load_calibration(ckpt_dir: str | Path, classifier: str | Path) -> dict | None:
    """The calibration stored for `classifier`, or None when there is none or it was fit for other weights."""
    path = Path(ckpt_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    stored = read_json(path)
    if stored.get("classifier_sha256") != file_sha256(classifier):
        LOGGER.warning("%s was fit for other classifier weights: probabilities are shown uncalibrated "
                       "(recalibrate with pillsnap evaluate or by training)", path)
        return None
    return stored


def _log_probs(model: Any, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from pillsnap.engine.classification import predict_classification

    y_true, y_prob, _ = predict_classification(model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    # Log-probabilities scale like logits: softmax(log p / T) == softmax(logits / T).
    return y_true, np.log(np.clip(y_prob, 1e-12, 1.0))


def _held_out_loader(cfg: DictConfig, known: set[str]) -> Any:
    """Single-pill photos of manifest classes the classifier never saw (None when the stage used them all)."""
    from torch.utils.data import DataLoader

    from pillsnap.data import load_manifest
    from pillsnap.data.datasets import ClassificationDataset, safe_collate

    try:
        rows = load_manifest(cfg.paths.manifest_dir)
    except FileNotFoundError:
        return None
    rows = rows[(rows["image_type"] == "single") & ~rows["mapping_code"].isin(known)]
    if rows.empty:
        return None
    index = dict.fromkeys(rows["mapping_code"].unique(), 0)  # labels are unused: these classes have no index
    dataset = ClassificationDataset(rows, index, int(cfg.model.image_size), False, float(cfg.data.crop_margin))
    return DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=safe_collate)


def plot_reliability(before: list[dict], after: list[dict], temperature: float, out_path: Path,
                     eces: tuple[float, float] | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin (marker area: photos in the bin), before and after
    temperature scaling; the legend gives each curve's ECE."""
    from pillsnap.eval.reports import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    labels = ["raw softmax", f"temperature {temperature:.2f}"]
    if eces is not None:
        labels = [f"{label} (ECE {ece:.3f})" for label, ece in zip(labels, eces, strict=True)]
    total = max(sum(b["count"] for b in before), 1)
    for bins, label, marker in ((before, labels[0], "o"), (after, labels[1], "s")):
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        line = ax.plot(x, y, linewidth=1, label=label)[0]
        ax.scatter(x, y, s=[20 + 400 * b["count"] / total for b in bins], marker=marker, color=line.get_color())
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability on the validation split")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def calibrate_classifier(cfg: DictConfig, exp_dir: str | Path, build_loaders: Callable[[DictConfig], Any] | None = None,
                         keep_correct: float | None = None) -> dict:
    """Fit and store the calibration of EXP's classification_best.pt; returns the report (also in reports/)."""
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.models.classifier import load_classifier_for_inference

    exp_dir = Path(exp_dir)
    ckpt = exp_dir / "checkpoints" / "classification_best.pt"
    loaders = (build_loaders or build_dataloaders_twostage)(cfg)
    if loaders.cls_val is None:
        raise ValueError("no validation split to calibrate on: raise data.val_ratio")
    keep = float(cfg.inference.unknown_keep_correct if keep_correct is None else keep_correct)
    model, _ = load_classifier_for_inference(ckpt)
    y_true, log_p = _log_probs(model, loaders.cls_val)
    temperature = fit_temperature(log_p, y_true)
    raw, cal = calibrated_probs(log_p, 1.0), calibrated_probs(log_p, temperature)
    threshold = rejection_threshold(cal, y_true, keep) if keep > 0 else 0.0
    stored = {"temperature": temperature, "unknown_threshold": threshold, "unknown_rule": UNKNOWN_RULE,
              "unknown_keep_correct": keep, "classifier_sha256": file_sha256(ckpt), "n_val": int(len(y_true))}
    report = {**stored, "nll_before": nll(log_p, y_true), "nll_after": nll(log_p, y_true, temperature),
              "ece_before": expected_calibration_error(raw, y_true),
              "ece_after": expected_calibration_error(cal, y_true),
              "bins_before": reliability_bins(raw, y_true), "bins_after": reliability_bins(cal, y_true)}
    held_out = _held_out_loader(cfg, set(loaders.meta["class_names"]))
    if held_out is not None:
        _, unknown_log_p = _log_probs(model, held_out)
        report["unknown_eval"] = rejection_report(cal, y_true, calibrated_probs(unknown_log_p, temperature),
                                                  threshold)
        report["unknown_eval"]["held_out_classes"] = len({r.mapping_code for r in held_out.dataset.rows})
    save_json(exp_dir / "checkpoints" / CALIBRATION_FILE, stored)
    save_json(exp_dir / "reports" / "calibration.json", report)
    plot_reliability(report["bins_before"], report["bins_after"], temperature, exp_dir / "reports" / "reliability.png",
                     (report["ece_before"], report["ece_after"]))
    LOGGER.info("calibration: temperature %.3f, ECE %.4f -> %.4f, NLL %.4f -> %.4f; unknown below p=%.3f%s",
                temperature, report["ece_before"], report["ece_after"], report["nll_before"], report["nll_after"],
                threshold, _unknown_line(report.get("unknown_eval")))
    return report


def _unknown_line(unknown: dict | None) -> str:
    if not unknown:
        return " (no held-out classes to test it on)"
    return (f"; held-out classes: AUROC {unknown['auroc']:.3f}, coverage {unknown['coverage']:.3f}, accuracy answered "
            f"{unknown['accuracy_answered']:.3f}, unknowns rejected {unknown['unknown_rejected']:.3f}")
