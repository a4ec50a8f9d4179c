"""A combination photo with many boxes at the real classifier's size: the crops through the Predictor's classifier
16 at a time (pillsnap.infer.pipeline.FORWARD_CHUNK, this code) vs all in one batch (the code before), each in a
fresh interpreter, same crops: peak resident memory and time. The classifier is the design's EfficientNetV2-S at
384 px with random weights (`tf_efficientnetv2_s`, nothing downloaded); an untrained detector at a low threshold
boxes this many things on a real photo.

    OMP_NUM_THREADS=1 .venv/bin/python bench/combo_many_boxes.py [--boxes 64 --classes 1000 --image-size 384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(exp: Path, classes: int, size: int) -> list[str]:
    return [f"paths.exp_dir={exp}", "model.backbone=tf_efficientnetv2_s", f"model.num_classes={classes}",
            "model.pretrained=false", f"model.image_size={size}", "inference.imprint.enabled=false"]


def build(exp: Path, classes: int, size: int) -> None:
    """A run folder with the real-size classifier (random weights) and its classes.json."""
    import torch

    from pillsnap.config import config_to_dict, load_config
    from pillsnap.models.classifier import build_classification_model
    from pillsnap.utils import save_ckpt, save_json

    cfg = load_config(REPO / "config.yaml", overrides(exp, classes, size), dotenv_path=None)
    torch.manual_seed(0)
    model = build_classification_model("tf_efficientnetv2_s", classes)
    save_ckpt(exp / "checkpoints" / "classification_best.pt",
              {"model_state": model.state_dict(), "optimizer_state": {}, "scheduler_state": {}, "scaler_state": {},
               "epoch": 1, "best_metric": 0.0, "config_snapshot": config_to_dict(cfg)})
    codes = [f"K-{i:06d}" for i in range(1, classes + 1)]
    save_json(exp / "checkpoints" / "classes.json",
              {"class_names": codes, "class_map": {c: {"name": f"drug {i}"} for i, c in enumerate(codes)}})


def arm(exp: Path, classes: int, size: int, boxes: int, chunk: int) -> dict:
    """In this process: the Predictor's forward over `boxes` crops, `chunk` at a time."""
    import numpy as np
    import torch
    from PIL import Image

    from pillsnap.config import load_config
    from pillsnap.infer import pipeline

    torch.set_num_threads(1)
    cfg = load_config(REPO / "config.yaml", overrides(exp, classes, size), dotenv_path=None)
    predictor = pipeline.Predictor(exp, cfg, device="cpu")
    rng = np.random.default_rng(0)
    crops = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(boxes)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipeline.FORWARD_CHUNK = chunk
    start = time.perf_counter()
    logits, _ = predictor.forward(crops)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunk": chunk, "seconds": round(seconds, 2), "peak_mb": round(peak), "before_mb": round(before),
            "logits_sum": float(logits.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # internal: run one arm with this chunk
    parser.add_argument("--exp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm is not None:
        print(json.dumps(arm(args.exp, args.classes, args.image_size, args.boxes, args.arm)))
        return
    from pillsnap.infer.pipeline import FORWARD_CHUNK

    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "exp"
        build(exp, args.classes, args.image_size)
        results = {}
        for name, chunk in (("one batch (before)", args.boxes), (f"chunks of {FORWARD_CHUNK} (now)", FORWARD_CHUNK)):
            out = subprocess.run([sys.executable, __file__, "--arm", str(chunk), "--exp", str(exp), "--boxes",
                                  str(args.boxes), "--classes", str(args.classes), "--image-size",
                                  str(args.image_size)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    old, new = results.values()
    print(f"{args.boxes} crops of {args.image_size} px through tf_efficientnetv2_s ({args.classes} classes), "
          f"one thread, each arm in a fresh interpreter")
    for name, r in results.items():
        print(f"  {name:22s} peak RSS {r['peak_mb']} MB (after loading {r['before_mb']} MB), {r['seconds']} s")
    print(f"peak RSS {new['peak_mb']} vs {old['peak_mb']} MB ({new['peak_mb'] / old['peak_mb']:.2f}x), "
          f"added over the loaded model {new['peak_mb'] - new['before_mb']} vs {old['peak_mb'] - old['before_mb']} MB, "
          f"time {new['seconds'] / old['seconds']:.2f}x; same logits: "
          f"{abs(new['logits_sum'] - old['logits_sum']) <= 1e-3 * max(1.0, abs(old['logits_sum']))}")


if __name__ == "__main__":
    main()
