"""Final test evaluation: runs only on request (or after stage 4), reads the test split, writes the verdict."""

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pillsnap.eval.after_training import AfterTrainingRecord
from pillsnap.eval.final import final_test_evaluation
from pillsnap.train import train as main
from pillsnap.utils import load_ckpt, read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def test_final_evaluation_after_training(synth_cfg, monkeypatch):
    cfg = synth_cfg
    cfg.train.strategy = "classification"
    assert main(cfg) == 0
    exp = cfg.paths.exp_dir

    assert not (Path(exp) / "reports" / "final_test_results.json").exists()  # stage 1: the test split stays shut
    # nor does the command open it for a Stage 1 run
    from pillsnap.cli import main as cli

    assert cli(["evaluate", "--exp", str(exp), "--final"]) == 2
    # nor a config of another stage given with --cfg: the run's metrics say which stage it trained
    staged = Path(exp) / "stage4.yaml"
    staged.write_text((Path(exp) / "config.yaml").read_text(encoding="utf-8").replace(
        "current_stage: 1", "current_stage: 4"), encoding="utf-8")
    assert "current_stage: 4" in staged.read_text(encoding="utf-8")
    assert cli(["evaluate", "--exp", str(exp), "--final", "--cfg", str(staged)]) == 2
    assert not (Path(exp) / "reports" / "final_test_results.json").exists()
    result = final_test_evaluation(cfg)
    saved = read_json(Path(exp) / "reports" / "final_test_results.json")
    assert saved["recommendation"] == result["recommendation"]
    cls = result["test_results"]["classification"]
    assert cls["n"] > 0 and 0.0 <= cls["accuracy"] <= 1.0
    goal = result["business_goals"]["classification.macro_f1"]
    # the single-pill goal is measured on the single-pill test photos as inference crops them, not on every test
    # crop at its labelled box (which inference never sees, and which includes the pills of combination photos)
    single = result["test_results"]["classification_single_photos"]
    assert 0 < single["n"] < cls["n"] and goal["measured_on"].startswith("single-pill test photos")
    assert goal["target"] == 0.92 and goal["value"] == single["macro_f1"]
    assert goal["met"] == (single["macro_f1"] >= 0.92)
    assert result["ready_for_production"] == result["business_goals"]["overall_target_met"]
    assert "classification.accuracy" in result["val_minus_test"]
    # the gap is that of the tested weights, the best checkpoint's epoch, not the last epoch's figures
    metrics_path = Path(exp) / "reports" / "metrics.json"
    metrics = read_json(metrics_path)
    epoch = load_ckpt(Path(exp) / "checkpoints" / "classification_best.pt")["epoch"]
    best = next(h["classification"]["acc"] for h in metrics["history"] if h["epoch"] == epoch)
    metrics["classification"]["acc"] = 0.123  # as if a later, worse epoch had ended the run
    metrics_path.write_text(json.dumps(metrics), encoding="utf-8")
    again = final_test_evaluation(cfg)
    assert again["val_minus_test"]["classification.accuracy"] == pytest.approx(round(best - cls["accuracy"], 4))

    # A try that fails in the detector's part keeps the classifier's figures (at Stage 4, tens of minutes of passes
    # over the test split): the next try measures the detector alone, for the same training, settings and weights.
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.eval import final

    reports, ckpts = Path(exp) / "reports", Path(exp) / "checkpoints"
    (reports / "final_test_results.json").unlink()
    (ckpts / "detection_best.pt").write_bytes(b"detector weights")

    def with_detector(cfg, build_test=False):
        return build_dataloaders_twostage(cfg, build_test=build_test)._replace(det_test=["a test photo"])

    def failing(*args):
        raise OSError("detection_best.pt: truncated")

    monkeypatch.setattr(final, "_test_detection", failing)
    with pytest.raises(OSError, match="truncated"):
        final_test_evaluation(cfg, with_detector)
    assert not (reports / "final_test_results.json").exists() and (reports / final.PARTS_FILE).is_file()

    measured = {"mAP@0.5": 0.5, "mAP@0.5:0.95": 0.3, "precision": 0.6, "recall": 0.7, "num_images": 1}
    calls = []
    real_classification = final._test_classification
    monkeypatch.setattr(final, "_test_classification",
                        lambda *args: calls.append("classification") or real_classification(*args))
    monkeypatch.setattr(final, "_test_detection", lambda *args: calls.append("detection") or measured)
    os.utime(ckpts / "classification_best.pt", (0, 0))  # a copy that lost its times: the same weights
    done = final_test_evaluation(cfg, with_detector)
    assert calls == ["detection"]  # the classifier's figures kept, not measured again
    assert done["test_results"]["classification"] == again["test_results"]["classification"]
    assert done["test_results"]["detection"]["mAP_0.5"] == 0.5
    assert not (reports / final.PARTS_FILE).exists()  # the results hold them now
    # A failed try, then a retry with a smaller detector batch (after an OOM): the classifier's figures are kept;
    # other settings of the classifier's test (the single-pill crop) measure it again.
    for change, want in (("train.detection.batch_size", ["detection"]), ("inference.single_crop",
                                                                           ["classification", "detection"])):
        (reports / "final_test_results.json").unlink()
        monkeypatch.setattr(final, "_test_detection", failing)
        with pytest.raises(OSError):
            final_test_evaluation(cfg, with_detector)
        calls.clear()
        OmegaConf.update(cfg, change, float(OmegaConf.select(cfg, change)) / 2)
        monkeypatch.setattr(final, "_test_detection", lambda *args: calls.append("detection") or measured)
        final_test_evaluation(cfg, with_detector)
        assert calls == want, change
    # a parts file that is not what this version writes is measured again, not trusted
    (reports / "final_test_results.json").unlink()
    monkeypatch.setattr(final, "_test_detection", failing)
    with pytest.raises(OSError):
        final_test_evaluation(cfg, with_detector)
    kept = read_json(reports / final.PARTS_FILE)
    kept["classification"]["figures"] = {"acc": 0.9}
    (reports / final.PARTS_FILE).write_text(json.dumps(kept), encoding="utf-8")
    calls.clear()
    monkeypatch.setattr(final, "_test_detection", lambda *args: calls.append("detection") or measured)
    final_test_evaluation(cfg, with_detector)
    assert calls == ["classification", "detection"]


def test_the_final_tests_kept_figures_follow_the_data_files(tmp_path):
    """A scan that rewrites the manifest in the same folder (other test photos, another class order) makes the
    figures kept from an earlier try stale: each part's digest names the manifest's files by their SHA-256."""
    from pillsnap.config import load_config
    from pillsnap.eval.final import TestParts

    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "manifest.parquet").write_bytes(b"rows")
    (manifests / "class_map.json").write_text('{"classes": []}', encoding="utf-8")
    cfg = load_config(None, [f"paths.manifest_dir={manifests}"], dotenv_path=None)
    parts = TestParts(tmp_path, cfg)
    before = {part: parts.settings_digest(part) for part in ("classification", "detection")}
    assert before == {part: TestParts(tmp_path, cfg).settings_digest(part) for part in before}  # stable
    (manifests / "manifest.parquet").write_bytes(b"other rows")
    assert all(parts.settings_digest(part) != digest for part, digest in before.items())


def test_stage_4_run_ends_with_the_final_evaluation(synth_cfg, tmp_path, monkeypatch, capsys, caplog):
    cfg = synth_cfg
    cfg.train.strategy = "classification"
    cfg.data.progressive_validation.current_stage = 4
    cfg.train.stage_overrides.stage_4 = {}  # no max-autotune compile in a CPU test
    cfg.data.progressive_validation.stage_4.max_samples = 1000
    cfg.data.progressive_validation.stage_4.max_classes = cfg.data.progressive_validation.stage_1.max_classes
    from pillsnap.eval.final import TestParts

    digests, digest = [], TestParts.settings_digest
    monkeypatch.setattr(TestParts, "settings_digest",
                        lambda self, part: digests.append((part, digest(self, part))) or digests[-1][1])
    assert main(cfg) == 0
    monkeypatch.setattr(TestParts, "settings_digest", digest)

    results = Path(cfg.paths.exp_dir) / "reports" / "final_test_results.json"
    assert results.is_file()
    # the figures a failed try kept are the command's to take: it sees the settings training's own test saw
    from pillsnap.config.run import load_run_config
    from pillsnap.eval.final import TestParts

    command = TestParts(Path(cfg.paths.exp_dir), load_run_config(cfg.paths.exp_dir))
    assert digests and all(digest == command.settings_digest(part) for part, digest in digests)
    # interrupted or failed, it runs again on its own, from the run's saved config, from another directory
    from pillsnap.cli import main as cli

    first = read_json(results)
    results.unlink()
    # a rerun (a torchrun restart after the test failed) finds the run trained and its final test owed: it runs the
    # final test alone, not the calibration and the stage evaluation already done for this training
    caplog.clear()
    reports = Path(cfg.paths.exp_dir) / "reports"
    done_before = {name: (reports / name).stat().st_mtime_ns for name in ("calibration.json", "reliability.png")}
    cfg.train.resume = "last"  # what a torchrun restart resumes from
    assert main(cfg) == 0
    assert read_json(results)["test_results"] == first["test_results"]
    assert {name: (reports / name).stat().st_mtime_ns for name in done_before} == done_before
    assert "work after this training already done: calibration, reports (" in caplog.text
    assert "left: final_test" in caplog.text
    results.unlink()
    monkeypatch.chdir(tmp_path)
    exp = str(cfg.paths.exp_dir)
    for refused in (["--stage", "2"], ["--device", "nonsense"], ["data.progressive_validation.current_stage=1"],
                    ["--yes"]):
        caplog.clear()
        assert cli(["evaluate", "--exp", exp, "--final", *refused]) == 2, refused
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0], errors
    assert not results.exists()
    assert cli(["evaluate", "--exp", exp, "--final", "--device", "cpu"]) == 0
    again = read_json(results)
    assert again["test_results"] == first["test_results"] and again["recommendation"] == first["recommendation"]
    assert f"final test evaluation: {again['recommendation']}" in capsys.readouterr().out
    tested = results.stat().st_mtime_ns
    caplog.clear()
    assert main(cfg) == 0  # trained, and tested: nothing owed, the test split not opened again
    assert results.stat().st_mtime_ns == tested and "nothing is left to do" in caplog.text
    os.utime(results, (0, 0))  # a copy that lost the file times: the results name the metrics they followed
    assert main(cfg) == 0 and results.stat().st_mtime == 0  # not evaluated again
    # a run stopped by its time cap is not tested, by training or by the command
    metrics = Path(exp) / "reports" / "metrics.json"
    metrics.write_text(metrics.read_text(encoding="utf-8").replace('"completed"', '"time_capped"'), encoding="utf-8")
    caplog.clear()
    assert cli(["evaluate", "--exp", exp, "--final"]) == 2
    assert "status time_capped" in caplog.text


def test_a_failed_final_evaluation_costs_the_evaluation_not_the_run(tmp_path, monkeypatch, caplog):
    """A photo or a device that fails the test split after Stage 4: exit 5, the log names the command that runs it
    again; nothing is raised past the run, whose checkpoints are whole."""
    from fakes import fake_build_loaders, make_cfg

    from pillsnap import train

    def broken(cfg, build_loaders=None, device=None):
        raise OSError("test photo 1234.png: truncated")

    monkeypatch.setattr("pillsnap.eval.final.final_test_evaluation", broken)
    monkeypatch.setattr("pillsnap.eval.final.final_test_missing", lambda exp_dir, stage: True)
    exp = tmp_path / "exp"
    assert train.train(make_cfg(exp, "train.epochs=1"), fake_build_loaders) == train.EXIT_AFTER_TRAINING
    assert "the work after it failed in: final_test" in caplog.text
    assert f"pillsnap evaluate --exp {exp} --final" in caplog.text
    assert "truncated" in caplog.text  # what went wrong, with its traceback, in the run's log
    assert AfterTrainingRecord.of(exp).done == ["calibration", "reports"]


@pytest.mark.parametrize(("stage", "status", "classifier", "want"), [
    (1, "completed", True, "pillsnap calibrate --exp {e} && pillsnap evaluate --exp {e} --stage 1"),
    (4, "completed", True, "pillsnap calibrate --exp {e} && pillsnap evaluate --exp {e} --stage 4 && "
                           "pillsnap evaluate --exp {e} --final"),
    (4, "early_stopped", False, "pillsnap evaluate --exp {e} --stage 4"),  # no classifier: nothing to test
    (4, "time_capped", True, "pillsnap calibrate --exp {e} && pillsnap evaluate --exp {e} --stage 4"),
])
def test_the_work_left_after_an_interrupt_names_only_what_applies(tmp_path, stage, status, classifier, want):
    """A detector-only run has no classifier to calibrate; the test split follows a Stage 4 run that trained all it
    meant to (not one stopped by the time cap), as training itself does."""
    import json

    from pillsnap.train import finish_command

    exp = tmp_path / "my exp"
    (exp / "reports").mkdir(parents=True)
    (exp / "checkpoints").mkdir()
    (exp / "reports" / "metrics.json").write_text(json.dumps({"status": status}))
    if classifier:
        (exp / "checkpoints" / "classification_best.pt").write_bytes(b"weights")
    assert finish_command(exp, stage) == want.format(e=f"'{exp}'")


def test_final_evaluation_needs_a_trained_model(synth_cfg):
    with pytest.raises(FileNotFoundError, match="classification_best.pt"):
        final_test_evaluation(synth_cfg)


def test_the_goals_are_the_criteria_targets():
    """The final verdict is judged against eval/criteria.py's BUSINESS_GOALS, the one home of the targets."""
    from pillsnap.eval import final
    from pillsnap.eval.criteria import BUSINESS_GOALS

    assert not hasattr(final, "BUSINESS_GOALS") or final.BUSINESS_GOALS is BUSINESS_GOALS  # not a second copy
    goals = final._goals({"classification": {"macro_f1": 0.95}, "detection": {"mAP@0.5": 0.5}}, None)
    assert set(goals) - {"overall_target_met"} == set(BUSINESS_GOALS)
    assert goals["classification.macro_f1"]["met"] is True and goals["detection.mAP@0.5"]["met"] is False
    assert "labelled box" in goals["classification.macro_f1"]["measured_on"]  # no single-pill block: said so
    single = final._goals({"classification": {"macro_f1": 0.95}}, {"macro_f1": 0.90})["classification.macro_f1"]
    assert single["value"] == 0.90 and single["met"] is False
    assert goals["overall_target_met"] is False and goals["detection.mAP@0.5"]["target"] == 0.85
