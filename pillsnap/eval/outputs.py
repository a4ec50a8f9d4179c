"""The classifier's outputs over a data set, for the calibration fits: labels, log-probabilities and pre-logit
features, in arrays of the data set's size; and the crops of a data set cut as inference cuts them, which is what
calibration fits on."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from pillsnap.utils.images import DECODE_ERRORS

LOGGER = logging.getLogger(__name__)
# Forward passes only, no gradients: a batch this size fits any device at the classifier's input size.
EVAL_BATCH = 64


class Outputs(NamedTuple):
    """A model's outputs over a loader, one row per crop that decoded: `rows` says which item of the loader's data
    set each row is (None where the data set does not say: InferenceCrops does, by its own positions)."""

    labels: np.ndarray
    log_probs: np.ndarray
    features: np.ndarray
    rows: np.ndarray | None


def model_outputs(model: Any, loader: Any, device: Any, keep_log_probs: bool = True) -> Outputs:
    """(labels, log-probabilities, pre-logit features, rows) of a WithFeatures model over a loader, in fp32.

    Filled into arrays of the data set's size as the batches come (RowFiller), not gathered and concatenated: at
    Stage 4 the validation log-probabilities are 1.7 GB and the fit crops' features 1.8 GB. Photos that failed to
    decode leave fewer rows than the data set has; `rows` then says which are left, so that what is known per crop
    (its source) can follow. keep_log_probs=False returns an empty [N, 0] array instead: with 5,000 classes the
    log-probabilities of the training crops the class Gaussians are fit on would take gigabytes and nothing reads
    them."""
    import torch

    from pillsnap.utils.arrays import RowFiller
    from pillsnap.utils.logs import progress

    size = len(loader.dataset)
    labels, log_probs, features, rows = RowFiller(size), RowFiller(size), RowFiller(size), RowFiller(size)
    numbered, broken = True, 0
    with torch.no_grad():
        for batch in progress(loader, "classifier pass", "batches", LOGGER):
            if batch is None:  # every photo of the batch failed to decode
                continue
            logits, feats = model(batch[0].to(device))
            broken += int((~torch.isfinite(logits).all(dim=1) | ~torch.isfinite(feats).all(dim=1)).sum())
            labels.add(np.asarray(batch[1], np.int64))
            log_probs.add(torch.log_softmax(logits.float(), dim=-1).cpu().numpy() if keep_log_probs
                          else np.zeros((len(logits), 0), np.float32))
            features.add(feats.float().cpu().numpy())
            meta = batch[2] if len(batch) > 2 else None
            numbered = numbered and isinstance(meta, dict) and "row" in meta
            if numbered:
                rows.add(np.asarray(meta["row"], np.int64))
    if broken:  # one NaN feature row makes the class Gaussians all NaN, and the unknown-pill rule then silently off
        raise ValueError(f"the classifier gave non-finite outputs (NaN or infinity) for {broken} of {labels.filled} "
                         "crops: its weights are broken (see the training log for a NaN loss); nothing is fit on them")
    return Outputs(labels.result((0,), np.int64), log_probs.result((0, 0)), features.result((0, 0)),
                   rows.result((0,), np.int64) if numbered else None)


def eval_loader(dataset: Any, cfg: Any) -> Any:
    """A loader over `dataset` in its order, in EVAL_BATCH batches, photos that fail to decode left out; with
    dataloader.num_workers workers, at most this rank's share of the cores, as the training loaders."""
    from torch.utils.data import DataLoader

    from pillsnap.data.datasets import safe_collate
    from pillsnap.data.loaders import workers_for_this_rank

    return DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, collate_fn=safe_collate,
                      num_workers=workers_for_this_rank(int(cfg.dataloader.num_workers)))


class InferenceCrops(Dataset):
    """The crops of a classification data set (those at `positions`, all by default) cut as inference cuts them: a
    single-pill photo (`single`, per row of the data set) as the single path does
    (pillsnap.infer.preprocess.single_photo_crop: where the pill is located on its backdrop, else a centred
    square), a pill of a combination photo at the detector's box (`detected`, per row: eval/box_calibration.py
    detector_boxes), else (no detector, or a pill it missed) at its labelled box. The data set's crops are cut at
    the labelled boxes, which inference never sees: a located box takes in the pill's shadow, and a classifier is
    less right there (bench/crop_jitter.py: 0.646 against 0.759 on the demo's single test photos).
    `labels`, `transform`, `load_crop` and (x, label, info) items like the data set's; None for a photo that fails
    to decode."""

    def __init__(self, dataset: Any, single: np.ndarray, locate: bool, fraction: float,
                 positions: np.ndarray | None = None, detected: dict[int, np.ndarray] | None = None) -> None:
        self.dataset, self.single, self.locate, self.fraction = dataset, np.asarray(single, bool), locate, fraction
        self.positions = np.arange(len(self.single)) if positions is None else np.asarray(positions, np.int64)
        self.labels, self.transform = np.asarray(dataset.labels)[self.positions], dataset.transform
        self.detected = detected or {}
        self._photo: tuple[str, Image.Image] | None = None  # the last photo cut at detector boxes: its pills follow

    def __len__(self) -> int:
        return len(self.positions)

    def load_crop(self, index: int) -> Image.Image:
        from pillsnap.infer.preprocess import load_image, single_photo_crop

        row = int(self.positions[index])
        if not self.single[row]:
            box = self.detected.get(row)
            if box is None:
                return self.dataset.load_crop(row)
            from pillsnap.data.datasets import LABELLED
            from pillsnap.infer.preprocess import crop_pill
            from pillsnap.utils.images import read_image

            # full resolution, in the frame the detector's box was found in (its labels' frame); a photo's pills
            # come one after the other, so it is decoded once for them
            path, photo = self.dataset.rows[row].image_path, self._photo
            if photo is None or photo[0] != path:
                photo = self._photo = (path, read_image(path, LABELLED))
            return crop_pill(photo[1], box, self.dataset.crop_margin)
        # decoded as inference decodes it, turned upright by its EXIF orientation: no labelled box is used here
        image = load_image(self.dataset.rows[row].image_path)[0]
        return single_photo_crop(image, self.dataset.crop_margin, self.locate, self.fraction)[0]

    def __getitem__(self, index: int) -> tuple[Any, int, dict[str, int]] | None:
        try:
            crop = self.load_crop(index)
        except DECODE_ERRORS:
            return None
        return self.transform(crop), int(self.labels[index]), {"row": index}  # model_outputs' rows


def inference_crops(dataset: Any, sources: np.ndarray | None, cfg: Any,
                    detected: dict[int, np.ndarray] | None = None) -> Any:
    """`dataset` cut as inference cuts it (InferenceCrops; `sources`: each crop's "single" | "combination", None:
    not known, every crop at its box; `detected`: the detector's boxes of combination pills, by row), under the
    config's single-path settings; a data set of tensors, with no photos to cut, as it is."""
    if not hasattr(dataset, "load_crop"):
        return dataset
    single = np.zeros(len(dataset), bool) if sources is None else np.asarray(sources) == "single"
    return InferenceCrops(dataset, single, bool(cfg.inference.single_locate), float(cfg.inference.single_crop),
                          detected=detected)
