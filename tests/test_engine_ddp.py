"""DDP on CPU: two gloo processes train the same interleaved run; both models' weights agree across ranks (the
detector's gradients are synchronised too) and only rank 0 writes files."""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
from fakes import fake_build_loaders, loaders_with_detection, make_cfg, run_ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.loop import EpochRunner
    from pillsnap.engine.run import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cfg = make_cfg(Path(root) / f"exp_rank{rank}", "train.epochs=2", "train.deterministic=true",
                   "train.strategy=interleaved")
    losses: list[tuple[int, str, float]] = []  # (epoch, task, loss) of each of this rank's steps
    runner_epoch, runner_step, epoch_now = EpochRunner.train_one_epoch, EpochRunner.guarded_step, [0]

    def recording_epoch(self, epoch, *args):
        epoch_now[0] = epoch
        return runner_epoch(self, epoch, *args)

    def recording_step(self, name, batch):
        out = runner_step(self, name, batch)
        losses.append((epoch_now[0], name, out.loss))
        return out

    EpochRunner.train_one_epoch, EpochRunner.guarded_step = recording_epoch, recording_step
    code, trainer = run_training(cfg, partial(loaders_with_detection, det_batches=4))
    tasks = trainer.tasks
    # Written by the test, not the library: each rank's final weights and the samples it trained on.
    torch.save({"code": code, "steps": trainer.state.global_step, "losses": losses, "history": trainer.history,
                "detector_epochs": tasks["detection"].epochs_trained,
                **{name: {"state": task.raw_model.state_dict(), "samples": task.samples_seen,
                          "ema": task.ema.module.state_dict()} for name, task in tasks.items()}},
               Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_agree_on_both_models_and_only_rank0_writes(tmp_path):
    run_ranks(worker, (2, free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    # Per epoch and rank: 48 images / 2 ranks / batch 8 = 3 classifier steps, 4 batches / 2 ranks = 2 detector steps.
    assert r0["steps"] == r1["steps"] == 10
    assert r0["classification"]["samples"] == r1["classification"]["samples"] == 48
    assert r0["detection"]["samples"] == r1["detection"]["samples"] == 8
    # the detector's per-epoch schedule (mosaic closing) is kept by every rank, not only by the one that validates
    assert r0["detector_epochs"] == r1["detector_epochs"] == 2
    for task in ("classification", "detection"):
        for key in ("state", "ema"):
            for name, tensor in r0[task][key].items():
                assert torch.equal(tensor, r1[task][key][name]), f"{task} {key} {name} differs between ranks"
    # the history's training loss is the mean over every rank's steps, each rank having trained its own shard
    steps = r0["losses"] + r1["losses"]
    for record in r0["history"]:
        for task in ("classification", "detection"):
            mine = [loss for epoch, name, loss in steps if (epoch, name) == (record["epoch"], task)]
            assert len(mine) == 2 * record[task]["steps"]
            assert record[task]["train_loss"] == pytest.approx(sum(mine) / len(mine), rel=1e-9)
    assert [h["classification"]["train_loss"] for h in r0["history"]] == [
        h["classification"]["train_loss"] for h in r1["history"]]
    assert (tmp_path / "exp_rank0" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "exp_rank0" / "reports" / "metrics.json").is_file()
    assert not any(p.is_file() for p in (tmp_path / "exp_rank1").rglob("*"))


class _LosesABatchOnRank1:
    """fake collate, but on rank 1 the second batch of each epoch comes back empty (None): every photo of it
    failed to decode."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, items):
        from fakes import collate

        self.calls += 1
        if os.environ["RANK"] == "1" and self.calls % 3 == 2:  # 3 batches a rank per epoch
            return None
        return collate(items)


def loaders_losing_a_batch(cfg):
    from fakes import fake_build_loaders
    from torch.utils.data import DataLoader

    loaders = fake_build_loaders(cfg)
    train = loaders.cls_train
    return loaders._replace(cls_train=DataLoader(train.dataset, batch_size=train.batch_size, shuffle=True,
                                                 drop_last=True, collate_fn=_LosesABatchOnRank1(), num_workers=0))


def lossy_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.run import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "TORCH_NCCL_BLOCKING_WAIT": "1"})
    cfg = make_cfg(Path(root) / f"exp_rank{rank}", "train.epochs=2", "train.deterministic=true",
                   "train.ddp_timeout_minutes=1")
    code, trainer = run_training(cfg, loaders_losing_a_batch)
    task = trainer.tasks["classification"]
    torch.save({"code": code, "steps": trainer.state.global_step, "samples": task.samples_seen,
                "state": task.raw_model.state_dict()}, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_a_batch_lost_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """A rank whose batch held no readable photo skips the step; the others skip it with it, instead of waiting
    for its gradients until the run times out (or stepping out of order)."""
    run_ranks(lossy_worker, (2, free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    assert r0["steps"] == r1["steps"] == 4  # 3 classifier steps per epoch and rank, one skipped by both, 2 epochs
    assert r0["samples"] == r1["samples"] == 32
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), f"{name} differs between ranks"


def compile_worker(rank: int, world: int, port: int, root: str, resume: bool) -> None:
    from pillsnap.engine import compiling
    from pillsnap.engine.run import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    tried = []

    def warm_up(task, model):  # rank 0's compiler works (nothing is compiled here); rank 1 has no C++ compiler
        tried.append(type(getattr(model, "_orig_mod", model)).__name__)  # what torch.compile wrapped
        if rank == 1:
            raise RuntimeError("no C++ compiler")

    compiling.warm_up = warm_up
    overrides = ("train.deterministic=true", "train.max_steps_per_epoch=2", "train.ddp_timeout_minutes=1",
                 "optimization.torch_compile=reduce-overhead")
    # resumed, each rank from its own folder: rank 1 (which wrote nothing) as a node without rank 0's
    overrides += ("train.epochs=2", "train.resume=last") if resume else ("train.epochs=1",)
    code, trainer = run_training(make_cfg(Path(root) / f"exp_rank{rank}", *overrides), fake_build_loaders)
    model = None if trainer is None else trainer.tasks["classification"].model
    torch.save({"code": code, "eager": not isinstance(model, torch._dynamo.eval_frame.OptimizedModule),
                "tried": tried}, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_every_rank_trains_compiled_or_every_rank_eager_and_resumes_alike_or_not_at_all(tmp_path):
    """A rank whose compile warm-up fails trains eager; the others must too (compiled and eager replicas would
    call their collectives out of step: a crash under gloo, a hang under NCCL), and the warm-up runs outside the
    DDP wrapper, without collectives. Ranks that find different checkpoints to resume from refuse to start."""
    run_ranks(compile_worker, (2, free_port(), str(tmp_path), False))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0 and r0["eager"] and r1["eager"]
    assert r0["tried"] == r1["tried"] == ["EfficientNet"]  # the compiled bare model, not the DDP wrapper
    run_ranks(compile_worker, (2, free_port(), str(tmp_path), True))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 2  # EXIT_CONFIG on both, with a line naming what each rank found
    log = (tmp_path / "exp_rank0" / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    assert "found different checkpoints to resume from (epoch, step per rank: 0: 1, 2, 1: 0, 0)" in log


def test_ranks_wait_for_each_other_as_long_as_the_config_says(monkeypatch):
    """Rank 0 validates alone between epochs while the others wait: NCCL's default 10 minutes is shorter than a
    Stage 4 validation, so those waits go through a gloo group with train.ddp_timeout_minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from pillsnap.config import load_config
    from pillsnap.engine import distributed

    seen, group = {}, {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: group.update(kwargs) or "the wait group")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    minutes = float(load_config(None, [], dotenv_path=None).train.ddp_timeout_minutes)
    info = distributed.init_distributed(minutes)
    assert info.rank == 1 and info.world_size == 2
    # the training collectives keep the backend's own timeout; the waits on rank 0 get the long one
    assert "timeout" not in seen and seen["backend"] == "gloo"
    assert group == {"backend": "gloo", "timeout": timedelta(minutes=minutes)} and minutes >= 60
    waited = {}
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group: waited.update(group=group))
    monkeypatch.setattr(dist, "barrier", lambda group: waited.update(barrier=group))
    assert distributed.broadcast_object(info, {"acc": 0.9}) == {"acc": 0.9}
    distributed.barrier(info)
    assert waited == {"group": "the wait group", "barrier": "the wait group"}
    distributed.cleanup(distributed.DistInfo())
    assert distributed._WAIT_GROUP is None


class _Counted(torch.utils.data.Dataset):
    """A data set that counts the crops this process reads from it."""

    def __init__(self, inner) -> None:
        self.inner, self.read = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        self.read.append(index)
        return self.inner[index]


def loaders_counting_validation(cfg):
    """The fake loaders with 15 validation crops (an odd split: shares of 8 and 7) read through a counter, and
    class weights for the loss."""
    from fakes import fake_build_loaders
    from torch.utils.data import DataLoader, Subset

    loaders = fake_build_loaders(cfg)
    val = loaders.cls_val
    counted = DataLoader(_Counted(Subset(val.dataset, range(15))), batch_size=3, shuffle=False,
                         collate_fn=val.collate_fn)
    meta = {**loaders.meta, "class_weights": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    return loaders._replace(cls_val=counted, meta=meta)


def sharing_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.classification import validate_classification
    from pillsnap.engine.run import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cfg = make_cfg(Path(root) / f"exp_rank{rank}", "train.epochs=1", "train.deterministic=true",
                   "train.ema.validate=both", "loss.use_class_weights=true")
    code, trainer = run_training(cfg, loaders_counting_validation)
    task = trainer.tasks["classification"]
    full = torch.utils.data.DataLoader(task.val_loader.dataset.inner, batch_size=5,
                                       collate_fn=task.val_loader.collate_fn)
    alone = {"ema": validate_classification(task.eval_model(), full, task.criterion, torch.device("cpu")),
             "raw": validate_classification(task.raw_model, full, task.criterion, torch.device("cpu"))}
    torch.save({"code": code, "read": task.val_loader.dataset.read, "recorded": trainer.history[-1]["classification"],
                "alone": alone}, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_every_rank_validates_its_share_and_rank0_reports_the_whole_split(tmp_path):
    """Under DDP each rank reads its own share of the validation split (no crop twice, none left out) and rank 0
    reports the metrics of the whole split, the same as one process validating it alone: the class-weighted loss
    too, on an odd split."""
    run_ranks(sharing_worker, (2, free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    size = 15
    for reads, share in ((r0["read"], 8), (r1["read"], 7)):  # per validation pass (EMA and raw weights): its share
        assert len(reads) == 2 * share
    assert sorted(set(r0["read"]) | set(r1["read"])) == list(range(size)) and not set(r0["read"]) & set(r1["read"])
    recorded = r0["recorded"]
    for key, value in r0["alone"]["ema"].items():
        assert recorded[key] == pytest.approx(value, abs=1e-6), key
    for key, value in r0["alone"]["raw"].items():
        assert recorded[f"raw_{key}"] == pytest.approx(value, abs=1e-6), key
    assert recorded["n"] == size


def test_joining_a_process_group_someone_else_started(monkeypatch):
    """A process group another library started is joined as it is; the wait group is still made."""
    import torch.distributed as dist

    from pillsnap.engine import distributed

    made = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: pytest.fail("started a second group"))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.update(kwargs) or "the wait group")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    info = distributed.init_distributed(30)
    assert info.world_size == 2 and made["backend"] == "gloo" and distributed._WAIT_GROUP == "the wait group"
    monkeypatch.setattr(distributed, "_WAIT_GROUP", None)


def test_the_other_ranks_of_a_job_say_only_warnings_and_errors(tmp_path):
    import logging

    from pillsnap.engine.run import run_logging

    root = logging.getLogger("pillsnap")
    before = root.level
    root.setLevel(logging.INFO)  # as the command line sets it
    try:
        with run_logging(tmp_path, enabled=False):  # rank 1's run
            child = logging.getLogger("pillsnap.engine.trainer")
            assert not child.isEnabledFor(logging.INFO) and child.isEnabledFor(logging.WARNING)
        assert root.level == logging.INFO
        with run_logging(tmp_path, enabled=True):  # rank 0's (or one process's) run: its level is left as set
            pass
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)
