"""End-to-end evaluation of the two-stage pipeline on held-out photos of a manifest split.

Figures: auto routing accuracy (single photos -> single, combination photos -> combo), single-photo top-1
accuracy, the "all pills in the photo right" rate on combination photos, and detector mAP on the same photos
through the torch model and, when given, its ONNX export (both through the one shared NMS, so they compare).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pillsnap.infer.preprocess import load_image
from pillsnap.infer.unknown import crop_source
from pillsnap.metrics.detection import evaluate_detection_metrics, match_boxes, match_in_confidence_order
from pillsnap.utils.boxes import xywh_to_xyxy

LOGGER = logging.getLogger(__name__)


class Answered(NamedTuple):
    """An evaluate_pipeline result (with its per-photo outcomes) and the drugs its answers were judged against."""

    result: dict
    known: frozenset[str]


def without_hard_cases(cfg: Any) -> Any:
    """A copy of `cfg` whose predictor logs no hard case: an evaluation's or a measurement's predictions are not a
    user's, and logged they filled the run's hard-case log with its own test photos, some a dozen times over."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"inference": {"hard_cases": {"enabled": False}}})


def without_imprint_reading(cfg: Any) -> Any:
    """A copy of `cfg` whose predictor reads no imprint: what the answers, or the time, owe to the reads."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"inference": {"imprint": {"enabled": False}}})


def photo_groups(manifest: pd.DataFrame, split: str = "test") -> list[dict]:
    """One entry per photo of `split`: image_path, image_type, codes and xywh boxes of its labelled pills."""
    rows = manifest[manifest["split"] == split]
    photos = []
    for image_path, group in rows.groupby("image_path", sort=True):
        photos.append({
            "image_path": str(image_path), "image_type": str(group["image_type"].iloc[0]),
            "codes": group["mapping_code"].astype(str).tolist(),  # row order: aligned with "boxes"
            "boxes": group[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=float),
            "incomplete_gt": bool(group["incomplete_gt"].any()) if "incomplete_gt" in group else False,
        })
    return photos


# Test photos the demo's closing evaluation answers at most (each pass through the whole pipeline, imprint reads
# included, ~0.3 s a photo): a demo on a real tree at Stage 4 went through 45,000-90,000 test photos five times,
# 8-22 h. 2,000 photos drawn at random keep each figure within about 0.01-0.02 of the whole split's.
MAX_TEST_PHOTOS = 2000


def drawn_test_photos(stage_rows: pd.DataFrame, seed: int, limit: int = MAX_TEST_PHOTOS) -> list[dict]:
    """photo_groups of the test split, at most `limit` of them drawn at random with `seed` (in path order; the same
    draw for every measure of one run, so that their answers can be reused), the kinds in their own proportions."""
    photos = photo_groups(stage_rows, "test")
    if len(photos) <= limit:
        return photos
    keep = np.sort(np.random.default_rng(seed).choice(len(photos), size=limit, replace=False))
    LOGGER.info("the pipeline is measured on %d of the %d test photos, drawn at random", limit, len(photos))
    return [photos[i] for i in keep]


UNKNOWN = "unknown"  # how an "unknown pill" answer (mapping_code null) and a pill of an untrained class compare
NO_PILL = "no pill"  # how a box answered "maybe no pill" compares: like nothing that was labelled


def _photo_outcome(photo: dict, result: dict, known: set[str] | None) -> dict:
    """Right means the same pills: a pill of a class the classifier never learnt is right only as "unknown". A box
    the answer itself says may hold no pill (unknown_by "box") claims no pill: where it holds no labelled pill it
    is left out, and a labelled pill in it was not answered (NO_PILL: wrong for a known and an unknown drug)."""
    match = _match(photo, result["pills"])
    found = set(match.values())
    pills = [p for d, p in enumerate(result["pills"]) if d in found or p.get("unknown_by") != BOX_DOUBT]
    predicted = sorted(NO_PILL if p.get("unknown_by") == BOX_DOUBT else p["mapping_code"] or UNKNOWN for p in pills)
    expected = sorted(c if known is None or c in known else UNKNOWN for c in photo["codes"])
    expected_mode = "single" if photo["image_type"] == "single" else "combo"
    doubted = [d in found for d, p in enumerate(result["pills"]) if p.get("unknown_by") == BOX_DOUBT]
    return {"image_path": photo["image_path"], "image_type": photo["image_type"], "mode_used": result["mode_used"],
            "routed_right": result["mode_used"] == expected_mode, "expected": expected, "predicted": predicted,
            "all_right": Counter(predicted) == Counter(expected), "fallback_reason": result["fallback_reason"],
            "doubted_boxes": {"pill": sum(doubted), "no_pill": len(doubted) - sum(doubted)},
            "pills": _pill_outcomes(photo, result, known, match)}


MATCH_IOU = 0.5  # a labelled pill and an answered one are the same pill when their boxes overlap this much
BOX_DOUBT = "box"  # unknown_by of a box the detector is too unsure of to claim a pill (pillsnap.infer.box_check)


def _match(photo: dict, pills: list[dict]) -> dict[int, int]:
    """{labelled pill: answered pill} by box. A photo of one pill answered by the whole-photo path (its answer
    first, with no detector confidence) is matched whatever the box: that box is where it looked, not a detection.
    Detected boxes are matched most confident first (COCO), others by the best overlap first."""
    if not pills or not len(photo["codes"]):
        return {}
    if len(photo["codes"]) == 1 and pills[0].get("det_confidence") is None:
        return {0: 0}
    truth = xywh_to_xyxy(np.asarray(photo["boxes"], float))
    found = xywh_to_xyxy(np.asarray([p["bbox"] for p in pills], float))
    confidences = [p.get("det_confidence") for p in pills]
    if all(c is not None for c in confidences):
        return match_in_confidence_order(truth, found, np.asarray(confidences, float), MATCH_IOU)
    return match_boxes(truth, found, MATCH_IOU)


def _pill_outcomes(photo: dict, result: dict, known: set[str] | None, match: dict[int, int]) -> list[dict]:
    """Per labelled pill: the answer given for it (`match`) and what its prediction set did. `answered`: a pill was
    matched; `named`: it was answered by name (not unknown); `covered`: a known drug inside its set, or an unknown
    one with an empty set; `doubted`: its box was answered "maybe no pill" (never right, never covered)."""
    pills = result["pills"]
    outcomes = []
    for g, code in enumerate(photo["codes"]):
        is_known = known is None or code in known
        pill = pills[match[g]] if g in match else None
        members = None if pill is None or pill.get("prediction_set") is None else [
            m["mapping_code"] for m in pill["prediction_set"]]
        named = pill is not None and not pill.get("unknown")
        doubted = pill is not None and pill.get("unknown_by") == BOX_DOUBT
        covered = None if members is None else (code in members if is_known else not members and not doubted)
        outcomes.append({
            "code": code, "known": is_known, "answered": pill is not None, "named": named, "doubted": doubted,
            "right": named and pill["mapping_code"] == code if is_known else pill is not None and not named
            and not doubted, "set": members, "covered": covered,
            # the crop source its answer was made from: the whole photo (no detector confidence) or a detector box
            "source": None if pill is None else crop_source(pill.get("det_confidence")),
            "topk": [] if pill is None else [(c["mapping_code"], c["probability"]) for c in pill.get("topk", [])]})
    return outcomes


def with_sets(outcomes: list[dict], rule: Any) -> list[dict]:
    """The outcomes with each named pill's set drawn again from its candidates under another set rule
    (pillsnap.infer.answer.SetRule, at the threshold of the pill's crop source): the candidates' probabilities are
    the answer's own, so this is the set that rule would have given."""
    redrawn = []
    for outcome in outcomes:
        pills = []
        for pill in outcome.get("pills", []):
            source_rule = rule.for_source(pill.get("source"))
            if pill["named"] and pill["set"] is not None and source_rule is None:  # that source's pills get none
                pill = {**pill, "set": None, "covered": None}
            elif pill["named"] and pill["set"] is not None:
                codes = [code for code, _ in pill["topk"]]
                members = codes[:source_rule.size([{"probability": p} for _, p in pill["topk"]])]
                pill = {**pill, "set": members, "covered": pill["code"] in members}
            pills.append(pill)
        redrawn.append({**outcome, "pills": pills})
    return redrawn


def set_figures(outcomes: list[dict]) -> dict:
    """What the prediction sets did on the labelled pills of these photo outcomes (None where answers carry no
    set). `coverage`: a known drug answered by name has it in its set (the guarantee's own terms); `coverage_all`:
    of every known pill, a withheld or missed one counting as not covered; `sure_share` / `sure_accuracy`: one-drug
    sets among the named answers, and how often that drug is right; `unknown_empty`: pills of untrained drugs
    given an empty set. `by_source`: the named pills' figures per crop source, which each source's own threshold is
    calibrated to."""
    pills = [p for o in outcomes for p in o.get("pills", [])]
    known = [p for p in pills if p["known"]]
    if not known or all(p["set"] is None for p in pills if p["answered"]):
        return {}
    named = [p for p in known if p["named"] and p["set"] is not None]
    unknown = [p for p in pills if not p["known"] and p["answered"] and not p.get("doubted") and p["set"] is not None]
    by_source = {source: _named_figures([p for p in named if p.get("source") == source])
                 for source in sorted({p["source"] for p in named if p.get("source")})}
    return {"pills": len(pills), "known_pills": len(known), **_named_figures(named),
            "coverage_all": _rate([bool(p["covered"]) for p in known]),
            "withheld_known": _rate([p["answered"] and not p["named"] and not p.get("doubted") for p in known]),
            "doubted_known": _rate([bool(p.get("doubted")) for p in known]),
            "unknown_pills": len(unknown), "unknown_empty": _rate([p["covered"] for p in unknown]),
            "by_source": by_source or None}


def _named_figures(named: list[dict]) -> dict:
    """How many pills were answered by name, and their sets' coverage, size and sure answers."""
    sure = [p for p in named if len(p["set"]) == 1]
    return {"named": len(named), "coverage": _rate([p["covered"] for p in named]),
            "mean_set_size": float(np.mean([len(p["set"]) for p in named])) if named else None,
            "sure_share": _rate([len(p["set"]) == 1 for p in named]),
            "sure_accuracy": _rate([p["right"] for p in sure])}


def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_pipeline(predictor: Any, photos: list[dict], mode: str = "auto",
                      progress: Callable[[int, int], None] | None = None, known: set[str] | None = None) -> dict:
    """Run `predictor.predict` on every photo in `mode`; returns rates and the per-photo outcomes. `known`: the
    classifier's classes (pills of other classes are right when answered as unknown)."""
    outcomes = []
    for i, photo in enumerate(photos, start=1):
        outcomes.append(_photo_outcome(photo, predictor.predict(photo["image_path"], mode=mode), known))
        if progress is not None:
            progress(i, len(photos))
    singles = [o for o in outcomes if o["image_type"] == "single"]
    combos = [o for o, p in zip(outcomes, photos, strict=True)
              if o["image_type"] != "single" and not p["incomplete_gt"]]
    return {
        "mode": mode, "num_photos": len(outcomes), "num_single": len(singles), "num_combination": len(combos),
        "routing_accuracy": _rate([o["routed_right"] for o in outcomes]),
        "single_accuracy": _rate([o["all_right"] for o in singles]),
        "combo_all_right_rate": _rate([o["all_right"] for o in combos]),
        # the same photos pill by pill: every labelled pill counts once, an untrained drug right as "unknown"
        "combo_pill_accuracy": _rate([p["right"] for o in combos for p in o["pills"]]),
        "prediction_sets": set_figures(outcomes),
        # on photos with every pill labelled: elsewhere a doubted box may hold a pill nobody labelled
        "doubted_boxes": {kind: sum(o["doubted_boxes"][kind] for o, p in zip(outcomes, photos, strict=True)
                                    if not p["incomplete_gt"]) for kind in ("pill", "no_pill")},
        "outcomes": outcomes,
    }


def detection_map(predictor: Any, photos: list[dict], forward: Callable | None = None,
                  conf_threshold: float = 0.001) -> dict:
    """Detector mAP on the combination photos (boxes in original pixels, letterboxed like inference)."""
    predictions, targets = [], []
    for photo in photos:
        if photo["image_type"] == "single" or photo["incomplete_gt"]:
            continue
        image, _ = load_image(photo["image_path"])
        dets = predictor.detect(image, conf_threshold, forward=forward)
        predictions.append({"boxes": xywh_to_xyxy(dets[:, :4]), "scores": dets[:, 4], "labels": np.zeros(len(dets))})
        targets.append({"boxes": xywh_to_xyxy(photo["boxes"]), "labels": np.zeros(len(photo["boxes"]))})
    return evaluate_detection_metrics(predictions, targets)
