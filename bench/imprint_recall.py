"""A drug the classifier ranked below the top-k brought back by a conclusive imprint read (Classified.reserve,
answer.recalled_candidates) against the top-k alone, on the same reads and answers in the same run.

1. The final answers on a trained experiment's validation crops (read once as inference reads them, the imprint
   check on; the run's calibration, unknown-pill rule and evidence weights) with the reserve and without it: the
   right drug named, withheld as unknown, drugs recalled and how many of those were right.
2. The same on the held-out drugs' single-pill photos: answered unknown (a recall names a known drug instead).
3. The pipeline in auto mode over the test photos with the reserve and without it (recall_min_probability above 1,
   so that no drug is kept aside), photo by photo alternating: single-photo accuracy and all pills right on the
   combination photos.

4. With `--scale` (no model): drugs drawn by the synthetic generator, 5,000 known and 500 others, each pill's
   candidates its 5 look-alikes among the known drugs (same shape and colours first) and its reserve the next 20,
   its own imprint read right at 0.95: how often an unseen drug's pill is named as a known drug by a recall (the
   risk: a shared or near imprint), and how often a known drug ranked 6th-25th comes back and is named.

    .venv/bin/python bench/imprint_recall.py --exp runs/demo/exp [--limit 256] [--skip-photos]
    .venv/bin/python bench/imprint_recall.py --scale [--known 5000 --unseen 500]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch


def answers(cfg, exp: Path, limit: int) -> dict:
    from reader_likelihoods import open_run, read_held_out, read_validation

    from pillsnap.infer.answer import decide_answer
    from pillsnap.infer.matching import KnownImprints
    from pillsnap.infer.thresholds import calibrated_evidence

    run = open_run(cfg, exp)
    unknown, names, class_map = run.unknown, run.names, run.class_map
    thresholds = calibrated_evidence(run.cal)[1]
    known = KnownImprints(class_map)
    sets = {"validation": read_validation(run, limit)[1]}
    held = read_held_out(run, limit)
    if held is not None:
        sets["held-out"] = held
    out = {}
    for name, items in sets.items():
        out[name] = {}
        for way in ("with", "without"):
            rows = []
            for item in items:
                classified = item.classified if way == "with" else item.classified._replace(reserve=())
                answer = decide_answer(classified, class_map, item.read, None,
                                       unknown.for_answer(len(names), item.source), thresholds,
                                       calibrated_evidence(run.cal, item.source)[0], known=known)
                top = answer.candidates[0] if answer.candidates else {}
                rows.append((not answer.unknown and top.get("mapping_code") == item.truth, answer.unknown,
                             bool(top.get("recalled_by_imprint")) and not answer.unknown))
            right, withheld, recalled = (np.array(column) for column in zip(*rows, strict=True))
            out[name][way] = {"n": len(rows), "right": float(right.mean()), "unknown": float(withheld.mean()),
                              "recalled": int(recalled.sum()), "recalled_right": int((recalled & right).sum())}
    return out


def test_photos(cfg, exp: Path, split: str) -> dict:
    from reader_likelihoods import alternate

    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import photo_groups
    from pillsnap.infer.pipeline import Predictor

    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), split)
    on, off = Predictor(str(exp), cfg, "cpu"), Predictor(str(exp), cfg, "cpu")
    off.thresholds = dataclasses.replace(off.thresholds, recall_min_probability=2.0)  # nothing kept aside
    return {"photos": len(photos), **alternate(photos, {"with": on, "without": off})}


def scale(known_n: int, unseen_n: int, seed: int = 0) -> dict:
    import random

    from unknown_imprint_check import look_alikes, readable

    from pillsnap.data.synth import make_classes
    from pillsnap.infer.answer import Classified, UnknownRule, decide_answer
    from pillsnap.infer.imprint import ImprintRead
    from pillsnap.infer.matching import KnownImprints

    rng = random.Random(seed)
    classes = make_classes(known_n + unseen_n, seed)
    rng.shuffle(classes)
    unseen, known = classes[:unseen_n], classes[unseen_n:]
    class_map = {c.code: c.fields for c in known}
    index, off = KnownImprints(class_map), UnknownRule("probability", None, len(known))
    top_p, reserve_p = (0.5, 0.2, 0.1, 0.05, 0.05), 0.005

    def answer(ranked: list, text: str, keep: bool = True) -> tuple[str | None, bool]:
        cands = [{"mapping_code": c.code, "name": "", "edi_codes": [], "probability": p}
                 for c, p in zip(ranked, top_p + (reserve_p,) * 20, strict=False)]
        out = decide_answer(Classified(tuple(cands[:5]), None, tuple(cands[5:]) if keep else ()), class_map,
                            ImprintRead(text, 0.95, 0.0, 0.0, True), None, off, known=index)
        top = out.candidates[0] if out.candidates else {}
        return (None if out.unknown else top.get("mapping_code")), bool(top.get("recalled_by_imprint"))

    false = tried = 0
    for drug in unseen:
        texts = readable(drug)
        if not texts:
            continue
        named, recalled = answer(look_alikes(drug, known, 25, rng), rng.choice(texts))
        tried += 1
        false += recalled and named is not None
    back = named_right = named_without = sampled = 0
    for drug in rng.sample(known, min(unseen_n, len(known))):
        texts = readable(drug)
        if not texts:
            continue
        ranked = [c for c in look_alikes(drug, known, 25, rng) if c.code != drug.code][:24]
        ranked.insert(rng.randrange(5, 25), drug)  # the right drug ranked 6th to 25th
        text = rng.choice(texts)
        named, recalled = answer(ranked, text)
        sampled += 1
        back += recalled
        named_right += named == drug.code
        named_without += answer(ranked, text, keep=False)[0] == drug.code
    return {"unseen": tried, "false_recall": false / max(tried, 1), "known": sampled,
            "brought_back": back / max(sampled, 1), "named_right": named_right / max(sampled, 1),
            "named_without": named_without / max(sampled, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path)
    parser.add_argument("--limit", type=int, default=256, help="validation crops and held-out photos at most")
    parser.add_argument("--split", default="test")
    parser.add_argument("--skip-photos", action="store_true", help="only the answers on crops")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. paths.manifest_dir=...)")
    parser.add_argument("--scale", action="store_true", help="only the synthetic part at the design's scale")
    parser.add_argument("--known", type=int, default=5000)
    parser.add_argument("--unseen", type=int, default=500)
    args = parser.parse_args()
    if args.scale:
        out = scale(args.known, args.unseen)
        print(f"{args.known} known drugs, each pill's reserve its 6th-25th look-alikes, its imprint read right: "
              f"{out['unseen']} unseen drugs named as a known one by a recall {out['false_recall']:.3f}; "
              f"{out['known']} known drugs ranked 6th-25th brought back {out['brought_back']:.3f}, named "
              f"{out['named_right']:.3f} vs {out['named_without']:.3f} with the top-k alone")
        return
    if args.exp is None:
        parser.error("--exp is required unless --scale")
    from pillsnap.config.run import load_cli_config

    torch.set_num_threads(1)
    exp = args.exp.resolve()
    if not (exp / "checkpoints" / "calibration.json").is_file():
        raise SystemExit(f"{exp}: no checkpoints/calibration.json (train, or run pillsnap calibrate --exp EXP)")
    cfg = load_cli_config(str(exp), None, [f"paths.exp_dir={exp}", "inference.hard_cases.enabled=false",
                                           "inference.imprint.threads=1", *args.set])
    for name, ways in answers(cfg, exp, args.limit).items():
        w, wo = ways["with"], ways["without"]
        named = "" if name == "held-out" else (  # no held-out drug can be named right: it is not a known one
            f"right drug named {w['right']:.3f} vs {wo['right']:.3f} without the reserve "
            f"({w['right'] / max(wo['right'], 1e-9):.2f}x) | ")
        print(f"{name} ({w['n']}): {named}answered unknown {w['unknown']:.3f} vs {wo['unknown']:.3f} | drugs "
              f"recalled by their imprint {w['recalled']} ({w['recalled_right']} right)")
    if not args.skip_photos:
        photos = test_photos(cfg, exp, args.split)
        w, wo = photos["with"], photos["without"]
        print(f"test photos ({photos['photos']}, auto): single-photo accuracy {w['single']:.3f} vs {wo['single']:.3f}"
              f" | all pills right on {w['n_combos']} combination photos {w['combos']:.3f} vs {wo['combos']:.3f}")


if __name__ == "__main__":
    main()
