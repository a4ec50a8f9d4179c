"""The candidates' likelihoods as imprint evidence (RerankWeights.likelihood): the answer policy with them at
several weights against without them (weight 0), on the same reads in the same run.

1. Validation crops of a trained experiment, read once as inference reads them (every pill whose top drug has an
   imprint on record, the imprint check's rule); for each weight the evidence scale is fitted again as calibration
   does, then: the right drug first, over the crops read and over all, and the negative log-likelihood of the
   right drug over the crops read.
2. The reader's time per crop with the likelihoods worked out and without (the same reader, the likelihoods'
   recogniser method hidden), alternating crop by crop.
3. The final answers' unknown-pill decision (the run's calibration, the imprint check on) on the known validation
   crops and the held-out drugs' photos, with the imprint check's likelihood path and without it.
4. The pipeline in auto mode over the test photos with the weight in force and with 0 (the run's calibration for
   both, alternating photo by photo): single-photo accuracy and all pills right on the combination photos.

    .venv/bin/python bench/reader_likelihoods.py --exp runs/demo/exp [--limit 256] [--weights 0.5 1 2] [--caps 6]
        [--set paths.manifest_dir=...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch


class _WithoutLikelihoods:
    """The OCR models with only text_map and recognise: the reader then works out no likelihoods."""

    def __init__(self, models: object) -> None:
        self.text_map, self.recognise = models.text_map, models.recognise


class Run(NamedTuple):
    """A trained experiment as these benches read it: its loaders, classifier, calibration and unknown-pill rule."""

    cfg: Any
    loaders: Any
    model: Any
    cal: dict
    unknown: Any
    manifest: Any
    names: list
    class_map: dict


def open_run(cfg, exp: Path) -> Run:
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.eval.calibration import load_manifest_if_any
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference

    loaders = build_dataloaders_twostage(cfg)
    model = WithFeatures(load_classifier_for_inference(exp / "checkpoints" / "classification_best.pt", "cpu")[0])
    cal = json.loads((exp / "checkpoints" / "calibration.json").read_text())
    return Run(cfg, loaders, model.eval(), cal, run_unknown_rule(exp, cal), load_manifest_if_any(cfg),
               list(loaders.meta["class_names"]), dict(loaders.meta.get("class_map") or {}))


def read_answers(run: Run, dataset, limit: int, sources) -> tuple[np.ndarray, list]:
    """The crops calibration would answer (spread_sample: `limit` drawn with train.seed), read once as inference
    reads with the imprint check on; returns (their indices in `dataset`, the answers)."""
    from pillsnap.eval.answer_calibration import spread_sample, val_answers
    from pillsnap.infer.artefacts import Temperatures

    indices = spread_sample(len(dataset), limit, int(run.cfg.train.seed))
    return indices, val_answers(run.model, dataset, Temperatures.from_stored(run.cal), run.names, run.class_map,
                                 int(run.cfg.inference.topk), 1, indices, True, run.unknown, sources,
                                 check_unknown=True)


def read_validation(run: Run, limit: int) -> tuple[np.ndarray, list]:
    from pillsnap.eval.unknown_calibration import crop_sources

    dataset = run.loaders.cls_val.dataset
    return read_answers(run, dataset, limit, crop_sources(dataset, run.manifest))


def read_held_out(run: Run, limit: int) -> list | None:
    """The answers on the photos of the drugs held out of training (None when the run trained on every one)."""
    from pillsnap.eval.unknown_calibration import held_out_loader

    held = None if run.manifest is None else held_out_loader(run.cfg, set(run.names), run.manifest)
    if held is None:
        return None
    return read_answers(run, held.dataset, limit, np.full(len(held.dataset), "single"))[1]


def validation(cfg, exp: Path, limit: int, weights: list[float], caps: list[float]) -> dict:
    from pillsnap.eval.answer_calibration import fit_evidence_scale
    from pillsnap.infer.ranking import rerank
    from pillsnap.infer.thresholds import WEIGHTS

    run = open_run(cfg, exp)
    class_map = run.class_map
    # read once, as inference reads with the imprint check on; the re-ranking below ignores the unknown-pill rule
    indices, items = read_validation(run, limit)
    read = [item for item in items if item.read is not None]
    out = {"crops": len(items), "read": len(read), "by_weight": {}}
    for w, cap in [(0.0, WEIGHTS.likelihood_cap)] + [(w, c) for w in weights if w for c in caps]:
        base = dataclasses.replace(WEIGHTS, likelihood=w, likelihood_cap=cap)
        scale = fit_evidence_scale(items, class_map, base)
        scaled = base.with_read_scaled(scale)
        right_read = nll = 0.0
        for item in read:
            ranked = rerank(item.classified.topk, class_map, item.read.text, item.read.score, None, scaled,
                            likelihoods=item.read.likelihoods, read_likelihood=item.read.read_likelihood).candidates
            right_read += ranked[0]["mapping_code"] == item.truth
            p = {c["mapping_code"]: c["probability"] for c in ranked}
            nll -= np.log(max(p.get(item.truth, 1.0 - sum(p.values())), 1e-12))
        right_unread = sum(item.classified.topk[0]["mapping_code"] == item.truth for item in items if item.read is None)
        out["by_weight"][(w, cap)] = {"scale": scale, "right_read": right_read / max(len(read), 1),
                               "right_all": (right_read + right_unread) / max(len(items), 1),
                               "nll_read": nll / max(len(read), 1)}
    out["timing"] = reader_time(run.loaders.cls_val.dataset, indices, items, class_map, min(len(items), 40))
    out["unknown"] = unknown_pills(run, items, limit)
    return out


def run_unknown_rule(exp: Path, cal: dict):
    """The run's calibrated unknown-pill rule, as inference applies it."""
    from pillsnap.infer.unknown import ClassGaussians, UnknownAnswer

    rule = cal["unknown_rule"]
    by_source = {source: values[rule] for source, values in (cal.get("unknown_thresholds_by_source") or {}).items()}
    return UnknownAnswer(rule, cal["unknown_thresholds"][rule],
                         ClassGaussians.load(exp / "checkpoints" / cal["features_file"]), by_source or None)


def unknown_pills(run: Run, known_items: list, limit: int) -> dict:
    """The final answers' unknown-pill decision (the run's calibration and unknown rule, the imprint check on) on
    the known drugs' validation crops and the held-out drugs' photos, with the imprint check's likelihood path
    (AnswerThresholds.foreign_likelihood_gap) and without it."""
    from pillsnap.eval.answer_calibration import answers_unknown_report
    from pillsnap.infer.answer import decide_answer
    from pillsnap.infer.matching import KnownImprints
    from pillsnap.infer.thresholds import calibrated_evidence

    held_items = read_held_out(run, limit)
    if held_items is None:
        return {}
    names, class_map, cal, unknown = run.names, run.class_map, run.cal, run.unknown
    thresholds = calibrated_evidence(cal)[1]
    imprints = KnownImprints(class_map)

    def answered(items, thresholds):  # each crop weighed with its source's evidence scale, as inference does
        return [decide_answer(item.classified, class_map, item.read, None, unknown.for_answer(len(names), item.source),
                              thresholds, calibrated_evidence(cal, item.source)[0], known=imprints) for item in items]

    out = {}
    for name, chosen in (("with", thresholds), ("without", dataclasses.replace(thresholds,
                                                                             foreign_likelihood_gap=np.inf))):
        out[name] = answers_unknown_report(answered(known_items, chosen), known_items, answered(held_items, chosen))
    return out


def reader_time(dataset, indices, items, class_map: dict, n: int) -> dict:
    """The reader's median time per crop with the likelihoods worked out and without, on the first `n` answered
    crops (`indices` in `dataset`, `items` their answers), alternating."""
    from pillsnap.infer.imprint import ImprintReader, ReaderSettings
    from pillsnap.infer.matching import candidate_imprints

    with_l = ImprintReader(ReaderSettings(threads=1))
    without = ImprintReader(ReaderSettings(threads=1), models=_WithoutLikelihoods(with_l.models))
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    for index in range(n):
        crop = dataset.load_crop(int(indices[index]))
        targets = candidate_imprints(items[index].classified.topk, class_map)
        order = (("with", with_l), ("without", without)) if index % 2 else (("without", without), ("with", with_l))
        for name, reader in order:
            start = time.perf_counter()
            reader.read(crop, targets)
            seconds[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


def test_photos(cfg, exp: Path, weight: float, split: str) -> dict:
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import photo_groups
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.infer.thresholds import WEIGHTS

    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), split)
    on, off = Predictor(str(exp), cfg, "cpu"), Predictor(str(exp), cfg, "cpu")
    for source, kept in on.weights.items():  # each crop source's evidence scale, kept for both
        scale = kept.imprint / WEIGHTS.imprint
        on.weights[source] = dataclasses.replace(kept, likelihood=weight * scale)
        off.weights[source] = dataclasses.replace(off.weights[source], likelihood=0.0)
    return {"photos": len(photos), **alternate(photos, {"on": on, "off": off})}


def alternate(photos: list[dict], predictors: dict) -> dict:
    """Two predictors ({name: Predictor}) over the same photos in auto mode, which goes first alternating photo by
    photo: per predictor, single-photo accuracy and all pills right on the fully labelled combination photos."""
    from pillsnap.eval.pipeline_eval import _photo_outcome

    (first, a), (second, b) = predictors.items()
    known = set(a.class_names)
    outcomes: dict[str, list[dict]] = {first: [], second: []}
    for i, photo in enumerate(photos):
        for name, predictor in (((first, a), (second, b)) if i % 2 else ((second, b), (first, a))):
            outcomes[name].append(_photo_outcome(photo, predictor.predict(photo["image_path"], mode="auto"), known))
    out = {}
    for name, rows in outcomes.items():
        labelled = [o for o, p in zip(rows, photos, strict=True) if not p["incomplete_gt"]]
        single = [o["all_right"] for o in rows if o["image_type"] == "single"]
        combos = [o["all_right"] for o in labelled if o["image_type"] != "single"]
        out[name] = {"single": float(np.mean(single)), "combos": float(np.mean(combos)), "n_combos": len(combos)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=256, help="validation crops at most")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--caps", type=float, nargs="+", default=None,
                        help="nats counted at most (default: the policy's RerankWeights.likelihood_cap)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--skip-photos", action="store_true", help="only the validation part")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (e.g. paths.manifest_dir=... for a run moved since)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pillsnap.config.run import load_cli_config
    from pillsnap.infer.thresholds import WEIGHTS

    exp = args.exp.resolve()
    cfg = load_cli_config(str(exp), None, [f"paths.exp_dir={exp}", "inference.hard_cases.enabled=false",
                                           "inference.imprint.threads=1", *args.set])
    caps = sorted(set(args.caps or [WEIGHTS.likelihood_cap]))
    val = validation(cfg, exp, args.limit, sorted(set(args.weights)), caps)
    print(f"{val['crops']} validation crops, {val['read']} read (the imprint check's rule)")
    base = val["by_weight"][(0.0, WEIGHTS.likelihood_cap)]
    for (w, cap), f in val["by_weight"].items():
        print(f"  likelihood weight {w:<4} cap {cap:<4} (scale {f['scale']:.3f}): right drug first "
              f"{f['right_read']:.3f} of those read ({f['right_read'] / max(base['right_read'], 1e-9):.3f}x), "
              f"{f['right_all']:.3f} of all | NLL {f['nll_read']:.3f} "
              f"({f['nll_read'] / max(base['nll_read'], 1e-9):.3f}x)")
    u = val.get("unknown") or {}
    if u:
        w, wo = u["with"], u["without"]
        print(f"  unknown pills, final answers ({w['known']} known single-pill crops, {w['unknown']} held-out photos): "
              f"held-out rejected {w['unknown_rejected']:.3f} vs {wo['unknown_rejected']:.3f} without the likelihood "
              f"path ({w['unknown_rejected'] / max(wo['unknown_rejected'], 1e-9):.2f}x), by the imprint "
              f"{w['unknown_rejected_by_imprint']:.3f} vs {wo['unknown_rejected_by_imprint']:.3f} | known rejected "
              f"{w['known_rejected']:.3f} vs {wo['known_rejected']:.3f} | AUROC {w['auroc']:.3f} vs {wo['auroc']:.3f}")
    t = val["timing"]
    print(f"  reader per crop (median): with likelihoods {t['with']:.0f} ms, without {t['without']:.0f} ms "
          f"({t['with'] / t['without']:.2f}x)")
    if args.skip_photos:
        return
    photos = test_photos(cfg, exp, WEIGHTS.likelihood, args.split)
    check = "; the imprint check, with its likelihood path, on for both" if cfg.inference.imprint.unknown_check else ""
    on, off = photos["on"], photos["off"]
    print(f"{photos['photos']} {args.split} photos, auto mode: likelihood weight {WEIGHTS.likelihood} vs 0 (the run's "
          f"calibration for both{check})")
    print(f"  single photos right {on['single']:.3f} vs {off['single']:.3f} | all pills right on "
          f"{on['n_combos']} combinations {on['combos']:.3f} vs {off['combos']:.3f} "
          f"({on['combos'] / max(off['combos'], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
