"""Imprint reader: its cost per pill crop against the plain classifier call, and what it reads on rotated
synthetic pills.

Crops are rendered by the synthetic generator (its own classes, look-alike twins included) at several azimuths,
camera elevations and both sides, and cut like the pipeline cuts them. Per crop, in turn: each baseline
classifier (preprocess + forward + softmax on one crop, random weights: the cost does not depend on them), the
reader without candidates (up to four turns), and the reader with three candidates (the crop's class and two
others, its twin first: it stops early on a close match). Medians are compared (the machine is shared). The
first try, RapidOCR's own full pipeline at 8 rotations, is timed on the first `--naive` crops for reference.

    .venv/bin/python bench/bench_imprint.py [--classes 30 --angles 4 --scale 0.5 --threads 1 --naive 10]
                                            [--baselines resnet18:64,tf_efficientnetv2_s:384] [--exp runs/demo/exp]
                                            [--contrast-clip 6]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from pillsnap.data import classification_transform
from pillsnap.data.synth import DrugClass, make_classes
from pillsnap.data.synth_render import PhotoConditions, render_photo
from pillsnap.infer.imprint import ImprintReader, ReaderSettings
from pillsnap.infer.matching import class_imprint_similarity, normalize_imprint
from pillsnap.infer.preprocess import crop_pill

ELEVATIONS = (60, 70, 75, 90)


@dataclass
class Sample:
    crop: Image.Image
    drug: DrugClass
    truth: str  # the imprint of the side facing the camera
    twin: DrugClass | None


def _twins(classes: list[DrugClass]) -> dict[str, DrugClass]:
    """Each look-alike twin's partner (same shape, colours and size; the generator makes them neighbours)."""
    out = {}
    for a, b in zip(classes, classes[1:], strict=False):
        if all(getattr(a.look, k) == getattr(b.look, k) for k in ("shape", "colors", "rgb", "long_mm")):
            out[a.code], out[b.code] = b, a
    return out


def make_samples(n_classes: int, angles: int, scale: float, seed: int) -> list[Sample]:
    classes = make_classes(n_classes, seed)
    twins, rng = _twins(classes), random.Random(seed)
    samples = []
    for drug in classes:
        for k in range(angles):
            back = bool(drug.look.print_back) and rng.random() < 0.4
            cond = PhotoConditions("1" if back else "0", "2", rng.choice("12"), rng.choice(ELEVATIONS),
                                   (k * 360 // angles + rng.randrange(0, 360 // angles, 20)) % 360)
            png, boxes, _ = render_photo([drug.look], cond, scale, seed=rng.getrandbits(32))
            crop = crop_pill(Image.open(io.BytesIO(png)).convert("RGB"), boxes[0], 0.15)
            truth = drug.look.print_back if back else drug.look.print_front
            samples.append(Sample(crop, drug, truth, twins.get(drug.code)))
    return samples


def make_baseline(spec: str, num_classes: int, exp: str | None) -> tuple[str, Callable[[Image.Image], object]]:
    """A classifier call on one crop: `backbone:size` with random weights, or the classifier of `exp`."""
    if exp:
        from pillsnap.infer.artefacts import find_checkpoints
        from pillsnap.models.classifier import load_classifier_for_inference

        model, snapshot = load_classifier_for_inference(find_checkpoints(exp)[0])
        backbone, size = f"{snapshot['model']['backbone']} ({exp})", int(snapshot["model"]["image_size"])
    else:
        import timm

        backbone, size = spec.split(":")[0], int(spec.split(":")[1])
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes).eval()
    transform = classification_transform(size, train=False)

    @torch.no_grad()
    def call(crop: Image.Image) -> object:
        return torch.softmax(model(transform(crop)[None]), -1)

    return f"classifier {backbone} @{size}px", call


def naive_reader(threads: int) -> Callable[[Image.Image], object]:
    """The first try: RapidOCR's own full pipeline (detect, classify, recognise) on the crop at 8 rotations."""
    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR(intra_op_num_threads=threads) if threads else RapidOCR()

    def call(crop: Image.Image) -> object:
        return [engine(np.asarray(crop.rotate(a, expand=True))[:, :, ::-1]) for a in range(0, 360, 45)]

    return call


def _timed(fn: Callable, *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1000, out


def _candidates(sample: Sample, classes: list[DrugClass], rng: random.Random) -> list[DrugClass]:
    others = [c for c in classes if c.code != sample.drug.code and c is not sample.twin]
    return [sample.drug] + ([sample.twin] if sample.twin else []) + rng.sample(others, 2 - bool(sample.twin))


def _best(read: str, classes: list[DrugClass]) -> tuple[DrugClass | None, float]:
    scored = [(class_imprint_similarity(read, {"print_front": c.look.print_front, "print_back": c.look.print_back}),
               c) for c in classes]
    sim, best = max(scored, key=lambda sc: sc[0])
    ties = sum(s == sim for s, _ in scored)
    return (best if sim > 0.5 and ties == 1 else None), sim


def run(samples: list[Sample], baselines: list[tuple[str, Callable]], reader: ImprintReader) -> dict:
    classes = list({s.drug.code: s.drug for s in samples}.values())
    rng = random.Random(1)
    times: dict[str, list[float]] = {name: [] for name, _ in baselines}
    times |= {"reader, no candidates": [], "reader, 3 candidates": []}
    counts = {"crops": 0, "exact": 0, "fuzzy": 0, "top3": 0, "twins": 0, "twin_right": 0}
    for sample in samples:
        for name, call in baselines:
            times[name].append(_timed(call, sample.crop)[0])
        if normalize_imprint(sample.truth):  # else a plain side or a logo only: nothing to read
            _read(sample, _candidates(sample, classes, rng), classes, reader, times, counts)
    return {"times": times, "counts": counts, "classes": len(classes)}


def _read(sample: Sample, cands: list[DrugClass], classes: list[DrugClass], reader: ImprintReader,
          times: dict[str, list[float]], counts: dict[str, int]) -> None:
    ms, read = _timed(reader.read, sample.crop)
    times["reader, no candidates"].append(ms)
    imprints = [t for c in cands for t in (c.look.print_front, c.look.print_back) if t]
    ms, read3 = _timed(reader.read, sample.crop, imprints)
    times["reader, 3 candidates"].append(ms)
    counts["crops"] += 1
    counts["exact"] += read.normalized == normalize_imprint(sample.truth)
    counts["fuzzy"] += _best(read.text, classes)[0] is sample.drug
    counts["top3"] += _best(read3.text, cands)[0] is sample.drug
    if sample.twin is not None:
        counts["twins"] += 1
        counts["twin_right"] += _best(read3.text, [sample.drug, sample.twin])[0] is sample.drug


def report(result: dict, baseline_name: str, scale: float) -> None:
    times, counts = result["times"], result["counts"]
    base = statistics.median(times[baseline_name])
    print("\ncost per crop (median over the crops, ratio to the first baseline)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<52} {median:8.1f} ms  {median / base:6.1f}x  ({len(values)} crops)")
    n = counts["crops"]
    print(f"\nreads on {n} rotated synthetic crops (scale {scale}) with an imprint on the side facing the camera")
    rows = (("exact (normalised) without candidates", counts["exact"], n),
            (f"fuzzy: right class among all {result['classes']}", counts["fuzzy"], n),
            ("right class among 3 candidates (the reader given them)", counts["top3"], n),
            ("look-alike twin told from its partner", counts["twin_right"], counts["twins"]))
    for name, k, total in rows:
        print(f"  {name:<56} {k:4d}/{total:<4d} {k / max(total, 1):6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=30)
    parser.add_argument("--angles", type=int, default=4, help="azimuths per class")
    parser.add_argument("--scale", type=float, default=0.5, help="photo scale (1.0 = real 976x1280 photos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime threads; 1 keeps a shared machine's noise out of the ratio")
    parser.add_argument("--baselines", default="resnet18:64,tf_efficientnetv2_s:384",
                        help="backbone:size list: the demo's classifier and the production one")
    parser.add_argument("--naive", type=int, default=10, help="crops to time the first try on (0: skip)")
    parser.add_argument("--exp", default=None, help="use this experiment's classifier as the baseline instead")
    parser.add_argument("--contrast-clip", type=float, default=ReaderSettings.contrast_clip,
                        help="the reader's local-contrast clip (0: off; default: the reader's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = make_samples(args.classes, args.angles, args.scale, args.seed)
    specs = [None] if args.exp else args.baselines.split(",")
    baselines = [make_baseline(spec, args.classes, args.exp) for spec in specs]
    reader = ImprintReader(ReaderSettings(threads=args.threads, contrast_clip=args.contrast_clip))
    reader.read(samples[0].crop)  # loads the OCR models
    for _, call in baselines:
        call(samples[0].crop)
    result = run(samples, baselines, reader)
    if args.naive:
        naive = naive_reader(args.threads)
        texts = [s.crop for s in samples if normalize_imprint(s.truth)][: args.naive]
        result["times"]["RapidOCR full pipeline x 8 rotations (first try)"] = [_timed(naive, c)[0] for c in texts]
    report(result, baselines[0][0], args.scale)


if __name__ == "__main__":
    main()
