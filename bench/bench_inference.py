"""Inference latency: detector torch vs ONNX Runtime (same letterboxed input, same NMS), and the pipeline's
single, combo and auto paths (auto with and without imprint reading) on one photo.

Baselines are measured in the same run: the ONNX figure is a ratio to torch, the pipeline figures ratios to the plain
classifier call on the same photo. Runs alternate and medians are compared (the machine is shared).

    .venv/bin/python bench/bench_inference.py [--size 160 --rounds 7 --reps 10] [--exp runs/demo/exp --photo P]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pillsnap.models.detector import build_yolo_model, postprocess_detections, raw_detector_output
from pillsnap.models.export import OnnxDetector, export_detector_onnx


def _photo(size: tuple[int, int] = (244, 320)) -> Image.Image:
    image = Image.new("RGB", size, (190, 190, 185))
    draw = ImageDraw.Draw(image)
    for x, y in ((40, 60), (140, 80), (90, 200)):
        draw.ellipse((x, y, x + 40, y + 30), fill=(200, 40, 120))
    return image


def _median_ms(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def bench_detector(size: int, rounds: int, reps: int) -> None:
    from pillsnap.infer.preprocess import letterbox

    model = build_yolo_model("yolo11n", 1).eval()
    tensor, _, _ = letterbox(_photo(), size)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = OnnxDetector(export_detector_onnx(model, Path(tmp) / "d.onnx", size))

        def run_torch() -> None:
            with torch.no_grad():
                postprocess_detections(raw_detector_output(model, tensor), 0.25, 0.5)

        def run_onnx() -> None:
            postprocess_detections(onnx(tensor), 0.25, 0.5)

        run_torch(), run_onnx()  # warm-up
        torch_ms, onnx_ms = [], []
        for _ in range(rounds):
            torch_ms.append(_median_ms(run_torch, reps))
            onnx_ms.append(_median_ms(run_onnx, reps))
    t, o = statistics.median(torch_ms), statistics.median(onnx_ms)
    print(f"detector yolo11n {size}px, 1 image incl. NMS: torch {t:.1f} ms, onnxruntime {o:.1f} ms, "
          f"speed-up onnx/torch = {t / o:.2f}x")


def bench_pipeline(exp: str, photo: str, rounds: int, reps: int) -> None:
    """The plain classifier call on the photo (the baseline), then single / combo / auto on the same photo with a
    trained experiment (e.g. the demo's), auto both with and without imprint reading."""
    from pillsnap.config import load_config
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.utils.images import read_image

    cfg = load_config("config.yaml", ["inference.hard_cases.enabled=false"], dotenv_path=None)
    predictor = Predictor(exp, cfg, "cpu")
    no_ocr = Predictor(exp, load_config("config.yaml", ["inference.hard_cases.enabled=false",
                                                        "inference.imprint.enabled=false"], dotenv_path=None), "cpu")
    image = read_image(photo)
    runs = {"classifier": lambda: predictor.classify([image]),
            **{mode: (lambda m=mode: predictor.predict(image, mode=m)) for mode in ("single", "combo", "auto")},
            "auto, no imprint reading": lambda: no_ocr.predict(image, mode="auto")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up (loads the detector and the OCR models)
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(_median_ms(run, reps))
    base = statistics.median(times["classifier"])
    for name, values in times.items():
        print(f"pipeline {name:<25} {statistics.median(values):7.1f} ms/photo  ratio to the classifier call = "
              f"{statistics.median(values) / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exp", default=None, help="trained exp dir (e.g. runs/demo/exp) for the pipeline bench")
    parser.add_argument("--photo", default=None, help="a photo for the pipeline bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_detector(args.size, args.rounds, args.reps)
    if args.exp and args.photo:
        bench_pipeline(args.exp, args.photo, args.rounds, args.reps)


if __name__ == "__main__":
    main()
