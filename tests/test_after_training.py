"""The work after training under restarts: a run resumed with nothing left to train (a torchrun restart after a
step of that work failed, or a rerun) ends as its training did and does the steps left, each once, whether its
training completed or stopped early."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from fakes import fake_build_loaders, loaders_with_detection, make_cfg

import pillsnap.eval.stage_eval
import pillsnap.train
from pillsnap.engine.run import run_training
from pillsnap.eval.after_training import AFTER_TRAINING_FILE, AfterTrainingRecord, mark_done
from pillsnap.eval.stage_eval import evaluation_path, finished_line
from pillsnap.train import EXIT_AFTER_TRAINING, finish_command, only, train
from pillsnap.utils import save_json

RUNS = {
    "completed": ("train.epochs=2",),
    # no epoch after the first can improve by 1000: stopped at epoch 2 of 4
    "early_stopped": ("train.epochs=4", "train.early_stopping.patience=1", "train.early_stopping.min_delta=1000"),
}


class Steps:
    """Stand-ins for the calibration and the stage evaluation that record their calls and, like the real ones,
    mark themselves done; `fail` makes the calibration raise (a photo, a device) before it is done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.fail = False
        monkeypatch.setattr(pillsnap.train, "calibrate", self.calibrate)
        monkeypatch.setattr(pillsnap.eval.stage_eval, "evaluate_stage", self.evaluate_stage)
        real_reports = pillsnap.train.write_reports
        monkeypatch.setattr(pillsnap.train, "write_reports",
                            lambda trainer: (self.calls.append("reports"), real_reports(trainer))[1])

    def calibrate(self, trainer, build_loaders):
        self.calls.append("calibration")
        if self.fail:
            raise OSError("val photo 12.png: truncated")
        mark_done(trainer.exp_dir, "calibration")

    def evaluate_stage(self, cfg, exp_dir, choice, assume_yes, build_loaders=None):
        self.calls.append("stage_evaluation")
        report = {"stage": 1, "status": "GO", "recommendation": "proceed", "action": "train stage 2"}
        save_json(evaluation_path(exp_dir, 1), report)
        mark_done(exp_dir, "stage_evaluation")
        return report


def read_bytes(exp: Path) -> dict[str, tuple[bytes, int]]:
    """The training's record and weights, with their times: a run that trains nothing leaves them as they were."""
    return {name: ((exp / name).read_bytes(), (exp / name).stat().st_mtime_ns) for name in
            ("reports/metrics.json", "checkpoints/classification_last.pt", "checkpoints/classification_best.pt")}


@pytest.mark.parametrize("status", sorted(RUNS))
def test_a_restart_after_a_failed_step_does_the_steps_left_and_a_second_one_nothing(tmp_path, monkeypatch, caplog,
                                                                                   status):
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)
    overrides = (*RUNS[status], "train.stage_evaluation=true")
    steps.fail = True
    # the report plots still come; the stage evaluation, measured through the calibrated answers, waits for it
    assert train(make_cfg(exp, *overrides), fake_build_loaders) == EXIT_AFTER_TRAINING
    assert steps.calls == ["calibration", "reports"]
    assert "truncated" in caplog.text and "the work after it failed in: calibration" in caplog.text
    assert "stage_evaluation waited for the calibration" in caplog.text
    assert f"finish it with: pillsnap calibrate --exp {exp} && pillsnap evaluate --exp {exp} --stage 1 (or " in \
        caplog.text
    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == status
    assert AfterTrainingRecord.of(exp).done == ["reports"]
    e = str(exp)
    assert finish_command(exp, 1) == f"pillsnap calibrate --exp {e} && pillsnap evaluate --exp {e} --stage 1"
    trained = read_bytes(exp)

    # the restart: nothing trained, the training's record kept byte for byte, the steps left done once
    steps.fail, steps.calls = False, []
    assert train(make_cfg(exp, *overrides, "train.resume=last"), fake_build_loaders) == 0
    assert steps.calls == ["calibration", "stage_evaluation"]
    assert read_bytes(exp) == trained
    assert "work after this training already done: reports (" in caplog.text
    assert AfterTrainingRecord.of(exp).done == ["calibration", "reports", "stage_evaluation"]
    assert finish_command(exp, 1) == ""

    # a second restart (a rerun of the same command): nothing to do, nothing rewritten
    steps.calls = []
    caplog.clear()
    assert train(make_cfg(exp, *overrides, "train.resume=last"), fake_build_loaders) == 0
    assert steps.calls == [] and read_bytes(exp) == trained
    assert "nothing is left to do" in caplog.text
    # the stage's checkpoint names, linked again by each restart, leave no temporary link behind (which the next
    # start would call "left by an interrupted save")
    ckpts = exp / "checkpoints"
    assert (ckpts / "stage1_classification_best.pt").samefile(ckpts / "classification_best.pt")
    assert not list(ckpts.glob(".*.link.tmp")) and "left by an interrupted save" not in caplog.text
    # scripts/train.sh's last line: the stage decision this training's record names, though written before this run
    assert finished_line(exp, 1, since=time.time()) == (
        "training finished; stage 1 decision GO (proceed); next step: train stage 2")


def test_a_step_that_fails_costs_that_step_and_the_resume_does_it_alone(tmp_path, monkeypatch, caplog):
    """A report plot that fails (a font, a full disk) ended the run with a traceback before the calibration ran:
    the weights went to inference with no calibration (raw softmax, no sets, no unknown-pill rule by look). Now
    the other steps run, the run exits 5 naming what failed, and the resume does that step alone."""
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)

    def broken(trainer):
        steps.calls.append("reports")
        raise RuntimeError("font cache: no space left on device")

    monkeypatch.setattr(pillsnap.train, "write_reports", broken)
    overrides = ("train.epochs=1", "train.stage_evaluation=true")
    assert train(make_cfg(exp, *overrides), fake_build_loaders) == EXIT_AFTER_TRAINING
    assert steps.calls == ["calibration", "reports", "stage_evaluation"]
    assert AfterTrainingRecord.of(exp).done == ["calibration", "stage_evaluation"]
    assert "the work after it failed in: reports" in caplog.text and "no space left on device" in caplog.text
    # the report plots have no command of their own: the resume, not `pillsnap evaluate` (done already)
    assert "finish it with: the same training command with train.resume=last" in caplog.text
    assert "pillsnap evaluate" not in caplog.text
    ckpts = exp / "checkpoints"
    assert (ckpts / "stage1_classification_best.pt").samefile(ckpts / "classification_best.pt")
    stream = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text(encoding="utf-8")
              .splitlines()]
    assert [(r["step"], r["event"]) for r in stream if r["type"] == "after_training"] == [
        ("calibration", "start"), ("calibration", "done"), ("reports", "start"), ("reports", "failed"),
        ("stage_evaluation", "start"), ("stage_evaluation", "done")]
    monkeypatch.undo()
    steps = Steps(monkeypatch)
    assert train(make_cfg(exp, *overrides, "train.resume=last"), fake_build_loaders) == 0
    assert steps.calls == ["reports"] and (exp / "reports" / "confusion_matrix.png").is_file()


def test_the_stages_checkpoint_names_come_though_the_calibration_was_done_by_hand(tmp_path, monkeypatch):
    """Ctrl-C during the calibration, `pillsnap calibrate` by hand, then the resume for the report plots: the stage's
    names for its best weights (stage1_*_best.pt) were made only after a calibration in the same process."""
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)

    def interrupted(trainer, build_loaders):
        raise KeyboardInterrupt

    monkeypatch.setattr(pillsnap.train, "calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(exp, "train.epochs=1"), fake_build_loaders)
    for alias in (exp / "checkpoints").glob("stage1_*"):
        alias.unlink()  # as a run interrupted before the links were made
    mark_done(exp, "calibration")  # pillsnap calibrate, by hand
    monkeypatch.setattr(pillsnap.train, "calibrate", steps.calibrate)
    assert train(make_cfg(exp, "train.epochs=1", "train.resume=last"), fake_build_loaders) == 0
    assert steps.calls == ["reports"]
    assert (exp / "checkpoints" / "stage1_classification_best.pt").samefile(
        exp / "checkpoints" / "classification_best.pt")


def test_a_run_that_trains_on_owes_all_its_work_after_training_again(tmp_path, monkeypatch):
    """The record names the training it follows: more epochs make another training, whose steps are all owed."""
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)
    assert train(make_cfg(exp, "train.epochs=1", "train.stage_evaluation=true"), fake_build_loaders) == 0
    assert steps.calls == ["calibration", "reports", "stage_evaluation"]
    steps.calls = []
    assert train(make_cfg(exp, "train.epochs=2", "train.stage_evaluation=true", "train.resume=last"),
                 fake_build_loaders) == 0
    assert steps.calls == ["calibration", "reports", "stage_evaluation"]
    assert json.loads((exp / "reports" / AFTER_TRAINING_FILE).read_text(encoding="utf-8"))["done"] == [
        "calibration", "reports", "stage_evaluation"]


def test_a_run_killed_after_its_last_epoch_ends_on_resume_and_does_its_work_after_training(tmp_path, monkeypatch):
    """Killed between the last epoch's checkpoints and the run's end, metrics.json still says "running" (and the
    test split would never be owed): the resume ends the run, completed, keeping the training's memory figures,
    and does the work after training, though its clock passed the stage's time cap meanwhile."""
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)
    assert train(make_cfg(exp, "train.epochs=2"), fake_build_loaders) == 0
    metrics_path = exp / "reports" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["status"] = "running"
    metrics["history"][-1]["elapsed_s"] = 3700.0
    save_json(metrics_path, metrics)
    steps.calls = []
    cap = "data.progressive_validation.stage_1.time_limit_hours=1.0"
    assert train(make_cfg(exp, "train.epochs=2", cap, "train.resume=last"), fake_build_loaders) == 0
    ended = json.loads(metrics_path.read_text(encoding="utf-8"))
    assert (ended["status"], ended["epoch"], ended["history"]) == ("completed", 2, metrics["history"])
    assert ended["system"] == metrics["system"]
    assert steps.calls == ["calibration", "reports"]


def test_a_record_of_another_training_or_unreadable_counts_for_nothing(tmp_path):
    exp = tmp_path / "exp"
    (exp / "reports").mkdir(parents=True)
    assert AfterTrainingRecord.of(exp).done == []  # no metrics.json: no training to name
    mark_done(exp, "calibration")
    assert not (exp / "reports" / AFTER_TRAINING_FILE).exists()
    save_json(exp / "reports" / "metrics.json", {"epoch": 1, "status": "completed", "history": []})
    mark_done(exp, "calibration")
    assert AfterTrainingRecord.of(exp).done == ["calibration"]
    save_json(exp / "reports" / "metrics.json", {"epoch": 2, "status": "completed", "history": []})
    assert AfterTrainingRecord.of(exp).done == []
    (exp / "reports" / AFTER_TRAINING_FILE).write_text("{not json", encoding="utf-8")
    assert AfterTrainingRecord.of(exp).done == []
    with pytest.raises(ValueError, match="unknown step 'calibrate'"):
        AfterTrainingRecord.of(exp).owes("calibrate")


def test_checkpoints_resumed_into_another_folder_at_their_last_epoch_write_nothing_there(tmp_path, caplog):
    """A path resume into a new folder finds no training there to end or finish: it says so and writes nothing."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_training(make_cfg(first, "train.epochs=1"), fake_build_loaders)[0] == 0
    with caplog.at_level(logging.WARNING):
        code, trainer = run_training(make_cfg(second, "train.epochs=1", f"train.resume={first}/checkpoints/"
                                              "classification_last.pt"), fake_build_loaders)
    assert (code, trainer) == (0, None)
    assert "already trained to epoch 1" in caplog.text and "records no training to finish" in caplog.text
    assert not (second / "reports" / "metrics.json").exists()
    assert not (second / "checkpoints" / "classification_best.pt").exists()


def test_resuming_one_model_of_a_sequential_run_keeps_the_record_of_both(tmp_path, monkeypatch):
    """`--only classification` on a sequential run whose detector trained after the classifier resumes at the
    classifier's epoch: the run's metrics.json, at the detector's later epoch, stays as it was, and nothing of the
    work after training is owed again."""
    exp = tmp_path / "exp"
    steps = Steps(monkeypatch)
    sequential = ("train.strategy=sequential", "train.epochs=1", "train.detection.epochs=1",
                  "train.max_steps_per_epoch=2", "train.warmup_steps=0")
    assert train(make_cfg(exp, *sequential), loaders_with_detection) == 0
    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["epoch"] == 2 and "detection" in metrics["history"][-1]
    before = (exp / "reports" / "metrics.json").read_bytes()
    steps.calls = []
    assert train(only(make_cfg(exp, *sequential, "train.resume=last"), "classification"), loaders_with_detection) == 0
    assert (exp / "reports" / "metrics.json").read_bytes() == before
    assert steps.calls == []
