"""The unknown-pill rules: class Gaussians over features (distance to the nearest class mean), the threshold that
keeps the asked share of right answers, and the report on classes held out of training."""

import numpy as np
import pytest

from pillsnap.metrics.novelty import (
    ClassGaussians,
    rejection_report,
    rejection_threshold,
    unknown_scores,
)


def blobs(rng: np.random.Generator, centres: np.ndarray, n: int, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])) * spread, labels


def test_mahalanobis_distance_matches_the_formula_and_survives_a_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 4
    x, y = blobs(rng, centres, 300, np.array([3.0, 1.0, 1.0, 0.3, 0.3]))
    gaussians = ClassGaussians.fit(x, y)
    from sklearn.covariance import LedoitWolf

    means = np.stack([x[y == c].mean(0) for c in range(3)])
    precision = LedoitWolf().fit(x - means[y]).precision_
    probe = rng.normal(size=(4, 5))
    expected = np.stack([np.einsum("nd,de,ne->n", probe - m, precision, probe - m) for m in means], 1)
    assert np.allclose(gaussians.distances(probe), expected, rtol=1e-3, atol=1e-3)
    assert np.allclose(gaussians.score(probe), expected.min(1), rtol=1e-3, atol=1e-3)
    loaded = ClassGaussians.load(gaussians.save(tmp_path / "g.npz"))
    assert np.array_equal(loaded.means, gaussians.means) and np.array_equal(loaded.whiten, gaussians.whiten)


def test_features_of_a_new_class_are_told_apart_where_the_softmax_is_fooled():
    """A class between two known ones in a direction the known classes never vary in: a linear softmax
    answers it confidently (it lies far along the line separating them), its features are far from both."""
    rng = np.random.default_rng(1)
    spread = np.array([1.0, 0.1])
    known, y = blobs(rng, np.array([[-3.0, 0.0], [3.0, 0.0]]), 400, spread)
    new = np.array([[9.0, 2.0]]) + rng.normal(size=(200, 2)) * spread
    logits = lambda f: np.stack([-f[:, 0], f[:, 0]], 1)  # noqa: E731 - the linear head of such a model
    probs = lambda f: np.exp(logits(f)) / np.exp(logits(f)).sum(1, keepdims=True)  # noqa: E731
    gaussians = ClassGaussians.fit(known, y)
    correct = probs(known).argmax(1) == y
    by_prob = rejection_report(unknown_scores("probability", probs(known)), correct,
                               unknown_scores("probability", probs(new)), 0.5)
    scores_known = unknown_scores("feature_distance", probs(known), gaussians.score(known))
    threshold = rejection_threshold(scores_known, correct, 0.95)
    by_features = rejection_report(scores_known, correct, unknown_scores(
        "feature_distance", probs(new), gaussians.score(new)), threshold)
    assert by_prob["auroc"] < 0.2  # the softmax is surer of the stranger than of the known pills
    assert by_features["auroc"] > 0.99 and by_features["unknown_rejected"] > 0.95
    assert by_features["coverage"] == pytest.approx(0.95, abs=0.01)


def test_the_threshold_keeps_the_asked_share_of_right_answers():
    rng = np.random.default_rng(2)
    scores = rng.uniform(0, 1, 1000)
    correct = rng.uniform(0, 1, 1000) < 0.7
    threshold = rejection_threshold(scores, correct, keep_correct=0.9)
    assert (scores[correct] <= threshold).mean() == pytest.approx(0.9, abs=0.005)
    assert rejection_threshold(scores, np.zeros(1000, bool)) == float("inf")  # nothing right: reject nothing
    report = rejection_report(scores, correct, np.array([2.0, 0.1]), threshold)
    assert report["unknown_rejected"] == 0.5 and report["known"] == 1000 and report["unknown"] == 2


def test_unknown_scores_name_the_rule():
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert np.allclose(unknown_scores("probability", probs), [0.1, 0.4])
    with pytest.raises(ValueError, match="feature distances"):
        unknown_scores("feature_distance", probs)
    with pytest.raises(ValueError, match="must be one of"):
        unknown_scores("entropy", probs)


def test_streamed_fit_matches_sklearn_ledoit_wolf_in_blocks_and_with_more_dims_than_rows():
    """The fit streams blocks of rows; any block size gives sklearn's LedoitWolf fit on the whole array, also with
    fewer rows than feature dimensions (the real case: 1,280-dim features, few crops per class)."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(3)
    for n, d in ((300, 5), (40, 64)):
        x, y = blobs(rng, rng.normal(size=(4, d)) * 3, n, rng.uniform(0.2, 2.0, d))
        means = np.stack([x[y == c].mean(0) for c in range(4)])
        precision = LedoitWolf().fit(x - means[y]).precision_
        probe = rng.normal(size=(6, d))
        expected = np.stack([np.einsum("nd,de,ne->n", probe - m, precision, probe - m) for m in means], 1)
        for chunk in (7, 4096):
            gaussians = ClassGaussians.fit(x, y, chunk=chunk)
            assert np.allclose(gaussians.distances(probe), expected, rtol=1e-4, atol=1e-4)
            assert np.allclose(gaussians.score(probe, chunk=4), expected.min(1), rtol=1e-4, atol=1e-4)


def test_fit_and_score_keep_memory_to_blocks_not_copies_of_the_whole_array():
    """At 5,000 classes the calibration fits on ~350,000 x 1,280 features: a float64 copy of the array (or a
    [N, classes] distance matrix) is gigabytes. Peak extra memory stays below the input's own size."""
    import tracemalloc

    rng = np.random.default_rng(4)
    x = rng.normal(size=(20000, 32)).astype(np.float32)
    y = rng.integers(0, 500, len(x))
    tracemalloc.start()
    gaussians = ClassGaussians.fit(x, y, chunk=1024)
    fit_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    scores = gaussians.score(x, chunk=1024)
    score_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert scores.shape == (len(x),)
    assert fit_peak < x.nbytes  # the float64 copy alone would be 2x
    assert score_peak < len(x) * 500 * 4 / 4  # the whole [N, C] float32 matrix would be 40 MB
