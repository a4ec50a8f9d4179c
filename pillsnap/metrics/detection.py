"""Detection metrics (arrays in, dict out): COCO-style mAP@0.5 and mAP@0.5:0.95 plus precision/recall.

The matching and the 101-point interpolation follow pycocotools' COCOeval (area "all", maxDets=100, no crowd
boxes), so the figures agree with it on the same boxes; tests check that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100


def _as_array(value: Any, shape_tail: tuple[int, ...], name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape((0,) + shape_tail)
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        raise ValueError(f"{name} must have shape [N{''.join(f', {s}' for s in shape_tail)}], got {arr.shape}")
    return arr


def _normalise_prediction(pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy [N,4], scores [N], labels [N]) from a dict or an [N,6] array (x1,y1,x2,y2,conf,cls)."""
    if isinstance(pred, Mapping):
        boxes = _as_array(pred["boxes"], (4,), "prediction boxes")
        scores = _as_array(pred["scores"], (), "prediction scores")
        labels = _as_array(pred.get("labels", np.zeros(len(boxes))), (), "prediction labels")
    else:
        arr = _as_array(pred, (6,), "prediction array")
        boxes, scores, labels = arr[:, :4], arr[:, 4], arr[:, 5]
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"prediction boxes/scores/labels lengths differ: {len(boxes)}, {len(scores)}, {len(labels)}")
    return boxes, scores, labels.astype(np.int64)


def _normalise_target(target: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(target, Mapping):
        boxes = _as_array(target["boxes"], (4,), "target boxes")
        labels = _as_array(target.get("labels", np.zeros(len(boxes))), (), "target labels")
    else:
        arr = _as_array(target, (5,), "target array (x1,y1,x2,y2,cls)")
        boxes, labels = arr[:, :4], arr[:, 4]
    return boxes, labels.astype(np.int64)


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (COCO convention: no +1 on widths)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(truth_xyxy: np.ndarray, found_xyxy: np.ndarray, min_iou: float = 0.5) -> dict[int, int]:
    """One-to-one matching of labelled boxes to found ones, best overlap first: {truth index: found index} for
    the pairs that overlap at least `min_iou`."""
    iou = box_iou_xyxy(np.asarray(truth_xyxy, float).reshape(-1, 4), np.asarray(found_xyxy, float).reshape(-1, 4))
    match: dict[int, int] = {}
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        t, f = np.unravel_index(flat, iou.shape)
        if iou[t, f] < min_iou:
            break
        if t not in match and f not in match.values():
            match[int(t)] = int(f)
    return match


def match_in_confidence_order(truth_xyxy: np.ndarray, found_xyxy: np.ndarray, confidences: np.ndarray,
                              min_iou: float = 0.5) -> dict[int, int]:
    """{truth index: found index}, matched as COCO does: the found boxes most confident first, each to the
    best-overlapping labelled box still free (at least `min_iou`). Matched this way, the boxes a detection
    threshold keeps are matched as they would be had the detector run at that threshold."""
    order = np.argsort(-np.asarray(confidences, float), kind="stable")
    found = np.asarray(found_xyxy, float).reshape(-1, 4)[order]
    matches = _greedy_match(box_iou_xyxy(found, np.asarray(truth_xyxy, float).reshape(-1, 4)), min_iou)
    return {t: int(order[f]) for f, t in enumerate(matches) if t >= 0}


def _greedy_match(ious: np.ndarray, min_iou: float) -> list[int]:
    """COCO's greedy matching: the found boxes (rows of `ious` [D, G], most confident first) each take the
    best-overlapping labelled box still free, at least `min_iou` (of equal overlaps, the later). The labelled
    index per found box, -1 for none."""
    taken = np.zeros(ious.shape[1], dtype=bool)
    matches = []
    for d in range(ious.shape[0]):
        best, best_iou = -1, min(min_iou, 1 - 1e-10)
        for g in range(ious.shape[1]):
            if taken[g] or ious[d, g] < best_iou:
                continue
            best, best_iou = g, ious[d, g]
        if best >= 0:
            taken[best] = True
        matches.append(best)
    return matches


def _match_image(ious: np.ndarray) -> np.ndarray:
    """COCO greedy matching: [T, D] bool, det d is a true positive at IoU threshold t (dets sorted by score)."""
    matched = np.zeros((len(IOU_THRESHOLDS), ious.shape[0]), dtype=bool)
    for t_idx, thr in enumerate(IOU_THRESHOLDS):
        matched[t_idx] = np.asarray(_greedy_match(ious, thr), dtype=int) >= 0
    return matched


def _class_records(predictions: list, targets: list, cls: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores [D], true-positive flags [T, D] over all images, and the number of ground-truth boxes of `cls`."""
    scores, tps, n_gt = [], [], 0
    for pred, target in zip(predictions, targets, strict=True):
        p_boxes, p_scores, p_labels = pred
        t_boxes, t_labels = target
        gt = t_boxes[t_labels == cls]
        keep = p_labels == cls
        order = np.argsort(-p_scores[keep], kind="mergesort")[:MAX_DETS]
        dets, det_scores = p_boxes[keep][order], p_scores[keep][order]
        n_gt += len(gt)
        scores.append(det_scores)
        tps.append(_match_image(box_iou_xyxy(dets, gt)))
    if not scores:
        return np.zeros(0), np.zeros((len(IOU_THRESHOLDS), 0), dtype=bool), 0
    return np.concatenate(scores), np.concatenate(tps, axis=1), n_gt


def _interpolated_ap(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP exactly as COCOeval.accumulate computes it."""
    tp_sum, fp_sum = np.cumsum(tp).astype(float), np.cumsum(fp).astype(float)
    recall = tp_sum / n_gt
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.spacing(1))
    for i in range(len(precision) - 1, 0, -1):  # precision envelope, right to left
        precision[i - 1] = max(precision[i - 1], precision[i])
    idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    q = np.zeros(len(RECALL_THRESHOLDS))
    valid = idx < len(precision)
    q[valid] = precision[idx[valid]]
    return float(q.mean())


def _best_f1_point(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> tuple[float, float]:
    """Precision and recall at the confidence that maximises F1 (the figure ultralytics reports as P and R)."""
    if len(tp) == 0 or n_gt == 0:
        return 0.0, 0.0
    tp_sum, fp_sum = np.cumsum(tp).astype(float), np.cumsum(fp).astype(float)
    recall = tp_sum / n_gt
    precision = tp_sum / (tp_sum + fp_sum)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return float(precision[best]), float(recall[best])


def evaluate_detection_metrics(predictions: Sequence[Any], targets: Sequence[Any]) -> dict:
    """COCO-style detection metrics over images.

    predictions: one entry per image, either {"boxes": [N,4] xyxy, "scores": [N], "labels": [N]} or an [N,6]
    array (x1, y1, x2, y2, conf, cls) as the shared NMS returns. targets: one entry per image, {"boxes": [M,4]
    xyxy, "labels": [M]} or an [M,5] array (x1, y1, x2, y2, cls). Returns mAP@0.5, mAP@0.5:0.95 (mean over the
    classes that have ground truth), and precision/recall at IoU 0.5 at the best-F1 confidence, plus counts.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"predictions ({len(predictions)}) and targets ({len(targets)}) must list the same images")
    preds = [_normalise_prediction(p) for p in predictions]
    gts = [_normalise_target(t) for t in targets]
    classes = sorted({int(c) for _, labels in gts for c in labels})
    ap = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    precisions, recalls = [], []
    for c_idx, cls in enumerate(classes):
        scores, tps, n_gt = _class_records(preds, gts, cls)
        order = np.argsort(-scores, kind="mergesort")
        tps = tps[:, order]
        for t_idx in range(len(IOU_THRESHOLDS)):
            ap[c_idx, t_idx] = _interpolated_ap(tps[t_idx], ~tps[t_idx], n_gt)
        p, r = _best_f1_point(tps[0], ~tps[0], n_gt)
        precisions.append(p)
        recalls.append(r)
    has_gt = len(classes) > 0
    return {
        "mAP@0.5": float(ap[:, 0].mean()) if has_gt else 0.0,
        "mAP@0.5:0.95": float(ap.mean()) if has_gt else 0.0,
        "precision": float(np.mean(precisions)) if has_gt else 0.0,
        "recall": float(np.mean(recalls)) if has_gt else 0.0,
        "num_images": len(gts),
        "num_targets": int(sum(len(labels) for _, labels in gts)),
        "num_predictions": int(sum(len(s) for _, s, _ in preds)),
    }
