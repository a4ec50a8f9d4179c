"""Where `Predictor.predict`'s time goes, per stage, for `inference.backend: torch` and `onnx` in the same run,
with imprint reading on and off: decode, locate, crops, classifier (preprocess / forward / unknown-rule scores /
rest), detector (letterbox / forward / NMS / rest), imprint reading, answer policy, and what is left (other).

Stages are timed exclusively (a stage's time excludes the stages it calls) by wrapping the pipeline's own functions,
so the per-stage figures add up to the end-to-end one. One thread for torch, onnxruntime and the OCR (on 2 shared
cores a second thread measures the neighbours; `--set inference.imprint.threads=0` gives the OCR its default). The
backends take turns photo by photo; one warm-up round first; figures are the median over rounds of the mean per
photo. `--answers` writes every backend's JSON answers (without their timings), to check that a change leaves them
identical.

    .venv/bin/python bench/pipeline_profile.py --exp runs/demo/exp [--photos P ...] [--mode auto] [--rounds 5]
        [--imprint on|off|both] [--answers OUT.json] [--set inference.imprint.threads=0 ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import pillsnap.infer.pipeline as pipeline
import pillsnap.models.detector as detector_module
from pillsnap.config.run import load_run_config
from pillsnap.utils.images import decode_image

STAGES = ("decode", "locate", "crop", "classify.preprocess", "classify.forward", "classify.unknown", "classify.rest",
          "detect.letterbox", "detect.forward", "detect.nms", "detect.rest", "imprint", "answer", "other")


class Profiler:
    """Exclusive wall time per stage: a stage's elapsed time is taken off the stage that called it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            frame = [0.0]  # time spent in stages called from this one
            self.stack.append(frame)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.stack.pop()
                self.totals[name] += elapsed - frame[0]
                if self.stack:
                    self.stack[-1][0] += elapsed
        return timed

    def take(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


class Timed:
    """A model behind a timer (torch module or onnxruntime model), keeping its other attributes."""

    def __init__(self, model, profiler: Profiler, name: str) -> None:
        self.model, self._call = model, profiler.wrap(name, model)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def instrument_modules(prof: Profiler) -> None:
    """The pipeline's module-level helpers, shared by every predictor in this process."""
    for name, stage in (("locate_pill", "locate"), ("crop_pill", "crop"), ("letterbox", "detect.letterbox"),
                        ("decide_answer", "answer")):
        setattr(pipeline, name, prof.wrap(stage, getattr(pipeline, name)))
    detector_module.postprocess_detections = prof.wrap("detect.nms", detector_module.postprocess_detections)


def instrument(predictor: pipeline.Predictor, prof: Profiler) -> None:
    """This predictor's models and per-pill steps (instance attributes shadow the methods)."""
    predictor.classify = prof.wrap("classify.rest", predictor.classify)
    predictor.detect = prof.wrap("detect.rest", predictor.detect)
    predictor.transform = prof.wrap("classify.preprocess", predictor.transform)
    predictor.classifier = Timed(predictor.classifier, prof, "classify.forward")
    if predictor.has_detector:
        predictor._detector = Timed(predictor.detector, prof, "detect.forward")
    object.__setattr__(predictor.unknown, "scores", prof.wrap("classify.unknown", predictor.unknown.scores))
    predictor.evidence.read = prof.wrap("imprint", predictor.evidence.read)


def default_photos(exp: Path) -> list[Path]:
    """The experiment's test photos (from its manifest), singles and combinations."""
    cfg = load_run_config(exp, dotenv_path=None)
    with open(Path(cfg.paths.manifest_dir) / "manifest.csv", newline="", encoding="utf-8") as fh:
        paths = {row["image_path"] for row in csv.DictReader(fh) if row["split"] == "test"}
    return sorted(Path(p) for p in paths)


def build(exp: Path, backend: str, imprint: bool, overrides: list[str]) -> pipeline.Predictor:
    cfg = load_run_config(exp, [f"inference.backend={backend}", f"inference.imprint.enabled={str(imprint).lower()}",
                                "inference.hard_cases.enabled=false", "inference.imprint.threads=1", *overrides],
                          dotenv_path=None)
    predictor = pipeline.Predictor(exp, cfg, "cpu")
    predictor.warm_up()
    return predictor


def stable(value):
    """An answer without its timings (elapsed_ms, the imprint read's seconds), to compare runs."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in ("elapsed_ms", "seconds")}
    return [stable(v) for v in value] if isinstance(value, list) else value


def one_photo(predictor: pipeline.Predictor, prof: Profiler, data: bytes, mode: str) -> tuple[dict, dict]:
    """Seconds by stage for one photo (decode + predict), and its answer."""
    prof.take()
    start = time.perf_counter()
    result = predictor.predict(prof.wrap("decode", decode_image)(data), mode=mode)
    total = time.perf_counter() - start
    stages = prof.take()
    return {**stages, "other": total - sum(stages.values()), "total": total}, stable(result)


def one_round(predictors: dict, prof: Profiler, photos: list[bytes], mode: str, flip: bool) -> tuple[dict, dict]:
    """Mean ms per photo by stage, per backend, and the answers. The backends take turns photo by photo (the
    first one changing every photo), so that both see the same load from the neighbours."""
    sums: dict[str, dict] = {b: defaultdict(float) for b in predictors}
    answers: dict[str, list] = {b: [] for b in predictors}
    order = list(predictors)
    for i, data in enumerate(photos):
        for backend in order[::-1] if (i % 2) ^ flip else order:
            stages, answer = one_photo(predictors[backend], prof, data, mode)
            answers[backend].append(answer)
            for stage, seconds in stages.items():
                sums[backend][stage] += seconds
    return {b: {k: v * 1000 / len(photos) for k, v in s.items()} for b, s in sums.items()}, answers


def profile(exp: Path, photos: list[bytes], args: argparse.Namespace, imprint: bool, prof: Profiler) -> dict:
    predictors = {b: build(exp, b, imprint, args.set) for b in ("torch", "onnx")}
    for predictor in predictors.values():
        instrument(predictor, prof)
    one_round(predictors, prof, photos, args.mode, False)  # warm-up: OCR models load, allocators settle
    runs: dict[str, list[dict]] = {b: [] for b in predictors}
    for i in range(args.rounds):
        means, answers = one_round(predictors, prof, photos, args.mode, bool(i % 2))
        for backend, stages in means.items():
            runs[backend].append(stages)
    table = {b: {s: statistics.median(r.get(s, 0.0) for r in rs) for s in (*STAGES, "total")} for b, rs in runs.items()}
    print_table(table, f"imprint reading {'on' if imprint else 'off'}", len(photos), args.mode, args.rounds)
    return {"ms_per_photo": table, "answers": answers}


def print_table(table: dict, title: str, n: int, mode: str, rounds: int) -> None:
    print(f"\n{title}: {n} photos, mode {mode}, median of {rounds} rounds, ms per photo")
    print(f"{'stage':<22}{'torch':>9}{'onnx':>9}{'torch/onnx':>12}")
    for stage in (*STAGES, "total"):
        t, o = table["torch"][stage], table["onnx"][stage]
        ratio = f"{t / o:.2f}x" if o > 0.05 else "-"
        print(f"{stage:<22}{t:>9.2f}{o:>9.2f}{ratio:>12}")
    saved = sum(table["torch"][s] - table["onnx"][s] for s in ("classify.forward", "detect.forward"))
    total = table["torch"]["total"]
    print(f"ceiling if only the model forwards differ: {total / max(total - saved, 1e-9):.2f}x "
          f"(models {saved:.2f} ms of torch's {total:.2f} ms per photo)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", type=Path, required=True, help="experiment with checkpoints and export/")
    parser.add_argument("--photos", type=Path, nargs="*", help="default: the experiment's test photos")
    parser.add_argument("--mode", default="auto", choices=("auto", "single", "combo"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--imprint", choices=("on", "off", "both"), default="both")
    parser.add_argument("--answers", type=Path, help="write the answers (JSON) here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both backends, e.g. inference.imprint.threads=0")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the ONNX models take torch's thread count (models/export.py)
    paths = args.photos or default_photos(args.exp)
    photos = [p.read_bytes() for p in paths]
    prof = Profiler()
    instrument_modules(prof)
    out = {}
    for imprint in {"on": (True,), "off": (False,), "both": (False, True)}[args.imprint]:
        out[f"imprint_{'on' if imprint else 'off'}"] = profile(args.exp, photos, args, imprint, prof)
    if args.answers:
        answers = {k: v["answers"] for k, v in out.items()}
        args.answers.write_text(json.dumps(answers, indent=1, ensure_ascii=False, sort_keys=True, default=str))
    print("\nend to end, torch/onnx: " + ", ".join(
        f"{k} {v['ms_per_photo']['torch']['total'] / v['ms_per_photo']['onnx']['total']:.2f}x" for k, v in out.items()))


if __name__ == "__main__":
    main()
