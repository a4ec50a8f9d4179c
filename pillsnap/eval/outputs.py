"""The classifier's outputs over a data set, for the calibration fits: labels, log-probabilities and pre-logit
features, in arrays of the data set's size."""

from __future__ import annotations

from typing import Any

import numpy as np

# Forward passes only, no gradients: a batch this size fits any device at the classifier's input size.
EVAL_BATCH = 64


def model_outputs(model: Any, loader: Any, device: Any, keep_log_probs: bool = True,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log-probabilities, pre-logit features) of a WithFeatures model over a loader, in fp32.

    Filled into arrays of the data set's size as the batches come (RowFiller), not gathered and concatenated: at
    Stage 4 the validation log-probabilities are 1.7 GB and the fit crops' features 1.8 GB. Photos that failed to
    decode leave fewer rows than the data set has. keep_log_probs=False returns an empty [N, 0] array instead: with
    5,000 classes the log-probabilities of the training crops the class Gaussians are fit on would take gigabytes
    and nothing reads them."""
    import torch

    from pillsnap.utils.arrays import RowFiller

    size = len(loader.dataset)
    labels, log_probs, features = RowFiller(size), RowFiller(size), RowFiller(size)
    with torch.no_grad():
        for batch in loader:
            if batch is None:  # every photo of the batch failed to decode
                continue
            logits, feats = model(batch[0].to(device))
            labels.add(np.asarray(batch[1], np.int64))
            log_probs.add(torch.log_softmax(logits.float(), dim=-1).cpu().numpy() if keep_log_probs
                          else np.zeros((len(logits), 0), np.float32))
            features.add(feats.float().cpu().numpy())
    return labels.result((0,), np.int64), log_probs.result((0, 0)), features.result((0, 0))


def eval_loader(dataset: Any, cfg: Any) -> Any:
    """A loader over `dataset` in its order, in EVAL_BATCH batches, photos that fail to decode left out."""
    from torch.utils.data import DataLoader

    from pillsnap.data.datasets import safe_collate

    return DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, collate_fn=safe_collate,
                      num_workers=int(cfg.dataloader.num_workers))
