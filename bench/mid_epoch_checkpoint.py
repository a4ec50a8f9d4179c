"""What a kill costs a long epoch, and what a checkpoint inside it costs (train.checkpoint_interval_minutes).

1. Work lost, rehearsed with the real trainer on CPU: a tiny classifier trains epochs of `--steps` steps in a child
   process that is killed with SIGKILL `--kill-at` of the way through its second epoch; a second child resumes it with
   train.resume=last. The baseline saves at epoch ends only (train.checkpoint_interval_minutes=0), then the same run
   saves inside the epoch as well, `--saves` times an epoch (the interval is set from an unbroken run's epoch time,
   measured first). Prints the steps each resumed run redid and their ratio, the unbroken runs' time with and without
   the saves, and whether the resumed weights equal the unbroken run's.
2. A save at the design's sizes: EfficientNetV2-S for 5,000 drugs and YOLO11m, each with its AdamW state and EMA,
   committed as one generation (what every save writes) `--repeats` times, in `--dir`; prints the median seconds and
   their share of the default 30 min interval.

    .venv/bin/python bench/mid_epoch_checkpoint.py [--steps 60 --kill-at 0.7 --saves 6] [--repeats 3 --dir .]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, IMAGES = 8, 64


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


# ---- part 1: a child process trains, is killed, resumes ---------------------------------------------------------
def child(spec: dict) -> None:
    """One training run (the bench calls itself with --child): prints the (epoch, step) of every step it trained."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pillsnap.config import load_config
    from pillsnap.data.loaders import Loaders
    from pillsnap.data.samplers import EpochSampler
    from pillsnap.engine import run_training

    torch.set_num_threads(1)

    class Colours(Dataset):
        """Class k: noise around a colour of its own, with a random brightness drawn at each read (augmentation)."""

        def __init__(self, n: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.y = torch.arange(n) % 4
            self.x = torch.randn(n, 3, IMAGES, IMAGES, generator=g) * 0.5 + self.y[:, None, None, None] / 2

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int):
            return self.x[i] + 0.2 * torch.randn(1, 1, 1), int(self.y[i])

    def collate(items):
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs), torch.tensor(ys), {"image_path": [""] * len(ys), "mapping_code": [""] * len(ys)}

    def build(cfg):
        train = Colours(spec["steps"] * BATCH, seed=1)
        meta = {"num_classes": 4, "class_names": [f"K-{i:06d}" for i in range(4)], "class_weights": None, "stage": 1,
                "class_map": {f"K-{i:06d}": {"index": i, "mapping_code": f"K-{i:06d}"} for i in range(4)}}
        return Loaders(DataLoader(train, BATCH, sampler=EpochSampler(train, seed=7), collate_fn=collate),
                       DataLoader(Colours(16, seed=2), BATCH, collate_fn=collate), None, None, None, None, meta)

    trained: list[tuple[int, int]] = []

    class Steps:
        def __getattr__(self, name):
            return lambda *args: None

        def on_step_end(self, record: dict) -> None:
            trained.append((record["epoch"], record["step"], time.perf_counter()))
            if record["global_step"] == spec.get("kill_at_global_step"):
                print(json.dumps(trained), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # a kill -9: nothing is saved on the way out

    overrides = [f"paths.exp_dir={spec['exp']}", "model.backbone=test_efficientnet", f"model.image_size={IMAGES}",
                 "train.strategy=classification", "train.epochs=2", f"train.batch_size={BATCH}",
                 "train.warmup_steps=2", "train.step_log_interval=1", "dataloader.num_workers=0",
                 "train.stage_evaluation=false", f"train.checkpoint_interval_minutes={spec['interval_min']}",
                 *(["train.resume=last"] if spec.get("resume") else [])]
    cfg = load_config(REPO / "config.yaml", overrides, dotenv_path=None)
    code, _ = run_training(cfg, build, callbacks=[Steps()])
    print(json.dumps(trained), flush=True)
    sys.exit(code)


def run_child(spec: dict) -> tuple[list[tuple[int, int]], float]:
    """The (epoch, step) of every step the child trained, and the seconds from its first step to its last."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if not lines:
        raise SystemExit(f"the training child failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    trained = json.loads(lines[-1])
    return [(epoch, step) for epoch, step, _ in trained], trained[-1][2] - trained[0][2]


def redone(exp: Path, steps: int, kill_step: int, interval_min: float) -> int:
    """Kill a run at (epoch 2, kill_step), resume it; the steps of epoch 2 it trained twice."""
    run_child({"exp": str(exp), "steps": steps, "interval_min": interval_min, "kill_at_global_step": steps + kill_step})
    trained, _ = run_child({"exp": str(exp), "steps": steps, "interval_min": interval_min, "resume": True})
    first = next(step for epoch, step in trained if epoch == 2)
    return kill_step - (first - 1)


def same_weights(a: Path, b: Path) -> bool:
    import torch

    from pillsnap.utils import load_ckpt

    mine, theirs = (load_ckpt(p / "checkpoints" / "last.pt")["model_state"] for p in (a, b))
    return all(torch.equal(mine[k], theirs[k]) for k in theirs)


def work_lost(args: argparse.Namespace, work: Path) -> None:
    _, plain = run_child({"exp": str(work / "unbroken_plain"), "steps": args.steps, "interval_min": 0})
    interval_min = plain / 2 / args.saves / 60
    _, saving = run_child({"exp": str(work / "unbroken"), "steps": args.steps, "interval_min": interval_min})
    kill_step = max(1, round(args.kill_at * args.steps))
    base = redone(work / "killed_plain", args.steps, kill_step, 0)
    now = redone(work / "killed", args.steps, kill_step, interval_min)
    print(f"work lost: epochs of {args.steps} steps (~{plain / 2:.2f} s of training each); SIGKILL at step "
          f"{kill_step} of epoch 2")
    print(f"  epoch ends only (baseline): {base} steps redone")
    print(f"  a save every {interval_min * 60:.2f} s ({args.saves} an epoch): {now} steps redone "
          f"({now / max(base, 1):.2f}x)")
    log = (work / "unbroken" / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    print(f"  training time of the unbroken run with its {log.count('checkpoint inside epoch')} saves inside "
          f"epochs: {saving:.2f} s vs {plain:.2f} s without ({saving / plain:.2f}x; a tiny model saved every "
          f"{interval_min * 60:.2f} s: the design-size cost is below)")
    print(f"  resumed weights equal the unbroken run's: {same_weights(work / 'killed', work / 'unbroken')}")


# ---- part 2: a save at the design's sizes -----------------------------------------------------------------------
def with_adamw_state(model) -> dict:  # noqa: ANN001
    """The state AdamW keeps for `model` after a step (two moments a parameter), made without a forward pass."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt.state_dict()


def task_state(model, epoch: int) -> dict:  # noqa: ANN001
    import copy

    return {"model_state": model.state_dict(), "optimizer_state": with_adamw_state(model), "scheduler_state": {},
            "scaler_state": {}, "epoch": epoch, "best_metric": None, "config_snapshot": {},
            "ema_state": copy.deepcopy(model).state_dict(), "global_step": 0, "progress": {"epoch": epoch + 1}}


def save_cost(args: argparse.Namespace) -> None:
    import timm

    from pillsnap.engine.checkpointing import CheckpointStore, Save
    from pillsnap.utils.offline import ultralytics_offline

    ultralytics_offline()
    from ultralytics import YOLO

    classifier = timm.create_model("tf_efficientnetv2_s", pretrained=False, num_classes=5000)
    detector = YOLO("yolo11m.yaml").model
    saves = [Save("classification", ("last",), task_state(classifier, 3), {"last": "last.pt"}),
             Save("detection", ("last",), task_state(detector, 3))]
    folder = Path(tempfile.mkdtemp(prefix="pillsnap_save_", dir=args.dir))
    try:
        store, times = CheckpointStore(folder), []
        for _ in range(args.repeats):
            start = time.perf_counter()
            store.commit(3, saves)
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in folder.glob("*_last.pt")) / 2**20
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    median = statistics.median(times)
    print(f"a save at the design's sizes (EfficientNetV2-S x 5,000 drugs + YOLO11m, AdamW and EMA): {size:.0f} MiB, "
          f"median {median:.2f} s of {args.repeats} in {args.dir}")
    print(f"  share of the default 30 min interval: {median / 1800:.4f} ({100 * median / 1800:.2f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=60, help="steps an epoch (default 60)")
    parser.add_argument("--kill-at", type=fraction, default=0.7, help="where in epoch 2 the kill comes (0-1)")
    parser.add_argument("--saves", type=positive_int, default=6, help="saves an epoch with the interval on")
    parser.add_argument("--repeats", type=positive_int, default=3, help="design-size saves to time")
    parser.add_argument("--dir", default=".", help="where the design-size saves are written (default: here)")
    parser.add_argument("--skip-sizes", action="store_true", help="only the rehearsal (part 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not Path(args.dir).is_dir():
        parser.error(f"--dir {args.dir}: no such folder")
    with tempfile.TemporaryDirectory(prefix="pillsnap_kill_") as work:
        work_lost(args, Path(work))
    if not args.skip_sizes:
        save_cost(args)


if __name__ == "__main__":
    main()
