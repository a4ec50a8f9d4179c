"""The demo's classifier training reading its crops from the crop cache (data.cache.enabled, as the demo profile
now does) against decoding and cutting each photo at every step (the profile before), in the same run, on a demo
work directory's data.

Each arm trains the demo profile's classifier alone (train.strategy=classification, same seed, no work after
training) for `--epochs` into a scratch folder; the cache arm starts from an empty cache folder each round, so its
time includes building the cache. Rounds alternate the arms (the machine is shared and noisy) and the median of
each is compared. The cache holds each crop resized exactly as the photo path resizes it, so both arms must end
with the same validation figures: the bench says so or fails.

    pillsnap demo --workdir runs/demo          # once: data and manifests
    .venv/bin/python bench/demo_crop_cache.py --workdir runs/demo --epochs 4 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from demo_arms import train_in_scratch

ARMS = {"photos": False, "cache": True}


def run_arm(workdir: Path, cache: bool, epochs: int) -> tuple[float, dict]:
    """Seconds from building the loaders (and the cache) to the last epoch's end, and its validation figures."""
    seconds, epochs_seen = train_in_scratch(workdir, settings={
        "paths.cache_dir": "{scratch}/cache", "data.cache.enabled": cache, "train.epochs": epochs})
    return seconds, {key: round(float(epochs_seen[-1][key]), 6) for key in ("val_loss", "acc", "macro_f1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="a demo work directory (its data and manifests)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs each arm trains (the demo trains 36)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each training both arms")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    if not (workdir / "manifests" / "manifest.parquet").is_file():
        raise SystemExit(f"{workdir} has no manifests: run `pillsnap demo --workdir {args.workdir}` first")
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    figures: dict[str, dict] = {}
    for round_ in range(args.rounds):
        order = list(ARMS) if round_ % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            seconds, figures[arm] = run_arm(workdir, ARMS[arm], args.epochs)
            times[arm].append(seconds)
            print(f"round {round_ + 1} {arm:>6}: {seconds:6.1f} s  validation {figures[arm]}", flush=True)
    median = {arm: statistics.median(values) for arm, values in times.items()}
    print(f"training {args.epochs} epochs (median of {args.rounds}): photos {median['photos']:.1f} s, "
          f"cache {median['cache']:.1f} s (building it included) -> {median['photos'] / median['cache']:.2f}x")
    same = figures["photos"] == figures["cache"]
    print("validation figures after the last epoch: " + ("the same both ways" if same else
                                                          f"DIFFER: {figures}"))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
