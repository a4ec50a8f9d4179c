"""Stage selection at the real data's size: `select_stage` now against its version at a baseline revision (read from
git), each in a fresh child process, the two alternating, on a manifest in the real schema with the real data's
2.6 M rows over 5,000 drugs. Prints the time to select each stage, the child's peak RSS, and whether both versions
chose the same rows in the same order (a hash of the whole frame, row by row).

    .venv/bin/python bench/stage_selection.py --baseline-ref HEAD~1 [--rows 2600000 --classes 5000 --stages 1,4]

The manifest is the scan's own output of a small generated data set (placeholder photos, the generator's real label
JSON, the real splits and box checks), tiled to --rows: each copy's drugs renamed so that the copies hold --classes
drugs, its photo ids and paths made its own. It is written in row groups of --row-group rows, as the scan writes one
per part. Every stage selects, trains on and evaluates from this frame: the loaders, the calibration, the stage
evaluation and the final test each select it again in a run's process.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_manifest(work: Path, rows: int, classes: int, row_group: int) -> Path:
    """A manifest of `rows` rows over `classes` drugs under work/manifests (see the module's docstring)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pillsnap.data.scan import load_manifest, scan_dataset
    from pillsnap.data.scan_chunk import MANIFEST_SCHEMA
    from pillsnap.data.synth import generate_dataset

    generate_dataset(work / "data", 20, 30, 60, seed=0, zip_output=True, image_scale=0.04, workers=1,
                     progress=False, placeholder_images=True)
    scan_dataset(work / "data", work / "small", workers=1, progress=False)
    small = load_manifest(work / "small")
    codes = sorted(small["mapping_code"].unique())
    per_code = math.ceil(classes / len(codes))  # each drug of the small set stands for this many
    base = small["mapping_code"].map({c: i for i, c in enumerate(codes)}).to_numpy() * per_code
    out = work / "manifests"
    out.mkdir(parents=True, exist_ok=True)
    copies = math.ceil(rows / len(small))
    with pq.ParquetWriter(out / "manifest.parquet", MANIFEST_SCHEMA) as writer:
        pending, written = [], 0
        for copy in range(copies):
            frame = small.copy()
            frame["mapping_code"] = [f"K-{b + copy % per_code:06d}" for b in base]
            for column in ("image_path", "label_path", "photo_id", "split_group"):
                frame[column] = frame[column] + f"_{copy}"
            pending.append(frame)
            if sum(map(len, pending)) >= row_group or copy == copies - 1:
                chunk = pd.concat(pending, ignore_index=True).head(rows - written)
                writer.write_table(pa.Table.from_pandas(chunk[MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA,
                                                        preserve_index=False))
                written += len(chunk)
                pending = []
    shutil.copy(work / "small" / "class_map.json", out / "class_map.json")
    return out


def child(args: argparse.Namespace) -> int:
    """One selection in this process: prints its figures as JSON."""
    import pandas as pd

    from pillsnap.config import load_config
    from pillsnap.data.scan import load_manifest

    spec = importlib.util.spec_from_file_location("stages_under_test", args.module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(ROOT / "config.yaml", [f"paths.manifest_dir={args.manifest_dir}",
                                             f"data.progressive_validation.current_stage={args.stage}"])
    start = time.perf_counter()
    manifest = load_manifest(args.manifest_dir)
    loaded = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    rows = module.select_stage(manifest, cfg)
    seconds = time.perf_counter() - start
    print(json.dumps({"load_s": loaded, "select_s": seconds, "rows": len(rows),
                      "peak_after_load_mib": rss_loaded,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "hash": hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
                      .hexdigest()}))
    return 0


def run_child(module: Path, manifest_dir: Path, stage: int) -> dict:
    command = [sys.executable, __file__, "--child", "--module", str(module), "--manifest-dir", str(manifest_dir),
               "--stage", str(stage)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-ref", default="HEAD", help="git revision of the baseline select_stage")
    parser.add_argument("--rows", type=int, default=2_600_000, help="manifest rows (default: the real data's)")
    parser.add_argument("--classes", type=int, default=5000, help="drugs in the manifest (default: the real 5,000)")
    parser.add_argument("--stages", default="1,4", help="stages to select, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/now pairs per stage, alternating")
    parser.add_argument("--row-group", type=int, default=100_000, help="rows per Parquet row group")
    parser.add_argument("--work-dir", default=None, help="a new folder for the data (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --work-dir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--manifest-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty, and this bench deletes its folder: give a new one")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="stage_selection_"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "stages_baseline.py"
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline_ref}:pillsnap/data/stages.py"],
                           capture_output=True, text=True, check=False)
    if shown.returncode:
        raise SystemExit(f"git show {args.baseline_ref}:pillsnap/data/stages.py failed: {shown.stderr.strip()}")
    baseline.write_text(shown.stdout, encoding="utf-8")
    versions = {"baseline": baseline, "now": ROOT / "pillsnap" / "data" / "stages.py"}
    try:
        start = time.perf_counter()
        manifest_dir = make_manifest(work, args.rows, args.classes, args.row_group)
        print(f"manifest: {args.rows:,} rows, {args.classes:,} drugs ({time.perf_counter() - start:.0f} s to make); "
              f"baseline {args.baseline_ref}")
        print("| stage | stage rows | select s, baseline | select s, now | baseline/now | peak RSS MiB, baseline / now "
              "(after the load alone) | same rows |")
        print("|---|---|---|---|---|---|---|")
        for stage in (int(s) for s in args.stages.split(",")):
            figures: dict[str, list[dict]] = {"baseline": [], "now": []}
            for round_ in range(args.rounds):
                order = ("baseline", "now") if round_ % 2 == 0 else ("now", "baseline")
                for name in order:
                    figures[name].append(run_child(versions[name], manifest_dir, stage))
            mean = {name: sum(f["select_s"] for f in runs) / len(runs) for name, runs in figures.items()}
            peak = {name: max(f["peak_mib"] for f in runs) for name, runs in figures.items()}
            loaded = max(f["peak_after_load_mib"] for runs in figures.values() for f in runs)
            same = len({f["hash"] for runs in figures.values() for f in runs}) == 1
            print(f"| {stage} | {figures['now'][0]['rows']:,} | {mean['baseline']:.1f} | {mean['now']:.1f} | "
                  f"{mean['baseline'] / mean['now']:.2f}x | {peak['baseline']:.0f} / {peak['now']:.0f} "
                  f"({loaded:.0f}) | {'yes' if same else 'NO'} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
