"""Report artefacts of an evaluation: confusion matrix, ROC/PR curves, detection overlays, metrics.json.

Plots use matplotlib's Agg backend (no display); metrics come from pillsnap.metrics, never computed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pillsnap.utils import atomic_path, ensure_dir, save_json

MAX_LABELED_CLASSES = 50  # classes a confusion-matrix picture shows, labelled: past this, the most confused ones
MAX_CURVE_NEGATIVES = 2_000_000  # micro ROC/PR: past this many negative scores a weighted sample stands in


def pyplot() -> Any:
    """matplotlib.pyplot, imported on first use with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def most_confused_classes(cm: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the `k` classes with the most wrong answers, as the true class or the one answered."""
    cm = np.asarray(cm)
    wrong = cm.sum(axis=0) + cm.sum(axis=1) - 2 * np.diagonal(cm)
    return np.sort(np.argsort(-wrong, kind="stable")[:k])


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], out_path: str | Path) -> Path:
    """Row-normalised confusion matrix as PNG, labelled. Past MAX_LABELED_CLASSES classes it shows the classes with
    the most wrong answers: 5,000 classes in 2,000 pixels would average every single confusion away into what
    looks like a clean diagonal."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    title = "Confusion matrix (row-normalised)"
    shown = np.arange(len(class_names))
    if len(class_names) > MAX_LABELED_CLASSES:
        shown = most_confused_classes(cm, MAX_LABELED_CLASSES)
        title = (f"Confusion matrix: the {len(shown)} of {len(class_names)} classes with the most wrong answers\n"
                 "(rows normalised over all of each class's crops; answers outside these classes not drawn)")
    rows = cm.sum(axis=1, keepdims=True)[shown].astype(float)
    part = cm[np.ix_(shown, shown)].astype(float)
    norm = np.divide(part, rows, out=np.zeros_like(part), where=rows > 0)
    names = [class_names[i] for i in shown]
    plt = pyplot()
    size = min(4 + 0.25 * len(names), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9 if len(shown) < len(class_names) else None)
    out_path = Path(out_path)
    ensure_dir(out_path.parent)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def micro_ovr_scores(y_true: np.ndarray, y_prob: np.ndarray, max_negatives: int = MAX_CURVE_NEGATIVES,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, weights) of the micro-averaged one-vs-rest problem without building the N x C one-hot.

    Every row's true-class score is a positive; the other N x (C - 1) scores are negatives. Past `max_negatives`
    (a 5,000-class validation split has hundreds of millions) a uniform random sample of them stands in, each
    weighted by how many negatives it represents, so the curves and areas estimate the full ones at bounded memory.
    """
    y_true, y_prob = np.asarray(y_true, dtype=np.int64), np.asarray(y_prob)
    if y_prob.ndim != 2 or y_true.shape != (y_prob.shape[0],):
        raise ValueError(f"y_true {y_true.shape} and y_prob {y_prob.shape} differ: one class index per row")
    n, c = y_prob.shape
    rows = np.arange(n)
    positives = y_prob[rows, y_true]
    total_negatives = n * (c - 1)
    if total_negatives <= max_negatives:
        mask = np.ones(y_prob.shape, dtype=bool)
        mask[rows, y_true] = False
        negatives, weight = y_prob[mask], 1.0
    else:
        rng = np.random.default_rng(seed)
        pick_rows = rng.integers(0, n, max_negatives)
        pick_cols = rng.integers(0, c - 1, max_negatives)
        pick_cols += pick_cols >= y_true[pick_rows]  # skip the true class: every pick is a negative
        negatives, weight = y_prob[pick_rows, pick_cols], total_negatives / max_negatives
    labels = np.concatenate([np.ones(n, dtype=np.int8), np.zeros(len(negatives), dtype=np.int8)])
    weights = np.concatenate([np.ones(n), np.full(len(negatives), weight)])
    return labels, np.concatenate([positives, negatives]), weights


def plot_roc_pr_curves(y_true: np.ndarray, y_prob: np.ndarray, out_dir: str | Path) -> list[Path]:
    """Micro-averaged one-vs-rest ROC and PR curves (roc.png, pr.png) with AUC / AP in the legend.

    `y_true` holds one class index per row of `y_prob`."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    y_true, scores, weights = micro_ovr_scores(y_true, y_prob)
    out_dir = ensure_dir(out_dir)
    plt = pyplot()
    fpr, tpr, _ = roc_curve(y_true, scores, sample_weight=weights)
    precision, recall, _ = precision_recall_curve(y_true, scores, sample_weight=weights)
    curves = [("roc.png", fpr, tpr, "false positive rate", "true positive rate", f"micro AUC={auc(fpr, tpr):.3f}"),
              ("pr.png", recall, precision, "recall", "precision",
               f"micro AP={average_precision_score(y_true, scores, sample_weight=weights):.3f}")]
    paths = []
    for name, x, y, xlabel, ylabel, label in curves:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(x, y, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc="lower right" if name == "roc.png" else "lower left")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def plot_detection_results(images: Sequence, predictions: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Draw each prediction's boxes (`boxes` xyxy, optional `labels`/`scores`) on its PIL image; save PNGs."""
    from PIL import ImageDraw

    if len(images) != len(predictions):
        raise ValueError(f"{len(images)} images but {len(predictions)} predictions")
    out_dir = ensure_dir(out_dir)
    paths = []
    for i, (image, pred) in enumerate(zip(images, predictions, strict=True)):
        canvas = image.convert("RGB").copy()
        draw = ImageDraw.Draw(canvas)
        labels = pred.get("labels") or [""] * len(pred["boxes"])
        scores = pred.get("scores") or [None] * len(pred["boxes"])
        for box, label, score in zip(pred["boxes"], labels, scores, strict=True):
            draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=2)
            text = f"{label} {score:.2f}" if score is not None else str(label)
            draw.text((float(box[0]) + 2, float(box[1]) + 2), text.strip(), fill=(255, 0, 0))
        path = out_dir / f"detection_{i:04d}.png"
        canvas.save(path)
        paths.append(path)
    return paths


def dump_metrics_json(metrics: dict, out_path: str | Path) -> Path:
    """Write metrics.json atomically: one block per task, {detection: {...}, classification: {...}, ...}."""
    save_json(out_path, metrics)
    return Path(out_path)


def write_classification_reports(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str],
                                 out_dir: str | Path) -> list[Path]:
    """confusion_matrix.png, roc.png and pr.png from validation labels and probabilities ([] when empty)."""
    from sklearn.metrics import confusion_matrix

    if not len(y_true):
        return []
    num_classes = y_prob.shape[1]
    labels = np.arange(num_classes)
    names = list(class_names)
    if len(names) != num_classes:  # e.g. model.num_classes set larger than the stage's classes
        names = [str(i) for i in labels]
    cm = confusion_matrix(y_true, y_prob.argmax(axis=1), labels=labels)
    paths = [plot_confusion_matrix(cm, names, Path(out_dir) / "confusion_matrix.png")]
    paths += write_per_class_tables(cm, names, out_dir)
    return paths + plot_roc_pr_curves(y_true, y_prob, out_dir)


TOP_CONFUSIONS = 200  # rows of top_confusions.csv


def write_per_class_tables(cm: np.ndarray, class_names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """per_class.csv (each class with validation crops: crops, right, precision, recall, F1 and the accuracy after
    empirical-Bayes shrinkage the stage's per-class floor uses, worst first) and top_confusions.csv (the most
    frequent wrong answers: true class, answered class, crops, share of the true class's crops). At thousands of
    classes the confusion matrix's picture cannot show which drug fails or which two are confused; these can."""
    import csv

    from pillsnap.metrics.classification import per_class_rates, shrunken_rates

    out_dir = ensure_dir(Path(out_dir))
    support, answered, right = cm.sum(axis=1), cm.sum(axis=0), np.diagonal(cm).copy()
    present = np.flatnonzero(support)
    shrunk = shrunken_rates(right[present], support[present])
    precision, recall, f1 = per_class_rates(right, support, answered)
    per_class = Path(out_dir) / "per_class.csv"
    with atomic_path(per_class) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "crops", "right", "precision", "recall", "f1", "accuracy_shrunken"])
        for i in np.lexsort((recall[present], shrunk)):  # worst first
            c = present[i]
            writer.writerow([class_names[c], int(support[c]), int(right[c]), f"{precision[c]:.4f}",
                             f"{recall[c]:.4f}", f"{f1[c]:.4f}", f"{shrunk[i]:.4f}"])
    np.fill_diagonal(cm, 0)  # in place (the matrix may be 5,000 x 5,000): restored below
    try:
        flat = cm.ravel()
        wrong = np.flatnonzero(flat)  # at most one entry per crop: far fewer than classes squared
        top = wrong[np.argsort(-flat[wrong], kind="stable")[:TOP_CONFUSIONS]]
        rows = [(int(t) // cm.shape[1], int(t) % cm.shape[1], int(flat[t])) for t in top]
    finally:
        np.fill_diagonal(cm, right)
    confusions = Path(out_dir) / "top_confusions.csv"
    with atomic_path(confusions) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true_class", "answered_class", "crops", "share_of_true_class"])
        for t, a, n in rows:
            writer.writerow([class_names[t], class_names[a], n, f"{n / support[t]:.4f}"])
    return [per_class, confusions]


def plot_reliability(before: list[dict], after: list[dict], temperature: float | str, out_path: Path,
                     eces: tuple[float, float] | None = None, answers: dict | None = None,
                     floor: float | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin (marker area: photos in the bin), before and after
    temperature scaling and, when measured, of the final answers after the imprint evidence; the legend gives each
    curve's ECE, the title the ECE sampling alone would give a perfectly calibrated model on this many crops."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    labels = ["raw softmax", f"temperature {temperature:.2f}" if isinstance(temperature, float)
              else f"temperature {temperature}"]
    if eces is not None:
        labels = [f"{label} (ECE {ece:.3f})" for label, ece in zip(labels, eces, strict=True)]
    total = max(sum(b["count"] for b in before), 1)
    curves = [(before, labels[0], "o"), (after, labels[1], "s")]
    if answers and answers.get("bins"):
        curves.append((answers["bins"], f"answers after the imprint evidence (ECE {answers['ece']:.3f})", "^"))
    for bins, label, marker in curves:
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        line = ax.plot(x, y, linewidth=1, label=label)[0]
        ax.scatter(x, y, s=[20 + 400 * b["count"] / total for b in bins], marker=marker, color=line.get_color())
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    title = f"Reliability on the validation split ({total} crops, cut as inference cuts them)"
    if floor is not None:
        title += f"\nECE of a perfectly calibrated model this size: about {floor:.2f}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)  # below the diagonal on the right: where few bins fall
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
