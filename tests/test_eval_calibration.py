"""Calibration at the end of training on the synthetic fixture, with two classes held out of the stage: the stored
temperature and threshold, the reliability diagram, the held-out report, and refusal of stale calibration."""

from __future__ import annotations

import json

import pytest
from test_stage_eval import run_cfg

from pillsnap.eval.calibration import CALIBRATION_FILE, calibrate_classifier, load_calibration
from pillsnap.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_calibration_with_held_out_classes(synth_root, manifest_dir, tmp_path):
    exp = tmp_path / "exp"
    cfg = run_cfg(synth_root, manifest_dir, exp, "train.strategy=classification", "train.epochs=2",
                  "train.max_steps_per_epoch=null", "data.progressive_validation.stage_1.max_classes=4",
                  "train.stage_evaluation=false")
    assert train(cfg) == 0  # the run ends with the calibration
    stored = json.loads((exp / "checkpoints" / CALIBRATION_FILE).read_text(encoding="utf-8"))
    report = json.loads((exp / "reports" / "calibration.json").read_text(encoding="utf-8"))
    assert 0.05 <= stored["temperature"] <= 20 and 0 <= stored["unknown_threshold"] <= 1
    assert report["nll_after"] <= report["nll_before"] + 1e-9  # fit on these very photos: never worse
    assert (exp / "reports" / "reliability.png").stat().st_size > 0
    unknown = report["unknown_eval"]
    assert unknown["held_out_classes"] == 2 and unknown["unknown"] > 0 and 0.0 <= unknown["auroc"] <= 1.0
    assert load_calibration(exp / "checkpoints", exp / "checkpoints" / "classification_best.pt") == stored

    again = calibrate_classifier(cfg, exp, keep_correct=0.0)  # 0 turns the unknown answer off
    assert again["unknown_threshold"] == 0.0 and again["unknown_eval"]["unknown_rejected"] == 0.0
    (exp / "checkpoints" / "classification_best.pt").write_bytes(b"other weights")
    assert load_calibration(exp / "checkpoints", exp / "checkpoints" / "classification_best.pt") is None
