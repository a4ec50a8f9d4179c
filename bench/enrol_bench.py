"""Enrolling new drugs without retraining, on a trained demo experiment (a scratch copy: the original is not
touched): the held-out drugs are enrolled from N photos each and their other photos answered; the known drugs'
test photos are answered before and after by the same predictor (the baseline of this run); the time to enrol one
drug is compared with the time to answer one photo, and with a whole `pillsnap enrol` (models loaded first).

    .venv/bin/python bench/enrol_bench.py --exp runs/demo/exp [--photos 5 --threads 2]

`--scale`: no experiment; what enrol() adds at the design's sizes (5,000 trained drugs, 1,280 features, the
calibration's 25,000-crop probe, 5 per drug, 20 drugs enrolled before, the new drug a look-alike of one): the
measure of what a new drug would take from the trained drugs (pillsnap.infer.enrolment.taken_from_trained),
against the unknown-pill score of the same crops against the same means (ClassGaussians.score, the baseline), and
the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def scratch_copy(exp: Path, root: Path) -> Path:
    """The experiment with its files hard-linked (checkpoints are large) and enrolments cleared."""
    copy = Path(shutil.copytree(exp, root / "exp", copy_function=os.link,
                                ignore=shutil.ignore_patterns("enrolment*", "hard_cases", "tb")))
    return copy


def timings(cfg, photos: list[str]) -> dict:
    """Seconds to answer one photo, to enrol one drug, and to load the models and enrol (what the CLI does)."""
    from pillsnap.infer.enrol import DrugInfo, enrol, remove
    from pillsnap.infer.pipeline import Predictor

    start = time.perf_counter()
    predictor = Predictor(cfg.paths.exp_dir, cfg, "cpu")
    predictor.predict(photos[0], mode="single")  # warm
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    predictor.predict(photos[0], mode="single")
    one_photo = time.perf_counter() - start
    start = time.perf_counter()
    enrol(predictor, DrugInfo.parse("K-999999", "bench drug"), photos, force=True)
    enrolling = time.perf_counter() - start
    remove(cfg.paths.exp_dir, "K-999999")
    return {"answer_one_photo_s": round(one_photo, 3), "enrol_s": round(enrolling, 3),
            "load_and_enrol_s": round(loaded + enrolling, 3), "enrol_over_one_photo": round(enrolling / one_photo, 1)}


def scale(threads: int) -> None:
    """The cost measure at the design's sizes, against the unknown-pill score of the same crops."""
    import resource

    import numpy as np

    from pillsnap.infer.enrolment import PROBE_CROPS, Enrolled, Probe, taken_from_trained
    from pillsnap.metrics.novelty import ClassGaussians

    rng = np.random.default_rng(0)
    drugs, dims = 5000, 1280
    gaussians = ClassGaussians(rng.normal(size=(drugs, dims)).astype(np.float32), np.eye(dims, dtype=np.float32) * 0.1)
    labels = np.repeat(np.arange(drugs), PROBE_CROPS // drugs)  # 5 crops of each drug, near its mean
    probe = Probe(gaussians.means[labels] + rng.normal(size=(len(labels), dims)).astype(np.float32),
                  labels, rng.uniform(0.3, 1.0, len(labels)).astype(np.float32), rng.random(len(labels)) < 0.9)
    before = Enrolled()
    for k in range(20):
        before = before.with_drug({"mapping_code": f"K-9{k:05d}", "n_photos": 5, "spread": 1.0},
                                  rng.normal(size=dims).astype(np.float32) * 10)
    # the new drug's mean on one trained drug's (in the whitened space: the whitening is 0.1 x identity)
    after = before.with_drug({"mapping_code": "K-999999", "n_photos": 5, "spread": 1.0},
                             gaussians.means[7] / 0.1 + rng.normal(size=dims).astype(np.float32))
    start = time.perf_counter()
    gaussians.score(probe.whitened / 0.1)  # the same crops, raw (the whitening is 0.1 x identity)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    taken = taken_from_trained(probe, gaussians, before, after, "K-999999", 500.0)
    measure = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"design sizes ({threads} threads): what a new drug takes from {drugs} trained drugs on {PROBE_CROPS} "
          f"probe crops, 20 enrolled before: {measure:.2f} s = {measure / baseline:.1f}x the unknown-pill score of "
          f"the same crops ({baseline:.2f} s); peak RSS {peak:.0f} MiB; taken {int(taken.sum())}, of them "
          f"{int((probe.labels[taken] == 7).sum())} of the look-alike drug's "
          f"{int(probe.right[probe.labels == 7].sum())} right")


def probe_against_test(cfg, photos: int) -> None:
    """What enrol() measures a drug would take from the trained drugs, on the calibration's validation probe and on
    a probe built the same way from the known drugs' test crops, against what enrolling it does to those test crops
    (their classifier top-1, right before and taken by an enrolled drug after)."""
    import numpy as np

    from pillsnap.data import load_manifest
    from pillsnap.eval.enrol_eval import _enrol_all, _plan, known_crops
    from pillsnap.infer.enrol import remove
    from pillsnap.infer.enrolment import Probe, load_probe, read_store, taken_from_trained, trained_gaussians
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.metrics.calibration import calibrated_probs
    from pillsnap.utils import read_json

    manifest = load_manifest(cfg.paths.manifest_dir)
    predictor = Predictor(cfg.paths.exp_dir, cfg, "cpu")
    trained = list(predictor.trained[0])
    crops = known_crops(manifest, set(trained), predictor.crop_margin, seed=int(cfg.train.seed))
    images = [crop for crop, _, _ in crops]
    sources = ["single" if kind == "single" else "combination" for _, _, kind in crops]
    before = predictor.classify(images, sources)
    logits, features = predictor.forward(images)
    probs = calibrated_probs(logits.float().cpu().numpy(), predictor.temperatures.per_row(sources))
    labels = np.array([trained.index(code) for _, code, _ in crops])
    ckpt = predictor.exp_dir / "checkpoints"
    gaussians, threshold = trained_gaussians(ckpt, predictor.calibration)
    test_probe = Probe(features.numpy() @ gaussians.whiten, labels, probs.max(1), probs.argmax(1) == labels)
    val_probe = load_probe(ckpt, predictor.calibration)[0]
    plan = _plan(manifest, set(trained), photos, int(cfg.train.seed))
    class_map = {c["mapping_code"]: c for c in read_json(Path(cfg.paths.manifest_dir) / "class_map.json")["classes"]}
    _enrol_all(predictor, plan, class_map)
    try:
        after = predictor.classify(images, sources)
        flips = sum(b.topk[0]["mapping_code"] == code and a.topk[0]["mapping_code"] != code
                    for b, a, (_, code, _) in zip(before, after, crops, strict=True))
        store = read_store(ckpt, predictor.classifier_path)
        probes = [(name, probe) for name, probe in (("validation probe", val_probe), ("test crops", test_probe))
                  if probe is not None]
        for code in store.codes:
            counts = [(name, taken_from_trained(probe, gaussians, store.without(code), store, code, threshold).sum(),
                       probe.right.sum()) for name, probe in probes]
            print(f"{code}: " + "; ".join(f"{name} taken {int(k)} of {int(n)} right" for name, k, n in counts))
        print(f"test crops answered right before and otherwise after enrolling them all: {flips} of "
              f"{sum(b.topk[0]['mapping_code'] == code for b, (_, code, _) in zip(before, crops, strict=True))}")
    finally:
        for code in plan:
            remove(cfg.paths.exp_dir, code)


def ratio(after: float | None, before: float | None) -> str:
    return "n/a" if not before or after is None else f"{after / before:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="runs/demo/exp")
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", action="store_true", help="the cost measure at the design's sizes (no --exp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale:
        scale(args.threads)
        return
    from pillsnap.config import load_cli_config
    from pillsnap.data import load_manifest
    from pillsnap.eval.enrol_eval import _plan, evaluate_enrolment, format_enrolment

    with tempfile.TemporaryDirectory(prefix="enrol_bench_") as tmp:
        exp = scratch_copy(Path(args.exp), Path(tmp))
        cfg = load_cli_config(exp, None, [f"paths.exp_dir={exp}", "inference.hard_cases.enabled=false"])
        figures = evaluate_enrolment(cfg, "cpu", args.photos)
        print(json.dumps(figures, ensure_ascii=False, indent=2))
        print("\n".join(format_enrolment(figures)))
        before, after = figures["known_before"], figures["known_after"]
        print("known drugs, after / before (same predictor, same photos): " + ", ".join(
            f"{name} {ratio(after[name], before[name])}" for name in before))
        for kind, stats in figures["known_crops_after"].items():
            old = figures["known_crops_before"][kind]
            print(f"known drugs' {kind} crops, classifier top-1 after / before: "
                  f"{ratio(stats['accuracy'], old['accuracy'])} ({old['accuracy']:.3f} -> {stats['accuracy']:.3f}, "
                  f"{stats['crops']} crops)")
        print(f"enrolled drugs: accuracy {figures['accuracy']:.3f} against mean probability of the answers "
              f"{figures['mean_top_probability']:.3f}")
        manifest = load_manifest(cfg.paths.manifest_dir)
        trained = set(json.loads((exp / "checkpoints" / "classes.json").read_text())["class_names"])
        chosen = next(iter(_plan(manifest, trained, args.photos, 0).values()))[0]
        probe_against_test(cfg, args.photos)
        times = timings(cfg, chosen)
        print(f"time ({args.threads} threads): enrol one drug {times['enrol_s']:.2f} s = "
              f"{times['enrol_over_one_photo']}x answering one photo ({times['answer_one_photo_s']:.2f} s); "
              f"models loaded and enrolled (the CLI) {times['load_and_enrol_s']:.2f} s")


if __name__ == "__main__":
    main()
