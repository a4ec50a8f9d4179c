"""Pill crops, the classification transform and dataset, safe_collate (image reading: pillsnap.utils.images)."""

from __future__ import annotations

import copy
import gc
import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pillsnap.utils.arrays import place_in_runs
from pillsnap.utils.boxes import xywh_to_xyxy, xyxy_to_cxcywh
from pillsnap.utils.images import DECODE_ERRORS, ImageLimits, read_image
from pillsnap.utils.signals import loader_worker_signals

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


class BoxJitter(NamedTuple):
    """A training crop cut at a box a little off the labelled one, as inference's boxes are: a located pill's box
    takes in its shadow, a detector's box is loose or tight. The crop (the labelled box's square grown by `margin`
    per side, as crop_box cuts it) is grown or shrunk by a factor up to 1 + `scale` either way and moved by up to
    `shift` x the pill's size on each axis; where the new square reaches past the crop, the crop's own border is
    mirrored, as far as the margin's backdrop goes (the square is kept within that)."""

    scale: float
    shift: float
    margin: float

    def __call__(self, crop: Image.Image) -> Image.Image:
        if self.scale <= 0 and self.shift <= 0:
            return crop
        width, height = crop.size
        short = min(width, height)
        grow = float(np.exp((2 * torch.rand(()).item() - 1) * np.log1p(self.scale)))
        pill = short / (1 + 2 * self.margin)
        dx, dy = ((2 * torch.rand(2) - 1) * self.shift * pill).tolist()
        # the margin's backdrop is all that may be mirrored: a mirror reaching further would copy the pill's edge
        room = max(0, int((short - pill) / 2) - 1)
        side = min(max(1, int(round(short * grow))), short + 2 * room)
        left = int(np.clip(round(width / 2 + dx - side / 2), -room, width + room - side))
        top = int(np.clip(round(height / 2 + dy - side / 2), -room, height + room - side))
        pad = max(0, -left, -top, left + side - width, top + side - height)
        if pad:
            crop = Image.fromarray(np.pad(np.asarray(crop.convert("RGB")), ((pad, pad), (pad, pad), (0, 0)),
                                          mode="reflect"))
        return crop.crop((left + pad, top + pad, left + pad + side, top + pad + side))


def shift_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's adjust_hue for an RGB PIL image (the hue turned by `hue_factor` of the circle, in the same
    256 steps), through OpenCV's HSV conversion: PIL's was most of the colour jitter's cost, and a cached training
    crop takes 2.65 ms with this one against 6.56 ms (bench/bench_data_cache.py, uint8 crops). The two differ by
    0.4 grey levels on average (the same bench); PIL's own round trip through HSV moves a crop about as much."""
    if image.mode != "RGB":
        return TF.adjust_hue(image, hue_factor)
    import cv2

    hsv = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2HSV_FULL)  # hue in 0-255, as PIL's HSV
    hsv[..., 0] += np.int8(hue_factor * 255).view(np.uint8)  # wraps around the circle, as adjust_hue's
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL), "RGB")


class ColorJitter(T.ColorJitter):
    """torchvision's ColorJitter, the same factors drawn in the same order from the same random numbers, with the
    hue turned by shift_hue."""

    def forward(self, img: Any) -> Any:
        order, brightness, contrast, saturation, hue = self.get_params(self.brightness, self.contrast,
                                                                       self.saturation, self.hue)
        for step in order.tolist():
            if step == 0 and brightness is not None:
                img = TF.adjust_brightness(img, brightness)
            elif step == 1 and contrast is not None:
                img = TF.adjust_contrast(img, contrast)
            elif step == 2 and saturation is not None:
                img = TF.adjust_saturation(img, saturation)
            elif step == 3 and hue is not None:
                img = shift_hue(img, hue) if isinstance(img, Image.Image) else TF.adjust_hue(img, hue)
        return img


def classification_transform(image_size: int, train: bool,
                             jitter: BoxJitter | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL crop -> tensor [3, S, S].

    Evaluation (train=False): float, ImageNet-normalised, the model's input itself. Inference uses this variant, so
    serving sees exactly the validation preprocessing.

    Training: light rotation and colour jitter, the crop's box moved and resized by `jitter` (BoxJitter) first, and
    the pixels left as uint8. A training batch then goes from the loader's workers through shared and pinned memory
    to the GPU in a quarter of float32's bytes, and the workers skip the float conversion (about a millisecond of a
    384 px crop's few); `normalise` makes it the model's input on the device (engine.classification.to_input)."""
    steps: list[Callable] = [T.Resize((image_size, image_size), antialias=True)]
    if not train:
        return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if jitter is not None:
        steps.insert(0, jitter)
    # No flips: a mirrored imprint is a different-looking pill. Real photos already cover 0-340 deg azimuth.
    return T.Compose([*steps, T.RandomRotation(15, fill=0), ColorJitter(0.2, 0.2, 0.15, 0.02), T.PILToTensor()])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Crops as the classifier takes them: uint8 ones (the training transform's) to ImageNet-normalised float, on
    their own device and in their own memory format; float ones, already normalised, as they are."""
    if images.dtype != torch.uint8:
        return images
    shape = (-1, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).mul_(255).view(shape)
    std = torch.tensor(IMAGENET_STD, device=images.device).mul_(255).view(shape)
    return images.float().sub_(mean).div_(std)


# Label boxes are in the photo's stored pixel frame (the frame the annotators' JSON sizes describe): no EXIF turn.
LABELLED = ImageLimits(upright=False)


class CropRow(NamedTuple):
    """The manifest columns one crop needs."""

    image_path: str
    label_path: str
    mapping_code: str
    bbox_x: float
    bbox_y: float
    bbox_w: float
    bbox_h: float


_TEXT = ("image_path", "label_path", "mapping_code")
BOX = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")  # a crop's box in its manifest row


class CropTable:
    """Manifest rows for crops, kept column by column: the texts in Arrow arrays, the box in one float array.

    DataLoader workers are forked from the trainer and share its memory until they write to it. Reading a row out
    of a list of Python tuples writes to it (its reference count), so each worker ended up with its own copy of every
    row it touched: about 400 MiB a worker for 500,000 rows, Stage 4's size (`bench/worker_memory.py`). Arrow and
    numpy buffers hold no per-row objects, so nothing is copied. Indexing gives a CropRow; slices and index arrays
    give a CropTable.
    """

    def __init__(self, texts: dict[str, pa.Array], boxes: np.ndarray) -> None:
        self._texts, self._boxes = texts, boxes

    @classmethod
    def from_frame(cls, rows: pd.DataFrame) -> CropTable:
        texts = {name: pa.array(rows[name].astype("string"), type=pa.large_string()) for name in _TEXT}
        boxes = rows[list(BOX)].to_numpy(dtype=np.float64).reshape(len(rows), len(BOX))
        return cls(texts, boxes)

    def __len__(self) -> int:
        return len(self._boxes)

    @overload
    def __getitem__(self, index: int) -> CropRow: ...
    @overload
    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> CropTable: ...

    def __getitem__(self, index: Any) -> CropRow | CropTable:
        if isinstance(index, slice):
            return self._take(np.arange(len(self))[index])
        try:
            i = operator.index(index)  # an int, a numpy integer, a 0-d integer tensor (as samplers yield)
        except TypeError:
            return self._take(self._positions(index))
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a table of {len(self)}")
        i %= len(self)
        return CropRow(*(self._texts[name][i].as_py() for name in _TEXT), *self._boxes[i].tolist())

    def _positions(self, index: Any) -> np.ndarray:
        """Row positions from integer indices (negative ones count from the end) or a boolean mask."""
        picked = np.asarray(index)
        if picked.dtype == bool:
            if picked.shape != (len(self),):
                raise IndexError(f"a boolean mask of shape {picked.shape} for a table of {len(self)} rows")
            return np.flatnonzero(picked)
        if picked.size and not np.issubdtype(picked.dtype, np.integer):
            raise TypeError(f"rows are picked by integers or a boolean mask, not {picked.dtype}")
        picked = picked.astype(np.int64).reshape(-1)
        if picked.size and (picked.min() < -len(self) or picked.max() >= len(self)):
            raise IndexError(f"rows {picked.min()}..{picked.max()} of a table of {len(self)}")
        return picked % max(len(self), 1)

    def _take(self, picked: np.ndarray) -> CropTable:
        positions = pa.array(picked, pa.int64())
        return CropTable({name: column.take(positions) for name, column in self._texts.items()}, self._boxes[picked])

    def __iter__(self) -> Iterator[CropRow]:
        columns = [self._texts[name].to_pylist() for name in _TEXT]
        return map(CropRow._make, zip(*columns, *self._boxes.T.tolist(), strict=True))

    def column(self, name: str) -> list[str]:
        """One text column as a list (image_path, label_path or mapping_code)."""
        return self._texts[name].to_pylist()


def crop_rows(rows: pd.DataFrame) -> list[CropRow]:
    return list(CropTable.from_frame(rows))


def pill_crop(row: Any, margin: float) -> Image.Image:
    """Decode the row's photo and crop it to the row's pill (manifest columns)."""
    image = read_image(row.image_path, LABELLED)
    box = crop_box(image.width, image.height, (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h), margin)
    return image.crop(box)


class ClassificationDataset(Dataset):
    """Pill crops from manifest rows (single-pill photos or pills of combination photos) -> (x, y, info); a sample
    that fails to decode becomes None.

    `cache` (pillsnap.data.cache.CachedCrops) serves pre-cropped, pre-resized uint8 crops instead of PNGs.
    `jitter` (scale, shift): with `train`, each crop's box moved and resized at random (BoxJitter).
    """

    def __init__(self, rows: pd.DataFrame, class_to_idx: dict[str, int], image_size: int, train: bool,
                 crop_margin: float = 0.15, cache: Any = None, jitter: tuple[float, float] = (0.0, 0.0)) -> None:
        unknown = sorted(set(rows["mapping_code"]) - set(class_to_idx))
        if unknown:
            raise ValueError(f"Rows with codes missing from the class list: {unknown[:5]}")
        self.rows = CropTable.from_frame(rows)
        self.labels = rows["mapping_code"].map(class_to_idx).to_numpy(dtype=np.int64)
        self.transform = classification_transform(image_size, train, BoxJitter(*jitter, crop_margin))
        self.image_size, self.crop_margin, self.cache = image_size, crop_margin, cache
        self.cache_slots = None if cache is None else cache.slots(self.rows.column("label_path"))

    def evaluation_view(self, per_class: int | None = None, seed: int = 0) -> ClassificationDataset:
        """The same crops without augmentation; at most `per_class` of each class, drawn with `seed`."""
        view = copy.copy(self) if per_class is None else self.subset(
            _first_per_class(self.labels, per_class, np.random.default_rng(seed)))
        view.transform = classification_transform(self.image_size, train=False)
        return view

    def subset(self, indices: np.ndarray | slice) -> ClassificationDataset:
        """These rows only (positions or a slice), with their labels and cached-crop slots, the same transform."""
        part = copy.copy(self)
        part.rows, part.labels = self.rows[indices], self.labels[indices]
        part.cache_slots = None if self.cache_slots is None else self.cache_slots[indices]
        return part

    def __len__(self) -> int:
        return len(self.rows)

    def load_crop(self, index: int) -> Image.Image:
        if self.cache is not None:
            return self.cache.read(*self.cache_slots[index].tolist())
        return pill_crop(self.rows[index], self.crop_margin)

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
    return np.sort(order[place_in_runs(labels[order]) < per_class])


def worker_init(worker_id: int) -> None:
    """First thing in a DataLoader worker: keep its garbage collector off the objects it inherited from the trainer.

    A worker is forked with the trainer's memory shared, page by page, until either writes to a page. A full
    collection writes to every object it examines, so each worker would soon hold its own copy of the trainer's
    whole Python heap (torch, timm, the manifest's objects). Frozen objects are never examined; the worker's own
    objects are collected as before. Freezing moves lists, not objects, so it costs nothing.

    Ctrl-C, SIGHUP and SIGUSR1 then end the worker quietly, once (utils.signals.loader_worker_signals)."""
    gc.freeze()
    loader_worker_signals()


def safe_collate(batch: list[Any], fill: bool = False) -> Any:
    """default_collate without the samples a dataset returned as None (undecodable); None if all failed.

    `fill` (training batches): copies of the batch's readable samples take the dropped ones' places, so that the
    batch keeps its size. A compiled model has static shapes: each new batch size compiles it again, for minutes
    under max-autotune, while under DDP the other ranks wait in the gradient exchange (NCCL's timeout). A batch
    less than half readable is None instead (the trainer skips the step): copies would weigh its few samples many
    times over. Evaluation keeps each crop once."""
    kept = [item for item in batch if item is not None]
    if fill and 2 * len(kept) < len(batch):
        kept = []
    if len(kept) < len(batch):
        LOGGER.warning("safe_collate: dropped %d undecodable sample(s) of %d%s", len(batch) - len(kept), len(batch),
                       "; copies of readable ones take their places" if fill and kept else
                       "; the batch is skipped" if fill else "")
    if not kept:
        return None
    if fill:
        kept += [kept[i % len(kept)] for i in range(len(batch) - len(kept))]
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
