"""Pill crops, the classification transform and dataset, safe_collate (image reading: pillsnap.utils.images)."""

from __future__ import annotations

import copy
import logging
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from pillsnap.utils.boxes import xywh_to_xyxy, xyxy_to_cxcywh
from pillsnap.utils.images import DECODE_ERRORS, ImageLimits, read_image

LOGGER = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_box(width: int, height: int, bbox: Sequence[int], margin: float) -> tuple[int, int, int, int]:
    """Square crop (left, top, right, bottom) around `bbox` = (x, y, w, h), grown by `margin` x its size per side
    and shifted (not shrunk) to stay inside the image where possible; square so resizing keeps the pill's shape."""
    cx, cy, w, h = xyxy_to_cxcywh(xywh_to_xyxy(bbox)).tolist()
    side = int(round(max(w, h) * (1 + 2 * margin)))
    side = max(1, min(side, width, height))
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def classification_transform(image_size: int, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL crop -> float tensor [3, S, S], ImageNet-normalised; `train` adds light rotation and colour jitter.

    Inference uses the train=False variant, so serving sees exactly the validation preprocessing.
    """
    steps: list[Callable] = [T.Resize((image_size, image_size), antialias=True)]
    if train:
        # No flips: a mirrored imprint is a different-looking pill. Real photos already cover 0-340 deg azimuth.
        steps += [T.RandomRotation(15, fill=0), T.ColorJitter(0.2, 0.2, 0.15, 0.02)]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


# The manifest columns a crop needs; a module-level namedtuple so that rows pickle into worker processes.
# Label boxes are in the photo's stored pixel frame (the frame the annotators' JSON sizes describe): no EXIF turn.
LABELLED = ImageLimits(upright=False)
CropRow = namedtuple("CropRow", ["image_path", "label_path", "mapping_code", "bbox_x", "bbox_y", "bbox_w", "bbox_h"])


def crop_rows(rows: pd.DataFrame) -> list[CropRow]:
    return [CropRow(*t) for t in rows[list(CropRow._fields)].itertuples(index=False, name=None)]


def pill_crop(row: Any, margin: float) -> Image.Image:
    """Decode the row's photo and crop it to the row's pill (manifest columns)."""
    image = read_image(row.image_path, LABELLED)
    box = crop_box(image.width, image.height, (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h), margin)
    return image.crop(box)


class ClassificationDataset(Dataset):
    """Pill crops from manifest rows (single-pill photos or pills of combination photos) -> (x, y, info); a sample
    that fails to decode becomes None.

    `cache` (pillsnap.data.cache.CachedCrops) serves pre-cropped, pre-resized uint8 crops instead of PNGs.
    """

    def __init__(self, rows: pd.DataFrame, class_to_idx: dict[str, int], image_size: int, train: bool,
                 crop_margin: float = 0.15, cache: Any = None) -> None:
        unknown = sorted(set(rows["mapping_code"]) - set(class_to_idx))
        if unknown:
            raise ValueError(f"Rows with codes missing from the class list: {unknown[:5]}")
        self.rows = crop_rows(rows)  # plain tuples: DataFrame.iloc per sample costs more than a cached crop
        self.labels = np.array([class_to_idx[r.mapping_code] for r in self.rows], dtype=np.int64)
        self.transform = classification_transform(image_size, train)
        self.image_size, self.crop_margin, self.cache = image_size, crop_margin, cache

    def evaluation_view(self, per_class: int | None = None, seed: int = 0) -> ClassificationDataset:
        """The same crops without augmentation; at most `per_class` of each class, drawn with `seed`."""
        view = copy.copy(self)
        view.transform = classification_transform(self.image_size, train=False)
        if per_class is not None:
            keep = _first_per_class(self.labels, per_class, np.random.default_rng(seed))
            view.rows, view.labels = [self.rows[i] for i in keep], self.labels[keep]
        return view

    def __len__(self) -> int:
        return len(self.rows)

    def load_crop(self, index: int) -> Image.Image:
        row = self.rows[index]
        if self.cache is not None:
            return self.cache.get(row.label_path)
        return pill_crop(row, self.crop_margin)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, dict[str, str]] | None:
        row = self.rows[index]
        try:
            crop = self.load_crop(index)
        except DECODE_ERRORS as err:
            LOGGER.warning("dropping undecodable sample %s: %s", row.image_path, err)
            return None
        info = {"image_path": row.image_path, "mapping_code": row.mapping_code}
        return self.transform(crop), int(self.labels[index]), info


def _first_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of up to `per_class` random rows of each class, in one shuffle and one stable sort (a mask per
    class is N x classes work: 350,000 rows x 5,000 classes at the last stage)."""
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within each class
    grouped = labels[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(grouped) else np.zeros(0, np.int64)
    rank = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
    return np.sort(order[rank < per_class])


def safe_collate(batch: list[Any]) -> Any:
    """default_collate without the samples a dataset returned as None (undecodable); None if all failed."""
    kept = [item for item in batch if item is not None]
    if len(kept) < len(batch):
        LOGGER.warning("safe_collate: dropped %d undecodable sample(s) of %d", len(batch) - len(kept), len(batch))
    if not kept:
        return None
    return default_collate(kept)


def compute_class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency CE weights (mean 1 over present classes; absent classes get 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)
