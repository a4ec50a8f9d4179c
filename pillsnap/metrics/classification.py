"""Classification metrics: arrays in, dict out (checked against sklearn in the tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score


def topk_hits(y_true: np.ndarray, y_prob: np.ndarray, k: int) -> np.ndarray:
    """Per row, whether the true class is among the k highest scores (k is clipped to the class count). Scores of
    any dtype, never copied to float64: at 75,000 x 5,000 a float64 copy alone is 3 GB."""
    k = min(k, y_prob.shape[1])
    topk = np.argpartition(y_prob, kth=y_prob.shape[1] - k, axis=1)[:, -k:]
    return (topk == np.asarray(y_true)[:, None]).any(axis=1)


def topk_accuracy(y_true: np.ndarray, y_prob: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest probabilities (k is clipped to the class count)."""
    return float(topk_hits(y_true, y_prob, k).mean())


def _check_inputs(y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray | None) -> None:
    if y_true.ndim != 1 or y_pred.shape != y_true.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    if y_prob is not None and (y_prob.ndim != 2 or y_prob.shape[0] != y_true.shape[0]):
        raise ValueError(f"y_prob must be [N, num_classes] with N={y_true.shape[0]}, got {y_prob.shape}")


def evaluate_classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    y_prob: np.ndarray | None = None,
    topk: Sequence[int] = (1, 5),
) -> dict:
    """acc (accuracy), macro_f1 (over classes present in y_true or y_pred, as sklearn), top{k} for each k,
    confidence, n.

    top{k} and confidence (mean top-1 probability) need `y_prob`; without it they are omitted.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    y_prob = None if y_prob is None else np.asarray(y_prob)
    _check_inputs(y_true, y_pred, y_prob)
    if y_prob is None or not len(y_true):
        return metrics_from_hits(y_true, y_pred)
    return metrics_from_hits(y_true, y_pred, {int(k): topk_hits(y_true, y_prob, int(k)) for k in topk},
                             y_prob.max(axis=1))


def metrics_from_hits(y_true: np.ndarray, y_pred: np.ndarray, hits: Mapping[int, np.ndarray] | None = None,
                      confidence: np.ndarray | None = None) -> dict:
    """evaluate_classification_metrics' figures from vectors of length N: the labels, the top-1 classes, per k
    whether the true class is in the top k (`hits`), and the top-1 probabilities (`confidence`); a validation pass
    can keep these per batch instead of the [N, classes] probabilities."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    _check_inputs(y_true, y_pred, None)
    n = int(y_true.shape[0])
    if n == 0:
        return {"acc": 0.0, "macro_f1": 0.0, "n": 0}
    out = {
        "acc": float((y_true == y_pred).mean()),
        # over the classes this split has crops of: a class it lacks that the model names anyway would add an F1 of
        # 0 (sklearn's default, over true and predicted classes), and the wrong answer already costs its true class
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
        "n": n,
    }
    for k, hit in (hits or {}).items():
        out[f"top{k}"] = float(np.mean(hit))
    if confidence is not None:
        out["confidence"] = float(np.mean(confidence, dtype=np.float64))
    return out


def per_class_rates(right: np.ndarray, crops: np.ndarray, answered: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each class's precision, recall and F1 from its right answers, its crops and the answers naming it (0 where a
    figure has nothing to divide by, as sklearn's zero_division=0)."""
    right, crops, answered = (np.asarray(a, np.float64) for a in (right, crops, answered))
    precision = np.divide(right, answered, out=np.zeros(len(right)), where=answered > 0)
    recall = np.divide(right, crops, out=np.zeros(len(right)), where=crops > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(right)),
                   where=precision + recall > 0)
    return precision, recall, f1


def shrunken_rates(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """Each group's rate (a class's accuracy: right answers over its crops) shrunk toward the rate over all groups
    by empirical Bayes: a beta prior fit to the groups by the method of moments, the binomial noise of each group's
    count taken out of their spread; returns each group's posterior mean.

    With a few crops per class the lowest observed accuracy measures the noise, not the worst class: at 5,000
    classes of 15 crops each, a classifier right on 97 % of every class's photos shows a lowest class accuracy far
    below 0.85, while the lowest shrunken rate stays near 0.97, and a few dozen classes truly at 0.6 still pull it
    well below 0.85 (bench/per_class_floor.py). Groups with no trials get the overall rate."""
    k, n = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
    seen = n > 0
    if not seen.any():
        return np.full(len(n), np.nan)
    rate = k[seen] / n[seen]
    mean = float(np.average(rate, weights=n[seen]))
    # what binomial counts alone add to the crop-weighted spread: sum n * p(1-p)/n over sum n = p(1-p) groups/crops
    noise = mean * (1 - mean) * seen.sum() / n[seen].sum()
    spread = float(np.average((rate - mean) ** 2, weights=n[seen])) - noise
    if mean <= 0.0 or mean >= 1.0 or spread <= 0.0:  # no spread beyond the noise: every group at the overall rate
        return np.full(len(n), mean)
    strength = max(mean * (1 - mean) / spread - 1.0, 0.0)  # the prior's pseudo-count
    return np.where(seen, (k + mean * strength) / np.maximum(n + strength, 1e-12), mean)
