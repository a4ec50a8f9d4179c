"""The end-of-stage evaluation on real run outputs: a short interleaved run on the synthetic fixture (its detector
finds nothing yet), a regression against the previous evaluation, the time-cap rule, and the user's choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES

from pillsnap.config import load_config
from pillsnap.eval.stage_eval import choose, evaluate_stage
from pillsnap.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def run_cfg(synth_root: Path, manifest_dir: Path, exp: Path, *extra: str):
    return load_config(None, overrides=[
        f"paths.data_root={synth_root}", f"paths.manifest_dir={manifest_dir}", f"paths.exp_dir={exp}",
        f"paths.cache_dir={exp.parent / 'cache'}", "model.backbone=test_efficientnet", "model.image_size=32",
        "model.detector=yolo11n", "model.det_image_size=64", "train.batch_size=4", "train.detection.batch_size=2",
        "train.epochs=1", "train.max_steps_per_epoch=2", "dataloader.num_workers=0",
        "dataloader.persistent_workers=false", "dataloader.pin_memory=false",
        "data.progressive_validation.stage_1.max_samples=1000",
        f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}", *extra], dotenv_path=None)


@pytest.fixture(scope="module")
def trained(synth_root, manifest_dir, tmp_path_factory) -> tuple:
    """One short interleaved run whose end-of-run stage evaluation ran (with --yes)."""
    exp = tmp_path_factory.mktemp("stage_run") / "exp"
    cfg = run_cfg(synth_root, manifest_dir, exp)
    assert train(cfg, assume_yes=True) == 0
    return cfg, exp


def copy_run(trained: tuple, tmp_path: Path):
    cfg, exp = trained
    dst = tmp_path / "exp"
    shutil.copytree(exp, dst)
    cfg = cfg.copy()
    cfg.paths.exp_dir = str(dst)
    return cfg, dst


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_end_of_run_evaluation_measures_decides_and_reports(trained):
    cfg, exp = trained
    report = json.loads((exp / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    results = report["results"]
    # Measured now, not read from a constant: latencies, loading, export, per-class floors.
    assert results["classification"]["inference_time_ms"] > 0 and results["detection"]["inference_time_ms"] > 0
    assert 0 < results["latency_p95_ms"] < 60_000 and results["production"]["inference_latency_ms"] > 0
    assert results["mandatory_checks"] == {"pipeline_complete": True, "detection_model_loading": True,
                                           "classification_model_loading": True, "onnx_conversion_success": True}
    assert results["n_eval_samples"] > 0 and 0 < results["class_coverage"] <= 1
    assert results["optimization"]["throughput_img_s"] > 0 and results["system"]["gpu_memory_gb"] is None  # CPU
    # The tiny detector finds nothing: the stage must not proceed, and the reasons say why.
    assert results["detection"]["mAP@0.5"] < 0.05
    assert report["status"] == "NO_GO" and report["recommendation"] != "RECOMMEND_PROCEED"
    assert any(r.startswith("TARGET_NOT_MET: detection.mAP@0.5") for r in report["reasons"])
    assert "NOT_ENOUGH_SAMPLES" in report["reasons"]  # a few dozen validation images, 2000 required
    assert report["choice"] == {"option": 1, "text": report["advisor"]["user_options"][0], "how": "--yes"}
    streamed = [r for r in read_jsonl(exp / "reports" / "metrics.jsonl") if r["type"] == "stage_evaluation"]
    assert streamed[-1]["status"] == "NO_GO" and streamed[-1]["reasons"] == report["reasons"]
    assert (exp / "checkpoints" / "stage1_classification_best.pt").samefile(
        exp / "checkpoints" / "classification_best.pt")
    assert (exp / "checkpoints" / "stage1_detection_best.pt").is_file()


def test_a_regression_against_the_previous_evaluation_is_named(trained, tmp_path):
    cfg, exp = copy_run(trained, tmp_path)
    path = exp / "reports" / "stage_1_evaluation.json"
    previous = json.loads(path.read_text(encoding="utf-8"))
    acc = previous["results"]["classification"]["acc"]
    previous["results"]["classification"]["acc"] = acc + 0.10  # the last evaluation of this stage was better
    path.write_text(json.dumps(previous), encoding="utf-8")
    report = evaluate_stage(cfg, exp, choice=2)
    assert "REGRESSION_TOO_LARGE" in report["reasons"] and report["go_no_go"]["go"] is False
    assert report["baseline"] == {"classification.acc": pytest.approx(acc + 0.10)}
    assert report["choice"]["option"] == 2 and report["choice"]["how"] == "--choice"


def test_the_evaluate_command_never_blocks_without_a_terminal(trained, tmp_path, capsys):
    from pillsnap.cli import main

    _, exp = copy_run(trained, tmp_path)
    assert main(["evaluate", "--exp", str(exp), "--stage", "1"]) == 0
    out = capsys.readouterr().out
    assert "Stage 1 evaluation: NO_GO" in out and "chosen: [1]" in out
    report = json.loads((exp / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    assert report["choice"]["how"].startswith("default (")  # pytest's stdin is no terminal (and CI sets CI)
    assert main(["evaluate", "--exp", str(tmp_path / "nothing"), "--stage", "1"]) == 2


def test_choices_asked_given_or_defaulted():
    decision = {"advisor": {"user_options": ["[1] a", "[2] b", "[3] c"]}}
    answers = iter(["x", "3"])
    assert choose(decision, ask=lambda _prompt: next(answers)) == {"option": 3, "text": "[3] c", "how": "asked"}
    assert choose(decision, ask=lambda _prompt: "")["option"] == 1  # Enter takes the first option
    assert choose(decision, choice=2)["how"] == "--choice" and choose(decision, assume_yes=True)["option"] == 1
    with pytest.raises(ValueError, match="between 1 and 3"):
        choose(decision, choice=4)


def test_a_time_capped_stage_1_that_meets_the_rule_is_go(synth_root, manifest_dir, tmp_path):
    pv = "data.progressive_validation.stage_1."
    cfg = run_cfg(synth_root, manifest_dir, tmp_path / "exp", "train.epochs=3", f"{pv}time_limit_hours=1.0e-9",
                  f"{pv}min_samples_required=4", f"{pv}min_class_coverage=1", "train.strategy=classification")
    assert train(cfg, assume_yes=True) == 0
    report = json.loads((tmp_path / "exp" / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    assert report["results"]["run_status"] == "time_capped" and report["results"]["time_cap"]["success"]
    assert report["status"] == "GO" and "time cap" in report["rule"]
    assert "ACC_BELOW_TARGET" in report["reasons"]  # the shortfalls are still on record
