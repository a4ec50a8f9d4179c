"""evaluate_detection_metrics must agree with pycocotools' COCOeval on the same boxes."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pillsnap.metrics.detection import box_iou_xyxy, evaluate_detection_metrics


def _random_case(rng: np.random.Generator, n_images: int, n_classes: int) -> tuple[list, list]:
    preds, targets = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 200, size=(m, 2))
        wh = rng.uniform(10, 60, size=(m, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, n_classes, size=m)
        # Predictions: jittered copies of some ground truth plus random false positives.
        keep = rng.random(m) < 0.8
        jitter = gt[keep] + rng.normal(0, 4, size=(int(keep.sum()), 4))
        fp_n = int(rng.integers(0, 3))
        fp_xy = rng.uniform(0, 200, size=(fp_n, 2))
        fp = np.concatenate([fp_xy, fp_xy + rng.uniform(10, 60, size=(fp_n, 2))], 1)
        boxes = np.concatenate([jitter, fp])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        p_labels = np.concatenate([labels[keep], rng.integers(0, n_classes, size=fp_n)])
        scores = rng.uniform(0.05, 1.0, size=len(boxes))
        preds.append({"boxes": boxes, "scores": scores, "labels": p_labels})
        targets.append({"boxes": gt, "labels": labels})
    return preds, targets


def _coco_eval(preds: list, targets: list, n_classes: int) -> np.ndarray:
    images, anns, dets = [], [], []
    for i, (pred, tgt) in enumerate(zip(preds, targets, strict=True), start=1):
        images.append({"id": i, "width": 300, "height": 300})
        for box, label in zip(tgt["boxes"], tgt["labels"], strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label) + 1,
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h),
                         "iscrowd": 0})
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"], strict=True):
            dets.append({"image_id": i, "category_id": int(label) + 1, "score": float(score),
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed,n_classes", [(0, 1), (1, 1), (2, 3), (3, 2)])
def test_map_agrees_with_pycocotools(seed: int, n_classes: int) -> None:
    preds, targets = _random_case(np.random.default_rng(seed), n_images=12, n_classes=n_classes)
    ours = evaluate_detection_metrics(preds, targets)
    stats = _coco_eval(preds, targets, n_classes)
    assert ours["mAP@0.5:0.95"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["mAP@0.5"] == pytest.approx(stats[1], abs=1e-6)
    assert 0.0 < ours["mAP@0.5"] < 1.0


def test_perfect_predictions_score_one_and_array_input() -> None:
    gt = np.array([[10, 10, 50, 50], [60, 60, 90, 100]], dtype=float)
    pred = np.concatenate([gt, np.array([[0.9, 0], [0.8, 0]])], 1)  # Nx6 as the shared NMS returns
    target = np.concatenate([gt, np.zeros((2, 1))], 1)
    out = evaluate_detection_metrics([pred], [target])
    assert out["mAP@0.5"] == pytest.approx(1.0)
    assert out["mAP@0.5:0.95"] == pytest.approx(1.0)
    assert out["precision"] == pytest.approx(1.0) and out["recall"] == pytest.approx(1.0)


def test_missed_and_false_boxes_lower_precision_and_recall() -> None:
    target = {"boxes": [[10, 10, 50, 50], [60, 60, 90, 100]], "labels": [0, 0]}
    pred = {"boxes": [[10, 10, 50, 50], [150, 150, 190, 190]], "scores": [0.9, 0.95], "labels": [0, 0]}
    out = evaluate_detection_metrics([pred], [target])
    assert out["recall"] == pytest.approx(0.5)
    assert out["mAP@0.5"] < 0.5


def test_no_predictions_gives_zero() -> None:
    out = evaluate_detection_metrics([np.zeros((0, 6))], [{"boxes": [[0, 0, 5, 5]], "labels": [0]}])
    assert out["mAP@0.5"] == 0.0 and out["recall"] == 0.0


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="prediction array"):
        evaluate_detection_metrics([np.zeros((2, 5))], [np.zeros((0, 5))])
    with pytest.raises(ValueError, match="same images"):
        evaluate_detection_metrics([], [np.zeros((0, 5))])


def test_box_iou() -> None:
    iou = box_iou_xyxy(np.array([[0, 0, 10, 10.0]]), np.array([[5, 0, 15, 10.0], [20, 20, 30, 30.0]]))
    assert iou[0, 0] == pytest.approx(50 / 150)
    assert iou[0, 1] == 0.0
