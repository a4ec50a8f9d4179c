"""Shared fakes for the engine tests: a learnable colour-coded classification set, easy detection batches, and
CPU-sized configs, all in the loader contract's formats."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from pillsnap.config import load_config
from pillsnap.data.loaders import Loaders
from pillsnap.infer.evidence import Evidence

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4

# What a rank started by the DDP tests imports before it runs: torch, timm and the trainer take about 5 s of CPU in
# each new process, two per test, which made those starts most of the suite's time on 2 cores.
RANK_PRELOAD = ["torch", "timm", "pillsnap.engine.run", "pillsnap.engine.trainer", "fakes"]


def run_ranks(fn: Callable[..., None], args: tuple, world: int = 2, timeout: float = 240.0,
              own_interpreter: bool = False) -> None:
    """Start `world` DDP ranks, fn(rank, *args), and wait; ranks still running after `timeout` seconds are waiting on
    each other for good, which fails the test (they are killed); a rank's error is raised here.

    The ranks are forked from multiprocessing's fork server, which imports RANK_PRELOAD once (importing torch starts
    no thread pool of torch's own; each rank sets one intra-op thread first). Each rank still sets up its own
    process group, signal handlers and threads, as under torchrun, and gets the test's working directory and
    sys.path at each start. PILLSNAP_TEST_RANK_START=spawn starts each rank in a new interpreter instead
    (bench/ddp_test_starts.py).

    What a forked rank takes from the server, as it was when the server started (at the session's first rank start,
    maybe inside another test): the environment, stdout and stderr, the signals ignored. So a test that sets
    environment variables for its ranks (`monkeypatch`) or reads what they write (`capfd`) passes
    own_interpreter=True and gets "spawn". A forked rank's parent is the server, not pytest: if pytest is killed, its
    ranks are not sent the SIGINT torch asks for at their parent's death, and a pair stuck in a collective waits out
    its timeout."""
    import multiprocessing
    import os
    import time

    import pytest
    import torch.multiprocessing as mp

    method = "spawn" if own_interpreter else os.environ.get("PILLSNAP_TEST_RANK_START", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"PILLSNAP_TEST_RANK_START must be forkserver or spawn, got {method!r}")
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts: the first start
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the ranks were still running after {timeout:.0f} s: they wait on each other")


class ColourDataset(Dataset):
    """Class k is a noisy image whose channel means encode k: learnable in a few steps by a tiny model."""

    def __init__(self, n_per_class: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        codes = torch.tensor([[1, -1, 0], [-1, 1, 0], [0, -1, 1], [1, 1, -1]], dtype=torch.float32)
        self.y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
        noise = torch.randn(len(self.y), 3, size, size, generator=g)
        self.x = noise * 0.5 + codes[self.y][:, :, None, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.x[i], int(self.y[i]), f"img_{i}.png"

    def evaluation_view(self, per_class: int | None = None, seed: int = 0) -> ColourDataset:
        """Unaugmented already; the first `per_class` images of each class."""
        view = copy.copy(self)
        if per_class is not None:
            keep = torch.cat([torch.nonzero(self.y == c).flatten()[:per_class] for c in range(NUM_CLASSES)])
            view.x, view.y = self.x[keep], self.y[keep]
        return view


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    xs, ys, paths = zip(*items, strict=True)
    info = {"image_path": list(paths), "mapping_code": [f"K-{y:06d}" for y in ys]}
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), info


def fake_meta() -> dict:
    names = [f"K-{i:06d}" for i in range(NUM_CLASSES)]
    return {"num_classes": NUM_CLASSES, "class_names": names, "class_weights": None, "stage": 1,
            "class_map": {c: {"index": i, "mapping_code": c, "name": f"drug {i}"} for i, c in enumerate(names)}}


def fake_build_loaders(cfg: DictConfig) -> Loaders:
    """Classification loaders only, at model.image_size, batch train.batch_size (48 train, 16 val images)."""
    size = int(cfg.model.image_size)
    train = DataLoader(ColourDataset(12, size, seed=1), batch_size=int(cfg.train.batch_size), shuffle=True,
                       drop_last=True, collate_fn=collate, num_workers=0)
    val = DataLoader(ColourDataset(4, size, seed=2), batch_size=8, shuffle=False, collate_fn=collate)
    return Loaders(train, val, None, None, None, None, fake_meta())


def fake_det_batch(rng: np.random.Generator, batch_size: int = 4, size: int = 64) -> dict:
    """An ultralytics-style batch: bright rectangles ("pills") on a grey background, one class."""
    imgs = np.full((batch_size, 3, size, size), 110, dtype=np.uint8)
    cls, boxes, idx = [], [], []
    for b in range(batch_size):
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.integers(size // 6, size // 3, size=2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            imgs[b, :, y:y + h, x:x + w] = rng.integers(180, 255, size=(3, 1, 1))
            boxes.append([(x + w / 2) / size, (y + h / 2) / size, w / size, h / size])
            cls.append([0.0])
            idx.append(b)
    return {"img": torch.from_numpy(imgs), "cls": torch.tensor(cls), "bboxes": torch.tensor(boxes, dtype=torch.float32),
            "batch_idx": torch.tensor(idx, dtype=torch.float32), "im_file": [f"{i}.png" for i in range(batch_size)],
            "ori_shape": [(size, size)] * batch_size, "resized_shape": [(size, size)] * batch_size}


def batch_loader(batches: list[dict]) -> DataLoader:
    """A DataLoader that serves ready-made detection batches (so DDP can shard it like a real one)."""
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def loaders_with_detection(cfg: DictConfig, det_batches: int = 3) -> Loaders:
    """fake_build_loaders plus detection loaders of `det_batches` fake batches of 2 images at 64 px."""
    loaders = fake_build_loaders(cfg)
    rng = np.random.default_rng(3)
    train = batch_loader([fake_det_batch(rng, 2) for _ in range(det_batches)])
    return loaders._replace(det_train=train, det_val=batch_loader([fake_det_batch(rng, 2)]))


def make_cfg(exp_dir: Path, *overrides: str) -> DictConfig:
    """The repo config shrunk to a CPU-sized run (tiny timm model, 32 px, 2 epochs; yolo11n at 64 px)."""
    base = [
        f"paths.exp_dir={exp_dir}", "model.backbone=test_efficientnet", "model.image_size=32",
        "train.strategy=classification", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2",
        "train.step_log_interval=2", "train.oom.cooldown_sec=0", "train.ema.decay=0.9", "train.lr=0.01",
        "dataloader.num_workers=0", "train.early_stopping.patience=50", "model.detector=yolo11n",
        "model.det_image_size=64", "train.detection.batch_size=2", "train.stage_evaluation=false",
        "inference.imprint.enabled=false",  # colour blocks have no imprint to read
    ]
    return load_config(ROOT / "config.yaml", [*base, *overrides], dotenv_path=None)



class StoppingLoader:
    """Delegates to a loader; when the n-th batch of the run is requested, calls `stop(n)` (which raises: a kill,
    Ctrl-C, a SIGTERM) instead of yielding it."""

    def __init__(self, loader, at: int, stop: Callable[[int], None]) -> None:
        self.loader, self.at, self.stop, self.served = loader, at, stop, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.served += 1
            if self.served == self.at:
                self.stop(self.served)
            yield batch


class StandInEvidence:
    """Stands in for a predictor's evidence step (pillsnap.infer.evidence.Evidence): a subclass gives read(crop,
    topk); the pills of a photo are read through Evidence's own read_all, one after another."""

    parallel = 1
    read_all = Evidence.read_all
