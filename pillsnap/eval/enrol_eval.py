"""How well drugs enrolled after training are answered (pillsnap.infer.enrol): the classes held out of training are
enrolled from a few of their single-pill photos each, then the pipeline answers their remaining photos, and the
known drugs' test photos are answered before and after, with the same configuration in the same run (before: the
demo's own evaluation pass where it gives one)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pillsnap.eval.pipeline_eval import (
    Answered,
    drawn_test_photos,
    evaluate_pipeline,
    photo_groups,
    without_hard_cases,
)

LOGGER = logging.getLogger(__name__)
ENROL_PHOTOS = 5  # photos each held-out drug is enrolled from: the figure
# At most this many held-out drugs are enrolled, drawn at random, and at most this many of each one's other photos
# answered: a real data set's first stage leaves ~4,950 drugs and 2.3 M photos out of training, days of answers.
ENROL_DRUGS = 20
ANSWERED_PER_DRUG = 60


def _known_pill_accuracy(outcomes: list[dict], known: set[str]) -> float | None:
    """Share of the pills of trained drugs on combination photos answered by their own name."""
    pills = [p for o in outcomes if o["image_type"] != "single" for p in o["pills"] if p["code"] in known]
    return float(np.mean([p["right"] for p in pills])) if pills else None


def _figures(result: dict, known: set[str]) -> dict:
    return {"single_accuracy": result["single_accuracy"], "combo_all_right_rate": result["combo_all_right_rate"],
            "known_pill_accuracy": _known_pill_accuracy(result["outcomes"], known)}


def known_crops(manifest: Any, trained: set[str], margin: float, limit: int = 400,
                seed: int = 0) -> list[tuple[Any, str, str]]:
    """(crop, code, image_type) of the test split's labelled pills of trained drugs, cut at their labelled boxes:
    the classifier's view without the detector or the routing in between (at most `limit`, drawn at random with
    `seed`: the manifest lists the combination photos first and the single photos grouped by drug)."""
    from pillsnap.infer.preprocess import crop_pill
    from pillsnap.utils.images import read_image

    rows = manifest[(manifest["split"] == "test") & manifest["mapping_code"].isin(trained)]
    rows = rows.sample(n=min(limit, len(rows)), random_state=seed).sort_index()  # the manifest's order: by photo
    crops, images = [], {}
    for row in rows.itertuples():
        if row.image_path not in images:
            images = {row.image_path: read_image(str(row.image_path)).convert("RGB")}  # rows come grouped by photo
        box = (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h)
        crops.append((crop_pill(images[row.image_path], box, margin), str(row.mapping_code), str(row.image_type)))
    return crops


def crop_figures(predictor: Any, crops: list[tuple[Any, str, str]], batch: int = 32) -> dict:
    """Per image type: top-1 accuracy of the classifier's answer (enrolled drugs included) on the crops, and the
    share the unknown-pill rule would withhold."""
    right: dict[str, list[bool]] = {}
    withheld: dict[str, list[bool]] = {}
    for start in range(0, len(crops), batch):
        chunk = crops[start:start + batch]
        sources = ["single" if kind == "single" else "combination" for _, _, kind in chunk]
        for (_, code, kind), source, out in zip(chunk, sources, predictor.classify([c for c, _, _ in chunk], sources),
                                                strict=True):
            threshold = predictor.unknown_rules[source].threshold
            right.setdefault(kind, []).append(out.topk[0]["mapping_code"] == code)
            withheld.setdefault(kind, []).append(threshold is not None and out.unknown_score is not None
                                                 and out.unknown_score > threshold)
    return {kind: {"crops": len(v), "accuracy": float(np.mean(v)), "unknown": float(np.mean(withheld[kind]))}
            for kind, v in right.items()}


def _plan(manifest: Any, trained: set[str], per_drug: int, seed: int, drugs: int = ENROL_DRUGS,
          answered: int = ANSWERED_PER_DRUG) -> dict[str, tuple[list[str], list[str]]]:
    """Per held-out drug (at most `drugs`, drawn at random with `seed`): (the single-pill photos to enrol from,
    drawn from its train split when it has enough; up to `answered` of its other single-pill photos, which are
    answered afterwards)."""
    rows = manifest[(manifest["image_type"] == "single") & ~manifest["mapping_code"].isin(trained)]
    codes = sorted(rows["mapping_code"].astype(str).unique())
    if len(codes) > drugs:
        codes = sorted(np.random.default_rng(seed).choice(codes, size=drugs, replace=False).tolist())
        rows = rows[rows["mapping_code"].isin(codes)]
    plan = {}
    for code, group in rows.groupby("mapping_code", sort=True):
        group = group.sample(frac=1.0, random_state=seed)
        pool = group[group["split"] == "train"] if (group["split"] == "train").sum() >= per_drug else group
        chosen = list(pool["image_path"].astype(str)[:per_drug])
        others = [path for path in dict.fromkeys(group["image_path"].astype(str)) if path not in chosen]
        plan[str(code)] = (chosen, sorted(others[:answered]))
    return plan


def refused_unforced(report: dict) -> bool:
    """Whether enrol() refused this drug until forced: its photos look like an existing drug, or it takes too many
    of the trained drugs' right validation answers (pillsnap.infer.enrolment.refuses)."""
    return bool(report.get("look_alike")) or bool((report.get("takes_known") or {}).get("refused"))


def _enrol_all(predictor: Any, plan: dict, class_map: dict) -> list[dict]:
    """Enrol every planned drug with the attributes its label gives (what a pharmacist reads off the box); a drug
    the look-alike checks refuse is enrolled anyway (forced) and says so."""
    from pillsnap.infer.enrol import DrugInfo, enrol
    from pillsnap.infer.enrolment import EnrolmentError

    done = []
    for code, (chosen, _) in plan.items():
        entry = class_map.get(code) or {}
        info = DrugInfo.parse(code, entry.get("name") or code, entry.get("print_front"), entry.get("print_back"),
                              ", ".join(entry.get("colors") or []), entry.get("shape"))
        start = time.perf_counter()
        try:
            report = enrol(predictor, info, chosen, replace=True)
        except EnrolmentError as err:
            if err.kind not in ("look_alike", "takes_known"):
                raise
            LOGGER.info("enrol %s: %s", code, err)
            report = enrol(predictor, info, chosen, replace=True, force=True)
        done.append({**report, "seconds": round(time.perf_counter() - start, 2)})
        LOGGER.info("enrolled %s (%s) from %d photos in %.1f s", code, info.name, len(chosen), done[-1]["seconds"])
    return done


def evaluate_enrolment(cfg: Any, device: str | None = None, per_drug: int = ENROL_PHOTOS,
                       keep: bool = False, before: Answered | None = None) -> dict | None:
    """Enrol the manifest's held-out drugs into EXP from `per_drug` photos each and measure; None when the run
    trained on every drug. The enrolments are removed afterwards unless `keep`, so that the experiment answers as
    trained (and a rerun measures the same thing). `before`: the test split's auto answers already made with this
    configuration (the demo's evaluation), used where they were judged against the trained drugs alone instead of
    answering the same photos again. Its predictor logs no hard case: these are not a user's photos."""
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.infer.enrol import remove
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.utils import read_json

    manifest = load_manifest(cfg.paths.manifest_dir)
    predictor = Predictor(cfg.paths.exp_dir, without_hard_cases(cfg), device)
    trained = set(predictor.trained[0])
    plan = _plan(manifest, trained, per_drug, int(cfg.train.seed))
    if not plan:
        return None
    class_map_path = Path(cfg.paths.manifest_dir) / "class_map.json"
    class_map = {c["mapping_code"]: c for c in read_json(class_map_path)["classes"]} if class_map_path.is_file() else {}
    test = drawn_test_photos(select_stage(manifest, cfg), int(cfg.train.seed))  # the demo's draw
    same = (before is not None and before.known == trained
            and [o["image_path"] for o in before.result["outcomes"]] == [p["image_path"] for p in test])
    before = before.result if same else evaluate_pipeline(predictor, test, "auto", None, trained)
    crops = known_crops(manifest, trained, predictor.crop_margin, seed=int(cfg.train.seed))
    crops_before = crop_figures(predictor, crops)
    enrolled = _enrol_all(predictor, plan, class_map)
    removed: set[str] = set()
    try:
        codes = trained | set(plan)
        after = evaluate_pipeline(predictor, test, "auto", None, codes)
        others = {p for _, paths in plan.values() for p in paths}
        rest = photo_groups(manifest[manifest["image_path"].astype(str).isin(others)].assign(split="any"), "any")
        answered = evaluate_pipeline(predictor, rest, "auto", None, codes)
        crops_after = crop_figures(predictor, crops)
        # The same known photos with the look-alike check obeyed: the drugs it objected to (enrolled above with
        # --force) taken out again, as a user who does not force would have them.
        flagged = [d["mapping_code"] for d in enrolled if refused_unforced(d)]
        checked = None
        if flagged and not keep:  # kept enrolments stay as they were forced
            for code in flagged:
                remove(cfg.paths.exp_dir, code)
                removed.add(code)
            result = evaluate_pipeline(predictor, test, "auto", None, codes - set(flagged))
            checked = {"refused": flagged, "known_after": _figures(result, trained)}
    finally:
        if not keep:
            for code in sorted(set(plan) - removed):
                remove(cfg.paths.exp_dir, code)
    return {**_summary(enrolled, answered, before, after, trained),
            "known_crops_before": crops_before, "known_crops_after": crops_after, "look_alike_check_obeyed": checked}


def _summary(enrolled: list[dict], answered: dict, before: dict, after: dict, trained: set[str]) -> dict:
    pills = [p for o in answered["outcomes"] for p in o["pills"]]
    per_drug = []
    for drug in enrolled:
        mine = [p for p in pills if p["code"] == drug["mapping_code"]]
        per_drug.append({"mapping_code": drug["mapping_code"], "name": drug["name"], "n_photos": drug["n_photos"],
                         "seconds": drug["seconds"], "look_alike": drug["look_alike"],
                         "takes_known": drug.get("takes_known"), "answered_photos": len(mine),
                         "accuracy": float(np.mean([p["right"] for p in mine])) if mine else None,
                         "unknown_share": float(np.mean([p["answered"] and not p["named"] for p in mine]))
                         if mine else None})
    known_before, known_after = _figures(before, trained), _figures(after, trained)
    return {"per_drug": per_drug, "drugs": len(enrolled), "photos_per_drug": enrolled[0]["n_photos"],
            "remaining_photos": len(pills),
            "accuracy": float(np.mean([p["right"] for p in pills])) if pills else None,
            "unknown_share": float(np.mean([p["answered"] and not p["named"] for p in pills])) if pills else None,
            "mean_top_probability": _mean_top(pills),
            "enrol_seconds_max": max(d["seconds"] for d in enrolled),
            "known_before": known_before, "known_after": known_after,
            "known_drop": {k: None if known_before[k] is None or known_after[k] is None
                           else round(known_before[k] - known_after[k], 4) for k in known_before}}


def _mean_top(pills: list[dict]) -> float | None:
    """Mean probability of the answers given by name: beside the accuracy, whether it means what it says."""
    tops = [p["topk"][0][1] for p in pills if p["named"] and p["topk"]]
    return float(np.mean(tops)) if tops else None


def format_enrolment(figures: dict | None) -> list[str]:
    """The closing lines the demo prints about enrolment."""
    if not figures:
        return ["enrolment   no held-out drugs to enrol (the run trained on every drug)"]
    if "skipped" in figures:
        return [f"enrolment   not measured: {figures['skipped']}"]

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    before, after = figures["known_before"], figures["known_after"]
    return [
        f"enrolment   {figures['drugs']} held-out drugs enrolled from {figures['photos_per_drug']} photos each "
        f"(at most {figures['enrol_seconds_max']:.1f} s each): accuracy on their {figures['remaining_photos']} "
        f"other photos={fmt(figures['accuracy'])}, answered unknown={fmt(figures['unknown_share'])}",
        f"enrolment   known drugs before -> after: single-photo accuracy {fmt(before['single_accuracy'])} -> "
        f"{fmt(after['single_accuracy'])}, known pills on combination photos {fmt(before['known_pill_accuracy'])} -> "
        f"{fmt(after['known_pill_accuracy'])}, all pills right on combination photos "
        f"{fmt(before['combo_all_right_rate'])} -> {fmt(after['combo_all_right_rate'])} (held-out pills: "
        "unknown before, by name after)",
        "enrolment   known drugs' labelled crops (classifier only) before -> after: " + ", ".join(
            f"{kind} accuracy {fmt(figures['known_crops_before'][kind]['accuracy'])} -> {fmt(stats['accuracy'])}, "
            f"withheld as unknown {fmt(figures['known_crops_before'][kind]['unknown'])} -> {fmt(stats['unknown'])}"
            for kind, stats in (figures.get("known_crops_after") or {}).items())] + _taken_line(figures) + \
        _checked_line(figures, fmt)


def _taken_line(figures: dict) -> list[str]:
    """What each drug takes from the trained drugs' right validation pills by its look, as enrol() measured it."""
    measured = [(d["mapping_code"], d["takes_known"]) for d in figures.get("per_drug", [])
                if (d.get("takes_known") or {}).get("measured")]
    if not measured:
        return []
    counts = ", ".join(f"{code} {taken['crops']} of {taken['of']}" for code, taken in measured)
    return ["enrolment   the trained drugs' validation pills answered right that each enrolled drug takes by its look "
            f"(the enrolment check's probe): {counts}"]


def _checked_line(figures: dict, fmt: Any) -> list[str]:
    checked = figures.get("look_alike_check_obeyed")
    if not checked:
        return []
    before, after = figures["known_before"], checked["known_after"]
    return [f"enrolment   with the look-alike checks obeyed ({', '.join(checked['refused'])} refused, not forced): "
            f"known single-photo accuracy {fmt(before['single_accuracy'])} -> {fmt(after['single_accuracy'])}, "
            f"known pills on combination photos {fmt(before['known_pill_accuracy'])} -> "
            f"{fmt(after['known_pill_accuracy'])}"]
