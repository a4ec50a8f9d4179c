"""The crop cache's bookkeeping at Stage 4's size: writing the index (done after every shard of 2,048 crops, ~245
times in a 500,000-crop build) with the boxes the crops were cut at vs without them (the index before the boxes
were kept, rebuilt here as it was), and the check for rows whose box moved (`CachedCrops.cut_elsewhere`, run at
every loader build), on an index of `--rows` crops. No photos are decoded: this is the index's own cost, which the
build adds to ~20 ms of decoding a crop.

    .venv/bin/python bench/cache_index_scale.py --rows 500000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pillsnap.data import cache
from pillsnap.data.datasets import BOX
from pillsnap.utils import atomic_path


def index_without_boxes(root: Path, index: dict, unreadable: set) -> None:
    """The index as it was written before the boxes were kept (key, shard, offset, nbytes)."""
    entries = {**dict.fromkeys(sorted(unreadable), cache.UNREADABLE), **index}
    frame = pd.DataFrame({"key": list(entries), "shard": [v[0] for v in entries.values()],
                          "offset": [v[1] for v in entries.values()], "nbytes": [v[2] for v in entries.values()]})
    with atomic_path(root / "index.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    folder = "/data/166/01.데이터/1.Training/라벨링데이터"  # label paths as long as the real ones
    keys = [f"{folder}/TL_{i % 90}_단일/K-{i % 5000:06d}_json/K-{i % 5000:06d}_0_2_0_2_{i}_000_200.json"
            for i in range(args.rows)]
    index = {key: (i // cache.SHARD_ROWS, (i % cache.SHARD_ROWS) * 31_000, 31_000) for i, key in enumerate(keys)}
    boxes = pd.DataFrame(rng.integers(0, 900, (args.rows, 4)).astype(float), index=pd.Index(keys, name="key"),
                         columns=list(BOX))
    rows = pd.DataFrame({"label_path": keys, **{b: boxes[b].to_numpy() for b in BOX}})
    rows.loc[::1000, "bbox_x"] += 7  # one row in 1,000 moved since
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        root = Path(tmp)
        cache.save_json(root / "meta.json", {"image_size": 384, "crop_margin": 0.15, "format": "jpeg"})
        times: dict[str, list[float]] = {"with boxes": [], "without boxes": [], "moved-box check": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            index_without_boxes(root, index, set())
            times["without boxes"].append(time.perf_counter() - start)
            start = time.perf_counter()
            cache._save_index(root, index, set(), boxes)
            times["with boxes"].append(time.perf_counter() - start)
            reader = cache.CachedCrops(root)
            start = time.perf_counter()
            moved = reader.cut_elsewhere(rows)
            times["moved-box check"].append(time.perf_counter() - start)
        size = (root / "index.parquet").stat().st_size
    s = {name: statistics.median(t) for name, t in times.items()}
    print(f"index of {args.rows:,} crops ({size / 1e6:.1f} MB with boxes), median of {args.rounds} rounds:")
    for name, value in s.items():
        print(f"  {name:<16} {value:7.2f} s")
    shards = args.rows / cache.SHARD_ROWS
    print(f"writing the index with boxes / without: {s['with boxes'] / s['without boxes']:.2f}x; over a build of "
          f"{shards:.0f} shards, the index growing to this size: ~{s['with boxes'] * shards / 2:.0f} s with boxes, "
          f"~{s['without boxes'] * shards / 2:.0f} s without")
    print(f"moved boxes found: {int(moved.sum()):,} of {args.rows:,} (expected {len(rows.index[::1000]):,})")


if __name__ == "__main__":
    main()
