"""Does an experiment's pill detector transfer past the look it was trained on? Recall and precision at IoU 0.5 on
held-out synthetic combination photos of two kinds, rendered in this run from classes no run has seen:

- plain: the real set's look (blue-grey backdrop, even light, sharp) -- the baseline;
- hard: mostly off that look (grey, light or other-hue backdrops, a white dish or tray in half of them, casts,
  vignetting, defocus or motion blur, noise, JPEG; synth_style.HARD_SHARES).

The detector runs as inference runs it (Predictor.detect's steps: letterbox, the shared NMS, the run's configured
confidence and IoU). Printed: each set's figures, hard / plain ratios, recall by backdrop / dish / blur, false boxes per
photo with and without a dish, and with --baseline-exp the same for a second experiment and the ratios between them.

    .venv/bin/python bench/detector_transfer.py --exp runs/demo/exp [--baseline-exp OLD/exp] [--photos 48]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pillsnap.data.synth import make_classes
from pillsnap.data.synth_render import PhotoConditions, render_photo, style_of
from pillsnap.data.synth_style import HARD_SHARES, PLAIN_SHARES, PhotoStyle, StyleShares

HELD_OUT_SEED = 90210  # classes of their own: no generated training set uses this seed
ANGLES = (70, 75, 90)


@dataclass(frozen=True)
class Photo:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]]
    style: PhotoStyle


def render_set(shares: StyleShares, n: int, scale: float, seed: int) -> list[Photo]:
    """`n` combination photos of 3-4 held-out pills each, their styles drawn with `shares`."""
    classes = make_classes(40, HELD_OUT_SEED + seed)
    rng = random.Random(f"transfer:{seed}")
    photos = []
    for _ in range(n):
        looks = [c.look for c in rng.sample(classes, rng.choice((3, 4)))]
        cond = PhotoConditions(rng.choice("01"), "2", rng.choice("12"), rng.choice(ANGLES), 0)
        photo_seed = rng.getrandbits(32)
        style = style_of(looks, cond, photo_seed, shares=shares)
        png, boxes, _ = render_photo(looks, cond, scale, photo_seed, style=style)
        photos.append(Photo(Image.open(io.BytesIO(png)).convert("RGB"), boxes, style))
    return photos


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [N, 4] and [M, 4] xywh boxes: [N, M]."""
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter = (np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
             * np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None))
    return inter / (a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter + 1e-9)


def match(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> int:
    """True positives: predictions (most confident first) matched one to one to a box at IoU >= threshold."""
    if len(pred) == 0 or len(truth) == 0:
        return 0
    overlaps = iou(pred[np.argsort(-pred[:, 4]), :4], truth[:, :4])
    taken: set[int] = set()
    for row in overlaps:
        free = [(v, j) for j, v in enumerate(row) if j not in taken and v >= threshold]
        if free:
            taken.add(max(free)[1])
    return len(taken)


def photo_groups(style: PhotoStyle) -> list[str]:
    return [f"backdrop={style.backdrop_kind}", f"dish={'yes' if style.dish else 'no'}",
            f"blur={style.blur or 'sharp'}", f"jpeg={'yes' if style.jpeg_quality else 'no'}"]


def score(detect: Any, photos: list[Photo], conf: float) -> dict[str, Any]:
    """Recall and precision at IoU 0.5 over `photos`, recall per style group, false boxes per photo by dish."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # true positives, truths, predictions
    false_boxes: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # false boxes, photos
    for photo in photos:
        pred = np.asarray(detect(photo.image, conf), dtype=np.float64).reshape(-1, 5)
        tp = match(pred, np.asarray(photo.boxes, dtype=np.float64))
        for group in ("all", *photo_groups(photo.style)):
            counts = totals[group]
            counts[0], counts[1], counts[2] = counts[0] + tp, counts[1] + len(photo.boxes), counts[2] + len(pred)
        fb = false_boxes["dish" if photo.style.dish else "no_dish"]
        fb[0], fb[1] = fb[0] + len(pred) - tp, fb[1] + 1
    tp, truths, preds = totals.pop("all")
    return {"recall@0.5": round(tp / max(truths, 1), 3), "precision": round(tp / max(preds, 1), 3),
            "pills": truths, "boxes": preds,
            "recall_by": {g: round(c[0] / max(c[1], 1), 3) for g, c in sorted(totals.items())},
            "false_boxes_per_photo": {k: round(v[0] / max(v[1], 1), 2) for k, v in sorted(false_boxes.items())}}


def load_detect(exp: str, device: str) -> tuple[Any, float]:
    """The experiment's detector as inference runs it (Predictor.detect's steps: letterbox, the shared NMS at the
    run's inference.iou_threshold, boxes back in photo pixels): detect(image, conf) -> [N, 5] xywh + conf; and the
    run's inference.conf_threshold. Needs only checkpoints/detection_best.pt (no classifier)."""
    import torch

    from pillsnap.config.run import load_cli_config
    from pillsnap.infer.preprocess import letterbox, unletterbox_boxes
    from pillsnap.models.detector import (
        detector_settings,
        load_detector_for_inference,
        postprocess_detections,
        raw_detector_output,
    )

    ckpt = Path(exp) / "checkpoints" / "detection_best.pt"
    if not ckpt.is_file():
        raise SystemExit(f"{exp}: no detection checkpoint ({ckpt})")
    model, snapshot = load_detector_for_inference(ckpt, device)
    size, settings = detector_settings(snapshot)[1], load_cli_config(exp, None, dotenv_path=None).inference

    @torch.no_grad()
    def detect(image: Image.Image, conf: float) -> np.ndarray:
        tensor, scale, pad = letterbox(image, size)
        raw = raw_detector_output(model, tensor.to(device))
        dets = postprocess_detections(raw, conf, float(settings.iou_threshold))[0].numpy()
        boxes = unletterbox_boxes(dets[:, :4], scale, pad, image.size)
        return np.concatenate([boxes, dets[:, 4:5]], 1) if len(dets) else np.zeros((0, 5))

    return detect, float(settings.conf_threshold)


def evaluate(exp: str, sets: dict[str, list[Photo]], conf: float | None, device: str) -> dict[str, Any]:
    detect, configured = load_detect(exp, device)
    conf = configured if conf is None else conf
    out: dict[str, Any] = {"exp": exp, "conf": conf}
    out.update({name: score(detect, photos, conf) for name, photos in sets.items()})
    out["hard_vs_plain"] = {k: round(out["hard"][k] / max(out["plain"][k], 1e-9), 3)
                            for k in ("recall@0.5", "precision")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="experiment folder (its checkpoints/detection_best.pt)")
    parser.add_argument("--baseline-exp", default=None, help="a second experiment to compare against")
    parser.add_argument("--photos", type=int, default=48, help="photos per set")
    parser.add_argument("--scale", type=float, default=0.5, help="photo scale vs the real 976x1280")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conf", type=float, default=None, help="detector confidence (default: the exp's config)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-examples", default=None, help="write the first hard photos here (PNG) to look at")
    args = parser.parse_args()
    for exp in filter(None, (args.exp, args.baseline_exp)):
        if not (Path(exp) / "checkpoints").is_dir():
            parser.error(f"--exp {exp}: no checkpoints folder there (give an experiment folder, e.g. runs/demo/exp)")
    sets = {"plain": render_set(PLAIN_SHARES, args.photos, args.scale, args.seed),
            "hard": render_set(HARD_SHARES, args.photos, args.scale, args.seed + 1)}
    if args.save_examples:
        Path(args.save_examples).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(sets["hard"][:8]):
            photo.image.save(Path(args.save_examples) / f"hard_{i}.png")
    result: dict[str, Any] = {"photos_per_set": args.photos, "scale": args.scale,
                              "current": evaluate(args.exp, sets, args.conf, args.device)}
    if args.baseline_exp:
        base = result["baseline"] = evaluate(args.baseline_exp, sets, args.conf, args.device)
        result["current_vs_baseline"] = {
            name: {k: round(result["current"][name][k] / max(base[name][k], 1e-9), 3)
                   for k in ("recall@0.5", "precision")} for name in sets}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
