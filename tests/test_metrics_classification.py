"""Classification metrics against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from pillsnap.metrics import evaluate_classification_metrics


def random_case(seed: int, n: int = 200, k: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y_true] += 1.5  # better than chance, not perfect
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y_true, prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    y_true, prob = random_case(seed)
    y_pred = prob.argmax(1)
    m = evaluate_classification_metrics(y_true, y_pred, prob, topk=(1, 3, 5))
    labels = np.arange(prob.shape[1])
    assert m["acc"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["top1"] == pytest.approx(m["acc"])
    assert m["top3"] == pytest.approx(top_k_accuracy_score(y_true, prob, k=3, labels=labels))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y_true, prob, k=5, labels=labels))
    assert m["confidence"] == pytest.approx(prob.max(1).mean()) and m["n"] == len(y_true)


def test_macro_f1_is_over_the_classes_the_split_has_crops_of():
    """4 classes with crops, all right but one crop answered as class 9, which the split has no crop of: macro-F1 is
    over the 4 (the wrong answer costs class 0's recall), not over 5 with a 0 for class 9."""
    y_true, y_pred = np.array([0, 0, 1, 2, 3]), np.array([9, 0, 1, 2, 3])
    m = evaluate_classification_metrics(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro"))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 3) / 4)


def test_topk_above_class_count_is_clipped_and_probs_are_optional():
    y_true, prob = np.array([0, 1, 2]), np.eye(3)[[1, 1, 0]]
    m = evaluate_classification_metrics(y_true, prob.argmax(1), prob, topk=(1, 5))
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == 1.0
    m = evaluate_classification_metrics([0, 1], [0, 0])
    assert "top5" not in m and m["acc"] == 0.5
    assert evaluate_classification_metrics([], [])["n"] == 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="equal length"):
        evaluate_classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="y_prob"):
        evaluate_classification_metrics([0, 1], [0, 1], np.ones((3, 2)))


@pytest.mark.parametrize("classes,weighted", [(3, False), (12, False), (3, True)])
def test_validation_pass_keeps_vectors_and_matches_the_full_probabilities(classes, weighted):
    """The per-epoch validation keeps only vectors per batch (at Stage 4 the [N, classes] probabilities are
    gigabytes); its figures are those of the whole probability matrix, top-5 clipped to the class count."""
    import torch
    from torch import nn

    from pillsnap.engine.classification import predict_classification, validate_classification

    torch.manual_seed(classes)
    x, y = torch.randn(50, 8), torch.randint(0, classes, (50,))
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 50, 7)] + [None]  # a last short batch; one unreadable
    model = nn.Linear(8, classes).train()
    # a class-weighted loss is a mean over the labels' weights: batching must not change it
    criterion = nn.CrossEntropyLoss(weight=torch.arange(1.0, classes + 1) if weighted else None, label_smoothing=0.1)
    got = validate_classification(model, batches, criterion, torch.device("cpu"), topk=(1, 5))
    assert model.training  # its mode is given back
    y_true, prob, loss = predict_classification(model, batches, criterion, torch.device("cpu"))
    want = evaluate_classification_metrics(y_true, prob.argmax(1), prob, topk=(1, 5))
    assert set(got) == {"val_loss", *want}
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["val_loss"] == pytest.approx(loss) == pytest.approx(criterion(model(x), y).item())
    assert (got["top5"] == 1.0) == (classes <= 5)
    assert validate_classification(model, [], criterion, torch.device("cpu"))["n"] == 0


def test_shrunken_rates_measure_the_worst_class_not_the_noise():
    from pillsnap.metrics.classification import shrunken_rates

    rng = np.random.default_rng(0)
    crops = np.full(2000, 15)
    right = rng.binomial(crops, 0.95)  # every class truly at 0.95
    shrunk = shrunken_rates(right, crops)
    assert (right / crops).min() < 0.75 < 0.93 < shrunk.min() <= shrunk.max() < 0.97
    # 40 classes truly at 0.5, measured on 15 crops like the rest: the floor finds them
    truth = np.r_[np.full(1960, 0.95), np.full(40, 0.5)]
    right = rng.binomial(crops, truth)
    shrunk = shrunken_rates(right, crops)
    assert shrunk.min() < 0.8 and np.argsort(shrunk)[:20].min() >= 1960 - 20  # the bad classes are the lowest
    assert np.all(np.diff(shrunk[np.argsort(right / crops)]) >= -1e-12)  # the order of the observed rates is kept
    # a class with many crops keeps its own rate; one with none gets the overall rate; all right stays at 1
    rates = shrunken_rates(np.array([14, 15, 13, 500, 0]), np.array([15, 15, 15, 1000, 0]))
    assert abs(rates[3] - 0.5) < 0.05 and rates[4] == pytest.approx(np.average([14 / 15, 1, 13 / 15, 0.5],
                                                                                 weights=[15, 15, 15, 1000]))
    assert shrunken_rates(np.array([5, 7]), np.array([5, 7])).tolist() == [1.0, 1.0]
    assert np.isnan(shrunken_rates(np.array([0]), np.array([0]))).all()


def test_shrunken_rates_find_weak_classes_whatever_their_crop_counts():
    """Combination crops fall on some drugs only, so classes have unequal crop counts: the binomial noise taken
    out of the spread is that of the crop-weighted spread, else the weak classes vanish into the overall rate."""
    from pillsnap.metrics.classification import shrunken_rates

    rng = np.random.default_rng(1)
    crops = np.r_[np.full(2500, 5), np.full(2500, 25)]
    truth = np.full(5000, 0.97)
    truth[rng.choice(5000, 50, replace=False)] = 0.6
    floors = [shrunken_rates(rng.binomial(crops, truth), crops).min() for _ in range(5)]
    assert max(floors) < 0.8, floors
    even = [shrunken_rates(rng.binomial(crops, 0.97), crops).min() for _ in range(5)]
    assert min(even) > 0.93, even
