"""The box check (inference.box_check) and sets filled to the coverage (inference.prediction_set.fill_to_coverage)
on a trained experiment's test photos: each against the rule without it, on the same photos in the same run.

1. The pipeline in auto mode over the test photos with the box check on and off (one thread, the same photos,
   two rounds in the order on, off, off, on): routing, single-photo accuracy, all pills right on the combination
   photos, the boxes answered "maybe no pill" (on no labelled pill / on a labelled one; matched most confident
   first, so a second box on a labelled pill counts as on none), the boxes on no labelled pill named as a drug (and
   how many of those "sure"), and the time per photo.
2. The same answers' prediction sets, filled to the coverage and not (the sets drawn again from each pill's own
   candidates): coverage, mean size, the share of sure (one-drug) answers and how often they are right.

    .venv/bin/python bench/box_check_and_sure.py --exp runs/demo/exp [--split test]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def _named_non_pills(results: list[dict], photos: list[dict]) -> tuple[int, int]:
    """(boxes on no labelled pill answered by name, of which sure) on the photos with every pill labelled."""
    from pillsnap.eval.pipeline_eval import _match

    named = sure = 0
    for result, photo in zip(results, photos, strict=True):
        if photo["incomplete_gt"]:
            continue
        on_pills = set(_match(photo, result["pills"]).values())
        for d, pill in enumerate(result["pills"]):
            if d not in on_pills and not pill["unknown"] and pill.get("det_confidence") is not None:
                named += 1
                sure += bool(pill.get("sure"))
    return named, sure


def _rate(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run(predictor, photos: list[dict], known: set[str]) -> dict:
    from pillsnap.eval.pipeline_eval import _photo_outcome

    outcomes, results, start = [], [], time.perf_counter()
    for photo in photos:
        result = predictor.predict(photo["image_path"], mode="auto")
        results.append(result)
        outcomes.append(_photo_outcome(photo, result, known))
    seconds = time.perf_counter() - start
    labelled = [o for o, p in zip(outcomes, photos, strict=True) if not p["incomplete_gt"]]
    combos = [o for o in labelled if o["image_type"] != "single"]
    doubted = {kind: sum(o["doubted_boxes"][kind] for o in labelled) for kind in ("pill", "no_pill")}
    named, sure = _named_non_pills(results, photos)
    return {"outcomes": outcomes, "combo_all_right": _rate([o["all_right"] for o in combos]),
            "single_right": _rate([o["all_right"] for o in outcomes if o["image_type"] == "single"]),
            "routing": _rate([o["routed_right"] for o in outcomes]), "combos": len(combos), "doubted": doubted,
            "named_non_pills": named, "sure_non_pills": sure, "seconds": seconds, "photos": len(photos)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pillsnap.config.run import load_cli_config
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import photo_groups, set_figures, with_sets
    from pillsnap.infer.pipeline import Predictor

    exp = str(args.exp)
    cfg = load_cli_config(exp, None, [f"paths.exp_dir={exp}", "inference.hard_cases.enabled=false",
                                      "inference.imprint.threads=1"])
    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), args.split)
    off_cfg = copy.deepcopy(cfg)
    off_cfg.inference.box_check.enabled = False
    predictors = {"box check on": Predictor(exp, cfg, "cpu"), "box check off": Predictor(exp, off_cfg, "cpu")}
    known = set(predictors["box check on"].class_names)
    for predictor in predictors.values():  # warm-up: models loaded, the detector hashed, the reader's sessions made
        predictor.warm_up()
        predictor.predict(photos[0]["image_path"], mode="auto")
    runs: dict[str, dict] = {}
    for name in ("box check on", "box check off", "box check off", "box check on"):  # order effects cancel
        r = run(predictors[name], photos, known)
        if name in runs:
            runs[name]["seconds"] += r["seconds"]
            runs[name]["photos"] += r["photos"]
        else:
            runs[name] = r
    for r in runs.values():
        r["ms_per_photo"] = 1000 * r["seconds"] / r["photos"]
    print(f"{len(photos)} {args.split} photos ({runs['box check on']['combos']} combination photos with every pill "
          f"labelled), auto mode, one thread")
    for name, r in runs.items():
        print(f"  {name:<14} routing {r['routing']:.3f} | single photos right {r['single_right']:.3f} | all pills "
              f"right on combinations {r['combo_all_right']:.3f} | boxes answered 'maybe no "
              f"pill': {r['doubted']['no_pill']} on no labelled pill, {r['doubted']['pill']} on a labelled pill | "
              f"boxes on no labelled pill named as a drug: {r['named_non_pills']} ({r['sure_non_pills']} of them "
              f"'sure') | {r['ms_per_photo']:.0f} ms per photo")
    on, off = runs["box check on"], runs["box check off"]
    print(f"ratio on/off: all pills right {on['combo_all_right'] / max(off['combo_all_right'], 1e-9):.2f}x, time per "
          f"photo {on['ms_per_photo'] / off['ms_per_photo']:.2f}x")

    rule = predictors["box check on"].set_rule
    if rule is None:  # the predictor's log said why (no scores, too few answers, a top-k that misses too often)
        print("no prediction sets for this run: see the predictor's warning above")
        return
    outcomes = on["outcomes"]
    for name, fill in (("filled to the coverage", True), ("not filled", False)):
        f = set_figures(with_sets(outcomes, replace(rule, fill=fill)))
        print(f"  sets {rule.method} at {rule.coverage:.2f}, {name:<22} coverage {f['coverage']:.3f} over "
              f"{f['named']} pills named | mean size {f['mean_set_size']:.3f} | sure share {f['sure_share']:.3f}, "
              f"right {f['sure_accuracy']:.3f}")


if __name__ == "__main__":
    main()
