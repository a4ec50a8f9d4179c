"""Box-format converters, one place for them all. Each takes boxes of shape [..., 4] and returns the converted
boxes: a torch tensor for a tensor, a numpy array for anything else (arrays, lists, tuples).

Formats:
  xyxy    x1, y1, x2, y2: top-left and bottom-right corners (NMS output, mAP, drawing)
  xywh    x, y, w, h: top-left corner and size (AI Hub labels, the manifest, inference results)
  cxcywh  cx, cy, w, h: centre and size (YOLO labels, raw detector head output)

Torch is never imported here (a tensor can only exist once torch is imported), so numpy-only callers such as
the YOLO export stay torch-free. Integer input comes back as float64, so halving a size never truncates.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def _torch_of(boxes: Any) -> Any:
    """The torch module when `boxes` is a tensor, else None (a tensor implies torch is already imported)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(boxes, torch.Tensor) else None


def _split(boxes: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The torch module (or None for numpy), and the four coordinate columns of `boxes` as floats."""
    torch = _torch_of(boxes)
    if torch is None:
        boxes = np.asarray(boxes)
        if not np.issubdtype(boxes.dtype, np.floating):
            boxes = boxes.astype(np.float64)  # halving integer sizes must not truncate
    elif not boxes.is_floating_point():
        boxes = boxes.double()
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(boxes.shape)}")
    return torch, boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def _stack(torch: Any, columns: tuple[Any, Any, Any, Any]) -> Any:
    return np.stack(columns, axis=-1) if torch is None else torch.stack(columns, dim=-1)


def xywh_to_xyxy(boxes: Any) -> Any:
    """Top-left corner and size (x, y, w, h) -> corners (x1, y1, x2, y2)."""
    t, x, y, w, h = _split(boxes)
    return _stack(t, (x, y, x + w, y + h))


def xyxy_to_xywh(boxes: Any) -> Any:
    """Corners (x1, y1, x2, y2) -> top-left corner and size (x, y, w, h)."""
    t, x1, y1, x2, y2 = _split(boxes)
    return _stack(t, (x1, y1, x2 - x1, y2 - y1))


def cxcywh_to_xyxy(boxes: Any) -> Any:
    """Centre and size (cx, cy, w, h) -> corners (x1, y1, x2, y2)."""
    t, cx, cy, w, h = _split(boxes)
    return _stack(t, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))


def xyxy_to_cxcywh(boxes: Any) -> Any:
    """Corners (x1, y1, x2, y2) -> centre and size (cx, cy, w, h)."""
    t, x1, y1, x2, y2 = _split(boxes)
    return _stack(t, ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
