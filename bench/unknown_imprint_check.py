"""The imprint check of the unknown-pill answer (inference.imprint.unknown_check): how much it can tell at the
design's scale, and what it costs.

1. Scale (no model needed): drugs drawn by the synthetic generator, `--known` of them known, `--unseen` others.
   An unseen drug's pill is answered "unknown" when the answer policy's check (answer.foreign_imprint) says its
   read imprint is like none of its candidates'; its candidates are the 5 known drugs that look most like it (same
   shape and colours first: what a classifier confuses). For the unseen drugs' imprints read right and with one
   character misread: the share the check answers "unknown"; beside it the share a check against every known drug
   would (the rule not taken). For the known drugs' own imprints misread once and twice, against their own
   candidates (themselves and 4 look-alikes): the share wrongly answered "unknown" (one misread of a 2+ character
   imprint stays at the floor by construction; two are where the cost shows). Time per
   read of the check (5 candidates) and of looking through every known imprint for the one the read is (done
   only for a pill the check answers "unknown"), against the check.
2. With `--exp`: the pipeline's time per photo with the check on and off, the same photos in alternating order,
   one thread, after a warm-up round; and how many pills each answered "unknown".

    .venv/bin/python bench/unknown_imprint_check.py [--known 10 100 1000 5000] [--unseen 500]
        [--exp runs/demo/exp --photos 24 --rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pillsnap.data.synth import make_classes
from pillsnap.infer.answer import foreign_imprint
from pillsnap.infer.imprint import ImprintRead
from pillsnap.infer.matching import KnownImprints, class_imprints
from pillsnap.infer.thresholds import THRESHOLDS

ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def misread(text: str, rng: random.Random, times: int = 1) -> str:
    """`text` with `times` characters (distinct places, at most all) replaced by others of the imprint alphabet."""
    for i in rng.sample(range(len(text)), min(times, len(text))):
        text = text[:i] + rng.choice([c for c in ALPHABET if c != text[i]]) + text[i + 1:]
    return text


def legible(side: str) -> str:
    """An imprint key as OCR could read it: logo and score-line keys dropped."""
    return side.replace("*", "").replace("|", "")


def look_alikes(drug, known: list, n: int, rng: random.Random) -> list:
    """The `n` known drugs that look most like `drug`: same shape and colours, then same colours, then any."""
    def rank(other) -> int:
        same_colours = other.look.colors == drug.look.colors
        return 0 if same_colours and other.look.shape == drug.look.shape else (1 if same_colours else 2)

    return sorted(known, key=lambda other: (rank(other), rng.random()))[:n]


def foreign(text: str, candidates: list) -> bool:
    """What the answer policy's check says of a confident read `text` on a pill named candidates[0]."""
    class_map = {c.code: c.fields for c in candidates}
    ranked = [{"mapping_code": c.code} for c in candidates]
    return foreign_imprint(ImprintRead(text, 0.95, 0.0, 0.0, True), "", ranked, class_map) is not None


def readable(drug) -> list[str]:
    return [legible(s) for s in class_imprints(drug.fields) if len(legible(s)) >= THRESHOLDS.foreign_read_chars]


def scale_part(sizes: list[int], unseen: int, seed: int, top_k: int = 5) -> None:
    rng = random.Random(seed)
    classes = make_classes(max(sizes) + unseen, seed)
    rng.shuffle(classes)
    print(f"{unseen} unseen drugs, each read (confidence 0.95) on a pill named after its {top_k} look-alikes; the "
          f"answer policy's check (answer.foreign_imprint) decides; known drugs' own imprints misread 1 or 2 times")
    print(f"{'known':>6} | {'unseen: read right':>18} | {'1 misread':>9} | {'vs every known':>14} | "
          f"{'known, 1 / 2 misread':>20} | {'check us':>8} | {'every known us':>14} | ratio")
    for size in sizes:
        known = classes[unseen:unseen + size]
        index = KnownImprints({c.code: c.fields for c in known})
        right, wrong, every, own1, own2, cost_check, cost_all = [], [], [], [], [], 0.0, 0.0
        for drug in classes[:unseen]:
            reads = readable(drug)
            if not reads:
                continue
            candidates = look_alikes(drug, known, top_k, rng)
            read = rng.choice(reads)
            right.append(foreign(read, candidates))
            bad = misread(read, rng)
            start = time.perf_counter()
            wrong.append(foreign(bad, candidates))
            cost_check += time.perf_counter() - start
            start = time.perf_counter()
            every.append(index.closest(read, THRESHOLDS.imprint_floor).similarity < THRESHOLDS.imprint_floor)
            cost_all += time.perf_counter() - start
        for drug in rng.sample(known, min(len(known), unseen)):
            reads = readable(drug)
            if reads:
                mine = [drug, *look_alikes(drug, [k for k in known if k is not drug], top_k - 1, rng)]
                own1.append(foreign(misread(rng.choice(reads), rng), mine))
                own2.append(foreign(misread(rng.choice(reads), rng, 2), mine))
        n, m = len(right), max(1, len(own1))
        print(f"{size:>6} | {sum(right) / n:>18.3f} | {sum(wrong) / n:>9.3f} | {sum(every) / n:>14.3f} | "
              f"{sum(own1) / m:>9.3f} / {sum(own2) / m:<8.3f} | {cost_check / n * 1e6:>8.0f} | "
              f"{cost_all / n * 1e6:>14.0f} | {cost_all / cost_check:.0f}x")


def pipeline_part(exp: str, n_photos: int, rounds: int) -> None:
    import torch

    from pillsnap.config.run import load_run_config
    from pillsnap.data import load_manifest
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.infer.preprocess import load_image

    torch.set_num_threads(1)
    predictors = {}
    for on in (True, False):
        cfg = load_run_config(exp, [f"inference.imprint.unknown_check={str(on).lower()}", "inference.imprint.threads=1",
                                    "inference.hard_cases.enabled=false"])
        predictors["on" if on else "off"] = Predictor(exp, cfg, "cpu")
    manifest = load_manifest(predictors["on"].cfg.paths.manifest_dir)
    paths = sorted(manifest.loc[manifest["split"] == "test", "image_path"].unique())
    paths = paths[:: max(1, len(paths) // n_photos)][:n_photos]
    images = [load_image(p)[0] for p in paths]
    times: dict[str, list[float]] = {"on": [], "off": []}
    unknown: dict[str, int] = {}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name in (("on", "off") if round_ % 2 else ("off", "on")):
            start = time.perf_counter()
            results = [predictors[name].predict(im, mode="auto") for im in images]
            if round_:
                times[name].append((time.perf_counter() - start) / len(images))
            unknown[name] = sum(p["unknown"] for r in results for p in r["pills"])
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"pipeline, {len(images)} test photos, median of {rounds} rounds: check on {on * 1000:.0f} ms/photo, off "
          f"{off * 1000:.0f} ms/photo ({on / off:.2f}x); pills answered unknown: on {unknown['on']}, off "
          f"{unknown['off']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--known", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--unseen", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exp", default=None, help="a trained experiment: time the pipeline with the check on/off")
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scale_part(args.known, args.unseen, args.seed)
    if args.exp:
        pipeline_part(args.exp, args.photos, args.rounds)


if __name__ == "__main__":
    main()
