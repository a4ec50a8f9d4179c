"""Confidence that means what it says: temperature scaling, expected calibration error, reliability bins, and the
"unknown pill" rejection rule (arrays in, plain values out; numpy and scipy only)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

TEMPERATURE_BOUNDS = (0.05, 20.0)


def nll(log_probs: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `y_true` under softmax(log_probs / temperature).

    `log_probs` may be logits or log-probabilities: dividing either by T gives the same softmax.
    """
    scaled = log_softmax(log_probs / temperature, axis=1)
    return float(-scaled[np.arange(len(y_true)), y_true].mean())


def fit_temperature(log_probs: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises validation NLL (1.0 when there is nothing to fit)."""
    if len(y_true) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: nll(log_probs, y_true, float(np.exp(log_t))),
                             bounds=tuple(np.log(TEMPERATURE_BOUNDS)), method="bounded")
    return float(np.exp(result.x))


def calibrated_probs(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(log_probs / temperature, axis=1)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins of the top-1 answer: count, mean confidence and accuracy per non-empty bin."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = index == b
        if mask.any():
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                         "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return bins


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted gap between confidence and accuracy over the reliability bins."""
    if len(y_true) == 0:
        return 0.0
    bins = reliability_bins(probs, y_true, n_bins)
    return float(sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / len(y_true))


def rejection_threshold(probs: np.ndarray, y_true: np.ndarray, keep_correct: float = 0.95) -> float:
    """The top-1 probability below which an answer becomes "unknown pill": the level that keeps `keep_correct`
    of the validation answers that were right (chosen on known classes only, since unknowns are not in val)."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    if not correct.any():
        return 0.0
    return float(np.quantile(confidence[correct], 1.0 - keep_correct))


def rejection_report(known_probs: np.ndarray, known_true: np.ndarray, unknown_probs: np.ndarray,
                     threshold: float) -> dict:
    """How the rule does on known classes and on classes held out of training: AUROC of known-vs-unknown by top-1
    probability, coverage and accuracy of the answered known photos, share of unknowns rejected."""
    from sklearn.metrics import roc_auc_score

    known_conf, unknown_conf = known_probs.max(axis=1), unknown_probs.max(axis=1)
    answered = known_conf >= threshold
    correct = known_probs.argmax(axis=1) == known_true
    labels = np.r_[np.ones(len(known_conf)), np.zeros(len(unknown_conf))]
    auroc = float(roc_auc_score(labels, np.r_[known_conf, unknown_conf])) if len(unknown_conf) and len(
        known_conf) else None
    return {"auroc": auroc, "threshold": threshold, "known": int(len(known_conf)), "unknown": int(len(unknown_conf)),
            "coverage": float(answered.mean()) if len(answered) else 0.0,
            "accuracy_answered": float(correct[answered].mean()) if answered.any() else 0.0,
            "accuracy_all": float(correct.mean()) if len(correct) else 0.0,
            "unknown_rejected": float((unknown_conf < threshold).mean()) if len(unknown_conf) else None}
