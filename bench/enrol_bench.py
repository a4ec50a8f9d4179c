"""Enrolling new drugs without retraining, on a trained demo experiment (a scratch copy: the original is not
touched): the held-out drugs are enrolled from N photos each and their other photos answered; the known drugs'
test photos are answered before and after by the same predictor (the baseline of this run); the time to enrol one
drug is compared with the time to answer one photo, and with a whole `pillsnap enrol` (models loaded first).

    .venv/bin/python bench/enrol_bench.py --exp runs/demo/exp [--photos 5 --threads 2]
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


def ratio(after: float | None, before: float | None) -> str:
    return "n/a" if not before or after is None else f"{after / before:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="runs/demo/exp")
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
        times = timings(cfg, chosen)
        print(f"time ({args.threads} threads): enrol one drug {times['enrol_s']:.2f} s = "
              f"{times['enrol_over_one_photo']}x answering one photo ({times['answer_one_photo_s']:.2f} s); "
              f"models loaded and enrolled (the CLI) {times['load_and_enrol_s']:.2f} s")


if __name__ == "__main__":
    main()
