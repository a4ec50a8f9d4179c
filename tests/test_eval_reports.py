"""Report artefacts are written as real images and JSON; shape mismatches are clear errors."""

import numpy as np
import pytest
from PIL import Image

from pillsnap.eval.reports import (
    dump_metrics_json,
    micro_ovr_scores,
    plot_confusion_matrix,
    plot_detection_results,
    plot_roc_pr_curves,
)
from pillsnap.utils import read_json


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["K-000001", "K-000002"], tmp_path / "cm.png")
    assert Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(np.eye(2), ["a", "b", "c"], tmp_path / "bad.png")


def test_a_confusion_picture_of_thousands_of_classes_shows_the_most_confused_ones(tmp_path):
    """5,000 classes in 2,000 pixels average every confusion away: past 50 classes the picture shows, labelled, the
    classes with the most wrong answers (as the true class or the one answered)."""
    from pillsnap.eval.reports import MAX_LABELED_CLASSES, most_confused_classes

    rng = np.random.default_rng(1)
    n = 3000
    cm = np.diag(rng.integers(20, 40, n)).astype(np.int64)
    for true in range(100, 196, 2):  # 96 classes with 1 to 3 wrong answers each: more than the picture holds
        cm[true, true + 1] = 1 + true % 3
    cm[2900, 17], cm[5, 6], cm[1234, 2345] = 30, 12, 9
    shown = most_confused_classes(cm, MAX_LABELED_CLASSES)
    assert len(shown) == MAX_LABELED_CLASSES and list(shown) == sorted(shown)
    assert {2900, 17, 1234, 2345, 5, 6} <= set(shown.tolist())  # the heaviest first, whichever end of the list
    path = plot_confusion_matrix(cm, [f"K-{i:06d}" for i in range(n)], tmp_path / "cm.png")
    assert 500 < Image.open(path).size[0] <= 2000


def test_per_class_tables_name_the_failing_drug_and_the_confused_pair(tmp_path):
    """At thousands of classes the confusion picture shows neither; per_class.csv lists the classes worst first and
    top_confusions.csv the most frequent wrong answers, and the confusion matrix is left as it was."""
    import csv

    from pillsnap.eval.reports import write_per_class_tables

    rng = np.random.default_rng(0)
    n = 300
    cm = np.diag(rng.integers(10, 20, n)).astype(np.int64)
    cm[5, 5], cm[5, 6] = 2, 12  # K-000005 is mostly answered as its twin K-000006
    cm[7, 9] = 3
    before = cm.copy()
    names = [f"K-{i:06d}" for i in range(n)]
    per_class, confusions = write_per_class_tables(cm, names, tmp_path)
    assert np.array_equal(cm, before)
    rows = list(csv.DictReader(per_class.read_text(encoding="utf-8").splitlines()))
    assert len(rows) == n and rows[0]["class"] == "K-000005" and rows[0]["crops"] == "14" and rows[0]["right"] == "2"
    assert rows[1]["class"] == "K-000007" and float(rows[0]["accuracy_shrunken"]) < float(rows[-1]["accuracy_shrunken"])
    top = list(csv.DictReader(confusions.read_text(encoding="utf-8").splitlines()))
    assert [(r["true_class"], r["answered_class"], r["crops"]) for r in top] == [("K-000005", "K-000006", "12"),
                                                                               ("K-000007", "K-000009", "3")]
    assert top[0]["share_of_true_class"] == f"{12 / 14:.4f}"


def test_roc_pr_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    prob = 0.5 * np.eye(3)[y] + 0.5 * rng.dirichlet(np.ones(3), 40)
    paths = plot_roc_pr_curves(y, prob, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "pr.png"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="differ"):
        plot_roc_pr_curves(y, prob[:10], tmp_path)


def test_micro_scores_match_the_one_hot_and_a_sample_estimates_them():
    """The micro one-vs-rest scores without a one-hot: exactly the one-hot's when small; a weighted sample of the
    negatives (what a 5,000-class split needs) gives nearly the same AUC and AP."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    n, c = 400, 50
    y = rng.integers(0, c, n)
    prob = rng.dirichlet(np.ones(c), n) + 0.3 * np.eye(c)[y] * rng.random((n, 1))
    onehot = np.eye(c)[y]
    full_auc = roc_auc_score(onehot.ravel(), prob.ravel())
    full_ap = average_precision_score(onehot.ravel(), prob.ravel())
    labels, scores, weights = micro_ovr_scores(y, prob)
    assert len(scores) == n * c and labels.sum() == n and np.all(weights == 1)
    assert roc_auc_score(labels, scores) == pytest.approx(full_auc)
    labels, scores, weights = micro_ovr_scores(y, prob, max_negatives=4000)
    assert len(scores) == n + 4000 and labels.sum() == n
    assert weights[labels == 0].sum() == pytest.approx(n * (c - 1))
    assert roc_auc_score(labels, scores, sample_weight=weights) == pytest.approx(full_auc, abs=0.02)
    assert average_precision_score(labels, scores, sample_weight=weights) == pytest.approx(full_ap, abs=0.05)
    with pytest.raises(ValueError, match="one class index per row"):
        micro_ovr_scores(onehot, prob)


def test_detection_overlay_draws_box(tmp_path):
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    [path] = plot_detection_results([image], [{"boxes": [[10, 10, 30, 30]], "labels": ["pill"], "scores": [0.9]}],
                                    tmp_path)
    drawn = np.asarray(Image.open(path))
    assert tuple(drawn[10, 20]) == (255, 0, 0)  # box edge is red
    assert tuple(drawn[50, 50]) == (255, 255, 255)


def test_dump_metrics_json(tmp_path):
    metrics = {"classification": {"accuracy": 0.5}, "detection": {"mAP@0.5": 0.4}}
    assert read_json(dump_metrics_json(metrics, tmp_path / "r" / "metrics.json")) == metrics
