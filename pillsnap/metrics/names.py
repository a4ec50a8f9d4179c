"""One spelling per metric. Inside PillSnap a metric has one key (the key of the validation dict, which is also the
key in reports/metrics.json); where the design writes the same figure under another name (a TensorBoard tag, a
field of final_test_results.json, a target in the stage criteria), this module holds the one mapping."""

from __future__ import annotations

# Our keys, per task: what validation returns and metrics.json keeps.
CLASSIFICATION_KEYS = ("acc", "macro_f1", "top5", "val_loss")
DETECTION_KEYS = ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall")

# Metric key -> TensorBoard tag under val/, where the design's tag differs from the key.
TB_VAL_TAGS = {"acc": "val/accuracy", "val_loss": "val/loss"}

# Metric key -> field name of final_test_results.json (the design's final evaluation example).
FINAL_TEST_NAMES = {"acc": "accuracy", "mAP@0.5": "mAP_0.5", "mAP@0.5:0.95": "mAP_0.5_0.95"}

def tb_val_tag(key: str) -> str:
    """The TensorBoard tag (without the task prefix) of a validation metric."""
    return TB_VAL_TAGS.get(key, f"val/{key}")


def final_test_name(key: str) -> str:
    """The final_test_results.json field of a metric."""
    return FINAL_TEST_NAMES.get(key, key)
