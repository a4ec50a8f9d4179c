"""The validation probe enrolment measures its cost to the trained drugs on (pillsnap.infer.enrolment.Probe): up to
a few validation crops of every trained drug, cut as inference cuts them, through the classifier once at
calibration."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset

from pillsnap.eval.outputs import eval_loader, model_outputs
from pillsnap.infer.enrolment import Probe, probe_rows
from pillsnap.metrics.calibration import calibrated_probs
from pillsnap.utils.images import DECODE_ERRORS

LOGGER = logging.getLogger(__name__)


class InferenceCrops(Dataset):
    """Rows of a classification data set cut as inference cuts them: a single-pill photo (`single`) as its single
    path does (pillsnap.infer.preprocess.single_photo_crop), a pill of a combination photo at its labelled box (the
    detector's box stands in for it); (x, label, info) like the data set, None for a photo that fails to decode."""

    def __init__(self, dataset: Any, rows: np.ndarray, single: np.ndarray, locate: bool, fraction: float) -> None:
        self.dataset, self.rows, self.single = dataset, rows, single
        self.locate, self.fraction = locate, fraction

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int, dict[str, str]] | None:
        from pillsnap.data.datasets import LABELLED
        from pillsnap.infer.preprocess import single_photo_crop
        from pillsnap.utils.images import read_image

        row = int(self.rows[index])
        try:
            if self.single[row]:
                image = read_image(self.dataset.rows[row].image_path, LABELLED)
                crop = single_photo_crop(image, self.dataset.crop_margin, self.locate, self.fraction)[0]
            else:
                crop = self.dataset.load_crop(row)
        except DECODE_ERRORS:
            return None
        return self.dataset.transform(crop), int(self.dataset.labels[row]), {}


def build_probe(model: Any, dataset: Any, sources: np.ndarray | None, temperature: float, gaussians: Any,
                cfg: DictConfig, device: Any) -> Probe | None:
    """The probe of `dataset` (the validation crops; `sources` each one's "single" | "combination", None: not known,
    every crop cut at its box): the classifier's features whitened in the class Gaussians' space, each crop's drug,
    the calibrated top probability and whether it was right. None for a data set of tensors, with no photos."""
    if not hasattr(dataset, "load_crop"):
        return None
    rows = probe_rows(dataset.labels, int(cfg.train.seed))
    single = np.zeros(len(dataset), bool) if sources is None else np.asarray(sources) == "single"
    crops = InferenceCrops(dataset, rows, single, bool(cfg.inference.single_locate), float(cfg.inference.single_crop))
    labels, log_probs, features = model_outputs(model, eval_loader(crops, cfg), device)
    if len(labels) < len(rows):
        LOGGER.warning("calibration: %d of the probe's %d validation photos could not be read (left out of the "
                       "enrolment check's probe)", len(rows) - len(labels), len(rows))
    probs = calibrated_probs(log_probs, temperature)
    return Probe((features @ gaussians.whiten).astype(np.float32), labels, probs.max(1).astype(np.float32),
                 probs.argmax(1) == labels)
