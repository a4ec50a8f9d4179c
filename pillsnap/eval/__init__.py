"""Evaluation: the final test-split run over checkpoints, Go/No-Go gates and the advisor, report artefacts, the
calibration fit, and the end-to-end pipeline figures (pipeline_eval.py, pipeline_report.py). It runs pillsnap.infer;
nothing in infer imports it.

The metrics themselves (arrays in, dict out) live in pillsnap.metrics, below the training engine.
Names resolve lazily: plotting and the test run pull in heavier libraries than most callers need.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "simple_stage_evaluation": "pillsnap.eval.gates",
    "evaluate_and_recommend": "pillsnap.eval.gates",
    "stage_decision": "pillsnap.eval.gates",
    "evaluate_stage": "pillsnap.eval.stage_eval",
    "plot_confusion_matrix": "pillsnap.eval.reports",
    "plot_roc_pr_curves": "pillsnap.eval.reports",
    "plot_detection_results": "pillsnap.eval.reports",
    "dump_metrics_json": "pillsnap.eval.reports",
    "final_test_evaluation": "pillsnap.eval.final",
    "evaluate_pipeline": "pillsnap.eval.pipeline_eval",
    "calibrate_classifier": "pillsnap.eval.calibration",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
