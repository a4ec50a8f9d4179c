"""Evaluation: metrics (arrays in, dict out), gates, reports."""

from __future__ import annotations

from typing import Any

from pillsnap.eval.metrics import evaluate_classification_metrics, topk_accuracy

__all__ = ["evaluate_classification_metrics", "evaluate_detection_metrics", "topk_accuracy"]


def __getattr__(name: str) -> Any:
    # detection_metrics pulls in heavier code and is owned by another module: import it on first use only.
    if name == "evaluate_detection_metrics":
        from pillsnap.eval.detection_metrics import evaluate_detection_metrics

        return evaluate_detection_metrics
    raise AttributeError(f"module 'pillsnap.eval' has no attribute {name!r}")
