"""Classification sample throughput: crop cache (uint8 memory-mapped shards) vs raw PNG decode + crop + resize.

Both paths go through the same ClassificationDataset and validation transform (ToTensor + ImageNet normalisation
at model.image_size), one process, one thread, warm page cache; the ratio is measured in one run.

    .venv/bin/python bench/bench_data_cache.py --images 160 --image-scale 1.0 --image-size 384
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pillsnap.data.cache import build_cache
from pillsnap.data.datasets import ClassificationDataset
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.synth import generate_dataset


def images_per_second(dataset: ClassificationDataset, passes: int) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(len(dataset)):
            assert dataset[i] is not None
    return passes * len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="single-pill photos (8 classes)")
    parser.add_argument("--image-scale", type=float, default=1.0, help="1.0 = real 976x1280 photos")
    parser.add_argument("--image-size", type=int, default=384, help="classifier input size (model.image_size)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the data per path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root, manifests = Path(tmp) / "data", Path(tmp) / "manifests"
        generate_dataset(root, 8, max(1, args.images // 8), 0, seed=0, image_scale=args.image_scale, progress=False)
        scan_dataset(root, manifests, progress=False)
        rows = load_manifest(manifests)
        index = {c: i for i, c in enumerate(sorted(rows["mapping_code"].unique()))}
        start = time.perf_counter()
        cache = build_cache(rows, Path(tmp) / "cache", args.image_size, 0.15)
        build_s = time.perf_counter() - start
        raw = ClassificationDataset(rows, index, args.image_size, train=False)
        cached = ClassificationDataset(rows, index, args.image_size, train=False, cache=cache)
        images_per_second(cached, 1)  # touch every page once, like a second epoch would
        raw_ips, cached_ips = images_per_second(raw, args.passes), images_per_second(cached, args.passes)
    width, height = round(976 * args.image_scale), round(1280 * args.image_scale)
    print(f"{len(rows)} photos {width}x{height} -> {args.image_size}px crops, 1 thread")
    print(f"raw PNG decode+crop+resize: {raw_ips:8.1f} img/s")
    print(f"cached uint8 shards:        {cached_ips:8.1f} img/s")
    print(f"ratio cached/raw: {cached_ips / raw_ips:.1f}x (goal >= 5x); "
          f"cache build {build_s:.1f}s (one-off, all cores)")


if __name__ == "__main__":
    main()
