"""A/B of the generator's photo variety for the detector: two detectors trained the same way (the demo's detector
settings, detection only) on the same synthetic set -- same classes, layouts and seeds -- one rendered with the
variety off (every photo the real look: synth_style.PLAIN_SHARES) and one with the generator's mix; then both are
scored by bench/detector_transfer.py on its held-out plain and hard photos. Prints both and the ratios varied / plain.

    .venv/bin/python bench/detector_transfer_ab.py [--workdir /tmp/det_ab --epochs 20 --combo 120 --photos 48]

Each arm's data and run stay under --workdir; an arm whose detector is there is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from bench_synth import plain_style
from detector_transfer import HARD_SHARES, PLAIN_SHARES, evaluate, render_set

from pillsnap.config import load_config
from pillsnap.data.scan import scan_dataset
from pillsnap.data.synth import generate_dataset
from pillsnap.demo import PROFILES
from pillsnap.engine import run_training
from pillsnap.engine.detection import DetectionTask


def build_arm(work: Path, plain: bool, args: argparse.Namespace) -> tuple[Path, float]:
    """(experiment folder, seconds spent) of one arm: data, scan, detection-only training."""
    start = time.perf_counter()
    data, manifests, exp = work / "data", work / "manifests", work / "exp"
    if (exp / "checkpoints" / "detection_best.pt").is_file():
        return exp, 0.0
    with plain_style() if plain else contextlib.nullcontext():
        generate_dataset(data, args.classes, args.per_class, args.combo, seed=0, image_scale=args.scale, workers=1,
                         progress=False)
    scan_dataset(data, manifests, workers=1, progress=False)
    overrides = [*PROFILES["default"]["overrides"], f"train.epochs={args.epochs}", "train.stage_evaluation=false",
                 f"paths.data_root={data}", f"paths.manifest_dir={manifests}", f"paths.exp_dir={exp}",
                 f"paths.cache_dir={work / 'cache'}", *args.overrides]
    code, _ = run_training(load_config("config.yaml", overrides, dotenv_path=None), task_types=(DetectionTask,))
    if code:
        raise SystemExit(f"training {work.name} failed with exit code {code}")
    return exp, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/det_ab")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=6, help="single-pill photos per class")
    parser.add_argument("--combo", type=int, default=120)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--photos", type=int, default=48, help="held-out photos per test set")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for both arms (KEY=VALUE)")
    args = parser.parse_args()
    work = Path(args.workdir)
    arms = {name: build_arm(work / name, name == "plain", args) for name in ("plain", "varied")}
    sets = {"plain": render_set(PLAIN_SHARES, args.photos, 0.5, 0),
            "hard": render_set(HARD_SHARES, args.photos, 0.5, 1)}
    result = {name: {**evaluate(str(exp), sets, None, "cpu"), "build_seconds": round(sec, 1)}
              for name, (exp, sec) in arms.items()}
    result["varied_vs_plain"] = {s: {k: round(result["varied"][s][k] / max(result["plain"][s][k], 1e-9), 3)
                                     for k in ("recall@0.5", "precision")} for s in sets}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
