"""The stage evaluation's class balance check at the design's stage sizes, on a synthetic data set in the real AI Hub
layout with the real number of drugs: the largest over the smallest training class counted over the rows the
classifier trains on (`eval/stage_measure.class_imbalance`) against the same ratio over every row of the stage, as
it was counted before (the pills of the stage's combination photos that belong to drugs outside the stage
included), in the same run on the same rows.

    .venv/bin/python bench/stage_class_balance.py [--rows 500000 --classes 5000 --work-dir /tmp/stage_balance]

The photos are placeholders (flat images, the generator's real label JSON); data go under --work-dir and are
deleted at the end unless --keep. The check fails a stage above 10 (`class_balance_verification`).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000, help="label rows of the data set (default: Stage 4's)")
    parser.add_argument("--classes", type=int, default=5000, help="drugs in the data set (default: the real 5,000)")
    parser.add_argument("--combo-share", type=float, default=0.1, help="share of rows from combination photos")
    parser.add_argument("--work-dir", default="/tmp/stage_balance")
    parser.add_argument("--keep", action="store_true", help="keep the data under --work-dir")
    args = parser.parse_args(argv)

    from pillsnap.config import load_config
    from pillsnap.data.scan import load_manifest, scan_dataset
    from pillsnap.data.stages import select_stage
    from pillsnap.data.synth import generate_dataset
    from pillsnap.eval.criteria import ADVISOR
    from pillsnap.eval.stage_measure import class_imbalance

    work = Path(args.work_dir)
    start = time.perf_counter()
    per_class = max(1, round(args.rows * (1 - args.combo_share) / args.classes))
    combos = round(args.rows * args.combo_share / 3.5)  # 3-4 pills per combination photo
    generate_dataset(work / "data", args.classes, per_class, combos, seed=0, zip_output=True, image_scale=0.04,
                     workers=1, progress=False, placeholder_images=True)
    scan_dataset(work / "data", work / "manifests", workers=2, progress=False)
    manifest = load_manifest(work / "manifests")
    print(f"{len(manifest):,} rows, {manifest['mapping_code'].nunique():,} drugs "
          f"({time.perf_counter() - start:.0f} s to generate and scan)")
    print(f"| stage | stage rows | train rows of drugs outside the stage | ratio over every row (before) | "
          f"ratio over the classifier's rows (now) | check (<= {ADVISOR.max_class_imbalance:g}) before / now |")
    print("|---|---|---|---|---|---|")
    for stage in (1, 2, 3, 4):
        cfg = load_config(ROOT / "config.yaml", [f"paths.manifest_dir={work / 'manifests'}",
                                                 f"data.progressive_validation.current_stage={stage}"])
        rows = select_stage(manifest, cfg)
        train = rows[rows["split"] == "train"]
        counts = train["mapping_code"].value_counts()
        before, now = float(counts.max() / counts.min()), class_imbalance(rows)
        verdict = ["pass" if r <= ADVISOR.max_class_imbalance else "FAIL" for r in (before, now)]
        print(f"| {stage} | {len(rows):,} | {int((~train['stage_class']).sum()):,} | {before:.1f} | {now:.2f} | "
              f"{verdict[0]} / {verdict[1]} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
