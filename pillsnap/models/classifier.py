"""Classifier construction (any timm backbone, never downloading) and loading a trained one for inference."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pillsnap.utils import load_ckpt
from pillsnap.utils.io import select_inference_state

LOGGER = logging.getLogger(__name__)

def _load_backbone_weights(model: nn.Module, weights_path: str | Path) -> None:
    """Load a local timm state_dict, skipping the classifier head when its class count differs."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights_path does not exist: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    # The head of an ImageNet checkpoint has 1000 outputs: drop shape mismatches instead of failing.
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, _ = model.load_state_dict(kept, strict=False)
    LOGGER.info("Loaded %d/%d tensors from %s (%d left at init)", len(kept), len(state), path, len(missing))


def build_classification_model(
    backbone: str,
    num_classes: int,
    channels_last: bool = False,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """timm model `backbone` with a `num_classes` head.

    `pretrained=True` never downloads: it requires `weights_path` (a local timm state_dict).
    """
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pretrained and not weights_path:
        raise ValueError("model.pretrained=true needs model.weights_path (a local file); downloads are disabled.")
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
        raise ValueError(f"Unknown timm backbone {backbone!r}. Similar names: {close}")
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
    if weights_path:
        _load_backbone_weights(model, weights_path)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
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
