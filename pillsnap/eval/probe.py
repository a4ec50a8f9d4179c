"""The validation probe enrolment measures its cost to the trained drugs on (pillsnap.infer.enrolment.Probe): up to
a few validation crops of every trained drug, cut as inference cuts them, taken from calibration's pass over them."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.outputs import InferenceCrops, eval_loader, model_outputs
from pillsnap.infer.enrolment import Probe, probe_rows
from pillsnap.metrics.calibration import calibrated_probs

LOGGER = logging.getLogger(__name__)


def build_probe(model: Any, crops: Any, val: Any, gaussians: Any, cfg: DictConfig, device: Any) -> Probe | None:
    """The probe of the validation crops `crops` (InferenceCrops) from calibration's outputs on them (`val`, an
    eval.calibration.Validation: labels, pre-logit features, each crop's calibrated answer and top probability): the
    features of a few crops of each drug whitened in the class Gaussians' space, each crop's drug, the top
    probability and whether it was right. Where some photos failed to decode, the outputs no longer line up with the
    crops: the probe's crops go through the classifier again (at the overall temperature), those that decode. None
    for a data set of tensors, with no photos."""
    if not isinstance(crops, InferenceCrops):
        return None
    rows = probe_rows(crops.labels, int(cfg.train.seed))
    if len(val.labels) == len(crops):
        labels, features, top, answers = val.labels[rows], val.features[rows], val.top_probs[rows], val.answers[rows]
    else:
        again = InferenceCrops(crops.dataset, crops.single, crops.locate, crops.fraction, crops.positions[rows],
                               crops.detected)
        labels, log_probs, features, _ = model_outputs(model, eval_loader(again, cfg), device)
        LOGGER.warning("calibration: %d of the probe's %d validation photos could not be read (left out of the "
                       "enrolment check's probe)", len(rows) - len(labels), len(rows))
        probs = calibrated_probs(log_probs, val.temperatures.overall)
        top, answers = probs.max(1), probs.argmax(1)
    return Probe((features @ gaussians.whiten).astype(np.float32), labels, top.astype(np.float32), answers == labels)
