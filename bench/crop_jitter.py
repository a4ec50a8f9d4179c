"""The classifier trained on crops at boxes a little off the labelled ones (data.crop_jitter) against one trained on
the labelled boxes alone (scale 0, shift 0), in the same run, on a demo work directory's data.

Both classifiers train the demo profile's classifier alone (train.strategy=classification, same seed, same
steps) into scratch folders, and are measured on the test split's pills of the stage's drugs, cut three ways:

- `labelled`: at the annotators' boxes, as validation and the crop cache cut them;
- `moved`: at those boxes grown or shrunk by 8 % and moved by 5 % of the pill's size (fixed per pill, seeded),
  a box as far off as a located or detected one often is;
- `inference`: as inference cuts them: a single-pill photo where the pill is located on its backdrop
  (pillsnap.infer.preprocess.single_photo_crop), a pill of a combination photo at the work directory's detector's
  box that overlaps its labelled box most (IoU >= 0.5; pills it misses are left out of this row).

Each row gives the top-1 accuracy, the mean top probability and the ECE of the softmax at each classifier's own
calibrated temperature. The ratio line compares the jittered classifier with the baseline.

    pillsnap demo --workdir runs/demo          # once: data, manifests and a detector
    .venv/bin/python bench/crop_jitter.py --workdir runs/demo --out /tmp/crop_jitter
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

ARMS = {"labelled boxes only": (0.0, 0.0), "crop_jitter": (0.15, 0.08)}
MOVED_GROW, MOVED_SHIFT = 0.08, 0.05


def arm_config(workdir: Path, out: Path, name: str, jitter: tuple[float, float]) -> Any:
    from pillsnap.demo import demo_config

    args = argparse.Namespace(workdir=str(workdir), tiny=False, data_root=None, cfg="config.yaml", overrides=[])
    cfg = demo_config(args)
    extra = {"paths.exp_dir": str(out / name.split()[0]), "train.stage_evaluation": False,
             "data.crop_jitter.scale": jitter[0], "data.crop_jitter.shift": jitter[1]}
    from omegaconf import OmegaConf

    for key, value in extra.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def pills(cfg: Any, workdir: Path) -> list[dict]:
    """The test split's pills of the stage's drugs, each with its three crops."""
    from pillsnap.data import crop_box, load_manifest
    from pillsnap.data.datasets import LABELLED
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import photo_groups
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.infer.preprocess import load_image, single_photo_crop
    from pillsnap.metrics.detection import box_iou_xyxy
    from pillsnap.utils.images import read_image

    manifest = select_stage(load_manifest(cfg.paths.manifest_dir), cfg)
    known = set(manifest.loc[manifest["split"] == "train", "mapping_code"])
    detector = Predictor(workdir / "exp", cfg, "cpu")
    rng = np.random.default_rng(0)
    margin = float(cfg.data.crop_margin)
    out = []
    for photo in photo_groups(manifest, "test"):
        image = read_image(photo["image_path"], LABELLED)
        # as inference decodes it (upright by its EXIF turn); the labelled boxes are in the stored frame
        located = single_photo_crop(load_image(photo["image_path"])[0], margin, True,
                                    float(cfg.inference.single_crop))[0]
        dets = None if photo["image_type"] == "single" else detector.detect(image, float(cfg.inference.conf_threshold))
        for code, (x, y, w, h) in zip(photo["codes"], photo["boxes"], strict=True):
            if code not in known:
                continue
            grow = 1 + MOVED_GROW * rng.choice([-1, 1])
            angle = rng.uniform(0, 2 * np.pi)
            cx, cy = x + w / 2 + MOVED_SHIFT * w * np.cos(angle), y + h / 2 + MOVED_SHIFT * h * np.sin(angle)
            moved = (cx - w * grow / 2, cy - h * grow / 2, w * grow, h * grow)
            crops = {"labelled": image.crop(crop_box(image.width, image.height, (x, y, w, h), margin)),
                     "moved": image.crop(crop_box(image.width, image.height, moved, margin))}
            if dets is None:
                crops["inference"] = located
            elif len(dets):
                found = np.c_[dets[:, :2], dets[:, :2] + dets[:, 2:4]]
                ious = box_iou_xyxy(np.asarray([[x, y, x + w, y + h]]), found)[0]
                best = int(np.argmax(ious))
                if ious[best] >= 0.5:
                    crops["inference"] = image.crop(crop_box(image.width, image.height, dets[best, :4], margin))
            out.append({"code": code, "source": photo["image_type"], "crops": crops})
    return out


def measure(exp_dir: Path, cfg: Any, items: list[dict]) -> dict[str, dict]:
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.metrics.calibration import calibrated_probs, ece_of

    predictor = Predictor(exp_dir, cfg, "cpu")
    names = list(predictor.class_names)
    figures = {}
    for cut in ("labelled", "moved", "inference"):
        chosen = [item for item in items if cut in item["crops"]]
        logits = predictor.forward([item["crops"][cut] for item in chosen])[0].float().cpu()
        sources = ["single" if item["source"] == "single" else "combination" for item in chosen]
        probs = calibrated_probs(logits.numpy(), predictor.temperatures.per_row(sources))
        right = np.array([names[k] == item["code"] for k, item in zip(probs.argmax(1), chosen, strict=True)])
        single = np.array([item["source"] == "single" for item in chosen])
        figures[cut] = {"n": len(chosen), "accuracy": float(right.mean()),
                        "single": float(right[single].mean()), "combination": float(right[~single].mean()),
                        "mean_top": float(probs.max(1).mean()), "ece": ece_of(probs.max(1), right)}
    return figures


def main() -> None:
    import torch

    from pillsnap.train import train_classification_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="a demo work directory (data, manifests, exp/)")
    parser.add_argument("--out", required=True, help="scratch folder for the two classifiers")
    parser.add_argument("--skip-training", action="store_true", help="measure classifiers already in --out")
    parser.add_argument("--jitter", default=None, metavar="SCALE,SHIFT",
                        help="the jittered arm's data.crop_jitter (default: 0.15,0.08)")
    args = parser.parse_args()
    if args.jitter:
        ARMS["crop_jitter"] = tuple(float(v) for v in args.jitter.split(","))
    workdir, out = Path(args.workdir).resolve(), Path(args.out).resolve()
    results = {}
    for name, jitter in ARMS.items():
        cfg = arm_config(workdir, out, name, jitter)
        if not args.skip_training:
            torch.manual_seed(0)
            train_classification_stage(cfg)
        if name == next(iter(ARMS)):
            items = pills(cfg, workdir)
        print(f"{name}: data.crop_jitter scale {cfg.data.crop_jitter.scale} shift {cfg.data.crop_jitter.shift}")
        results[name] = measure(Path(cfg.paths.exp_dir), cfg, items)
        for cut, f in results[name].items():
            print(f"  {cut:10s} n {f['n']:3d}  accuracy {f['accuracy']:.3f} (single {f['single']:.3f}, combination "
                  f"{f['combination']:.3f})  mean top {f['mean_top']:.3f}  ECE {f['ece']:.3f}")
    base, new = results.values()
    print("ratio (crop_jitter / labelled boxes only), accuracy: " + ", ".join(
        f"{cut} {new[cut]['accuracy'] / base[cut]['accuracy']:.3f}x" for cut in base if base[cut]["accuracy"]))


if __name__ == "__main__":
    main()
