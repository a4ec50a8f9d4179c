"""A drug the classifier ranked below the top-k brought back by a conclusive imprint read (Classified.reserve,
answer.recalled_candidates) against the top-k alone, on the same reads and answers in the same run.

1. The final answers on a trained experiment's validation crops (read once as inference reads them, the imprint
   check on; the run's calibration, unknown-pill rule and evidence weights) with the reserve and without it: the
   right drug named, withheld as unknown, drugs recalled and how many of those were right.
2. The same on the held-out drugs' single-pill photos: answered unknown (a recall names a known drug instead).
3. The pipeline in auto mode over the test photos with the reserve and without it (recall_min_probability above 1,
   so that no drug is kept aside), photo by photo alternating: single-photo accuracy and all pills right on the
   combination photos.

    .venv/bin/python bench/imprint_recall.py --exp runs/demo/exp [--limit 256] [--skip-photos]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch


def answers(cfg, exp: Path, limit: int) -> dict:
    from reader_likelihoods import run_unknown_rule

    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.eval.calibration import _held_out_loader, _val_answers, crop_sources, load_manifest_if_any
    from pillsnap.infer.answer import calibrated_evidence, decide_answer
    from pillsnap.infer.matching import KnownImprints
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference

    loaders = build_dataloaders_twostage(cfg)
    model = WithFeatures(load_classifier_for_inference(exp / "checkpoints" / "classification_best.pt", "cpu")[0])
    cal = json.loads((exp / "checkpoints" / "calibration.json").read_text())
    unknown, manifest = run_unknown_rule(exp, cal), load_manifest_if_any(cfg)
    names, class_map = list(loaders.meta["class_names"]), dict(loaders.meta.get("class_map") or {})
    weights, thresholds = calibrated_evidence(cal)
    known = KnownImprints(class_map)
    sets = {"validation": _val_answers(model.eval(), loaders.cls_val.dataset, float(cal["temperature"]), names,
                                       class_map, int(cfg.inference.topk), 1, limit, True, unknown,
                                       crop_sources(loaders.cls_val.dataset, manifest), check_unknown=True)}
    held = None if manifest is None else _held_out_loader(cfg, set(names), manifest)
    if held is not None:
        n = min(len(held.dataset), limit)
        sets["held-out"] = _val_answers(model, held.dataset, float(cal["temperature"]), names, class_map,
                                        int(cfg.inference.topk), 1, n, True, unknown, np.full(n, "single"),
                                        check_unknown=True)
    out = {}
    for name, items in sets.items():
        out[name] = {}
        for way in ("with", "without"):
            rows = []
            for item in items:
                classified = item.classified if way == "with" else item.classified._replace(reserve=())
                answer = decide_answer(classified, class_map, item.read, None,
                                       unknown.for_answer(len(names), item.source), thresholds, weights, known=known)
                top = answer.candidates[0] if answer.candidates else {}
                rows.append((not answer.unknown and top.get("mapping_code") == item.truth, answer.unknown,
                             bool(top.get("recalled_by_imprint")) and not answer.unknown))
            right, withheld, recalled = (np.array(column) for column in zip(*rows, strict=True))
            out[name][way] = {"n": len(rows), "right": float(right.mean()), "unknown": float(withheld.mean()),
                              "recalled": int(recalled.sum()), "recalled_right": int((recalled & right).sum())}
    return out


def test_photos(cfg, exp: Path, split: str) -> dict:
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import _photo_outcome, photo_groups
    from pillsnap.infer.pipeline import Predictor

    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), split)
    on, off = Predictor(str(exp), cfg, "cpu"), Predictor(str(exp), cfg, "cpu")
    off.thresholds = dataclasses.replace(off.thresholds, recall_min_probability=2.0)  # nothing kept aside
    known = set(on.class_names)
    outcomes: dict[str, list[dict]] = {"with": [], "without": []}
    for i, photo in enumerate(photos):
        for name, predictor in ((("with", on), ("without", off)) if i % 2 else (("without", off), ("with", on))):
            outcomes[name].append(_photo_outcome(photo, predictor.predict(photo["image_path"], mode="auto"), known))
    out = {"photos": len(photos)}
    for name, rows in outcomes.items():
        labelled = [o for o, p in zip(rows, photos, strict=True) if not p["incomplete_gt"]]
        single = [o["all_right"] for o in rows if o["image_type"] == "single"]
        combos = [o["all_right"] for o in labelled if o["image_type"] != "single"]
        out[name] = {"single": float(np.mean(single)), "combos": float(np.mean(combos)), "n_combos": len(combos)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=256, help="validation crops and held-out photos at most")
    parser.add_argument("--split", default="test")
    parser.add_argument("--skip-photos", action="store_true", help="only the answers on crops")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. paths.manifest_dir=...)")
    args = parser.parse_args()
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
