"""Classification metrics: arrays in, dict out (checked against sklearn in the tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score


def topk_accuracy(y_true: np.ndarray, y_prob: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest probabilities (k is clipped to the class count)."""
    k = min(k, y_prob.shape[1])
    topk = np.argpartition(-y_prob, kth=k - 1, axis=1)[:, :k]
    return float((topk == y_true[:, None]).any(axis=1).mean())


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
    y_prob = None if y_prob is None else np.asarray(y_prob, dtype=np.float64)
    _check_inputs(y_true, y_pred, y_prob)
    n = int(y_true.shape[0])
    if n == 0:
        return {"acc": 0.0, "macro_f1": 0.0, "n": 0}
    out = {
        "acc": float((y_true == y_pred).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": n,
    }
    if y_prob is not None:
        for k in topk:
            out[f"top{k}"] = topk_accuracy(y_true, y_prob, int(k))
        out["confidence"] = float(y_prob.max(axis=1).mean())
    return out
