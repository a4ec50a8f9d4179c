"""Evaluation: metrics (arrays in, dict out), Go/No-Go gates and the advisor, report artefacts.

Names resolve lazily: detection metrics and plotting pull in heavier libraries than most callers need.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "evaluate_classification_metrics": "pillsnap.eval.metrics",
    "topk_accuracy": "pillsnap.eval.metrics",
    "evaluate_detection_metrics": "pillsnap.eval.detection_metrics",
    "simple_stage_evaluation": "pillsnap.eval.gates",
    "evaluate_and_recommend": "pillsnap.eval.gates",
    "plot_confusion_matrix": "pillsnap.eval.reports",
    "plot_roc_pr_curves": "pillsnap.eval.reports",
    "plot_detection_results": "pillsnap.eval.reports",
    "dump_metrics_json": "pillsnap.eval.reports",
    "final_test_evaluation": "pillsnap.eval.final",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
