"""Interleaved two-stage training: the ratio is respected and both tasks' steps are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import fake_det_batch, loaders_with_detection, make_cfg
from test_detection_task import tiny_cfg

from pillsnap.engine import ClassificationTask, StepOutput
from pillsnap.engine.detection import DetectionTask
from pillsnap.engine.loop import EpochRunner
from pillsnap.engine.run import main as train_main
from pillsnap.utils import load_ckpt, read_json


class FakeClassificationTask:
    """Counts its steps; the detection side is the real DetectionTask."""

    name, monitor, spec = "classification", "macro_f1", ClassificationTask.spec

    def __init__(self, steps: int, order: list[str]) -> None:
        self.train_loader = [0] * steps
        self.order = order
        self.device = torch.device("cpu")
        self.skipped_steps = 0

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_step(self, batch: object) -> StepOutput:
        self.order.append("classification")
        return StepOutput(1.0, 0.1, 1)


def test_ratio_two_to_one_with_real_detection_steps() -> None:
    rng = np.random.default_rng(0)
    order: list[str] = []
    det = DetectionTask(tiny_cfg("train.interleave_ratio=[2,1]", "train.ema.enabled=false"),
                        [fake_det_batch(rng, 2) for _ in range(4)], None, "cpu")
    real_step = det.train_step
    det.train_step = lambda batch: (order.append("detection"), real_step(batch))[1]  # type: ignore[method-assign]
    cls = FakeClassificationTask(steps=3, order=order)
    runner = EpochRunner({"detection": det, "classification": cls}, det.cfg)
    out = runner.train_one_epoch(1, ["detection", "classification"])
    d, c = "detection", "classification"
    assert order == [d, d, c, d, d, c, c]  # 2:1 while both have steps, then classification's leftover
    assert out[d]["steps"] == 4 and out[c]["steps"] == 3 and runner.state.global_step == 7
    assert det.optimizer_steps == 4  # four real optimizer steps of the detector


def test_trainer_interleaved_writes_both_checkpoints_and_resumes(tmp_path: Path, one_thread) -> None:
    overrides = ["train.strategy=interleaved", "train.max_steps_per_epoch=3"]
    cfg = make_cfg(tmp_path, *overrides, "train.epochs=1")
    assert train_main(cfg, build_loaders=loaders_with_detection) == 0
    ckpts = tmp_path / "checkpoints"
    for name in ("detection_last.pt", "detection_best.pt", "classification_last.pt", "classes.json"):
        assert (ckpts / name).is_file(), name
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert set(metrics["detection"]) >= {"mAP@0.5", "mAP@0.5:0.95", "precision", "recall"}
    assert load_ckpt(ckpts / "detection_last.pt")["global_step"] == 6  # 3 detection + 3 classification steps
    # each task's batch size is its own curve: the classifier's under the design's bare tag, the detector's under det/
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("perf/batch_size")] == [8]
    assert [e.value for e in events.Scalars("det/perf/batch_size")] == [2]

    cfg2 = make_cfg(tmp_path, *overrides, "train.epochs=2", "train.resume=last")
    assert train_main(cfg2, build_loaders=loaders_with_detection) == 0
    resumed = load_ckpt(ckpts / "detection_last.pt")
    assert resumed["epoch"] == 2 and resumed["global_step"] == 12


def test_trainer_sequential_trains_detection_after_classification(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "train.strategy=sequential", "train.max_steps_per_epoch=2", "train.epochs=1",
                   "train.detection.epochs=1")
    assert train_main(cfg, build_loaders=loaders_with_detection) == 0
    history = read_json(tmp_path / "reports" / "metrics.json")["history"]
    assert [sorted(k for k in h if k in ("classification", "detection")) for h in history] == [
        ["classification"], ["detection"]]
    det = load_ckpt(tmp_path / "checkpoints" / "detection_last.pt")
    assert det["epoch"] == 2 and det["scheduler_state"]["last_epoch"] == 2  # two detector optimizer steps


def test_train_detection_stage_trains_only_the_detector(tmp_path: Path) -> None:
    from pillsnap.train import train_detection_stage

    cfg = make_cfg(tmp_path, "train.max_steps_per_epoch=2", "train.detection.epochs=1")
    path = train_detection_stage(cfg, build_loaders=loaders_with_detection)
    assert path == tmp_path / "checkpoints" / "detection_best.pt" and path.is_file()
    history = read_json(tmp_path / "reports" / "metrics.json")["history"]
    assert [sorted(k for k in h if k in ("classification", "detection")) for h in history] == [["detection"]]
    assert not (tmp_path / "reports" / "confusion_matrix.png").exists()  # the classifier did not train


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it."""


def dying_save_ckpt(monkeypatch, tmp_dir: Path, die_on_call: int) -> None:
    """save_ckpt that dies on its n-th call mid-write, leaving a partial temp file as a killed process would."""
    from pillsnap.engine import checkpointing

    real, calls = checkpointing.save_ckpt, []

    def save(path, state):
        calls.append(path)
        if len(calls) == die_on_call:
            (Path(path).parent / f".{Path(path).name}.x1y2.tmp").write_bytes(b"half a checkpoint")
            raise Killed(f"killed while writing {path}")
        real(path, state)

    monkeypatch.setattr(checkpointing, "save_ckpt", save)


def dying_apply(monkeypatch, die_on_call: int) -> None:
    """CheckpointStore._apply that dies after its first rename on its n-th call (the commit point is passed)."""
    import os

    from pillsnap.engine.checkpointing import CheckpointStore

    real, calls = CheckpointStore._apply, []

    def apply(self, moves, links):
        calls.append(moves)
        if len(calls) == die_on_call:
            os.replace(self.dir / moves[0][0], self.dir / moves[0][1])
            raise Killed("killed between the two renames")
        real(self, moves, links)

    monkeypatch.setattr(CheckpointStore, "_apply", apply)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["before_the_commit_point", "after_the_commit_point"])
def test_a_kill_between_the_two_saves_resumes_both_tasks_at_one_epoch(tmp_path: Path, monkeypatch, kill,
                                                                       one_thread) -> None:
    args = ["train.strategy=interleaved", "train.max_steps_per_epoch=2", "train.deterministic=true",
            "train.epochs=3"]
    assert train_main(make_cfg(tmp_path / "straight", *args), loaders_with_detection) == 0

    exp = tmp_path / "killed"
    with monkeypatch.context() as patch:
        if kill == "before_the_commit_point":  # epoch 2: the classifier is staged, the detector's write dies
            dying_save_ckpt(patch, exp, die_on_call=4)
        else:  # epoch 2: the journal is written, the classifier moved into place, then the process dies
            dying_apply(patch, die_on_call=2)
        with pytest.raises(Killed):
            train_main(make_cfg(exp, *args), loaders_with_detection)
    ckpts = exp / "checkpoints"
    on_disk = {t: load_ckpt(ckpts / f"{t}_last.pt")["epoch"] for t in ("classification", "detection")}
    assert on_disk == ({"classification": 1, "detection": 1} if kill == "before_the_commit_point"
                       else {"classification": 2, "detection": 1})  # what the kill left

    assert train_main(make_cfg(exp, *args, "train.resume=last"), loaders_with_detection) == 0
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # temp, staged and journal files gone
    log = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert ("completing the checkpoint commit of epoch 2" in log) == (kill == "after_the_commit_point")
    history = read_json(exp / "reports" / "metrics.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all({"classification", "detection"} <= set(h) for h in history)
    for task in ("classification", "detection"):
        straight = load_ckpt(tmp_path / "straight" / "checkpoints" / f"{task}_last.pt")
        resumed = load_ckpt(ckpts / f"{task}_last.pt")
        assert resumed["epoch"] == 3 and resumed["global_step"] == straight["global_step"] == 12
        assert resumed["task_state"]["optimizer_steps"] == straight["task_state"]["optimizer_steps"] == 6
        for name, tensor in straight["model_state"].items():
            assert torch.equal(tensor, resumed["model_state"][name]), f"{task}: {name} differs after resume"
