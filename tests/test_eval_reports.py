"""Report artefacts are written as real images and JSON; shape mismatches are clear errors."""

import numpy as np
import pytest
from PIL import Image

from pillsnap.eval.reports import dump_metrics_json, plot_confusion_matrix, plot_detection_results, plot_roc_pr_curves
from pillsnap.utils import read_json


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["K-000001", "K-000002"], tmp_path / "cm.png")
    assert Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="3 class names"):
        plot_confusion_matrix(np.eye(2), ["a", "b", "c"], tmp_path / "bad.png")


def test_roc_pr_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    onehot = np.eye(3)[y]
    prob = 0.5 * onehot + 0.5 * rng.dirichlet(np.ones(3), 40)
    paths = plot_roc_pr_curves(onehot, prob, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "pr.png"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="differ"):
        plot_roc_pr_curves(onehot, prob[:10], tmp_path)


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
