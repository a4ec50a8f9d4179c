"""DDP on CPU: two gloo processes train the same interleaved run; both models' weights agree across ranks (the
detector's gradients are synchronised too) and only rank 0 writes files."""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fakes import loaders_with_detection, make_cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.trainer import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cfg = make_cfg(Path(root) / f"exp_rank{rank}", "train.epochs=2", "train.deterministic=true",
                   "train.strategy=interleaved")
    code, trainer = run_training(cfg, partial(loaders_with_detection, det_batches=4))
    tasks = trainer.tasks
    # Written by the test, not the library: each rank's final weights and the samples it trained on.
    torch.save({"code": code, "steps": trainer.state.global_step,
                **{name: {"state": task.raw_model.state_dict(), "samples": task.samples_seen,
                          "ema": task.ema.module.state_dict()} for name, task in tasks.items()}},
               Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_agree_on_both_models_and_only_rank0_writes(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    # Per epoch and rank: 48 images / 2 ranks / batch 8 = 3 classifier steps, 4 batches / 2 ranks = 2 detector steps.
    assert r0["steps"] == r1["steps"] == 10
    assert r0["classification"]["samples"] == r1["classification"]["samples"] == 48
    assert r0["detection"]["samples"] == r1["detection"]["samples"] == 8
    for task in ("classification", "detection"):
        for key in ("state", "ema"):
            for name, tensor in r0[task][key].items():
                assert torch.equal(tensor, r1[task][key][name]), f"{task} {key} {name} differs between ranks"
    assert (tmp_path / "exp_rank0" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "exp_rank0" / "reports" / "metrics.json").is_file()
    assert not any(p.is_file() for p in (tmp_path / "exp_rank1").rglob("*"))
