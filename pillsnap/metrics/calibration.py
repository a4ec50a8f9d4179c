"""Confidence that means what it says: temperature scaling, expected calibration error and reliability bins (arrays
in, plain values out; numpy and scipy only). The "unknown pill" rules are in metrics/novelty.py."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

TEMPERATURE_BOUNDS = (0.05, 20.0)
CHUNK_ROWS = 4096  # rows per block of the [N, classes] arrays (bounds the temporaries at thousands of classes)


def nll(log_probs: np.ndarray, y_true: np.ndarray, temperature: float | np.ndarray = 1.0,
        chunk: int = CHUNK_ROWS) -> float:
    """Mean negative log-likelihood of `y_true` under softmax(log_probs / temperature) (`temperature`: one, or one
    per row).

    `log_probs` may be logits or log-probabilities: dividing either by T gives the same softmax. Computed in blocks
    of `chunk` rows: the temperature search calls it some 30 times, and whole-array temporaries of a validation
    split at 5,000 classes are gigabytes each.
    """
    total = 0.0
    per_row = np.ndim(temperature) > 0
    for start in range(0, len(y_true), chunk):
        t = np.asarray(temperature)[start:start + chunk, None] if per_row else temperature
        scaled = log_softmax(log_probs[start:start + chunk] / t, axis=1)
        total += float(scaled[np.arange(len(scaled)), y_true[start:start + chunk]].sum())
    return -total / len(y_true) if len(y_true) else float("nan")


def fit_temperature(log_probs: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises validation NLL (1.0 when there is nothing to fit)."""
    if len(y_true) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: nll(log_probs, y_true, float(np.exp(log_t))),
                             bounds=tuple(np.log(TEMPERATURE_BOUNDS)), method="bounded")
    return float(np.exp(result.x))


def calibrated_probs(log_probs: np.ndarray, temperature: float | np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """softmax(log_probs / temperature), filled in blocks of `chunk` rows (no whole-array temporaries);
    `temperature` one for every row or one per row ([N])."""
    log_probs = np.asarray(log_probs)
    out = np.empty(log_probs.shape, np.result_type(log_probs.dtype, np.float32))
    per_row = np.ndim(temperature) > 0
    for start in range(0, len(log_probs), chunk):
        t = np.asarray(temperature)[start:start + chunk, None] if per_row else temperature
        out[start:start + chunk] = softmax(log_probs[start:start + chunk] / t, axis=1)
    return out


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins of the top-1 answer: count, mean confidence and accuracy per non-empty bin."""
    return bins_of(probs.max(axis=1), probs.argmax(axis=1) == y_true, n_bins)


def bins_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Equal-width bins of answers given as their stated probabilities and whether each was right."""
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
    return ece_of(probs.max(axis=1), probs.argmax(axis=1) == y_true, n_bins)


def ece_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE of answers given as their stated probabilities and whether each was right."""
    if len(confidence) == 0:
        return 0.0
    bins = bins_of(np.asarray(confidence, np.float64), np.asarray(correct, bool), n_bins)
    return float(sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / len(confidence))


def ece_sampling_floor(confidence: np.ndarray, n_bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would still show on a split this size, from the answers' stated
    probabilities (1-D): the median over `draws` simulated splits whose answers are right with exactly those
    probabilities. On a small validation split (a hundred or so crops) it is several hundredths, so a measured
    ECE near it is within sampling noise."""
    confidence = np.asarray(confidence, np.float64)
    if len(confidence) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.median([ece_of(confidence, rng.uniform(size=len(confidence)) < confidence, n_bins)
                            for _ in range(draws)]))
