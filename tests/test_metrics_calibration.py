"""Calibration metrics: temperature scaling lowers NLL on a held-out split, ECE and reliability bins."""

import numpy as np
import pytest

from pillsnap.metrics.calibration import (
    calibrated_probs,
    ece_of,
    ece_sampling_floor,
    expected_calibration_error,
    fit_temperature,
    nll,
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


def test_the_ece_floor_is_what_sampling_alone_gives_and_shrinks_with_more_photos():
    rng = np.random.default_rng(5)
    small, large = rng.uniform(0.2, 1.0, 120), rng.uniform(0.2, 1.0, 2000)
    floor_small, floor_large = ece_sampling_floor(small), ece_sampling_floor(large)
    assert 0.04 < floor_small < 0.12 and floor_large < floor_small / 2
    # answers right exactly as often as they claim measure about the floor, whatever their probability
    right = rng.uniform(size=len(large)) < large
    assert ece_of(large, right) == pytest.approx(floor_large, abs=0.02)
    assert ece_of(large, ~right) > 0.2  # ... and wrong ones do not


def test_nll_and_probabilities_in_blocks_match_the_whole_array_and_keep_memory_to_a_block():
    """A Stage 4 validation split is ~75,000 x 5,000 log-probabilities (1.5 GB in float32): the NLL of each
    temperature tried and the calibrated probabilities are computed in blocks of rows, with the same results."""
    import tracemalloc

    from scipy.special import log_softmax, softmax

    logits, y = overconfident(5000, 200, seed=3)
    logits = logits.astype(np.float32)
    whole = float(-log_softmax(logits / 1.7, axis=1)[np.arange(len(y)), y].mean())
    assert nll(logits, y, 1.7, chunk=333) == pytest.approx(whole, rel=1e-5)
    assert np.allclose(calibrated_probs(logits, 1.7, chunk=333), softmax(logits / 1.7, axis=1), atol=1e-6)
    assert calibrated_probs(logits, 1.7).dtype == np.float32  # no float64 copy of the whole array
    tracemalloc.start()
    nll(logits, y, 1.7, chunk=256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < logits.nbytes / 2  # a whole-array temporary alone would be logits.nbytes
