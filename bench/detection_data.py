"""The detector's training data cost: a sample of ultralytics' training loader (mosaic, HSV, flips, scale, as
train.detection.augment sets them) from the export's photos as they are (real-size 976x1280 PNGs) vs from the
same photos resized to the detector's size and stored as JPEGs, as the export writes them with
data.detection_export=jpeg.

One process, one thread, no loader workers (the cost a worker pays), warm page cache; the arms take turns round by
round over the same photos and each arm's median is reported. Each round builds its loaders afresh: ultralytics
keeps recently loaded photos in a buffer (its mosaic draws the other three tiles from it), so a second pass over a
set smaller than the buffer would decode nothing. In training each photo is decoded once an epoch; so it is here.

    .venv/bin/python bench/detection_data.py --photos 160 --image-scale 1.0 --det-size 640
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pillsnap.config import load_config
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.synth import generate_dataset
from pillsnap.data.yolo import build_detection_loader, export_yolo


def seconds_per_image(loader, batches: int) -> float:  # noqa: ANN001
    seen, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        seen += len(batch["im_file"])
        if i + 1 == batches:
            break
    return (time.perf_counter() - start) / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=160, help="combination photos")
    parser.add_argument("--image-scale", type=float, default=1.0, help="1.0 = real 976x1280 photos")
    parser.add_argument("--det-size", type=int, default=640, help="model.det_image_size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    augment = dict(load_config(None, dotenv_path=None).train.detection.augment)
    with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
        root, manifests = Path(tmp) / "data", Path(tmp) / "manifests"
        generate_dataset(root, 8, 1, args.photos, seed=0, image_scale=args.image_scale, progress=False)
        scan_dataset(root, manifests, progress=False)
        rows = load_manifest(manifests).assign(split="train")
        arms = {}
        for fmt in ("photos", "jpeg"):
            start = time.perf_counter()
            data_yaml = export_yolo(rows, Path(tmp) / f"yolo_{fmt}", image_format=fmt, image_size=args.det_size)
            built = time.perf_counter() - start
            images = list((Path(tmp) / f"yolo_{fmt}" / "images" / "train").iterdir())
            arms[fmt] = (data_yaml, built, sum(p.resolve().stat().st_size for p in images) / len(images))

        def loader(fmt: str):  # noqa: ANN202
            return build_detection_loader(arms[fmt][0], "train", args.det_size, args.batch, 0, True, augment=augment)

        photos = len(loader("photos").dataset)
        batches = max(1, photos // args.batch)
        for fmt in arms:
            seconds_per_image(loader(fmt), batches)  # every page touched once
        times: dict[str, list[float]] = {fmt: [] for fmt in arms}
        for _ in range(args.rounds):
            for fmt in arms:
                times[fmt].append(seconds_per_image(loader(fmt), batches))
    ms = {fmt: 1000 * statistics.median(t) for fmt, t in times.items()}
    print(f"{photos} combination photos {round(976 * args.image_scale)}x{round(1280 * args.image_scale)}, detector "
          f"{args.det_size} px, batch {args.batch}, mosaic on, 1 thread, median of {args.rounds} rounds")
    for fmt, (_, built, size) in arms.items():
        print(f"  export {fmt:>6}: {ms[fmt]:7.1f} ms a training image ({1000 / ms[fmt]:5.1f} /s), "
              f"{size / 1024:7.1f} KB a photo, export {built:.1f} s")
    print(f"a detector training image, jpeg export / photos: {ms['photos'] / ms['jpeg']:.2f}x")


if __name__ == "__main__":
    main()
