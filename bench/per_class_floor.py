"""The stage evaluation's per-class floor (Stage 4: every class's top-1 accuracy at least 0.85) at the design's
validation sizes, on simulated classifiers whose true per-class accuracies are known: the lowest observed class
accuracy (the former figure) against the lowest empirical-Bayes shrunken accuracy (`metrics.classification.
shrunken_rates`, the figure the gate reads now), the same draws in the same run.

    .venv/bin/python bench/per_class_floor.py [--classes 5000 --crops 15 --draws 20] [--crops-range 3 27]

Each scenario draws every class's right answers from a binomial of its crops and its true accuracy; the table gives
the mean over the draws (and the range), and how often each figure passes 0.85.
"""

from __future__ import annotations

import argparse

import numpy as np

from pillsnap.metrics.classification import shrunken_rates


def scenarios(classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    few = max(1, classes // 100)  # 1 % of the classes
    return {
        "every class 0.97": np.full(classes, 0.97),
        "every class 0.92": np.full(classes, 0.92),
        "every class 0.88": np.full(classes, 0.88),
        "every class 0.80": np.full(classes, 0.80),
        f"0.97, {few} classes at 0.60": np.r_[np.full(classes - few, 0.97), np.full(few, 0.60)],
        "0.97, 10 classes at 0.75": np.r_[np.full(classes - 10, 0.97), np.full(10, 0.75)],
        "uniform 0.85-1.00": rng.uniform(0.85, 1.0, classes),
        "uniform 0.70-1.00": rng.uniform(0.70, 1.0, classes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--crops", type=int, default=15, help="validation crops per class (Stage 4: ~15)")
    parser.add_argument("--crops-range", type=int, nargs=2, metavar=("LOW", "HIGH"),
                        help="crops per class drawn uniformly in [LOW, HIGH] instead of --crops for every class")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.crops_range:
        low, high = args.crops_range
        crops = rng.integers(low, high + 1, args.classes)  # combination crops fall on some drugs only
        shape = f"{low}-{high} (mean {crops.mean():.1f})"
    else:
        crops, shape = np.full(args.classes, args.crops), str(args.crops)
    print(f"{args.classes:,} classes x {shape} validation crops, {args.draws} draws, target {args.target}")
    print("| true accuracies | true lowest | lowest observed (before) | passes | lowest shrunken (now) | passes |")
    print("|---|---|---|---|---|---|")
    for name, truth in scenarios(args.classes, rng).items():
        observed, shrunk = [], []
        for _ in range(args.draws):
            right = rng.binomial(crops, truth)
            observed.append((right / crops).min())
            shrunk.append(shrunken_rates(right, crops).min())
        observed, shrunk = np.array(observed), np.array(shrunk)
        print(f"| {name} | {truth.min():.2f} | {observed.mean():.3f} ({observed.min():.3f}-{observed.max():.3f}) | "
              f"{np.mean(observed >= args.target):.2f} | {shrunk.mean():.3f} ({shrunk.min():.3f}-{shrunk.max():.3f}) "
              f"| {np.mean(shrunk >= args.target):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
