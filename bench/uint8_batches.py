"""A classifier training batch's cost on the host: crops leaving the workers as uint8 pixels (normalised on the GPU
by engine.classification.to_input) vs as ImageNet-normalised float32 (before).

The host's share of a training batch, measured per sample in one process and one thread, arms taking turns, median
round: the worker's transform of each crop read from the Stage 3-4 JPEG cache (rotation, jitter, then ToTensor +
Normalize or PILToTensor), the worker's collate into one batch tensor, and the main process's copy of that batch
(the pin-memory thread copies every batch once more into page-locked memory; a plain copy of the same bytes stands
in for it, as this machine has no GPU to pin for). On the GPU the uint8 batch then costs one conversion kernel.

    .venv/bin/python bench/uint8_batches.py --images 128 --image-size 384 --batch 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision import transforms as T

from pillsnap.data.cache import build_cache
from pillsnap.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ClassificationDataset, normalise, safe_collate
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.synth import generate_dataset


def as_float(dataset: ClassificationDataset) -> ClassificationDataset:
    """The training dataset as it was: its crops ImageNet-normalised float32 in the workers."""
    old = copy.copy(dataset)
    steps = list(dataset.transform.transforms)
    assert isinstance(steps[-1], T.PILToTensor), "the training transform no longer ends in uint8 pixels"
    old.transform = T.Compose([*steps[:-1], T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return old


def batch_costs(dataset: ClassificationDataset, batch: int) -> tuple[float, float, float, int]:
    """Seconds a sample: transform, collate, the main process's copy; and the bytes of a batch."""
    transform = collate = copying = 0.0
    nbytes = 0
    for start in range(0, len(dataset) - batch + 1, batch):
        t0 = time.perf_counter()
        samples = [dataset[i] for i in range(start, start + batch)]
        t1 = time.perf_counter()
        images = safe_collate(samples, fill=True)[0]
        t2 = time.perf_counter()
        torch.empty_like(images).copy_(images)
        t3 = time.perf_counter()
        transform, collate, copying = transform + t1 - t0, collate + t2 - t1, copying + t3 - t2
        nbytes = images.numel() * images.element_size()
    n = (len(dataset) // batch) * batch
    return transform / n, collate / n, copying / n, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="single-pill photos (8 classes)")
    parser.add_argument("--image-scale", type=float, default=1.0, help="1.0 = real 976x1280 photos")
    parser.add_argument("--image-size", type=int, default=384, help="classifier input size (model.image_size)")
    parser.add_argument("--batch", type=int, default=64, help="samples a batch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each arm passes over the data once a round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_uint8_") as tmp:
        root, manifests = Path(tmp) / "data", Path(tmp) / "manifests"
        generate_dataset(root, 8, max(1, args.images // 8), 0, seed=0, image_scale=args.image_scale, progress=False)
        scan_dataset(root, manifests, progress=False)
        rows = load_manifest(manifests)
        index = {c: i for i, c in enumerate(sorted(rows["mapping_code"].unique()))}
        cache = build_cache(rows, Path(tmp) / "cache", args.image_size, 0.15, workers=1, fmt="jpeg")
        now = ClassificationDataset(rows, index, args.image_size, True, 0.15, cache)
        arms = {"float32 (before)": as_float(now), "uint8 (now)": now}
        for arm in arms.values():  # every page touched once
            batch_costs(arm, args.batch)
        rounds: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                rounds[name].append(batch_costs(arm, args.batch))
        pixels = safe_collate([now[i] for i in range(args.batch)])[0]
        start = time.perf_counter()
        for _ in range(args.rounds):
            normalise(pixels)
        on_host = (time.perf_counter() - start) / args.rounds / args.batch
    print(f"{len(rows)} photos -> {args.image_size} px crops from the JPEG cache, batches of {args.batch}, 1 thread, "
          f"median of {args.rounds} rounds, arms taking turns")
    totals = {}
    for name, costs in rounds.items():
        parts = [1000 * statistics.median(c[k] for c in costs) for k in range(3)]
        totals[name] = sum(parts)
        print(f"  {name:<17} transform {parts[0]:5.2f} + collate {parts[1]:5.2f} + main-process copy {parts[2]:5.2f}"
              f" = {totals[name]:5.2f} ms a sample; {costs[0][3] / 2**20:6.1f} MiB a batch")
    before, after = totals["float32 (before)"], totals["uint8 (now)"]
    print(f"host work a training sample, now / before: {before / after:.2f}x ({before:.2f} -> {after:.2f} ms); "
          f"bytes a batch 4x fewer")
    print(f"normalising the uint8 batch on this CPU instead (where there is no GPU): {1000 * on_host:.2f} ms a sample")


if __name__ == "__main__":
    main()
