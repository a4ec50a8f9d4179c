"""End-to-end evaluation of the two-stage pipeline on held-out photos of a manifest split.

Figures: auto routing accuracy (single photos -> single, combination photos -> combo), single-photo top-1
accuracy, the "all pills in the photo right" rate on combination photos, and detector mAP on the same photos
through the torch model and, when given, its ONNX export (both through the one shared NMS, so they compare).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pillsnap.infer.preprocess import load_image
from pillsnap.metrics.detection import evaluate_detection_metrics
from pillsnap.utils.boxes import xywh_to_xyxy

LOGGER = logging.getLogger(__name__)


def photo_groups(manifest: pd.DataFrame, split: str = "test") -> list[dict]:
    """One entry per photo of `split`: image_path, image_type, codes and xywh boxes of its labelled pills."""
    rows = manifest[manifest["split"] == split]
    photos = []
    for image_path, group in rows.groupby("image_path", sort=True):
        photos.append({
            "image_path": str(image_path), "image_type": str(group["image_type"].iloc[0]),
            "codes": group["mapping_code"].astype(str).tolist(),  # row order: aligned with "boxes"
            "boxes": group[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=float),
            "incomplete_gt": bool(group["incomplete_gt"].any()) if "incomplete_gt" in group else False,
        })
    return photos


UNKNOWN = "unknown"  # how an "unknown pill" answer (mapping_code null) and a pill of an untrained class compare


def _photo_outcome(photo: dict, result: dict, known: set[str] | None) -> dict:
    """Right means the same pills: a pill of a class the classifier never learnt is right only as "unknown"."""
    predicted = sorted(p["mapping_code"] or UNKNOWN for p in result["pills"])
    expected = sorted(c if known is None or c in known else UNKNOWN for c in photo["codes"])
    expected_mode = "single" if photo["image_type"] == "single" else "combo"
    return {"image_path": photo["image_path"], "image_type": photo["image_type"], "mode_used": result["mode_used"],
            "routed_right": result["mode_used"] == expected_mode, "expected": expected, "predicted": predicted,
            "all_right": Counter(predicted) == Counter(expected), "fallback_reason": result["fallback_reason"]}


def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_pipeline(predictor: Any, photos: list[dict], mode: str = "auto",
                      progress: Callable[[int, int], None] | None = None, known: set[str] | None = None) -> dict:
    """Run `predictor.predict` on every photo in `mode`; returns rates and the per-photo outcomes. `known`: the
    classifier's classes (pills of other classes are right when answered as unknown)."""
    outcomes = []
    for i, photo in enumerate(photos, start=1):
        outcomes.append(_photo_outcome(photo, predictor.predict(photo["image_path"], mode=mode), known))
        if progress is not None:
            progress(i, len(photos))
    singles = [o for o in outcomes if o["image_type"] == "single"]
    combos = [o for o, p in zip(outcomes, photos, strict=True)
              if o["image_type"] != "single" and not p["incomplete_gt"]]
    return {
        "mode": mode, "num_photos": len(outcomes), "num_single": len(singles), "num_combination": len(combos),
        "routing_accuracy": _rate([o["routed_right"] for o in outcomes]),
        "single_accuracy": _rate([o["all_right"] for o in singles]),
        "combo_all_right_rate": _rate([o["all_right"] for o in combos]),
        "outcomes": outcomes,
    }


def detection_map(predictor: Any, photos: list[dict], forward: Callable | None = None,
                  conf_threshold: float = 0.001) -> dict:
    """Detector mAP on the combination photos (boxes in original pixels, letterboxed like inference)."""
    predictions, targets = [], []
    for photo in photos:
        if photo["image_type"] == "single" or photo["incomplete_gt"]:
            continue
        image, _ = load_image(photo["image_path"])
        dets = predictor.detect(image, conf_threshold, forward=forward)
        predictions.append({"boxes": xywh_to_xyxy(dets[:, :4]), "scores": dets[:, 4], "labels": np.zeros(len(dets))})
        targets.append({"boxes": xywh_to_xyxy(photo["boxes"]), "labels": np.zeros(len(photo["boxes"]))})
    return evaluate_detection_metrics(predictions, targets)
