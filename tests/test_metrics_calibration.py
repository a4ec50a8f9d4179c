"""Calibration metrics: temperature scaling lowers NLL on a held-out split, ECE and reliability bins, the
unknown-pill threshold and its report."""

import numpy as np
import pytest

from pillsnap.metrics.calibration import (
    calibrated_probs,
    expected_calibration_error,
    fit_temperature,
    nll,
    rejection_report,
    rejection_threshold,
    reliability_bins,
)


def overconfident(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right ~60% of the time but scaled to claim much more."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), y] += 1.5
    return logits * 4.0, y


def test_temperature_fit_on_one_split_lowers_nll_and_ece_on_another():
    fit_logits, fit_y = overconfident(3000, 6, seed=0)
    test_logits, test_y = overconfident(3000, 6, seed=1)
    t = fit_temperature(fit_logits, fit_y)
    assert t > 2.0  # the scores were inflated about 4x
    assert nll(test_logits, test_y, t) < nll(test_logits, test_y) - 0.1
    before = expected_calibration_error(calibrated_probs(test_logits, 1.0), test_y)
    after = expected_calibration_error(calibrated_probs(test_logits, t), test_y)
    assert after < 0.05 < before
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


def test_ece_and_reliability_bins_on_a_known_case():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])  # 0.9-bin: 1 of 2 right; 0.6-bin: 2 of 2 right
    bins = reliability_bins(probs, y, n_bins=10)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(2, 1.0), (2, 0.5)]
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx((2 * 0.4 + 2 * 0.4) / 4)


def test_the_unknown_threshold_keeps_the_asked_share_and_is_judged_on_held_out_classes():
    rng = np.random.default_rng(2)
    known = np.eye(4)[rng.integers(0, 4, 500)] * 0.7 + 0.075  # confident, right
    y = known.argmax(axis=1)
    known += rng.uniform(0, 0.05, known.shape)
    known /= known.sum(axis=1, keepdims=True)
    unknown = rng.dirichlet(np.ones(4), 200)  # diffuse answers
    threshold = rejection_threshold(known, y, keep_correct=0.95)
    report = rejection_report(known, y, unknown, threshold)
    assert report["coverage"] == pytest.approx(0.95, abs=0.01) and report["accuracy_answered"] == 1.0
    assert report["auroc"] > 0.9 and report["unknown_rejected"] > 0.5
    assert rejection_threshold(known, (y + 1) % 4) == 0.0  # nothing right: nothing to keep
