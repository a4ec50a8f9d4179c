"""Final test evaluation: runs only on request (or after stage 4), reads the test split, writes the verdict."""

from pathlib import Path

import pytest

from pillsnap.eval.final import final_test_evaluation
from pillsnap.train import train as main
from pillsnap.utils import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def test_final_evaluation_after_training(synth_cfg):
    cfg = synth_cfg
    cfg.train.strategy = "classification"
    assert main(cfg) == 0
    exp = cfg.paths.exp_dir

    assert not (Path(exp) / "reports" / "final_test_results.json").exists()  # stage 1: the test split stays shut
    result = final_test_evaluation(cfg)
    saved = read_json(Path(exp) / "reports" / "final_test_results.json")
    assert saved["recommendation"] == result["recommendation"]
    cls = result["test_results"]["classification"]
    assert cls["n"] > 0 and 0.0 <= cls["accuracy"] <= 1.0
    goal = result["business_goals"]["classification.macro_f1"]
    assert goal["target"] == 0.92 and goal["met"] == (cls["macro_f1"] >= 0.92)
    assert result["ready_for_production"] == result["business_goals"]["overall_target_met"]
    assert "classification.accuracy" in result["val_minus_test"]


def test_stage_4_run_ends_with_the_final_evaluation(synth_cfg):
    cfg = synth_cfg
    cfg.train.strategy = "classification"
    cfg.data.progressive_validation.current_stage = 4
    cfg.train.stage_overrides.stage_4 = {}  # no max-autotune compile in a CPU test
    cfg.data.progressive_validation.stage_4.max_samples = 1000
    cfg.data.progressive_validation.stage_4.max_classes = cfg.data.progressive_validation.stage_1.max_classes
    assert main(cfg) == 0

    assert (Path(cfg.paths.exp_dir) / "reports" / "final_test_results.json").is_file()


def test_final_evaluation_needs_a_trained_model(synth_cfg):
    with pytest.raises(FileNotFoundError, match="classification_best.pt"):
        final_test_evaluation(synth_cfg)


def test_the_goals_are_the_criteria_targets():
    """The final verdict is judged against eval/criteria.py's BUSINESS_GOALS, the one home of the targets."""
    from pillsnap.eval import final
    from pillsnap.eval.criteria import BUSINESS_GOALS

    assert not hasattr(final, "BUSINESS_GOALS") or final.BUSINESS_GOALS is BUSINESS_GOALS  # not a second copy
    goals = final._goals({"classification": {"macro_f1": 0.95}, "detection": {"mAP@0.5": 0.5}})
    assert set(goals) - {"overall_target_met"} == set(BUSINESS_GOALS)
    assert goals["classification.macro_f1"]["met"] is True and goals["detection.mAP@0.5"]["met"] is False
    assert goals["overall_target_met"] is False and goals["detection.mAP@0.5"]["target"] == 0.85
