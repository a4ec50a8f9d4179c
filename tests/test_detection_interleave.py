"""Interleaved two-stage training: the ratio is respected and both tasks' steps are counted (seed D-1/D-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_detection_task import fake_det_batch, tiny_cfg
from test_engine_fakes import fake_build_loaders, make_cfg

from pillsnap.engine.detection import DetectionTask
from pillsnap.engine.loop import EpochRunner
from pillsnap.engine.trainer import main as train_main
from pillsnap.utils import load_ckpt, read_json


class FakeClassificationTask:
    """Counts its steps; the detection side is the real DetectionTask."""

    name, monitor = "classification", "macro_f1"

    def __init__(self, steps: int, order: list[str]) -> None:
        self.train_loader = [None] * steps
        self.order = order

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def train_step(self, batch: object) -> dict:
        self.order.append("classification")
        return {"loss": 1.0, "lr": 0.1, "n": 1}


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
    assert out[d]["steps"] == 4 and out[c]["steps"] == 3 and runner.global_step == 7
    assert det.global_step == 4  # four real optimizer steps of the detector


def _loaders_with_detection(cfg):
    cls_train, cls_val, _, _, _, _, meta = fake_build_loaders(cfg)
    rng = np.random.default_rng(3)
    det_train = [fake_det_batch(rng, 2) for _ in range(3)]
    det_val = [fake_det_batch(rng, 2)]
    return cls_train, cls_val, None, det_train, det_val, None, meta


def test_trainer_interleaved_writes_both_checkpoints_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    overrides = ["train.strategy=interleaved", "model.detector=yolo11n", "model.det_image_size=64",
                 "train.max_steps_per_epoch=3"]
    cfg = make_cfg(tmp_path, *overrides, "train.epochs=1")
    assert train_main(cfg, build_loaders=_loaders_with_detection) == 0
    ckpts = tmp_path / "checkpoints"
    for name in ("detection_last.pt", "detection_best.pt", "classification_last.pt", "classes.json"):
        assert (ckpts / name).is_file(), name
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert set(metrics["detection"]) >= {"mAP@0.5", "mAP@0.5:0.95", "precision", "recall"}
    assert load_ckpt(ckpts / "detection_last.pt")["global_step"] == 6  # 3 detection + 3 classification steps

    cfg2 = make_cfg(tmp_path, *overrides, "train.epochs=2", "train.resume=last")
    assert train_main(cfg2, build_loaders=_loaders_with_detection) == 0
    resumed = load_ckpt(ckpts / "detection_last.pt")
    assert resumed["epoch"] == 2 and resumed["global_step"] == 12


def test_trainer_sequential_trains_detection_after_classification(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "train.strategy=sequential", "model.detector=yolo11n", "model.det_image_size=64",
                   "train.max_steps_per_epoch=2", "train.epochs=1", "train.detection.epochs=1")
    assert train_main(cfg, build_loaders=_loaders_with_detection) == 0
    history = read_json(tmp_path / "reports" / "metrics.json")["history"]
    assert [sorted(k for k in h if k in ("classification", "detection")) for h in history] == [
        ["classification"], ["detection"]]
    det = load_ckpt(tmp_path / "checkpoints" / "detection_last.pt")
    assert det["epoch"] == 2 and det["scheduler_state"]["last_epoch"] == 2  # two detector optimizer steps


def test_train_detection_stage_trains_only_the_detector(tmp_path: Path) -> None:
    from pillsnap.engine.trainer import train_detection_stage

    cfg = make_cfg(tmp_path, "model.detector=yolo11n", "model.det_image_size=64", "train.max_steps_per_epoch=2",
                   "train.detection.epochs=1")
    path = train_detection_stage(cfg, build_loaders=_loaders_with_detection)
    assert path == tmp_path / "checkpoints" / "detection_best.pt" and path.is_file()
    history = read_json(tmp_path / "reports" / "metrics.json")["history"]
    assert [sorted(k for k in h if k in ("classification", "detection")) for h in history] == [["detection"]]
    assert not (tmp_path / "reports" / "confusion_matrix.png").exists()  # the classifier did not train
