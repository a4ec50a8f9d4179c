"""The demo's classifier trained alone with our ColorJitter (the hue turned through OpenCV) and with torchvision's
own, over the same seeds, in the same run, on a demo work directory's data: validation figures side by side.

The two draw the same factors from the same random numbers and differ by under a grey level a pixel, so training
should not tell them apart beyond the run-to-run noise of ~130 validation crops; this bench says whether it does.
Each arm and seed is one training run of the demo profile's classifier (bench/demo_arms.py), the arms' order
alternating from seed to seed.

    pillsnap demo --workdir runs/demo          # once: data, manifests and cache
    .venv/bin/python bench/jitter_ab.py --workdir runs/demo --seeds 42 1
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from demo_classifier_recipe import FIGURES, run_arm
from torchvision import transforms as T

from pillsnap.data import datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="a demo work directory (data, manifests, cache)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1], help="train.seed of each round")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    if not (workdir / "manifests" / "manifest.parquet").is_file():
        raise SystemExit(f"{workdir} has no manifests: run `pillsnap demo --workdir {args.workdir}` first")
    ours = datasets.ColorJitter
    jitters = {"ours (OpenCV hue)": ours, "torchvision": T.ColorJitter}
    results: dict[str, list[dict]] = {arm: [] for arm in jitters}
    for index, seed in enumerate(args.seeds):
        for arm in (list(jitters) if index % 2 == 0 else list(reversed(jitters))):
            datasets.ColorJitter = jitters[arm]  # what classification_transform builds the training jitter from
            try:
                figures = run_arm(workdir, [], seed)
            finally:
                datasets.ColorJitter = ours
            results[arm].append(figures)
            print(f"seed {seed} {arm:>17}: best epoch {figures['best_epoch']} "
                  + " ".join(f"{key}={figures[key]:.3f}" for key in FIGURES), flush=True)
    means = {arm: {key: statistics.mean(r[key] for r in rows) for key in FIGURES} for arm, rows in results.items()}
    for arm in jitters:
        print(f"mean over {len(args.seeds)} seeds, {arm:>17}: "
              + " ".join(f"{k}={means[arm][k]:.3f}" for k in FIGURES))
    base, new = means["torchvision"], means["ours (OpenCV hue)"]
    print("ours / torchvision: " + " ".join(f"{k}={new[k] / base[k]:.3f}x" for k in FIGURES))


if __name__ == "__main__":
    main()
