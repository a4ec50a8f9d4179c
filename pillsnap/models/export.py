"""Detector export to ONNX, and an onnxruntime detector with the torch detector's call shape.

The ONNX model returns the same raw head output as the torch one; both go through the one NMS,
pillsnap.models.detector.postprocess_detections, so torch and ONNX figures are comparable.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(__name__)
ONNX_INPUT, ONNX_OUTPUT = "images", "output0"


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
