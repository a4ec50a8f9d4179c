"""Inference: the two-stage pipeline (pipeline.py), auto-mode gating (gating.py) and `pillsnap predict` (cli.py).

Names are re-exported lazily (PEP 562) so that `pillsnap --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "pillsnap.infer.pipeline",
    "get_predictor": "pillsnap.infer.pipeline",
    "predict_pipeline": "pillsnap.infer.pipeline",
    "GatingDecision": "pillsnap.infer.gating",
    "decide_route": "pillsnap.infer.gating",
    "hard_case_reasons": "pillsnap.infer.gating",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pillsnap.infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
