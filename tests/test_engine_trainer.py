"""trainer.main end to end on CPU with fake loaders: run files, checkpoint schema, log line, TB tags, resume, OOM."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from fakes import NUM_CLASSES, StoppingLoader, fake_build_loaders, make_cfg

from pillsnap.engine.precision import Precision
from pillsnap.engine.run import main, run_training
from pillsnap.engine.trainer import EXIT_CONFIG, EXIT_OOM, EXIT_TIME_CAP
from pillsnap.train import train
from pillsnap.utils import CKPT_REQUIRED_KEYS, load_ckpt

LINE = re.compile(r"\[train\] e=\d+/\d+ s=\d+/\d+ loss=-?\d+\.\d{4} lr=\d\.\d{2}e[+-]\d{2} data=\d+\.\d{3}s "
                  r"comp=\d+\.\d{3}s thr=\d+\.\d/s cuda=\d+MB$")
TB_TAGS = {"train/loss", "train/lr", "perf/data_time", "perf/compute_time", "perf/throughput", "perf/cuda_mem",
           "val/loss", "val/accuracy", "val/macro_f1", "val/top5"}


pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tb_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in tb_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_run_writes_checkpoints_logs_metrics_and_tb(tmp_path, monkeypatch):
    import os

    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (saved.append(str(f)), real_save(obj, f, *a, **k)))
    exp = tmp_path / "exp"
    assert train(make_cfg(exp), fake_build_loaders) == 0
    assert len(saved) == 2  # one serialization per epoch for the one task: aliases are links, not copies
    ckpts = exp / "checkpoints"
    for name in ("last.pt", "best.pt", "classification_last.pt", "classification_best.pt", "classes.json"):
        assert (ckpts / name).is_file(), name
    assert os.path.samefile(ckpts / "last.pt", ckpts / "classification_last.pt")
    assert os.path.samefile(ckpts / "best.pt", ckpts / "classification_best.pt")
    best_epoch = load_ckpt(ckpts / "best.pt")["epoch"]
    assert os.path.samefile(ckpts / "best.pt", ckpts / "last.pt") == (best_epoch == 2)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        ["best.pt", "last.pt", "classification_best.pt", "classification_last.pt", "classes.json",
         "stage1_classification_best.pt", "calibration.json",
         json.loads((ckpts / "calibration.json").read_text(encoding="utf-8"))["features_file"]])
    ckpt = load_ckpt(ckpts / "last.pt")
    assert set(ckpt) == {*CKPT_REQUIRED_KEYS, "ema_state", "global_step", "schema_version", "oom_state", "task_state"}
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 12
    assert ckpt["config_snapshot"]["model"]["num_classes"] == NUM_CLASSES
    classes = json.loads((ckpts / "classes.json").read_text(encoding="utf-8"))
    assert classes["class_names"] == [f"K-{i:06d}" for i in range(NUM_CLASSES)]
    assert classes["class_map"]["K-000002"]["index"] == 2

    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["epoch"] == 2 and metrics["status"] == "completed" and len(metrics["history"]) == 2
    assert set(metrics["classification"]) == {"acc", "macro_f1", "top5", "val_loss"}
    stream = read_jsonl(exp / "reports" / "metrics.jsonl")
    assert {r["type"] for r in stream} == {"start", "step", "val", "epoch", "end", "after_training"}
    # the work after training, told to the dashboard step by step (this run evaluates no stage)
    assert [(r["step"], r["event"]) for r in stream if r["type"] == "after_training"] == [
        ("calibration", "start"), ("calibration", "done"), ("reports", "start"), ("reports", "done")]
    assert all(r["time"] > 1.7e9 for r in stream) and stream[0]["type"] == "start" and stream[0]["stage"] == 1
    assert sum(r["type"] == "step" for r in stream) == 6  # every 2nd of 6 steps, two epochs

    lines = [ln for ln in (exp / "logs" / "train.out").read_text(encoding="utf-8").splitlines() if "[train]" in ln]
    assert len(lines) == 6 and all(LINE.search(ln) for ln in lines)
    assert (exp / "logs" / "train.err").is_file()
    assert tb_tags(exp / "tb") >= TB_TAGS
    for plot in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png"):  # from the validated weights
        assert (exp / "reports" / plot).stat().st_size > 0, plot


def test_classifier_learns_the_fake_data(tmp_path):
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.epochs=4", "train.ema.enabled=false"), fake_build_loaders) == 0
    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["classification"]["acc"] >= 0.75  # chance is 0.25


class Killed(Exception):
    """Stands in for a process killed mid-epoch."""


def kill(batch: int) -> None:
    raise Killed(f"killed at batch {batch}")


def killing_build(kill_at: int):
    def build(cfg):
        loaders = fake_build_loaders(cfg)
        return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, kill_at, kill))

    return build


def test_resume_after_a_kill_mid_epoch_gives_the_uninterrupted_weights(tmp_path):
    args = ("train.epochs=3", "train.deterministic=true", "train.ema.validate=both", "train.grad_accum_steps=2")
    assert main(make_cfg(tmp_path / "straight", *args), fake_build_loaders) == 0
    with pytest.raises(Killed):
        main(make_cfg(tmp_path / "killed", *args), killing_build(kill_at=9))  # epoch 2, batch 3 of 6
    assert load_ckpt(tmp_path / "killed" / "checkpoints" / "last.pt")["epoch"] == 1
    assert main(make_cfg(tmp_path / "killed", *args, "train.resume=last"), fake_build_loaders) == 0

    straight = load_ckpt(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_ckpt(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 3 and resumed["global_step"] == straight["global_step"]
    for key in ("model_state", "ema_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert straight["scheduler_state"]["last_epoch"] == resumed["scheduler_state"]["last_epoch"]
    history = json.loads((tmp_path / "killed" / "reports" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and "raw_acc" in history[-1]["classification"]


@pytest.mark.parametrize(("override", "named"), [("model.backbone=test_resnet", "'test_resnet'"),
                                                 ("model.num_classes=9", "9 classes")])
def test_resume_with_another_model_stops_with_a_friendly_error(tmp_path, caplog, override, named):
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.epochs=1"), fake_build_loaders) == 0
    assert main(make_cfg(exp, "train.epochs=2", "train.resume=last", override), fake_build_loaders) == EXIT_CONFIG
    err = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert "Cannot resume" in err and "'test_efficientnet' and 4 classes" in err and named in err
    assert main(make_cfg(exp, "train.resume=" + str(tmp_path / "nope.pt")), fake_build_loaders) == EXIT_CONFIG


def test_resume_on_other_drugs_of_the_same_count_stops_with_a_friendly_error(tmp_path):
    """A rescan or another split seed can give a stage as many classes, but other drugs or another order: resuming
    would teach each output row another drug's name, and the run's classes.json would no longer be its best.pt's."""
    import fakes

    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.epochs=1"), fake_build_loaders) == 0
    assert load_ckpt(exp / "checkpoints" / "last.pt")["task_state"]["class_names_sha256"]

    def swapped(cfg):
        loaders = fake_build_loaders(cfg)
        names = list(reversed(loaders.meta["class_names"]))
        return loaders._replace(meta={**fakes.fake_meta(), "class_names": names})

    assert main(make_cfg(exp, "train.epochs=2", "train.resume=last"), swapped) == EXIT_CONFIG
    err = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert "Cannot resume" in err and "not this run's 4 drugs in the same order" in err
    assert load_ckpt(exp / "checkpoints" / "last.pt")["epoch"] == 1  # nothing trained on, nothing overwritten
    classes = json.loads((exp / "checkpoints" / "classes.json").read_text(encoding="utf-8"))["class_names"]
    assert classes == fakes.fake_meta()["class_names"]
    assert main(make_cfg(exp, "train.epochs=2", "train.resume=last"), fake_build_loaders) == 0


def test_injected_oom_is_recovered_and_the_run_finishes(tmp_path, monkeypatch):
    # OOM #1 -> S1 fp16 autocast; #2 -> S2 bs 4 x2; #3 -> S2 bs 2 x4; #4 -> S3 bs 1 x4 (max_grad_accum=4), lr halved.
    # The task trains in fp32 on a CPU that may autocast (train.cpu_amp), so that S1 has memory to save.
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_STEPS", "1,2,3,4")
    exp = tmp_path / "exp"
    fp32 = ("train.cpu_amp=true", "train.classification.amp=false")
    # 64 px: at batch 1 the 32 px net would reach a 1x1 BatchNorm, which cannot train on one value.
    cfg = make_cfg(exp, "train.oom.max_retries=5", "train.oom.max_grad_accum=4", "train.scheduler=none",
                   "model.image_size=64", *fp32)
    assert main(cfg, fake_build_loaders) == 0
    ooms = [r for r in read_jsonl(exp / "reports" / "metrics.jsonl") if r["type"] == "oom"]
    applied = [(r["state"]["batch_size"], r["state"]["grad_accum"]) for r in ooms if r["action"] == "applied"]
    assert applied == [(8, 1), (4, 2), (2, 4), (1, 4)]
    assert [r["action"] for r in ooms if r["action"] != "applied"] == ["amp_fp16", "microbatching", "microbatching",
                                                                       "global_batch_change"]
    history = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert len(history) == 2 and history[-1]["classification"]["lr"] == pytest.approx(0.005)
    assert "oom/retries" in tb_tags(exp / "tb")
    assert "OOM Recovery S3" in (exp / "logs" / "train.err").read_text(encoding="utf-8")

    # Resuming keeps what recovery chose instead of walking into the same OOMs again.
    monkeypatch.delenv("PILLSNAP_FAKE_OOM_STEPS")
    resumed = make_cfg(exp, "train.oom.max_retries=5", "train.oom.max_grad_accum=4", "train.scheduler=none",
                       "model.image_size=64", "train.epochs=3", "train.resume=last", *fp32)
    code, trainer = run_training(resumed, fake_build_loaders)
    assert code == 0
    state = trainer.tasks["classification"].oom_state()
    assert (state["batch_size"], state["grad_accum"], state["did_amp_escalate"]) == (1, 4, True)
    assert trainer.tasks["classification"].precision == Precision(True, torch.float16)
    assert trainer.tasks["classification"].sched_mode == "by_samples"


def test_oom_beyond_max_retries_writes_an_emergency_checkpoint_and_exits(tmp_path, monkeypatch):
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_STEPS", "0,1")
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.oom.max_retries=1"), fake_build_loaders) == EXIT_OOM
    assert load_ckpt(exp / "checkpoints" / "classification_emergency.pt")["epoch"] == 0
    assert json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))["status"] == "oom_emergency_exit"


@pytest.mark.parametrize(("allow", "code"), [("true", 0), ("false", EXIT_TIME_CAP)])
def test_stage_time_cap_stops_and_applies_the_success_rule(tmp_path, allow, code):
    exp = tmp_path / "exp"
    pv = "data.progressive_validation.stage_1."
    cfg = make_cfg(exp, "train.epochs=5", f"{pv}time_limit_hours=1.0e-9", f"{pv}allow_success_on_time_cap={allow}",
                   f"{pv}min_samples_required=8", f"{pv}min_class_coverage=2")
    assert main(cfg, fake_build_loaders) == code
    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == "time_capped" and metrics["epoch"] == 1
    verdict = metrics["stage"]["time_cap"]
    assert verdict["samples_seen"] == 16 and verdict["success"] is (allow == "true")


def test_a_cap_that_falls_in_the_last_epochs_last_steps_leaves_the_run_complete(tmp_path):
    """The clock is asked at log steps and at an epoch's last step: a cap spent by then in the last planned epoch
    cut nothing, and the run is complete, not time-capped (whose stage the gate would judge as one that trained
    less than it planned)."""
    exp = tmp_path / "exp"
    pv = "data.progressive_validation.stage_1."
    cfg = make_cfg(exp, "train.epochs=1", "train.step_log_interval=1000", f"{pv}time_limit_hours=1.0e-9",
                   f"{pv}allow_success_on_time_cap=false")
    assert main(cfg, fake_build_loaders) == 0
    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == "completed" and metrics["epoch"] == 1 and "time_cap" not in metrics["stage"]


def test_resume_last_without_checkpoint_starts_fresh_and_empty_data_is_named(tmp_path):
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.epochs=1", "train.resume=last"), fake_build_loaders) == 0
    assert "starts fresh" in (exp / "logs" / "train.err").read_text(encoding="utf-8")

    def no_train(cfg):
        return fake_build_loaders(cfg)._replace(cls_train=None)

    assert main(make_cfg(tmp_path / "empty"), no_train) == EXIT_CONFIG
    assert "no classification training crops" in (tmp_path / "empty" / "logs" / "train.err").read_text(encoding="utf-8")


def test_resuming_a_finished_run_with_more_epochs_follows_the_longer_schedule(tmp_path):
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.epochs=2"), fake_build_loaders) == 0
    history = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert history[-1]["classification"]["lr"] == 0.0  # a finished cosine ends at 0
    assert main(make_cfg(exp, "train.epochs=4", "train.resume=last"), fake_build_loaders) == 0
    steps = [r for r in read_jsonl(exp / "reports" / "metrics.jsonl") if r["type"] == "step" and r["epoch"] > 2]
    lrs = [r["lr"] for r in steps]
    # The schedule is rebuilt for 4 epochs: the added epochs restart where the longer cosine is, then decay to 0.
    assert lrs[0] > 0.001 and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] == 0.0
    history = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_resume_from_the_emergency_checkpoint_goes_on_inside_the_epoch_it_stopped(tmp_path, monkeypatch, caplog):
    """OOM recovery gave up at epoch 2, step 4 (the 10th step): the emergency checkpoint holds weights that trained
    3 steps of epoch 2. Labelled epoch 1 with no place, a resume from it (the file train.sh names) trained epoch 2
    whole again over them, 2 steps past the schedule's end; it now goes on from step 4."""
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_STEPS", "9,10")
    exp = tmp_path / "exp"
    assert main(make_cfg(exp, "train.oom.max_retries=1", "train.epochs=2"), fake_build_loaders) == EXIT_OOM
    emergency = exp / "checkpoints" / "classification_emergency.pt"
    saved = load_ckpt(emergency)
    assert saved["epoch"] == 1 and saved["progress"]["epoch"] == 2 and saved["progress"]["done"] == {
        "classification": 3}
    monkeypatch.delenv("PILLSNAP_FAKE_OOM_STEPS")
    with caplog.at_level(logging.INFO):
        assert main(make_cfg(exp, "train.epochs=2", f"train.resume={emergency}"), fake_build_loaders) == 0
    assert "resuming inside epoch 2, after 4 classification steps" in caplog.text  # the OOM's batch left out
    last = load_ckpt(exp / "checkpoints" / "last.pt")
    assert last["task_state"]["optimizer_steps"] == 11 and last["scheduler_state"]["last_epoch"] == 11
