"""Classification sample cost: the crop caches (npy, jpeg) vs decoding, cropping and resizing the photo, and the
training transform's colour jitter (ours vs torchvision's).

Every arm goes through the same ClassificationDataset, one process, one thread, warm page cache; the arms take turns
round by round and each arm's median round is reported, so the ratios are measured in one run on the same machine.
"Stage 3-4 before" is what a Stage 3-4 training sample cost before these changes (the photo decoded for each crop,
torchvision's ColorJitter, the crop normalised to float32 in the worker); "now" is the stage's default now (the JPEG
cache, our ColorJitter, uint8 pixels normalised on the GPU: bench/uint8_batches.py measures that part alone).

    .venv/bin/python bench/bench_data_cache.py --images 160 --image-scale 1.0 --image-size 384
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from pillsnap.data.cache import build_cache
from pillsnap.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ClassificationDataset, ColorJitter
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.synth import generate_dataset


def seconds_per_sample(dataset: ClassificationDataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        assert dataset[i] is not None
    return (time.perf_counter() - start) / len(dataset)


def with_torchvision_jitter(dataset: ClassificationDataset, as_float: bool = False) -> ClassificationDataset:
    """The dataset with torchvision's own ColorJitter (same factors) in place of ours; `as_float`: its crops also
    ImageNet-normalised float32 in the worker, as training crops were before they left the workers as uint8."""
    old = copy.copy(dataset)
    steps = [T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue) if isinstance(s, ColorJitter) else s
             for s in dataset.transform.transforms]
    assert steps != dataset.transform.transforms, "the training transform has no ColorJitter"
    if as_float:
        assert isinstance(steps[-1], T.PILToTensor), "the training transform no longer ends in uint8 pixels"
        steps[-1:] = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    old.transform = T.Compose(steps)
    return old


def pixel_gaps(caches: dict, keys: list[str]) -> dict[str, float]:
    """Mean absolute difference in grey levels: each JPEG-cached crop against its npy crop, and our jitter against
    torchvision's on the npy crops, the same random numbers drawn for both."""
    jpeg = [np.abs(np.asarray(caches["jpeg"].get(k), float) - np.asarray(caches["npy"].get(k), float)).mean()
            for k in keys]
    ours, theirs = ColorJitter(0.2, 0.2, 0.15, 0.02), T.ColorJitter(0.2, 0.2, 0.15, 0.02)
    jitter = []
    for seed, key in enumerate(keys):
        crop = caches["npy"].get(key)
        torch.manual_seed(seed)
        a = np.asarray(ours(crop), float)
        torch.manual_seed(seed)
        jitter.append(np.abs(a - np.asarray(theirs(crop), float)).mean())
    return {"jpeg vs npy crop": float(np.mean(jpeg)), "our jitter vs torchvision's": float(np.mean(jitter))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="single-pill photos (8 classes)")
    parser.add_argument("--image-scale", type=float, default=1.0, help="1.0 = real 976x1280 photos")
    parser.add_argument("--image-size", type=int, default=384, help="classifier input size (model.image_size)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each arm passes over the data once a round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root, manifests = Path(tmp) / "data", Path(tmp) / "manifests"
        generate_dataset(root, 8, max(1, args.images // 8), 0, seed=0, image_scale=args.image_scale, progress=False)
        scan_dataset(root, manifests, progress=False)
        rows = load_manifest(manifests)
        index = {c: i for i, c in enumerate(sorted(rows["mapping_code"].unique()))}
        caches, built = {}, {}
        for fmt in ("npy", "jpeg"):
            start = time.perf_counter()
            caches[fmt] = build_cache(rows, Path(tmp) / "cache", args.image_size, 0.15, workers=1, fmt=fmt)
            built[fmt] = time.perf_counter() - start
        shards = {fmt: sum(p.stat().st_size for p in cache.root.glob("shard_*")) / len(cache)
                  for fmt, cache in caches.items()}
        gaps = pixel_gaps(caches, list(rows["label_path"]))

        def dataset(train: bool, cache: str | None) -> ClassificationDataset:
            return ClassificationDataset(rows, index, args.image_size, train, 0.15, caches.get(cache))

        arms = {
            "val: photo decoded": dataset(False, None),
            "val: npy cache": dataset(False, "npy"),
            "val: jpeg cache": dataset(False, "jpeg"),
            "train: photo decoded, torchvision jitter, float (stage 3-4 before)":
                with_torchvision_jitter(dataset(True, None), as_float=True),
            "train: npy cache, torchvision jitter": with_torchvision_jitter(dataset(True, "npy")),
            "train: npy cache, our jitter": dataset(True, "npy"),
            "train: jpeg cache, our jitter, uint8 (stage 3-4 now)": dataset(True, "jpeg"),
        }
        for arm in arms.values():  # every page touched once, as after a first epoch
            seconds_per_sample(arm)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                times[name].append(seconds_per_sample(arm))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    width, height = round(976 * args.image_scale), round(1280 * args.image_scale)
    print(f"{len(rows)} photos {width}x{height} -> {args.image_size} px crops, 1 thread, median of {args.rounds} "
          "rounds, arms taking turns")
    for name, value in ms.items():
        print(f"  {name:<62} {value:7.2f} ms a sample  {1000 / value:7.1f} /s")
    print(f"bytes a crop: npy {shards['npy'] / 1024:.1f} KB, jpeg {shards['jpeg'] / 1024:.1f} KB "
          f"({shards['npy'] / shards['jpeg']:.1f}x smaller); building each (1 process): npy {built['npy']:.1f} s, "
          f"jpeg {built['jpeg']:.1f} s")
    print("pixels, mean |difference|: " + "; ".join(f"{name} {value:.2f} grey levels" for name, value in gaps.items()))
    before = ms["train: photo decoded, torchvision jitter, float (stage 3-4 before)"]
    now = ms["train: jpeg cache, our jitter, uint8 (stage 3-4 now)"]
    print(f"val, npy cache / photo decoded: {ms['val: photo decoded'] / ms['val: npy cache']:.1f}x; "
          f"jpeg cache / photo decoded: {ms['val: photo decoded'] / ms['val: jpeg cache']:.1f}x")
    print(f"train, our jitter / torchvision's (npy cache): "
          f"{ms['train: npy cache, torchvision jitter'] / ms['train: npy cache, our jitter']:.2f}x")
    print(f"a stage 3-4 training sample, now / before: {before / now:.2f}x ({before:.1f} -> {now:.1f} ms)")


if __name__ == "__main__":
    main()
