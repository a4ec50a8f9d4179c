"""The calibration's detector pass over combination photos (`eval/box_calibration.detector_boxes`: each photo
decoded in its labels' frame, the detector run on it, its boxes matched to the labelled pills) with the photos
decoded by threads ahead of the detector against decoded one after the other as needed (the code before),
alternating in the same run on a trained experiment's combination photos (every split's: the validation split
alone holds a handful in the demo), with the same detector. Also the two parts alone, serially: decoding a photo
and the detector on it.

    .venv/bin/python bench/detector_boxes_threads.py --exp runs/demo/exp [--workers 2 --rounds 3 --scale 2]

--scale 2 enlarges the demo's half-size photos to the real data's 976x1280 (PNG, as the generator writes them; the
labelled boxes scaled with them, into a temporary folder): the decoding is what the threads take over.

At Stage 4 the validation split holds tens of thousands of combination photos; on a GPU the detector takes about
as long as decoding a full-size photo, so the pass is bounded by the decoding done one photo at a time. On this
machine's two cores the detector runs on the CPU beside the decoding threads, so the gain here is a floor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any


def enlarged(rows: Any, scale: float, folder: Path) -> Any:
    """`rows` with their photos enlarged by `scale` into `folder` and their labelled boxes scaled alike."""
    from PIL import Image

    from pillsnap.data.datasets import LABELLED
    from pillsnap.utils.images import read_image

    rows = rows.copy()
    written: dict[str, str] = {}
    for path in dict.fromkeys(rows["image_path"]):
        image = read_image(path, LABELLED)
        out = folder / f"{len(written)}.png"
        image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR).save(out)
        written[path] = str(out)
    rows["image_path"] = rows["image_path"].map(written)
    for column in ("bbox_x", "bbox_y", "bbox_w", "bbox_h", "width", "height"):
        rows[column] = (rows[column] * scale).round().astype(int)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", required=True, help="a trained experiment folder (with detection_best.pt)")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding the photos")
    parser.add_argument("--rounds", type=int, default=3, help="serial/workers pairs, alternating")
    parser.add_argument("--scale", type=float, default=1.0, help="enlarge the photos by this factor first")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from pillsnap.config.run import load_run_config
    from pillsnap.data import load_manifest
    from pillsnap.data.datasets import LABELLED, CropTable
    from pillsnap.eval.box_calibration import detector_boxes, detector_of
    from pillsnap.utils.images import read_image

    torch.set_num_threads(1)  # one core for the detector, as a GPU leaves the cores to the decoding
    exp = Path(args.exp)
    cfg = load_run_config(exp, required=("manifest_dir",))
    manifest = load_manifest(cfg.paths.manifest_dir)
    rows = manifest[manifest["image_type"] == "combination"].reset_index(drop=True)
    scratch = tempfile.TemporaryDirectory(prefix="detector_boxes_")
    if args.scale != 1.0:
        rows = enlarged(rows, args.scale, Path(scratch.name))
    dataset = type("Photos", (), {"rows": CropTable.from_frame(rows)})()
    sources = np.array(["combination"] * len(rows))
    conf = float(cfg.inference.conf_threshold)
    detect = detector_of(cfg, exp, "cpu")
    if detect is None:
        raise SystemExit(f"{exp} has no detector checkpoint")
    paths = list(dict.fromkeys(rows["image_path"]))
    images = [read_image(path, LABELLED) for path in paths[:3]]
    detect(images[0], conf)  # the model loaded before any timing

    start = time.perf_counter()
    images = [read_image(path, LABELLED) for path in paths]
    decode = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    for image in images:
        detect(image, conf)
    detector = (time.perf_counter() - start) / len(paths)
    del images

    times: dict[int, list[float]] = {0: [], args.workers: []}
    found: dict[int, dict] = {}
    for round_ in range(args.rounds):
        for workers in ((0, args.workers) if round_ % 2 == 0 else (args.workers, 0)):
            start = time.perf_counter()
            boxes, counts = detector_boxes(detect, dataset, sources, conf, workers)
            times[workers].append(time.perf_counter() - start)
            found[workers] = {row: box.tolist() for row, box in boxes.items()}
    serial, parallel = (float(np.median(times[w])) for w in (0, args.workers))
    size = read_image(paths[0], LABELLED).size
    print(f"{len(paths)} combination photos ({size[0]}x{size[1]}), {counts['pills']} pills, "
          f"{counts['at_detector_boxes']} at a detector box; {args.rounds} rounds, medians")
    print(f"alone, serially: decoding {decode * 1000:.1f} ms a photo, the detector (one thread) "
          f"{detector * 1000:.1f} ms a photo")
    print(f"pass, photos decoded as needed: {serial:.2f} s ({serial / len(paths) * 1000:.1f} ms a photo)")
    print(f"pass, photos decoded by {args.workers} threads ahead: {parallel:.2f} s "
          f"({parallel / len(paths) * 1000:.1f} ms a photo)")
    print(f"as needed / threads ahead: {serial / parallel:.2f}x; same boxes: "
          f"{'yes' if found[0] == found[args.workers] else 'NO'}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
