"""Training-step overhead: PillSnap's loop (task + callbacks) vs a bare PyTorch loop, and an RSS leak check.

Same model, batch, data and optimizer settings in both loops; runs alternate. Rates are images per second of
this process's CPU time (time.process_time): on a CPU shared with other jobs wall time mostly measures the
neighbours, CPU time measures the loop. Use --clock wall on a dedicated machine or GPU.
Then a 6-epoch trainer run records process RSS after epochs 2 and 5 (seed memory-leak check).

    .venv/bin/python bench/train_overhead.py [--backbone resnet18 --size 64 --batch 16 --steps 15 --rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, TensorDataset

from pillsnap.config import load_config
from pillsnap.data.loaders import Loaders
from pillsnap.engine import main as train_main
from pillsnap.engine.callbacks import default_callbacks
from pillsnap.engine.classification import ClassificationTask
from pillsnap.engine.loop import EpochRunner
from pillsnap.engine.optim import build_optimizer, build_scheduler
from pillsnap.utils import TBWriter, set_seed

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
CLOCK = time.process_time


def collate(items: list) -> tuple:
    x, y = zip(*items, strict=True)
    return torch.stack(x), torch.stack(y), {"image_path": [""] * len(x), "mapping_code": [""] * len(x)}


def make_loader(n: int, size: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate)


def make_cfg(exp_dir: Path, args: argparse.Namespace, epochs: int = 1) -> object:
    # EMA and clipping off: the bare loop has neither, and we measure the loop, not extra features.
    return load_config(ROOT / "config.yaml", [
        f"paths.exp_dir={exp_dir}", f"model.backbone={args.backbone}", f"model.image_size={args.size}",
        f"train.batch_size={args.batch}", f"train.epochs={epochs}", "train.ema.enabled=false", "train.grad_clip=null",
        "train.strategy=classification", "train.step_log_interval=10", "optimization.channels_last=false",
        "dataloader.num_workers=0"], dotenv_path=None)


def bare_epoch(cfg: object, loader: DataLoader, steps: int) -> float:
    """The textbook loop: forward, CE, backward, AdamW step, zero_grad, scheduler step. Returns img/s."""
    import timm

    set_seed(0)
    model = timm.create_model(str(cfg.model.backbone), num_classes=NUM_CLASSES)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.label_smoothing))
    opt = build_optimizer(model.parameters(), float(cfg.train.lr), float(cfg.train.weight_decay))
    sched = build_scheduler(str(cfg.train.scheduler), opt, steps, int(cfg.train.warmup_steps))
    seen, start = 0, CLOCK()
    for i, (x, y, _) in enumerate(loader):
        if i == steps:
            break
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seen += len(y)
        _ = loss.item()
    return seen / (CLOCK() - start)


def our_epoch(cfg: object, loader: DataLoader, steps: int, exp_dir: Path) -> float:
    """ClassificationTask.train_step driven by the trainer's EpochRunner with its default callbacks."""
    set_seed(0)
    meta = {"num_classes": NUM_CLASSES, "class_weights": None}
    tb = TBWriter(exp_dir)
    task = ClassificationTask(cfg, loader, None, meta, "cpu")
    import logging

    callbacks = default_callbacks(exp_dir, logging.getLogger("bench"), tb, 0.8)
    runner = EpochRunner({"classification": task}, cfg, callbacks=callbacks)
    cfg.train.max_steps_per_epoch = steps
    start = CLOCK()
    runner.train_one_epoch(1, ["classification"])
    rate = steps * loader.batch_size / (CLOCK() - start)
    cfg.train.max_steps_per_epoch = None
    tb.close()
    return rate


class RssProbe:
    """Loader wrapper that records process RSS (MB) each time an epoch starts iterating it."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.rss = loader, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.rss.append(psutil.Process().memory_info().rss / 2**20)
        return iter(self.loader)


def rss_check(args: argparse.Namespace, tmp: Path) -> tuple[float, float]:
    probe = RssProbe(make_loader(args.batch * args.steps, args.size, args.batch))
    val = make_loader(args.batch * 4, args.size, args.batch)
    meta = {"num_classes": NUM_CLASSES, "class_names": [f"K-{i:06d}" for i in range(NUM_CLASSES)],
            "class_map": {}, "class_weights": None}
    cfg = make_cfg(tmp / "rss", args, epochs=6)
    train_main(cfg, lambda _cfg: Loaders(probe, val, None, None, None, None, meta))
    # probe.rss[k] is taken when epoch k+1 starts, i.e. after epoch k: [2] = after epoch 2, [5] = after epoch 5.
    return probe.rss[2], probe.rss[5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cfg = make_cfg(tmp / "exp", args)
        loader = make_loader(args.batch * args.steps, args.size, args.batch)
        bare_epoch(cfg, loader, 3)  # warm-up (allocator, kernels) outside the timing
        bare, ours = [], []
        for r in range(args.rounds):
            bare.append(bare_epoch(cfg, loader, args.steps))
            ours.append(our_epoch(cfg, loader, args.steps, tmp / f"exp{r}"))
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"model={args.backbone} size={args.size} batch={args.batch} steps={args.steps} rounds={args.rounds} "
              f"threads={args.threads} clock={args.clock} device=cpu")
        print(f"bare PyTorch loop : median {b:8.1f} img/s, best {max(bare):8.1f}  "
              f"(runs: {', '.join(f'{v:.1f}' for v in bare)})")
        print(f"PillSnap loop     : median {o:8.1f} img/s, best {max(ours):8.1f}  "
              f"(runs: {', '.join(f'{v:.1f}' for v in ours)})")
        # On a shared CPU the best run is the least disturbed one; both estimators are printed.
        print(f"ratio ours/bare   : median {o / b:.3f}, best {max(ours) / max(bare):.3f}  (goal >= 0.95)")
        rss2, rss5 = rss_check(args, tmp)
        print(f"RSS after epoch 2 : {rss2:.1f} MB; after epoch 5: {rss5:.1f} MB; growth {rss5 - rss2:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
