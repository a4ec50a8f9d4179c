"""The pill detector: an ultralytics YOLO11 DetectionModel built from its YAML, one class ("pill"), fully offline,
and the one NMS postprocess that turns its raw output (torch or ONNX) into boxes.

Only ultralytics' model and loss are used; the step loop is ours (engine/detection.py) so that detection and
classification steps can interleave. Nothing here downloads: no weights, fonts, settings sync or AMP check.

Validation mAP, inference and the ONNX check all go through `postprocess_detections`, so torch and ONNX
figures come from the same NMS.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pillsnap.utils.offline import RANDOM_UNWANTED, mark_weights, offline_reason, ultralytics_offline

LOGGER = logging.getLogger(__name__)
NMS_MAX_DET = 300  # boxes NMS keeps per image at most (ultralytics' own default)
PILL_CLASS_NAMES = {0: "pill"}
ASSETS_HOST = "https://github.com"  # ultralytics' COCO weights (yolo11m.pt) are GitHub release assets


def _model_yaml(model_size: str) -> str:
    name = model_size if model_size.endswith((".yaml", ".yml")) else f"{model_size}.yaml"
    if not name.startswith("yolo"):
        raise ValueError(f"model.detector must name an ultralytics YOLO yaml (e.g. yolo11n, yolo11m), "
                         f"got {model_size!r}")
    return name


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a local ultralytics .pt ({'model': DetectionModel, 'ema': ...}) or a PillSnap checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"Detector weights not found: {path}")
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


def fetch_detector_weights(spec: str | Path) -> Path | None:
    """A local path to the weights `spec` names: an existing file as is; an ultralytics asset name (yolo11m.pt)
    through ultralytics' own downloader (cached in its weights folder). None, with a warning saying what to do,
    when it cannot be had (offline and not cached): the detector then starts from random weights."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.parent != Path(".") or path.suffix != ".pt":
        raise FileNotFoundError(f"Detector weights not found: {path} (give a local .pt, or an ultralytics asset "
                                "name such as yolo11m.pt to download it once)")
    ultralytics_offline()
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.downloads import attempt_download_asset

    cached = Path(SETTINGS["weights_dir"]) / path.name
    if cached.is_file():
        return cached
    offline = offline_reason(ASSETS_HOST)
    try:
        if offline:
            raise ConnectionError(offline)
        # Into ultralytics' weights folder (a bare name would land in the working directory, where a run started
        # elsewhere never finds it again).
        cached.parent.mkdir(parents=True, exist_ok=True)
        return Path(attempt_download_asset(str(cached), retry=1))
    except (OSError, ConnectionError, RuntimeError) as err:  # offline or blocked: ultralytics raises these
        LOGGER.warning("detector: could not fetch %s (%s; none cached): training from random init. Download it "
                       "once with network access, or set model.detector_weights to a local file.", path.name,
                       str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return None


MIN_MATCHED_SHARE = 0.9  # of the backbone's and neck's tensors a weights file must fill (all, from a fitting one)


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> int:
    """Copy tensors whose name and shape match (a COCO 80-class head is skipped for our 1-class head: its class
    branch is sized by the class count). A file that fills fewer than MIN_MATCHED_SHARE of the tensors before the
    head is refused (ValueError): the weights of another model size (yolo11n's for yolo11s) matched a handful and
    left the rest at random init, with only this function's count in the log to say so."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    layers = getattr(model, "model", None)
    head = f"model.{len(layers) - 1}." if isinstance(layers, nn.Sequential) else None  # the Detect layer's names
    body = [k for k in own if head is None or not k.startswith(head)]
    filled = sum(k in matched for k in body)
    if filled < MIN_MATCHED_SHARE * len(body):
        raise ValueError(f"model.detector_weights {source} fits {filled} of the {len(body)} tensors before the "
                         "detector's head: weights of another model (check model.detector, e.g. yolo11m, against "
                         "the file's size)")
    model.load_state_dict(matched, strict=False)
    LOGGER.info("detector: loaded %d/%d tensors from weights", len(matched), len(own))
    return len(matched)


def build_yolo_model(
    model_size: str = "yolo11m",
    num_classes: int = 1,
    weights: str | Path | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build an ultralytics DetectionModel from `{model_size}.yaml` with `num_classes` classes.

    `weights` (a local .pt, or an asset name such as yolo11m.pt) initialises the matching tensors; without it,
    `pretrained` takes ultralytics' COCO weights of the same model (`{model_size}.pt`), or random init offline.
    (Loading the detector only when needed at inference is infer.Predictor's job: inference.lazy_load_detector.)
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if weights is None and pretrained:
        weights = f"{Path(_model_yaml(model_size)).stem}.pt"
    ultralytics_offline()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(_model_yaml(model_size), nc=num_classes, verbose=False)
    # The loss reads its box/cls/dfl gains from model.args (normally set by ultralytics' trainer).
    model.args = get_cfg()
    model.names = dict(PILL_CLASS_NAMES) if num_classes == 1 else {i: str(i) for i in range(num_classes)}
    source = fetch_detector_weights(weights) if weights else None
    if source is not None:
        load_matching_weights(model, _state_dict_from_file(source), str(source))
        mark_weights(model, f"file {source}")
    else:
        mark_weights(model, f"{RANDOM_UNWANTED}{weights} could not be fetched" if weights
                     else "random (model.pretrained=false)")
    LOGGER.debug("built %s (nc=%d)", model_size, num_classes)
    return model


def raw_detector_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw head output [B, 4+nc, A] (xywh in input pixels, class scores) of an eval-mode DetectionModel."""
    out = model(images)
    return out[0] if isinstance(out, (list, tuple)) else out


def postprocess_detections(
    raw: torch.Tensor | np.ndarray | tuple,
    conf_threshold: float,
    iou_threshold: float,
    max_det: int = NMS_MAX_DET,
) -> list[torch.Tensor]:
    """NMS over raw [B, 4+nc, A] output (torch or numpy): per image an [N, 6] float tensor (x1,y1,x2,y2,conf,cls)."""
    ultralytics_offline()
    from ultralytics.utils.nms import non_max_suppression

    if isinstance(raw, (list, tuple)):  # an eval-mode DetectionModel returns (decoded, per-level features)
        raw = raw[0]
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw)
    if raw.ndim != 3:
        raise ValueError(f"raw detector output must be [B, 4+nc, anchors], got shape {tuple(raw.shape)}")
    out = non_max_suppression(raw.float(), conf_thres=conf_threshold, iou_thres=iou_threshold, max_det=max_det)
    return [det[:, :6].cpu() for det in out]


def detector_settings(config_snapshot: dict[str, Any]) -> tuple[str, int]:
    """(model yaml name, input size) recorded in a checkpoint's config snapshot."""
    model_cfg = config_snapshot.get("model", {}) if config_snapshot else {}
    return str(model_cfg.get("detector", "yolo11m")), int(model_cfg.get("det_image_size", 640))


def load_detector_for_inference(ckpt_path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(detector in eval mode on `device`, config_snapshot) from a detection checkpoint (the validated weights)."""
    from pillsnap.utils import load_ckpt
    from pillsnap.utils.io import select_inference_state

    ckpt = load_ckpt(ckpt_path)
    snapshot = ckpt.get("config_snapshot") or {}
    model_size, _ = detector_settings(snapshot)
    model = build_yolo_model(model_size, num_classes=1)
    model.load_state_dict(select_inference_state(ckpt))
    return model.to(device).eval(), snapshot
