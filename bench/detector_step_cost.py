"""What a larger detector input costs per training step: the detection task's own step (yolo11n by default,
ultralytics' loss, our optimizer step) at several `model.det_image_size`, run alternately, as this process's CPU
seconds per step (on a CPU shared with other jobs, wall time mostly measures the neighbours). Printed: seconds per
step and the ratio to the first size (the demo's 160), to judge what more resolution adds to the demo's budget.

    .venv/bin/python bench/detector_step_cost.py [--sizes 160 192 224 256 --batch 8 --steps 4 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pillsnap.config import load_config
from pillsnap.engine.detection import DetectionTask, random_detection_batch


def step_seconds(task: DetectionTask, batch: dict, steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        task.train_step(batch)
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224, 256])
    parser.add_argument("--detector", default="yolo11n")
    parser.add_argument("--batch", type=int, default=8, help="the demo's train.detection.batch_size")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per size and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks, batches = {}, {}
    for size in args.sizes:
        cfg = load_config("config.yaml", [f"model.detector={args.detector}", f"model.det_image_size={size}",
                                          "model.pretrained=false", "train.ema.enabled=false"], dotenv_path=None)
        batch = random_detection_batch(args.batch, size, torch.device("cpu"))
        batch["img"] = (batch["img"] * 255).to(torch.uint8)  # as the loader gives it
        tasks[size] = DetectionTask(cfg, [batch], None, "cpu")
        batches[size] = batch
        step_seconds(tasks[size], batch, 1)  # warm-up
    times: dict[int, list[float]] = {size: [] for size in args.sizes}
    for _ in range(args.rounds):
        for size in args.sizes:
            times[size].append(step_seconds(tasks[size], batches[size], args.steps))
    median = {size: float(np.median(v)) for size, v in times.items()}
    first = args.sizes[0]
    print(json.dumps({"detector": args.detector, "batch": args.batch, "threads": torch.get_num_threads(),
                      "cpu_seconds_per_step": {s: round(v, 3) for s, v in median.items()},
                      "ratio_vs_first": {s: round(v / median[first], 2) for s, v in median.items()}}))


if __name__ == "__main__":
    main()
