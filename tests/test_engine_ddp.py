"""DDP on CPU: two gloo processes train the same run; their weights agree and only rank 0 writes files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_engine_fakes import fake_build_loaders, make_cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.trainer import run_training

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cfg = make_cfg(Path(root) / f"exp_rank{rank}", "train.epochs=2", "train.deterministic=true")
    code, trainer = run_training(cfg, fake_build_loaders)
    task = trainer.tasks["classification"]
    # Written by the test, not the library: each rank's final weights and the samples it trained on.
    torch.save({"code": code, "state": task.raw_model.state_dict(), "samples": task.samples_seen,
                "steps": trainer.runner.global_step}, Path(root) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_agree_and_only_rank0_writes(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["code"] == r1["code"] == 0
    assert r0["steps"] == r1["steps"] == 6  # 48 samples / 2 ranks / batch 8 = 3 steps per epoch
    assert r0["samples"] == r1["samples"] == 48
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    assert (tmp_path / "exp_rank0" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "exp_rank0" / "reports" / "metrics.json").is_file()
    assert not any(p.is_file() for p in (tmp_path / "exp_rank1").rglob("*"))
