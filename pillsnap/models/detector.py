"""The pill detector: an ultralytics YOLO11 DetectionModel built from its YAML, one class ("pill"), fully offline.

Only ultralytics' model and loss are used; the step loop is ours (engine/detection.py) so that detection and
classification steps can interleave. Nothing here downloads: no weights, fonts, settings sync or AMP check.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)
PILL_CLASS_NAMES = {0: "pill"}


def ultralytics_offline() -> None:
    """Make ultralytics network-free before (and after) it is imported: no hub, no events, no settings sync."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.utils import LOGGER as YOLO_LOGGER
    from ultralytics.utils import SETTINGS

    # Its INFO chatter ("Overriding model.yaml nc=80 ...") would drown our progress lines; warnings still show.
    YOLO_LOGGER.setLevel(logging.WARNING)
    if SETTINGS.get("sync"):
        try:
            SETTINGS.update(sync=False)
        except OSError as err:  # a read-only settings dir must not stop training; YOLO_OFFLINE already blocks sync
            LOGGER.debug("cannot persist ultralytics sync=False: %s", err)


def _model_yaml(model_size: str) -> str:
    name = model_size if model_size.endswith((".yaml", ".yml")) else f"{model_size}.yaml"
    if not name.startswith("yolo"):
        raise ValueError(f"model.detector must name an ultralytics YOLO yaml (e.g. yolo11n, yolo11m), "
                         f"got {model_size!r}")
    return name


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a local ultralytics .pt ({'model': DetectionModel, 'ema': ...}) or a PillSnap checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"Detector weights not found: {path} (nothing is downloaded; give a local .pt)")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "ema_state" in obj and obj["ema_state"]:
        return obj["ema_state"]
    if isinstance(obj, dict) and "model_state" in obj:
        return obj["model_state"]
    if isinstance(obj, dict):
        source = obj.get("ema") or obj.get("model")
        if isinstance(source, nn.Module):
            return source.float().state_dict()
    if isinstance(obj, nn.Module):
        return obj.float().state_dict()
    raise ValueError(f"{path} holds no detector weights (expected an ultralytics .pt or a PillSnap checkpoint)")


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy tensors whose name and shape match (a COCO 80-class head is skipped for our 1-class head)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    LOGGER.info("detector: loaded %d/%d tensors from weights", len(matched), len(own))
    return len(matched)


def build_yolo_model(
    model_size: str = "yolo11m",
    num_classes: int = 1,
    lazy_load: bool = True,
    weights: str | Path | None = None,
) -> nn.Module:
    """Build an ultralytics DetectionModel from `{model_size}.yaml` with `num_classes` classes.

    `weights` is an optional local .pt whose matching tensors initialise the model. `lazy_load` keeps the
    agreed signature: laziness at inference lives in infer.Predictor (inference.lazy_load_detector); with
    lazy_load=False the model is also fused-ready (``model.args`` set) for immediate training.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    ultralytics_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(_model_yaml(model_size), nc=num_classes, verbose=False)
    # The loss reads its box/cls/dfl gains from model.args (normally set by ultralytics' trainer).
    model.args = get_cfg()
    model.names = dict(PILL_CLASS_NAMES) if num_classes == 1 else {i: str(i) for i in range(num_classes)}
    if weights:
        load_matching_weights(model, _state_dict_from_file(Path(weights)))
    LOGGER.debug("built %s (nc=%d, lazy_load=%s)", model_size, num_classes, lazy_load)
    return model


def detector_settings(config_snapshot: dict[str, Any]) -> tuple[str, int]:
    """(model yaml name, input size) recorded in a checkpoint's config snapshot."""
    model_cfg = config_snapshot.get("model", {}) if config_snapshot else {}
    return str(model_cfg.get("detector", "yolo11m")), int(model_cfg.get("det_image_size", 640))


def load_detector_for_inference(ckpt_path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(detector in eval mode on `device`, config_snapshot) from a detection checkpoint (EMA weights when saved)."""
    from pillsnap.utils import load_ckpt

    ckpt = load_ckpt(ckpt_path)
    snapshot = ckpt.get("config_snapshot") or {}
    model_size, _ = detector_settings(snapshot)
    model = build_yolo_model(model_size, num_classes=1, lazy_load=False)
    state = ckpt.get("ema_state") or ckpt["model_state"]
    model.load_state_dict(state)
    return model.to(device).eval(), snapshot
