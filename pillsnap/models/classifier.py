"""Classifier construction (any timm backbone, ImageNet weights through timm's own loader from the hub or a local
file, with an offline fallback) and loading a trained one for inference."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pillsnap.utils import load_ckpt
from pillsnap.utils.io import select_inference_state
from pillsnap.utils.offline import RANDOM_UNWANTED, mark_weights, offline_reason

LOGGER = logging.getLogger(__name__)


def build_classification_model(
    backbone: str,
    num_classes: int,
    channels_last: bool = False,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """timm model `backbone` with a fresh `num_classes` head.

    Pretrained backbones come through timm's own loader (the ImageNet head is dropped for ours): `weights_path`, a
    local timm/ImageNet weights file, always wins (a missing one is an error); else `pretrained=True` fetches the
    model's weights from the hub (or its local cache). Offline (HF_HUB_OFFLINE=1, or the hub silent for a few
    seconds) with nothing cached, the model starts from random weights at once, with a warning that says how to
    get them (run once online, or give model.weights_path).
    """
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
        raise ValueError(f"Unknown timm backbone {backbone!r}. Similar names: {close}")
    if weights_path:
        model = _from_local_file(backbone, num_classes, Path(weights_path))
        mark_weights(model, f"file {weights_path}")
    elif pretrained:
        model = _from_hub(backbone, num_classes)
    else:
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        mark_weights(model, "random (model.pretrained=false)")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _from_local_file(backbone: str, num_classes: int, path: Path) -> nn.Module:
    import timm

    if not path.is_file():
        raise FileNotFoundError(f"model.weights_path does not exist: {path}")
    try:
        model = timm.create_model(backbone, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay={"file": str(path)})
    except RuntimeError as err:  # timm's strict load names the keys that do not fit
        raise ValueError(f"model.weights_path {path} does not fit backbone {backbone!r}: {err}") from err
    LOGGER.info("classifier: %s backbone weights from %s (head: %d classes, fresh)", backbone, path, num_classes)
    return model


@contextlib.contextmanager
def _hub_cache_only(on: bool) -> Iterator[None]:
    """huggingface_hub reads its offline switch at call time: set, a cached file still loads and nothing waits."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _from_hub(backbone: str, num_classes: int) -> nn.Module:
    import huggingface_hub.constants as hub
    import timm

    offline = offline_reason(hub.ENDPOINT)
    try:
        with _hub_cache_only(offline is not None):
            model = timm.create_model(backbone, pretrained=True, num_classes=num_classes)
    except OSError as err:  # offline with nothing cached, or blocked (huggingface_hub raises OSError subclasses)
        reason = offline or f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        LOGGER.warning("classifier: could not fetch pretrained %s weights (%s; none cached): training from random "
                       "init. To use them, run once with network access (they are cached) or download them and set "
                       "model.weights_path.", backbone, reason)
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        mark_weights(model, f"{RANDOM_UNWANTED}pretrained {backbone} weights could not be fetched ({reason})")
        return model
    LOGGER.info("classifier: pretrained %s weights loaded (head: %d classes, fresh)", backbone, num_classes)
    mark_weights(model, f"pretrained {backbone} (timm)")
    return model


def load_classifier_for_inference(ckpt_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the classifier stored in a training checkpoint; returns (model.eval(), config_snapshot)."""
    ckpt = load_ckpt(ckpt_path, map_location="cpu")
    snapshot = ckpt["config_snapshot"] or {}
    model_cfg = snapshot.get("model", {})
    if not model_cfg.get("backbone") or int(model_cfg.get("num_classes") or 0) < 1:
        raise ValueError(f"{ckpt_path}: config_snapshot lacks model.backbone / a resolved model.num_classes")
    model = build_classification_model(model_cfg["backbone"], int(model_cfg["num_classes"]))
    model.load_state_dict(select_inference_state(ckpt))
    return model.to(device).eval(), snapshot


class WithFeatures(nn.Module):
    """A timm classifier that answers (logits, pre-logit features): the features are what the "unknown pill"
    rule measures distances on. timm's own split (`forward_head(..., pre_logits=True)`, then the classifier)
    gives the same logits as the plain forward of an eval-mode model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features
