"""Pure metrics, arrays in and dict out: classification (accuracy, macro-F1, top-k) and COCO-style detection mAP.

They sit below the training engine so that validation during training and the evaluation runs over
checkpoints (pillsnap.eval) compute the same figures from one implementation. Names resolve lazily:
the classification metrics import scikit-learn, which most callers of the detection metrics do not need.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "evaluate_classification_metrics": "pillsnap.metrics.classification",
    "topk_accuracy": "pillsnap.metrics.classification",
    "evaluate_detection_metrics": "pillsnap.metrics.detection",
    "box_iou_xyxy": "pillsnap.metrics.detection",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
