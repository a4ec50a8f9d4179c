"""A third task the engine has never heard of trains through the unchanged trainer: the task contract and its
TaskSpec are all the trainer, loop, checkpoints, callbacks and metrics files need."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from fakes import fake_build_loaders, make_cfg
from omegaconf import DictConfig
from test_engine_trainer import LINE, tb_tags
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pillsnap.engine import ClassificationTask, DetectionTask, ResumeMismatchError, Task
from pillsnap.engine.oom import BatchChoice
from pillsnap.engine.run import run_training
from pillsnap.engine.spec import TaskSpec
from pillsnap.utils import load_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
TRUE_W = torch.tensor([1.0, -2.0, 0.5, 3.0])


def regression_loader(n: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x @ TRUE_W), batch_size=8, shuffle=shuffle, drop_last=shuffle)


class RegressionTask(Task):
    """A 2-layer MLP fitting y = x . w on random tensors: nothing like a pill, nowhere in the engine."""

    spec: ClassVar[TaskSpec] = TaskSpec("regression", config_section="train.classification", tb_prefix="reg/",
                                        summary_keys=("mse",))

    def __init__(self, cfg: DictConfig, device: Any) -> None:
        super().__init__(cfg, cfg.train.classification, regression_loader(48, 0, True), regression_loader(16, 1, False),
                         device)

    @classmethod
    def from_loaders(cls, cfg: DictConfig, loaders: Any, device: Any, batch_choice: BatchChoice | None = None,
                     shard: Callable[[Any], Any] = lambda loader: loader) -> RegressionTask:
        return cls(cfg, device)  # brings its own data: the stage's loaders are the other tasks'

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0].to(self.device), batch[1].to(self.device)

    def batch_len(self, batch: Any) -> int:
        return len(batch[1])

    def split(self, batch: Any, size: int) -> list:
        return list(zip(batch[0].split(size), batch[1].split(size), strict=True))

    def chunk_loss(self, chunk: Any) -> torch.Tensor:
        return nn.functional.mse_loss(self.model(chunk[0]).squeeze(-1), chunk[1])

    def evaluate(self, model: nn.Module) -> dict:
        x, y = (torch.cat(t) for t in zip(*self.val_loader, strict=True))
        return {"mse": float(nn.functional.mse_loss(model(x).squeeze(-1), y)), "n": len(y)}

    def empty_metrics(self) -> dict:
        return {"mse": float("nan"), "n": 0}

    def random_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch_size, 4), torch.randn(batch_size)

    def lr_and_weight_decay(self) -> tuple[float, float]:
        return 0.01, 0.0

    def configured_batch_size(self) -> int:
        return 8

    def epochs(self) -> int:
        return int(self.cfg.train.epochs)

    @property
    def monitor(self) -> str:
        return "mse"

    @property
    def mode(self) -> str:
        return "min"

    def check_compatible(self, ckpt: dict, origin: str) -> None:
        if "0.weight" not in ckpt["model_state"]:
            raise ResumeMismatchError(f"{origin} holds no regression MLP")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_third_task_trains_alongside_the_classifier(tmp_path):
    exp = tmp_path / "exp"
    tasks = (ClassificationTask, DetectionTask, RegressionTask)  # detection is not wanted: strategy=classification
    code, trainer = run_training(make_cfg(exp, "train.epochs=2"), fake_build_loaders, task_types=tasks)
    assert code == 0 and list(trainer.tasks) == ["classification", "regression"]
    ckpts = exp / "checkpoints"
    reg = load_ckpt(ckpts / "regression_last.pt")
    assert reg["epoch"] == 2 and "0.weight" in reg["model_state"] and (ckpts / "regression_best.pt").is_file()
    assert os.path.samefile(ckpts / "last.pt", ckpts / "classification_last.pt")  # the aliases stay the classifier's

    metrics = read_json(exp / "reports" / "metrics.json")
    assert set(metrics["regression"]) == {"mse"} and metrics["regression"]["mse"] < 20.0  # var(y) is about 14
    history = metrics["history"]
    assert [sorted(k for k in h if k in ("classification", "regression")) for h in history] == [
        ["classification", "regression"]] * 2
    assert history[-1]["regression"]["steps"] == 6 and history[-1]["regression"]["lr"] == pytest.approx(0.0)
    assert metrics["best"]["regression"] == pytest.approx(min(h["regression"]["mse"] for h in history))

    lines = (exp / "logs" / "train.out").read_text(encoding="utf-8").splitlines()
    reg_lines = [ln for ln in lines if "(regression) [train]" in ln]
    assert len(reg_lines) == 6 and all(LINE.search(ln) for ln in reg_lines)
    assert any(re.search(r"\[val\] regression e=2 mse=\d", ln) for ln in lines)
    tags = tb_tags(exp / "tb")
    assert {"reg/train/loss", "reg/train/lr", "reg/val/mse", "train/loss", "val/accuracy"} <= tags


def test_a_third_task_alone_trains_and_resumes(tmp_path):
    exp = tmp_path / "exp"
    code, trainer = run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders, task_types=[RegressionTask])
    assert code == 0 and list(trainer.tasks) == ["regression"]
    assert not (exp / "checkpoints" / "last.pt").exists()  # the plain names belong to the task that declares them
    cfg = make_cfg(exp, "train.epochs=2", "train.resume=last")
    code, trainer = run_training(cfg, fake_build_loaders, task_types=[RegressionTask])
    assert code == 0 and trainer.start_epoch == 1
    assert load_ckpt(exp / "checkpoints" / "regression_last.pt")["epoch"] == 2
    assert [h["epoch"] for h in read_json(exp / "reports" / "metrics.json")["history"]] == [1, 2]
