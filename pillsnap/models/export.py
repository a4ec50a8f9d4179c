"""Detector export to ONNX and the ONE NMS postprocess shared by torch and ONNX outputs (seed D-6).

Validation mAP, inference and the ONNX check all go through `postprocess_detections`, so torch and ONNX
figures come from the same NMS.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pillsnap.models.detector import ultralytics_offline

LOGGER = logging.getLogger(__name__)
ONNX_INPUT, ONNX_OUTPUT = "images", "output0"


def raw_detector_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw head output [B, 4+nc, A] (xywh in input pixels, class scores) of an eval-mode DetectionModel."""
    out = model(images)
    return out[0] if isinstance(out, (list, tuple)) else out


def postprocess_detections(
    raw: torch.Tensor | np.ndarray | tuple,
    conf_threshold: float,
    iou_threshold: float,
    max_det: int = 300,
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


def export_detector_onnx(model: nn.Module, out_path: str | Path, image_size: int, opset: int = 17) -> Path:
    """Export an eval-mode detector to ONNX (dynamic batch) with torch.onnx; returns the written path."""
    from pillsnap.utils import atomic_path

    model = model.eval()
    dummy = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript; it still works.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, dummy, str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], opset_version=opset,
            dynamo=False, dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        )
    LOGGER.info("exported detector to %s", out_path)
    return out_path


class OnnxDetector:
    """onnxruntime session with the same call shape as the torch detector: images in, raw output out."""

    def __init__(self, onnx_path: str | Path) -> None:
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"ONNX detector not found: {onnx_path}")
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        array: Any = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(array, dtype=np.float32)})[0]
