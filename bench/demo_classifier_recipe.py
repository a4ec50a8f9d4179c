"""The demo's classifier trained alone with its profile's settings (the baseline) and with overrides (the variant),
each over the same seeds, in the same run, on a demo work directory's data: validation figures side by side.

Each arm trains the demo profile's classifier (train.strategy=classification, no work after training) for the
profile's epochs into a scratch folder, reading the crops from the work directory's crop cache; seeds alternate the
arms' order. Per arm and seed: the best epoch by macro-F1 with its accuracy and macro-F1, the lowest validation
loss, and the mean accuracy and loss of the last 5 epochs (less noisy than one best epoch on ~130 crops); then the
means over the seeds and the variant's over the baseline's. Validation loss compares only between arms with the same
loss.label_smoothing.

    pillsnap demo --workdir runs/demo          # once: data, manifests and cache
    .venv/bin/python bench/demo_classifier_recipe.py --workdir runs/demo --variant train.lr=4.0e-3 --seeds 42 1
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from demo_arms import train_in_scratch

FIGURES = ("best_acc", "best_f1", "min_val_loss", "last5_acc", "last5_loss", "seconds")


def run_arm(workdir: Path, overrides: list[str], seed: int) -> dict:
    """One training run's validation figures (see the module's docstring) and its seconds."""
    seconds, epochs = train_in_scratch(workdir, [*overrides, f"train.seed={seed}"])
    best = max(epochs, key=lambda e: e["macro_f1"])
    last = epochs[-5:]
    return {"best_epoch": epochs.index(best) + 1, "best_acc": best["acc"], "best_f1": best["macro_f1"],
            "min_val_loss": min(e["val_loss"] for e in epochs),
            "last5_acc": statistics.mean(e["acc"] for e in last),
            "last5_loss": statistics.mean(e["val_loss"] for e in last), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="a demo work directory (data, manifests, cache)")
    parser.add_argument("--variant", nargs="+", required=True, metavar="KEY=VALUE",
                        help="overrides of the variant arm (the baseline is the demo profile as it is)")
    parser.add_argument("--baseline", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the baseline arm (default: none, the profile as it is)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1], help="train.seed of each round")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    if not (workdir / "manifests" / "manifest.parquet").is_file():
        raise SystemExit(f"{workdir} has no manifests: run `pillsnap demo --workdir {args.workdir}` first")
    arms = {"baseline": args.baseline, "variant": args.variant}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for index, seed in enumerate(args.seeds):
        for arm in (list(arms) if index % 2 == 0 else list(reversed(arms))):
            figures = run_arm(workdir, arms[arm], seed)
            results[arm].append(figures)
            print(f"seed {seed} {arm:>8} {' '.join(arms[arm]) or '(profile)'}: best epoch {figures['best_epoch']} "
                  + " ".join(f"{key}={figures[key]:.3f}" for key in FIGURES), flush=True)
    means = {arm: {key: statistics.mean(r[key] for r in rows) for key in FIGURES} for arm, rows in results.items()}
    for arm in arms:
        print(f"mean over {len(args.seeds)} seeds, {arm:>8}: " + " ".join(f"{k}={means[arm][k]:.3f}" for k in FIGURES))
    print("variant / baseline: " + " ".join(f"{k}={means['variant'][k] / means['baseline'][k]:.3f}x"
                                              for k in FIGURES))


if __name__ == "__main__":
    main()
