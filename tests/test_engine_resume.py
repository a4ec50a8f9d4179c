"""What a resumed, interrupted or compiled run owes its user: the lr asked for, every task restored from a given
checkpoint, a clear word when there is nothing left to train, one stage clock, and a clean stop on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from fakes import StoppingLoader, fake_build_loaders, loaders_with_detection, make_cfg
from torch import nn

from pillsnap.engine import ClassificationTask, DetectionTask
from pillsnap.engine.checkpointing import checkpoint_beside
from pillsnap.engine.run import run_training
from pillsnap.engine.trainer import EXIT_INTERRUPTED
from pillsnap.eval.after_training import mark_done
from pillsnap.train import resume_command, train
from pillsnap.utils import load_ckpt, save_json

pytestmark = pytest.mark.usefixtures("one_thread")
SPECS = [ClassificationTask.spec, DetectionTask.spec]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_an_lr_given_on_resume_is_the_one_in_force(tmp_path):
    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=2", "train.scheduler=none"), fake_build_loaders)[0] == 0
    code, trainer = run_training(make_cfg(exp, "train.epochs=3", "train.scheduler=none", "train.lr=0.002",
                                          "train.resume=last"), fake_build_loaders)
    assert code == 0 and trainer.start_epoch == 2
    history = read_json(exp / "reports" / "metrics.json")["history"]
    assert [h["classification"]["lr"] for h in history] == pytest.approx([0.01, 0.01, 0.002])
    task = trainer.tasks["classification"]
    assert task.peak_lr == pytest.approx(0.002) and task.lr == pytest.approx(0.002)
    assert load_ckpt(exp / "checkpoints" / "last.pt")["task_state"]["peak_lr"] == pytest.approx(0.002)
    assert "peak lr 2.00e-03" in (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    assert "peak lr 2.00e-03 from the config replaces the checkpoint's 1.00e-02" in \
        (exp / "logs" / "train.err").read_text(encoding="utf-8")


def test_checkpoint_beside_names_each_tasks_file_of_the_generation(tmp_path):
    d = tmp_path
    assert checkpoint_beside(d / "classification_best.pt", "detection", SPECS) == d / "detection_best.pt"
    assert checkpoint_beside(d / "best.pt", "detection", SPECS) == d / "detection_best.pt"
    assert checkpoint_beside(d / "last.pt", "classification", SPECS) == d / "classification_last.pt"
    assert checkpoint_beside(d / "stage3_detection_best.pt", "classification", SPECS) == \
        d / "stage3_classification_best.pt"
    assert checkpoint_beside(d / "mine.pt", "classification", SPECS) == d / "mine.pt"
    assert checkpoint_beside(d / "mine.pt", "detection", SPECS) is None


def test_checkpoint_path_restores_every_task_and_keeps_the_schedule(tmp_path):
    overrides = ("train.strategy=interleaved", "train.max_steps_per_epoch=2", "train.warmup_steps=0")
    first = tmp_path / "first"
    assert run_training(make_cfg(first, *overrides, "train.epochs=1"), loaders_with_detection)[0] == 0
    given = first / "checkpoints" / "best.pt"
    code, trainer = run_training(make_cfg(tmp_path / "second", *overrides, "train.epochs=2",
                                          f"train.resume={given}"), loaders_with_detection)
    assert code == 0 and trainer.start_epoch == 1
    det = load_ckpt(tmp_path / "second" / "checkpoints" / "detection_last.pt")
    # Two epochs of two steps on one schedule: the detector went on from its checkpoint, not from scratch.
    assert det["epoch"] == 2 and det["scheduler_state"]["last_epoch"] == 4
    assert det["task_state"]["optimizer_steps"] == 4 and det["global_step"] == 8


def test_a_checkpoint_path_restores_only_the_tasks_of_its_epoch(tmp_path, caplog):
    """best files of two tasks are rarely of one epoch: the given file's epoch decides, and a task whose file is of
    another epoch starts fresh (with a warning) instead of training on a schedule its weights never saw."""
    import shutil

    overrides = ("train.strategy=interleaved", "train.max_steps_per_epoch=2", "train.warmup_steps=0")
    first, gen = tmp_path / "first", tmp_path / "gen"
    gen.mkdir()
    assert run_training(make_cfg(first, *overrides, "train.epochs=1"), loaders_with_detection)[0] == 0
    shutil.copy(first / "checkpoints" / "classification_last.pt", gen / "classification_best.pt")  # epoch 1
    assert run_training(make_cfg(first, *overrides, "train.epochs=2", "train.resume=last"),
                        loaders_with_detection)[0] == 0
    shutil.copy(first / "checkpoints" / "detection_last.pt", gen / "detection_best.pt")  # epoch 2
    with caplog.at_level(logging.WARNING):
        code, trainer = run_training(make_cfg(tmp_path / "third", *overrides, "train.epochs=2",
                                              f"train.resume={gen / 'classification_best.pt'}"),
                                     loaders_with_detection)
    assert code == 0 and trainer.start_epoch == 1
    assert "is from epoch 2, not epoch 1" in caplog.text and "detection starts fresh" in caplog.text
    det = load_ckpt(tmp_path / "third" / "checkpoints" / "detection_last.pt")
    cls = load_ckpt(tmp_path / "third" / "checkpoints" / "classification_last.pt")
    assert det["task_state"]["optimizer_steps"] == 2  # one epoch from scratch, not three
    assert cls["task_state"]["optimizer_steps"] == 4  # its epoch-1 state, then epoch 2


def test_a_run_already_at_its_epochs_says_so_and_exits_0(tmp_path, caplog):
    exp = tmp_path / "exp"
    assert train(make_cfg(exp, "train.epochs=1"), fake_build_loaders) == 0
    before = read_json(exp / "reports" / "metrics.json")
    with caplog.at_level(logging.WARNING):
        assert train(make_cfg(exp, "train.epochs=1", "train.resume=last"), fake_build_loaders) == 0
    assert "already trained to epoch 1; raise --epochs" in caplog.text
    assert read_json(exp / "reports" / "metrics.json") == before  # nothing trained, nothing rewritten


def test_a_run_that_stopped_early_trains_no_more_on_resume_and_finishes_again(tmp_path, monkeypatch):
    """An early-stopped run resumed (a torchrun restart after the work after training failed, or a rerun) trains
    nothing more, its rebuilt patience spent, and runs the work after training again (the calibration here). A
    raised patience, or early stopping turned off, trains on from where it stopped."""
    import pillsnap.train

    exp = tmp_path / "exp"
    stopping = ("train.epochs=4", "train.early_stopping.patience=1", "train.early_stopping.min_delta=1000")
    assert train(make_cfg(exp, *stopping), fake_build_loaders) == 0  # no epoch after the first can improve by 1000
    before = read_json(exp / "reports" / "metrics.json")
    assert before["status"] == "early_stopped" and before["epoch"] == 2
    weights = (exp / "checkpoints" / "classification_last.pt").read_bytes()
    calibrated = []
    monkeypatch.setattr(pillsnap.train, "calibrate", lambda trainer, build: calibrated.append(trainer.start_epoch))
    # the last validation ended past the stage's time cap: the restart's start-up must not make it a time cap
    capped = {**before, "history": [*before["history"][:-1], {**before["history"][-1], "elapsed_s": 3700.0}]}
    save_json(exp / "reports" / "metrics.json", capped)
    cap = "data.progressive_validation.stage_1.time_limit_hours=1.0"
    assert train(make_cfg(exp, *stopping, cap, "train.resume=last"), fake_build_loaders) == 0
    after = read_json(exp / "reports" / "metrics.json")
    assert (after["status"], after["epoch"], after["history"]) == ("early_stopped", 2, capped["history"])
    assert after["system"] == before["system"]  # the training's memory peaks, not the restart's
    assert (exp / "checkpoints" / "classification_last.pt").read_bytes() == weights  # not trained
    assert calibrated == [2]  # the work after training ran again
    save_json(exp / "reports" / "metrics.json", before)  # the run as it stopped, its clock well inside the cap
    for more in ("train.early_stopping.patience=2", "train.early_stopping.enabled=false"):
        code, trainer = run_training(make_cfg(exp, "train.epochs=4", "train.early_stopping.min_delta=1000", more,
                                              "train.resume=last"), fake_build_loaders)
        assert code == 0 and trainer.start_epoch == 2 and read_json(exp / "reports" / "metrics.json")["epoch"] > 2
        save_json(exp / "reports" / "metrics.json", before)  # back to the stopped run for the next case
        (exp / "checkpoints" / "classification_last.pt").write_bytes(weights)
        (exp / "checkpoints" / "last.pt").unlink(missing_ok=True)


def test_an_epoch_without_the_monitored_metric_counts_against_patience_on_resume_as_it_did_live(tmp_path, caplog):
    """A validation that lacks the monitored metric is no improvement, live and when a resume replays the history:
    a run stopped that way stays stopped (it trained no further epoch), and the stop's log line says so."""
    exp = tmp_path / "exp"
    typo = ("train.epochs=3", "train.early_stopping.patience=1", "train.early_stopping.monitor=macro_f1_typo")
    with caplog.at_level(logging.INFO):
        code, trainer = run_training(make_cfg(exp, *typo), fake_build_loaders)
    assert code == 0 and trainer.stopped == {"classification"}
    assert "early stopping classification at epoch 1 (macro_f1_typo best none (never measured))" in caplog.text
    code, trainer = run_training(make_cfg(exp, *typo, "train.resume=last"), fake_build_loaders)
    assert code == 0 and trainer.stopped == {"classification"}
    assert load_ckpt(exp / "checkpoints" / "classification_last.pt")["epoch"] == 1


def test_a_path_to_a_last_file_keeps_every_task_a_best_file_only_its_epochs(tmp_path):
    from pillsnap.engine.checkpointing import same_generation

    logger = logging.getLogger("test")
    found = {"classification": (tmp_path / "classification_last.pt", {"epoch": 9}),
             "detection": (tmp_path / "detection_last.pt", {"epoch": 5})}
    assert same_generation(str(tmp_path / "classification_last.pt"), found, logger) == found
    assert same_generation(str(tmp_path / "last.pt"), found, logger) == found
    best = {"classification": (tmp_path / "classification_best.pt", {"epoch": 9}),
            "detection": (tmp_path / "detection_best.pt", {"epoch": 5})}
    assert list(same_generation(str(tmp_path / "classification_best.pt"), best, logger)) == ["classification"]
    # best.pt, the design's name, is a hard link to a task's best file: that task's epoch decides there too
    for name in ("classification_best.pt", "detection_best.pt"):
        (tmp_path / name).write_bytes(name.encode())
    os.link(tmp_path / "classification_best.pt", tmp_path / "best.pt")
    assert list(same_generation(str(tmp_path / "best.pt"), best, logger)) == ["classification"]


def test_an_early_stopped_task_of_an_interleaved_run_stays_stopped_while_the_other_trains_on(tmp_path):
    """Interleaved, the task whose patience was spent is not trained again by a resume; the other trains on."""
    exp = tmp_path / "exp"
    overrides = ("train.strategy=interleaved", "train.max_steps_per_epoch=2", "train.warmup_steps=0",
                 "train.early_stopping.patience=1")
    assert run_training(make_cfg(exp, *overrides, "train.epochs=2", "train.early_stopping.patience=100"),
                        loaders_with_detection)[0] == 0
    # the history as if the detector's mAP fell at epoch 2 (its patience of 1 spent) and the classifier improved
    metrics = read_json(exp / "reports" / "metrics.json")
    for record, (det, cls) in zip(metrics["history"], ((0.5, 0.1), (0.1, 0.5)), strict=True):
        record["detection"]["mAP@0.5"], record["classification"]["macro_f1"] = det, cls
    save_json(exp / "reports" / "metrics.json", metrics)
    code, trainer = run_training(make_cfg(exp, *overrides, "train.epochs=3", "train.resume=last"),
                                 loaders_with_detection)
    assert code == 0 and trainer.stopped >= {"detection"} and "classification" in trainer.tasks
    assert load_ckpt(exp / "checkpoints" / "detection_last.pt")["epoch"] == 2  # not trained again
    assert load_ckpt(exp / "checkpoints" / "classification_last.pt")["epoch"] == 3
    # the dashboard's stream says so: the resume's start record and each epoch record name the stopped task
    stream = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in stream if r["type"] == "start"][-1]
    assert resumed["stopped_early"] == ["detection"] and resumed["last_epochs"] == {"classification": 3,
                                                                                   "detection": 3}
    assert "detection" in [r["stopped_early"] for r in stream if r["type"] == "epoch"][-1]


def test_the_stage_clock_and_time_cap_count_the_earlier_runs(tmp_path):
    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 0
    metrics = read_json(exp / "reports" / "metrics.json")
    metrics["history"][-1]["elapsed_s"] = 1000.0  # the first run "took" 1000 s of the stage
    save_json(exp / "reports" / "metrics.json", metrics)
    cap = "data.progressive_validation.stage_1.time_limit_hours=0.25"  # 900 s: already spent before the resume
    code, trainer = run_training(make_cfg(exp, "train.epochs=3", "train.resume=last", cap), fake_build_loaders)
    metrics = read_json(exp / "reports" / "metrics.json")
    # the cap was spent before the resume: nothing more is trained (training on to the first check would add
    # samples to a verdict the earlier runs had already earned)
    assert metrics["status"] == "time_capped" and metrics["epoch"] == 1 and len(metrics["history"]) == 1
    assert trainer.tasks["classification"].samples_seen == 48 and code == 4
    assert metrics["stage"]["elapsed_s"] >= 1000.0 and metrics["history"][-1]["elapsed_s"] >= 1000.0
    # the dashboard reads the stage clock at each start from the stream: 0 for the fresh run, 1000 s at the resume
    starts = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "start"]
    assert starts[0]["elapsed_s"] < 60 and 1000.0 <= starts[-1]["elapsed_s"] < 1060


def test_an_epoch_the_time_cap_cut_short_is_finished_by_a_resume_with_a_raised_cap(tmp_path):
    """The cap ends epoch 1 after 2 of its 6 steps (checked every 2 steps). Its `last` checkpoint stays where the
    cap cut it, so that raising the cap and resuming trains the 4 steps left before epoch 2; committing the
    part-epoch as whole made that resume skip them."""
    exp = tmp_path / "exp"
    stage = "data.progressive_validation.stage_1"
    cut = [f"{stage}.time_limit_hours=1.0e-9", f"{stage}.allow_success_on_time_cap=true",
           f"{stage}.min_samples_required=8", f"{stage}.min_class_coverage=1"]
    assert run_training(make_cfg(exp, *cut), fake_build_loaders)[0] == 0
    metrics = read_json(exp / "reports" / "metrics.json")
    assert metrics["status"] == "time_capped" and metrics["epoch"] == 1  # the stage's verdict reads the cut epoch
    ckpt = exp / "checkpoints"
    last, best = load_ckpt(ckpt / "classification_last.pt"), load_ckpt(ckpt / "classification_best.pt")
    assert last["epoch"] == 0 and last["progress"]["epoch"] == 1 and last["progress"]["done"] == {"classification": 2}
    assert best["epoch"] == 1  # validated: what the work after training evaluates
    assert "time cap (1e-09 h) cut it short" in (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")

    code, trainer = run_training(make_cfg(exp, f"{stage}.time_limit_hours=1.0", "train.resume=last"),
                                 fake_build_loaders)
    assert code == 0 and trainer.status == "completed"
    assert trainer.tasks["classification"].samples_seen == 2 * 48  # two whole epochs, none of epoch 1 skipped
    stream = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text().splitlines()]
    resumed_at = max(i for i, r in enumerate(stream) if r["type"] == "start")
    steps = [(r["epoch"], r["step"]) for r in stream[resumed_at:] if r["type"] == "step"]
    assert steps[0] == (1, 4) and steps.count((1, 6)) == steps.count((2, 6)) == 1  # steps logged every 2
    assert [h["epoch"] for h in read_json(exp / "reports" / "metrics.json")["history"]] == [1, 2]


def test_a_cut_epochs_best_is_judged_again_on_resume_and_its_own_metrics_stand_for_it(tmp_path):
    """The cut epoch validated best and wrote `best`; the resumed run finishes that epoch. The history it replays
    ends before the epoch, so the cut weights' metrics (kept in their checkpoint) are judged too: a finished epoch
    no better does not replace them, and the work after training reports their metrics, not the finished epoch's
    recorded under the same number. Detection counts the cut epoch as trained only once it is finished."""
    from pillsnap.engine.checkpointing import CUT_SHORT_METRICS
    from pillsnap.eval.stage_measure import best_checkpoint_metrics
    from pillsnap.utils import save_ckpt

    exp = tmp_path / "exp"
    stage = "data.progressive_validation.stage_1"
    common = ["train.strategy=interleaved", "train.interleave_ratio=[1,1]"]
    cut = [f"{stage}.time_limit_hours=1.0e-9", f"{stage}.allow_success_on_time_cap=true",
           f"{stage}.min_samples_required=1", f"{stage}.min_class_coverage=1"]
    run_training(make_cfg(exp, *common, *cut), loaders_with_detection)
    ckpt = exp / "checkpoints"
    det_last = load_ckpt(ckpt / "detection_last.pt")
    assert det_last["epoch"] == 0 and det_last["task_state"]["epochs_trained"] == 0  # epoch 1 not yet whole
    best = load_ckpt(ckpt / "classification_best.pt")
    cut_metrics = best["task_state"][CUT_SHORT_METRICS]
    recorded = read_json(exp / "reports" / "metrics.json")["history"][-1]["classification"]
    assert best["epoch"] == 1 and cut_metrics == {k: recorded[k] for k in cut_metrics}
    # as if the cut weights had validated perfectly: no finished epoch can beat them
    best["task_state"][CUT_SHORT_METRICS] = {**cut_metrics, "acc": 1.0, "macro_f1": 1.0, "val_loss": 0.0}
    save_ckpt(ckpt / "classification_best.pt", best)

    code, trainer = run_training(make_cfg(exp, *common, f"{stage}.time_limit_hours=1.0", "train.resume=last"),
                                 loaders_with_detection)
    assert code == 0 and trainer.es_state["classification"]["best"] == 1.0
    assert load_ckpt(ckpt / "detection_last.pt")["task_state"]["epochs_trained"] == 2
    kept = load_ckpt(ckpt / "classification_best.pt")
    assert kept["epoch"] == 1 and kept["task_state"][CUT_SHORT_METRICS]["acc"] == 1.0  # not replaced
    summary = read_json(exp / "reports" / "metrics.json")
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert best_checkpoint_metrics(summary, ckpt)["classification"]["acc"] == 1.0
    # the finished epoch's record keeps the cut part's metrics: a later resume replays them too
    assert summary["history"][0]["classification"][CUT_SHORT_METRICS]["acc"] == 1.0
    code, trainer = run_training(make_cfg(exp, *common, f"{stage}.time_limit_hours=1.0", "train.epochs=3",
                                          "train.resume=last"), loaders_with_detection)
    assert code == 0 and trainer.es_state["classification"]["best"] == 1.0
    assert load_ckpt(ckpt / "classification_best.pt")["task_state"][CUT_SHORT_METRICS]["acc"] == 1.0


def interrupt(how: str):
    """Ctrl-C, or a SIGTERM sent to the run (what the kernel would run, without risking the test process)."""

    def stop(batch: int) -> None:
        if how == "sigterm":
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "SIGTERM would kill the process without a word"
            handler(signal.SIGTERM, None)
        raise KeyboardInterrupt

    return stop


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_is_marked_logged_and_resumable(tmp_path, how):
    def build(cfg):
        loaders = fake_build_loaders(cfg)
        return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, 9, interrupt(how)))  # epoch 2, batch 3

    exp = tmp_path / "exp"
    before = signal.getsignal(signal.SIGTERM)
    try:
        code, trainer = run_training(make_cfg(exp, "train.epochs=3", "train.step_log_interval=1"), build)
    except KeyboardInterrupt:  # would otherwise stop the whole pytest session
        pytest.fail("the interruption escaped run_training")
    assert code == EXIT_INTERRUPTED == 130 and trainer.status == "interrupted"
    metrics = read_json(exp / "reports" / "metrics.json")
    assert metrics["status"] == "interrupted" and metrics["epoch"] == 1 and len(metrics["history"]) == 1
    log = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert "interrupted during epoch 2; the checkpoints hold epoch 1" in log
    out = (exp / "logs" / "train.out").read_text(encoding="utf-8")
    assert "e=2/3 s=2/6" in out  # the last step line before the stop reached the file
    assert not [h for h in logging.getLogger("pillsnap").handlers if str(exp) in str(getattr(h, "baseFilename", ""))]
    assert signal.getsignal(signal.SIGTERM) is before
    assert run_training(make_cfg(exp, "train.epochs=3", "train.resume=last"), fake_build_loaders)[0] == 0


def test_the_resume_command_repeats_the_run_with_train_resume_last(monkeypatch, caplog, tmp_path):
    from omegaconf import OmegaConf

    args = argparse.Namespace(prog="pillsnap train", cfg="my cfg.yaml", only=None, check=False, choice=None,
                              yes=False, overrides=["train.epochs=5", "train.resume=/x/best.pt"])
    # from the folder the run started in: a relative --cfg read elsewhere is another file (or none)
    monkeypatch.chdir(tmp_path)
    here = f"cd {tmp_path} && "
    assert resume_command(args) == here + "pillsnap train --cfg 'my cfg.yaml' train.epochs=5 train.resume=last"
    # under torchrun: a torchrun command with as many processes (a plain command would resume on one GPU)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resume_command(args) == here + ("torchrun --nproc_per_node 4 -m pillsnap.train --cfg 'my cfg.yaml' "
                                           "train.epochs=5 train.resume=last")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_command(args).startswith(here + "torchrun --nnodes 2 --nproc_per_node 4 -m pillsnap.train ")
    # the launcher's own options, where its command line can be read: its restarts, the signals it passes on
    import pillsnap.train

    launched = tmp_path / "cmdline"
    launched.write_bytes(b"\0".join([b"/venv/bin/python", b"/venv/bin/torchrun", b"--max-restarts", b"3",
                                      b"--signals-to-handle=SIGTERM,SIGUSR1", b"--nproc_per_node", b"4", b"-m",
                                      b"pillsnap.train", b"--cfg", b"my cfg.yaml", b"train.epochs=5"]) + b"\0")
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    assert pillsnap.train._torchrun_launcher(launched) == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun", "--max-restarts", "3",
        "--signals-to-handle=SIGTERM,SIGUSR1", "--nproc_per_node", "4", "-m", "pillsnap.train"]
    launched.write_bytes(b"\0".join([b"/usr/bin/python3", b"-m", b"torch.distributed.run", b"--nproc_per_node",
                                      b"2", b"-m", b"pillsnap.train", b"--cfg", b"c.yaml"]))
    assert pillsnap.train._torchrun_launcher(launched)[1:] == [
        "/usr/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pillsnap.train"]
    launched.write_bytes(b"\0".join([b"bash", b"job.sh"]))  # not torchrun: the plain command above
    assert pillsnap.train._torchrun_launcher(launched) is None
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.delenv(name)

    import pillsnap.config

    cfg = OmegaConf.create({"paths": {"exp_dir": str(tmp_path)}, "data": {"progressive_validation": {
        "current_stage": 1}}})
    monkeypatch.setattr(pillsnap.config, "load_config", lambda *a, **k: cfg)
    monkeypatch.setattr(pillsnap.train, "train", lambda *a, **k: 130)
    assert pillsnap.train.run(args) == 130
    assert f"resume with: cd {tmp_path} && pillsnap train --cfg 'my cfg.yaml' train.epochs=5 train.resume=last" in \
        caplog.text


def test_an_interrupt_after_training_names_the_steps_left_not_a_resume(monkeypatch, caplog, tmp_path):
    """Ctrl-C during the calibration or the stage evaluation: the checkpoints are complete; the hint names the
    commands that finish the steps left (those done for this training left out), and the resume that does the same.
    Told apart from an interrupt in training by the run's own metrics.json: written by this run, with its training
    ended (training_ended)."""
    from omegaconf import OmegaConf

    import pillsnap.config
    import pillsnap.train

    exp = tmp_path / "x"
    args = argparse.Namespace(prog="pillsnap train", cfg="c.yaml", only=None, check=False, choice=None, yes=False,
                              overrides=[])
    cfg = OmegaConf.create({"paths": {"exp_dir": str(exp)}, "data": {"progressive_validation": {"current_stage": 2}}})
    monkeypatch.setattr(pillsnap.config, "load_config", lambda *a, **k: cfg)

    def interrupted_with(status):
        def run_then_interrupt(*a, **k):
            if status is not None:
                save_json(exp / "reports" / "metrics.json", {"status": status})
            raise KeyboardInterrupt

        return run_then_interrupt

    monkeypatch.setattr(pillsnap.train, "train", interrupted_with("completed"))
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "checkpoints" / "classification_best.pt").write_bytes(b"a classifier to calibrate")
    assert pillsnap.train.run(args) == 130
    resume = f"cd {os.getcwd()} && pillsnap train --cfg c.yaml train.resume=last"
    assert (f"interrupted after training; finish with: pillsnap calibrate --exp {exp} && pillsnap evaluate --exp "
            f"{exp} --stage 2 (or: {resume})") in caplog.text
    caplog.clear()
    mark_done(exp, "calibration")  # the calibration was done before the interrupt
    assert pillsnap.train.run(args) == 130
    assert f"finish with: pillsnap evaluate --exp {exp} --stage 2 (or: {resume})" in caplog.text
    mark_done(exp, "stage_evaluation")
    caplog.clear()
    assert pillsnap.train.run(args) == 130  # what is left (the report plots) has no command of its own
    assert f"interrupted after training; finish with: {resume}" in caplog.text
    for status in ("interrupted", None):  # a second Ctrl-C while saving; one while setting up (an older file)
        caplog.clear()
        monkeypatch.setattr(pillsnap.train, "train", interrupted_with(status))
        if status is None:
            os.utime(exp / "reports" / "metrics.json", (1.0, 1.0))
        assert pillsnap.train.run(args) == 130
        assert f"resume with: {resume}" in caplog.text
        assert "pillsnap calibrate" not in caplog.text


def test_grad_clip_0_turns_clipping_off_for_every_task(tmp_path):
    from test_detection_task import tiny_cfg

    cfg = make_cfg(tmp_path, "train.grad_clip=0")
    loaders = fake_build_loaders(cfg)
    assert ClassificationTask(cfg, loaders.cls_train, None, loaders.meta, "cpu").grad_clip() is None
    assert DetectionTask(tiny_cfg("train.grad_clip=0"), [], None, "cpu").grad_clip() is None
    assert DetectionTask(tiny_cfg("train.grad_clip=1.0"), [], None, "cpu").grad_clip() > 0


class FakeCompiled(nn.Module):
    """Stands in for torch.compile's module: counts training-mode calls, or fails like a broken backend."""

    def __init__(self, model: nn.Module, fail: bool) -> None:
        super().__init__()
        self.model, self.fail, self.training_calls = model, fail, 0

    def forward(self, x):
        if self.fail:
            raise RuntimeError("backend compiler failed: no C++ compiler")
        self.training_calls += int(self.model.training)
        return self.model(x)


@pytest.mark.parametrize("fail", [False, True])
def test_compile_is_announced_warmed_up_and_falls_back_to_eager(tmp_path, monkeypatch, caplog, fail):
    import pillsnap.engine.compiling as compiling

    made = []
    monkeypatch.setattr(compiling, "try_torch_compile",
                        lambda model, mode, *rest: made.append(FakeCompiled(model, fail)) or made[-1])
    cfg = make_cfg(tmp_path, "optimization.torch_compile=max-autotune", "train.ema.enabled=false")
    loaders = fake_build_loaders(cfg)
    torch.manual_seed(0)
    reference = ClassificationTask(make_cfg(tmp_path, "train.ema.enabled=false"), loaders.cls_train, None,
                                   loaders.meta, "cpu")
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        task = ClassificationTask(cfg, loaders.cls_train, None, loaders.meta, "cpu")
    assert "compiling the classification model with torch.compile(mode=max-autotune)" in caplog.text
    if fail:
        assert task.model is task.raw_model and "training eager instead" in caplog.text
    else:
        assert task.model is made[0] and made[0].training_calls == 1  # the training graph compiled up front
        assert "warm-up done" in caplog.text
    for name, tensor in reference.raw_model.state_dict().items():  # the warm-up left weights and BN stats alone
        assert torch.equal(tensor, task.raw_model.state_dict()[name]), name
    assert all(p.grad is None for p in task.raw_model.parameters())


def test_tensorboard_shows_one_run_after_a_fresh_start_and_after_a_resume(tmp_path):
    """A fresh run in a folder with a run before it hides that run's curves (its files stay); a resume hides what
    the resumed run redoes. Read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    overrides = ("train.max_steps_per_epoch=3", "train.step_log_interval=1", "train.warmup_steps=0")

    def curve(tag: str) -> list[int]:
        events = EventAccumulator(str(exp / "tb"))
        events.Reload()
        return [e.step for e in events.Scalars(tag)]

    assert run_training(make_cfg(exp, *overrides, "train.epochs=2"), fake_build_loaders)[0] == 0
    first = curve("train/loss")
    assert first == sorted(first) and len(first) == 6
    assert run_training(make_cfg(exp, *overrides, "train.epochs=1"), fake_build_loaders)[0] == 0  # fresh again
    assert curve("train/loss") == first[:3]  # this run's 3 steps only, not drawn over the first run's 6
    assert len(list((exp / "tb").glob("events.out.tfevents.*"))) >= 2  # the first run's file is kept
    assert run_training(make_cfg(exp, *overrides, "train.epochs=2", "train.resume=last"),
                        fake_build_loaders)[0] == 0
    assert curve("train/loss") == first  # resumed after epoch 1: epoch 2 once


def test_where_the_starting_weights_came_from_is_recorded_and_a_resume_keeps_its_checkpoints(tmp_path):
    """Offline with nothing cached, a pretrained backbone starts from random weights with one warning among many
    log lines; metrics.json says so per task (system.init_weights), and the stage's advice names it first. A
    resume's weights are its checkpoint's, so it keeps their origin, not its own start-up's."""
    from pillsnap.utils import save_ckpt

    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 0  # the suite is offline
    origin = read_json(exp / "reports" / "metrics.json")["system"]["init_weights"]["classification"]
    assert origin.startswith("random: pretrained test_efficientnet weights could not be fetched")
    last = exp / "checkpoints" / "classification_last.pt"
    assert load_ckpt(last)["task_state"]["weights_origin"] == origin
    ckpt = load_ckpt(last)
    ckpt["task_state"]["weights_origin"] = "pretrained test_efficientnet (timm)"  # as if it had started online
    save_ckpt(last, ckpt)
    assert run_training(make_cfg(exp, "train.epochs=2", "train.resume=last"), fake_build_loaders)[0] == 0
    assert read_json(exp / "reports" / "metrics.json")["system"]["init_weights"] == {
        "classification": "pretrained test_efficientnet (timm)"}
    fresh = tmp_path / "fresh"
    assert run_training(make_cfg(fresh, "train.epochs=1", "model.pretrained=false"), fake_build_loaders)[0] == 0
    assert read_json(fresh / "reports" / "metrics.json")["system"]["init_weights"] == {
        "classification": "random (model.pretrained=false)"}


def test_training_compiles_without_cuda_graphs(monkeypatch, caplog, tmp_path):
    """A CUDA graph's outputs are overwritten by its next replay, and an optimizer step's first gradient is one of
    them: with gradients accumulated over chunks (grad_accum_steps, an OOM recovery) torch stopped the run. Both
    configured modes compile for training without CUDA graphs; max-autotune keeps its kernel tuning."""
    from pillsnap.utils import torch_utils

    asked = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: asked.append(kwargs) or model)
    for mode in ("max-autotune", "reduce-overhead"):
        torch_utils.try_torch_compile(nn.Linear(2, 2), mode)
    assert [kwargs["mode"] for kwargs in asked] == ["max-autotune-no-cudagraphs", "default"]
    from torch._inductor import list_mode_options

    assert all(not list_mode_options(kwargs["mode"]).get("triton.cudagraphs") for kwargs in asked)
    assert list_mode_options(asked[0]["mode"])["max_autotune"]
    with caplog.at_level(logging.INFO):
        ClassificationTask(make_cfg(tmp_path, "optimization.torch_compile=max-autotune"),
                           *fake_build_loaders(make_cfg(tmp_path))[:2], fake_build_loaders(make_cfg(tmp_path)).meta,
                           "cpu")
    assert "training compiles as mode=max-autotune-no-cudagraphs" in caplog.text


def test_a_mistyped_compile_mode_is_one_line_and_exit_2(tmp_path, caplog):
    from pillsnap.engine.run import run_training

    code, _ = run_training(make_cfg(tmp_path, "optimization.torch_compile=max_autotune"), fake_build_loaders)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and any("optimization.torch_compile must be one of" in e and "max_autotune" in e for e in errors)


def test_a_resume_whose_epochs_have_fewer_steps_goes_on_from_the_same_share_of_the_schedule(tmp_path, caplog):
    """The stage's data resampled, or train.max_steps_per_epoch changed, between the run and its resume: the
    schedule's step count is in the old epochs' steps. Taken as it was, half as many steps an epoch put the resumed
    run at the schedule's end, every remaining step at a learning rate of 0."""
    exp = tmp_path / "exp"
    base = ("train.warmup_steps=0", "train.epochs=2")
    assert run_training(make_cfg(exp, *base, "train.max_steps_per_epoch=4"), fake_build_loaders)[0] == 0
    assert load_ckpt(exp / "checkpoints" / "last.pt")["task_state"]["steps_per_epoch"] == 4
    with caplog.at_level(logging.WARNING):
        code, _ = run_training(make_cfg(exp, "train.warmup_steps=0", "train.epochs=4", "train.max_steps_per_epoch=2",
                                        "train.resume=last"), fake_build_loaders)
    assert code == 0 and "an epoch is now 2 steps, 4 when checkpointed: the schedule goes on from step 4" in caplog.text
    steps = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["lr"] for r in steps if r.get("type") == "step" and r.get("epoch") == 3]
    assert resumed and min(resumed) > 1e-3  # halfway through a cosine from 0.01, not at its end
    assert load_ckpt(exp / "checkpoints" / "last.pt")["scheduler_state"]["last_epoch"] == 8


def test_a_fresh_run_in_a_folder_holding_another_run_says_what_it_replaces(tmp_path, caplog):
    """Stage 2 trained with the documented command landed in stage 1's folder and replaced its best.pt,
    calibration and reports without a word; a fresh run now names what it finds there, once, before it starts."""
    exp = tmp_path / "exp"
    with caplog.at_level(logging.WARNING):
        assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 0
    assert "this fresh run replaces" not in caplog.text  # an empty folder: nothing to say
    with caplog.at_level(logging.WARNING):
        assert run_training(make_cfg(exp, "train.epochs=1", "data.progressive_validation.current_stage=2"),
                            fake_build_loaders)[0] == 0
    assert f"{exp} holds stage 1's run, trained to epoch 1: this fresh run replaces" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_training(make_cfg(exp, "train.epochs=2", "train.resume=last",
                                     "data.progressive_validation.current_stage=2"), fake_build_loaders)[0] == 0
    assert "this fresh run replaces" not in caplog.text  # a resume goes on with it
