"""The epoch loop with fake tasks: interleaving counts both tasks' steps, records feed the callbacks."""

from __future__ import annotations

import torch
from fakes import fake_build_loaders, make_cfg

from pillsnap.engine import ClassificationTask, DetectionTask, StepOutput
from pillsnap.engine.callbacks import Callback, CallbackList
from pillsnap.engine.loop import EpochRunner, RunState


class FakeTask:
    """Just enough of the task contract for the loop: counts the steps it is given."""

    def __init__(self, name: str, steps: int) -> None:
        self.name, self.steps, self.calls = name, steps, 0
        self.device = torch.device("cpu")
        self.skipped_steps = 0  # steps skipped for non-finite gradients (none here)
        self.spec = {"detection": DetectionTask.spec, "classification": ClassificationTask.spec}[name]
        self.train_loader = list(range(steps + 5))

    def steps_per_epoch(self) -> int:
        return self.steps

    def train_step(self, batch) -> StepOutput:
        self.calls += 1
        return StepOutput(1.0, 0.1, 2)


class Recorder(Callback):
    def __init__(self) -> None:
        self.records = []

    def on_step_end(self, record: dict) -> None:
        self.records.append(record)


def test_runner_interleaves_by_ratio_and_counts_each_task(tmp_path):
    cfg = make_cfg(tmp_path, "train.interleave_ratio=[1,2]", "train.step_log_interval=3")
    tasks = {"detection": FakeTask("detection", 4), "classification": FakeTask("classification", 8)}
    rec = Recorder()
    state = RunState(global_step=100)
    runner = EpochRunner(tasks, cfg, state, CallbackList([rec]), max_epochs=3)
    out = runner.train_one_epoch(1, ["detection", "classification"])
    assert tasks["detection"].calls == 4 and tasks["classification"].calls == 8
    assert out["detection"]["steps"] == 4 and out["classification"]["steps"] == 8
    assert [r["task"][0] for r in rec.records] == list("dccdccdccdcc")
    assert state.global_step == 112 and rec.records[0]["global_step"] == 101  # the run's counter, not a task's
    cls_records = [r for r in rec.records if r["task"] == "classification"]
    assert [r["step"] for r in cls_records] == list(range(1, 9)) and cls_records[-1]["steps"] == 8
    assert [r["step"] for r in cls_records if r["log"]] == [3, 6, 8]
    assert all(r["max_epochs"] == 3 and r["throughput"] > 0 for r in rec.records)


def test_classification_epoch_steps_the_optimizer_per_accumulation(tmp_path, one_thread):
    cfg = make_cfg(tmp_path, "train.grad_accum_steps=3", "train.max_steps_per_epoch=5")
    loaders = fake_build_loaders(cfg)
    task = ClassificationTask(cfg, loaders.cls_train, loaders.cls_val, loaders.meta, "cpu")
    before = task.raw_model.conv_stem.weight.detach().clone()
    out = EpochRunner({"classification": task}, cfg).train_one_epoch(1, ["classification"])["classification"]
    assert out["steps"] == 5 and task.optimizer_steps == 1  # 5 micro-batches, accumulation 3
    assert task.samples_seen == 40 and not torch.equal(before, task.raw_model.conv_stem.weight)
    # The EMA warms up its own decay: after the first update it equals the weights, not the random init.
    assert torch.equal(task.ema.module.conv_stem.weight, task.raw_model.conv_stem.weight)
    assert 0.0 < task.ema.get_decay(3) < 0.9 == task.ema.get_decay(1000)
    metrics = task.validate(1)
    assert {"val_loss", "acc", "macro_f1", "top5", "n"} <= set(metrics) and metrics["n"] == 16


def test_memory_watch_warns_above_the_ratio(caplog):
    from pillsnap.engine.callbacks import MemoryWatchCallback
    from pillsnap.utils import TBWriter

    tb = TBWriter(".", enabled=False)
    info = {"batch_size": 8}
    MemoryWatchCallback(0.8, tb, mem_ratio=lambda: 0.5).on_epoch_start(1, info)
    assert info["mem_ratio"] == 0.5 and "memory_warning" not in caplog.text
    MemoryWatchCallback(0.8, tb, mem_ratio=lambda: 0.93).on_epoch_start(2, info)
    assert "oom/memory_warning: CUDA memory at 93% (> 80%, train.memory_warning_ratio)" in caplog.text
    caplog.clear()
    sized = MemoryWatchCallback(0.8, tb, mem_ratio=lambda: 0.86)
    sized.sized_for(0.88)  # batches the auto batch search sized for 88% of the GPU
    sized.on_epoch_start(3, info)
    assert "memory_warning" not in caplog.text
    sized.mem_ratio = lambda: 0.9
    sized.on_epoch_start(4, info)
    assert "CUDA memory at 90% (> 88%, the auto batch's train.auto_batch_vram_headroom)" in caplog.text
    sized.sized_for(0.7)  # a headroom below the warning ratio leaves the ratio
    assert sized.ratio == 0.88


def test_profile_line_every_interval(caplog):
    import logging

    from pillsnap.engine.callbacks import ProfileCallback

    cb = ProfileCallback(3, logging.getLogger("pillsnap.test"))
    record = {"task": "classification", "data_time": 0.01, "compute_time": 0.09, "n": 8, "cuda_mem": 0.0}
    with caplog.at_level(logging.INFO, logger="pillsnap.test"):
        for _ in range(7):
            cb.on_step_end(record)
    lines = [r.message for r in caplog.records if r.message.startswith("[profile]")]
    assert len(lines) == 2 and "data_share=10%" in lines[0] and "thr=80.0/s" in lines[0]


def test_a_batch_with_no_readable_sample_is_skipped_not_fatal(tmp_path, caplog):
    cfg = make_cfg(tmp_path, "train.step_log_interval=1")
    task = FakeTask("classification", 3)
    task.train_loader = [0, None, 0, 0]  # safe_collate gives None when every sample of a batch failed to decode
    out = EpochRunner({"classification": task}, cfg).train_one_epoch(1, ["classification"])
    assert task.calls == 2 and out["classification"]["steps"] == 2
    assert "skipped a batch less than half readable" in caplog.text
