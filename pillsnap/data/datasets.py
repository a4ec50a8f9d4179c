"""Image reading (files and `zip:` members), pill crops, the classification transform and dataset, safe_collate."""

from __future__ import annotations

import io
import logging
import os
import sys
import zipfile
from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

LOGGER = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_ERRORS = (OSError, UnidentifiedImageError, zipfile.BadZipFile, KeyError, ValueError, EOFError)

_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _zip_file(path: str) -> zipfile.ZipFile:
    # Keyed by pid: a ZipFile inherited through fork shares its file offset with the parent (corrupt reads).
    key = (os.getpid(), path)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def split_zip_path(path: str) -> tuple[str, str]:
    """`zip:<zip path>!<member>` -> (zip path, member)."""
    body = path[len("zip:"):]
    zip_path, sep, member = body.partition(".zip!")
    if not sep or not member:
        raise ValueError(f"Bad zip image path {path!r}: expected zip:<file>.zip!<member>")
    return zip_path + ".zip", member


def read_bytes(path: str) -> bytes:
    """Raw bytes of a file or of a `zip:<zip>!<member>` entry."""
    if path.startswith("zip:"):
        zip_path, member = split_zip_path(path)
        return _zip_file(zip_path).read(member)
    with open(path, "rb") as fh:
        return fh.read()


def _pil_open(fp: io.BytesIO) -> Image.Image:
    # ultralytics replaces PIL.Image.open with a wrapper that tries to pip-install pi-heif when a file is not
    # identified; a corrupt pill photo must simply fail (and be dropped), so use PIL's own opener.
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) or Image.open
    return opener(fp)


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes as RGB; an undecodable image raises OSError naming `name`."""
    try:
        return _pil_open(io.BytesIO(data)).convert("RGB")
    except DECODE_ERRORS as err:
        raise OSError(f"Cannot read image {name}: {err}") from err


def read_image(path: str) -> Image.Image:
    """Decode an image (plain path or `zip:<zip>!<member>`) as RGB; errors name the path."""
    try:
        data = read_bytes(str(path))
    except DECODE_ERRORS as err:
        raise OSError(f"Cannot read image {path}: {err}") from err
    return decode_image(data, str(path))


def crop_box(width: int, height: int, bbox: Sequence[int], margin: float) -> tuple[int, int, int, int]:
    """Square crop (left, top, right, bottom) around `bbox` = (x, y, w, h), grown by `margin` x its size per side
    and shifted (not shrunk) to stay inside the image where possible; square so resizing keeps the pill's shape."""
    x, y, w, h = bbox
    side = int(round(max(w, h) * (1 + 2 * margin)))
    side = max(1, min(side, width, height))
    cx, cy = x + w / 2, y + h / 2
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
CropRow = namedtuple("CropRow", ["image_path", "label_path", "mapping_code", "bbox_x", "bbox_y", "bbox_w", "bbox_h"])


def crop_rows(rows: pd.DataFrame) -> list[CropRow]:
    return [CropRow(*t) for t in rows[list(CropRow._fields)].itertuples(index=False, name=None)]


def pill_crop(row: Any, margin: float) -> Image.Image:
    """Decode the row's photo and crop it to the row's pill (manifest columns)."""
    image = read_image(row.image_path)
    box = crop_box(image.width, image.height, (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h), margin)
    return image.crop(box)


class ClassificationDataset(Dataset):
    """Single-pill crops from manifest rows -> (x, y, info); a sample that fails to decode becomes None.

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
        self.crop_margin = crop_margin
        self.cache = cache

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
