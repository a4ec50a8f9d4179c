"""Memory each DataLoader worker makes its own while it reads a stage's classification rows: the dataset as it is
now (rows kept column by column, `data.datasets.CropTable`) against the dataset at a git revision (by default
HEAD), each in a fresh interpreter on the same synthetic rows.

Workers are forked from the trainer and share its memory until they write to it. Python objects are written to
whenever they are read (their reference counts), so rows kept as Python tuples are copied, page by page, into every
worker that reads them. The bench builds `--rows` manifest rows in the real layout (photos in the AI Hub zips, 5,000
drugs; Stage 4 samples 500,000), swaps the photo decode for a constant 8 px image, so that only the rows are read,
runs `--epochs` shuffled epochs with `--workers` persistent workers, and reports each worker's private memory (USS)
and the time `__getitem__` takes per sample in the main process. With `--cache` the rows are read through the crop
cache's index instead (`data.cache.enabled`).

    .venv/bin/python bench/worker_memory.py [--rows 500000 --workers 2 --epochs 2 --baseline-ref HEAD] [--cache]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
ZIP_DIR = "/data/aihub/166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터/01.데이터/1.Training"


def rows_frame(n: int, seed: int = 0):  # noqa: ANN201 (pandas is imported in the child only)
    """`n` classifier rows in the real manifest's form: photos and labels in the AI Hub zips, 5,000 drugs."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    codes = np.array([f"K-{i:06d}" for i in range(5000)])
    drug = rng.integers(0, len(codes), n)
    zips = drug % 81 + 1
    names = [f"{z}_단일.zip::{codes[d]}/{codes[d]}_0_2_{i % 2}_1_{(70, 75, 90)[i % 3]}_{i % 18 * 20:03d}_200"
             for i, (d, z) in enumerate(zip(drug, zips, strict=True))]
    return pd.DataFrame({
        "image_path": [f"{ZIP_DIR}/원천데이터/단일경구약제 5000종/TS_{name}.png" for name in names],
        "label_path": [f"{ZIP_DIR}/라벨링데이터/단일경구약제 5000종/TL_{name}.json" for name in names],
        "mapping_code": codes[drug],
        "bbox_x": rng.uniform(0, 700, n), "bbox_y": rng.uniform(0, 1000, n), "bbox_w": 240.0, "bbox_h": 230.0,
    }), list(codes)


def datasets_module(ref: str | None) -> ModuleType:
    """pillsnap.data.datasets, or the file as it is at git `ref` loaded as a module of its own."""
    if ref is None:
        from pillsnap.data import datasets

        return datasets
    source = subprocess.run(["git", "show", f"{ref}:pillsnap/data/datasets.py"], cwd=REPO, capture_output=True,
                            text=True)
    if source.returncode:
        raise SystemExit(f"--baseline-ref {ref!r}: no pillsnap/data/datasets.py there ({source.stderr.strip()})")
    spec = importlib.util.spec_from_loader("_base_datasets", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_base_datasets"] = module
    exec(compile(source.stdout, f"{ref}:datasets.py", "exec"), module.__dict__)  # noqa: S102
    return module


def cache_index_only(keys: list[str], image):  # noqa: ANN001, ANN201 (the cache is imported in the child only)
    """The crop cache's read side with its real index (a dict, and `slots` over it) but no shards: every read is
    one 8 px crop, so the bench measures the lookups, not the page cache of the shards."""
    from pillsnap.data.cache import CachedCrops

    class IndexOnly(CachedCrops):
        def __init__(self) -> None:  # no folder to read: the index is made here
            self.index = {key: (i // 2048, i % 2048, 0) for i, key in enumerate(keys)}

        def read(self, shard: int, offset: int, nbytes: int = 0):  # noqa: ANN202
            return image

    return IndexOnly()


def child(ref: str | None, rows: int, workers: int, epochs: int, cache: bool, freeze: bool) -> dict:
    import numpy as np
    import psutil
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    frame, codes = rows_frame(rows)
    module = datasets_module(ref)
    tiny = Image.new("RGB", (8, 8), (120, 90, 60))
    index_of = {code: i for i, code in enumerate(codes)}
    start = time.perf_counter()
    store = cache_index_only(frame["label_path"].tolist(), tiny) if cache else None
    dataset = module.ClassificationDataset(frame, index_of, 8, True, 0.15, store)
    build_s = time.perf_counter() - start
    if not cache:
        dataset.load_crop = lambda index: tiny  # the rows are read (image_path, mapping_code), the photo is not
    del frame
    probe = np.random.default_rng(1).integers(0, rows, 20000)
    start = time.perf_counter()
    for i in probe:
        dataset[int(i)]
    per_sample_us = (time.perf_counter() - start) / len(probe) * 1e6
    loader = DataLoader(dataset, batch_size=256, shuffle=True, num_workers=workers, persistent_workers=True,
                        collate_fn=module.safe_collate, generator=torch.Generator().manual_seed(0),
                        worker_init_fn=getattr(module, "worker_init", None) if freeze else None)
    iterator, per_epoch = None, []
    for _ in range(epochs):
        iterator = iter(loader)
        seen = sum(len(batch[1]) for batch in iterator)
        assert seen == rows, (seen, rows)
        mem = [psutil.Process(w.pid).memory_full_info() for w in iterator._workers]
        per_epoch.append({"uss_mib": [m.uss / 2**20 for m in mem], "pss_mib": [m.pss / 2**20 for m in mem]})
    return {"per_sample_us": per_sample_us, "build_s": build_s, "epochs": per_epoch,
            "main_rss_mib": psutil.Process().memory_info().rss / 2**20}


def run(ref: str | None, freeze: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", ref or "", "--rows", str(args.rows), "--workers", str(args.workers),
           "--epochs", str(args.epochs)] + (["--cache"] if args.cache else []) + ([] if freeze else ["--no-freeze"])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the run of {ref or 'the working tree'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000, help="classifier rows (Stage 4 samples 500,000)")
    parser.add_argument("--workers", type=int, default=2, help="persistent DataLoader workers")
    parser.add_argument("--epochs", type=int, default=2, help="shuffled epochs; memory is read after each")
    parser.add_argument("--baseline-ref", default="HEAD", help="git revision of the 'before' dataset")
    parser.add_argument("--cache", action="store_true", help="read the rows through the crop cache's index")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-freeze", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rows", "workers", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (the workers' memory is read after an epoch over the rows)")
    if args.child is not None:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args.child or None, args.rows, args.workers, args.epochs, args.cache,
                               not args.no_freeze)))
        return
    runs = {f"before ({args.baseline_ref})": run(args.baseline_ref, True, args),
            "columns, no freeze": run(None, False, args), "now": run(None, True, args)}
    print(f"{args.rows:,} rows, {args.workers} persistent workers, {args.epochs} epochs"
          f"{', read through the crop cache index' if args.cache else ''}")
    for label, result in runs.items():
        uss = [max(e["uss_mib"]) for e in result["epochs"]]
        print(f"  {label:<20} worker USS after each epoch (largest worker): "
              + ", ".join(f"{u:.0f} MiB" for u in uss)
              + f"; __getitem__ {result['per_sample_us']:.1f} us/sample; dataset built in {result['build_s']:.2f} s;"
              f" main RSS {result['main_rss_mib']:.0f} MiB")
    before, now = (max(r["epochs"][-1]["uss_mib"]) for r in (runs[next(iter(runs))], runs["now"]))
    time_ratio = runs["now"]["per_sample_us"] / runs[next(iter(runs))]["per_sample_us"]
    print(f"worker USS now/before: {now / before:.3f}x ({now:.0f} vs {before:.0f} MiB); "
          f"__getitem__ time now/before: {time_ratio:.2f}x; x 16 workers: {16 * now / 1024:.2f} vs "
          f"{16 * before / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
