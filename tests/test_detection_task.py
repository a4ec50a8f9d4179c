"""DetectionTask: step-level YOLO11n training on tiny fake batches, validation, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fakes import fake_det_batch

from pillsnap.config import load_config
from pillsnap.engine.detection import DetectionTask, batch_targets, split_batch
from pillsnap.models.detector import build_yolo_model, load_detector_for_inference
from pillsnap.utils import load_ckpt, save_ckpt


def tiny_cfg(*overrides: str):
    return load_config("config.yaml", ["model.detector=yolo11n", "model.det_image_size=64", "train.warmup_steps=2",
                                       "train.epochs=2", *overrides], dotenv_path=None)


@pytest.fixture(scope="module")
def batches() -> tuple[list, list]:
    rng = np.random.default_rng(0)
    return [fake_det_batch(rng) for _ in range(3)], [fake_det_batch(rng) for _ in range(2)]


def test_build_yolo_model_one_class_offline() -> None:
    model = build_yolo_model("yolo11n", num_classes=1)
    assert model.names == {0: "pill"}
    out = model.eval()(torch.zeros(1, 3, 64, 64))
    assert out[0].shape[:2] == (1, 5)  # 4 box channels + 1 class


def test_bad_detector_name_and_missing_weights_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="YOLO yaml"):
        build_yolo_model("resnet18")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_yolo_model("yolo11n", weights=tmp_path / "missing.pt")


def test_detector_weights_by_asset_name_fall_back_offline(monkeypatch, caplog):
    from ultralytics.utils import downloads

    def offline(name, *args, **kwargs):  # what ultralytics raises with no network and nothing cached
        raise ConnectionError(f"Download failure for {name}: no internet")

    monkeypatch.setattr(downloads, "attempt_download_asset", offline)
    model = build_yolo_model("yolo11n", weights="yolo11n.pt")
    assert model.names == {0: "pill"} and "could not fetch yolo11n.pt" in caplog.text


def test_detector_weights_from_a_local_file_load_what_fits(tmp_path):
    source = build_yolo_model("yolo11n", num_classes=3)  # a head of another size: skipped
    torch.save({"model": source}, tmp_path / "yolo.pt")
    model = build_yolo_model("yolo11n", weights=tmp_path / "yolo.pt")
    first = next(iter(source.state_dict()))
    assert torch.equal(model.state_dict()[first], source.state_dict()[first])


def test_detector_weights_of_another_model_size_are_refused_not_left_mostly_random(tmp_path):
    source = build_yolo_model("yolo11n", num_classes=1)
    torch.save({"model": source}, tmp_path / "yolo11n.pt")
    with pytest.raises(ValueError, match=r"fits \d+ of the \d+ tensors before the detector's head: weights of"):
        build_yolo_model("yolo11s", weights=tmp_path / "yolo11n.pt")


def test_batch_targets_to_pixels() -> None:
    batch = {"img": torch.zeros(2, 3, 40, 80), "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.5]]),
             "cls": torch.zeros(1, 1), "batch_idx": torch.tensor([1.0])}
    targets = batch_targets(batch)
    assert targets[0].shape == (0, 5)
    assert torch.allclose(targets[1], torch.tensor([[30.0, 10.0, 50.0, 30.0, 0.0]]))


def test_train_step_updates_weights_and_reports(batches) -> None:
    train, val = batches
    task = DetectionTask(tiny_cfg("train.ema.enabled=false"), train, val, "cpu")
    before = [p.detach().clone() for p in task.model.parameters()]
    out = task.train_step(train[0])
    assert out.n == 4 and math.isfinite(out.loss) and out.loss > 0
    changed = sum(not torch.equal(a, b) for a, b in zip(before, task.model.parameters(), strict=True))
    assert changed > 0
    assert task.optimizer_steps == 1 and task.steps_per_epoch() == 3


def test_grad_accumulation_steps_every_second_batch(batches) -> None:
    train, val = batches
    task = DetectionTask(tiny_cfg("train.grad_accum_steps=2"), train, val, "cpu")
    task.train_step(train[0])
    assert task.optimizer_steps == 0
    task.train_step(train[1])
    assert task.optimizer_steps == 1


def test_validate_and_checkpoint_roundtrip(batches, tmp_path) -> None:
    train, val = batches
    cfg = tiny_cfg()
    task = DetectionTask(cfg, train, val, "cpu")
    task.train_step(train[0])
    metrics = task.validate(0)
    for key in ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_targets"] == sum(len(b["cls"]) for b in val)
    path = tmp_path / "detection_last.pt"
    save_ckpt(path, task.checkpoint_state(epoch=0, best_metric=metrics["mAP@0.5"]))

    resumed = DetectionTask(cfg, train, val, "cpu")
    resumed.load_checkpoint_state(load_ckpt(path))
    assert resumed.optimizer_steps == 1 and resumed.samples_seen == 4
    for a, b in zip(task.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model, snapshot = load_detector_for_inference(path)
    assert snapshot["model"]["detector"] == "yolo11n" and not model.training
    ema_weights = task.ema.module.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema_weights[key])


@pytest.mark.slow
def test_short_training_learns_boxes(one_thread) -> None:
    """72 optimizer steps on easy fake pills: the loss falls and the detector finds pills (mAP@0.5 > 0.1)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    train = [fake_det_batch(rng, 8) for _ in range(8)]
    val = [fake_det_batch(rng, 8) for _ in range(1)]
    cfg = tiny_cfg("train.epochs=9", "train.detection.lr=0.003", "train.warmup_steps=5", "train.ema.enabled=false")
    task = DetectionTask(cfg, train, val, "cpu")
    losses = [task.train_step(b).loss for _ in range(9) for b in train]
    assert np.mean(losses[-8:]) < np.mean(losses[8:16])
    assert task.validate(9)["mAP@0.5"] > 0.1


def test_split_batch_reindexes_targets(batches) -> None:
    batch = batches[0][0]
    chunks = split_batch(batch, 3)
    assert [c["img"].shape[0] for c in chunks] == [3, 1]
    assert sum(len(c["cls"]) for c in chunks) == len(batch["cls"])
    last = chunks[1]
    assert torch.equal(last["bboxes"], batch["bboxes"][batch["batch_idx"] == 3])
    assert set(last["batch_idx"].tolist()) == {0.0} and last["im_file"] == ["3.png"]


def test_oom_is_recovered_by_chunking_the_batch(batches) -> None:
    from pillsnap.engine.loop import EpochRunner

    train, val = batches
    task = DetectionTask(tiny_cfg("train.oom.cooldown_sec=0", "train.oom.escalate_to_fp16=false",
                                  "train.detection.batch_size=4"), train, val, "cpu")
    real_loss, seen = task.model.loss, []

    def flaky_loss(batch):  # the first full batch of 4 "does not fit"; chunks of 2 do
        seen.append(batch["img"].shape[0])
        if batch["img"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(batch)

    task.model.loss = flaky_loss
    runner = EpochRunner({"detection": task}, task.cfg)
    out = runner.guarded_step("detection", train[0])
    assert seen == [4, 2, 2] and out.n == 4 and math.isfinite(out.loss)
    # S2 keeps the global batch: two chunks of 2, one optimizer step.
    assert (task.knobs.batch_size, task.knobs.grad_accum) == (2, 2) and task.optimizer_steps == 1
