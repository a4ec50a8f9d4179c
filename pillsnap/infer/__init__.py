"""Inference: the two-stage pipeline (pipeline.py), auto-mode gating (gating.py), a pill's answer (answer.py, over
ranking.py and thresholds.py), the files fit for the classifier (artefacts.py) and `pillsnap predict` (cli.py).
Nothing here imports pillsnap.eval.

Names are re-exported lazily (PEP 562) so that `pillsnap --help` does not import torch.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "Predictor": "pillsnap.infer.pipeline",
    "get_predictor": "pillsnap.infer.pipeline",
    "predict_pipeline": "pillsnap.infer.pipeline",
    "INFERENCE_MODES": "pillsnap.infer.gating",
    "GatingDecision": "pillsnap.infer.gating",
    "decide_route": "pillsnap.infer.gating",
    "hard_case_reasons": "pillsnap.infer.gating",
    "Hints": "pillsnap.infer.matching",
    "AnswerThresholds": "pillsnap.infer.thresholds",
    "PillAnswer": "pillsnap.infer.answer",
    "decide_answer": "pillsnap.infer.answer",
    "rerank": "pillsnap.infer.ranking",
    "load_calibration": "pillsnap.infer.artefacts",
    "ImprintReader": "pillsnap.infer.imprint",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
