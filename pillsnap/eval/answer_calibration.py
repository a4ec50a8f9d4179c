"""The final answers on validation crops, as inference makes them (the imprint evidence and the unknown-pill rule
in force): the imprint evidence's scale fit so that their probabilities mean what they say, their accuracy and ECE,
the conformal scores the prediction sets are calibrated on, and their unknown-pill decision on drugs held out of
training. pillsnap.eval.calibration stores what this fits."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, NamedTuple

import numpy as np

from pillsnap.infer.artefacts import Temperatures, set_thresholds
from pillsnap.infer.unknown import CROP_SOURCES, UnknownAnswer
from pillsnap.metrics.calibration import bins_of, ece_of, ece_sampling_floor
from pillsnap.metrics.conformal import (
    SET_METHODS,
    coverage_low,
    no_threshold_reason,
    nonconformity,
    scores_from_json,
    scores_to_json,
)
from pillsnap.utils.images import DECODE_ERRORS

LOGGER = logging.getLogger(__name__)
ANSWER_CROPS = 500  # validation crops whose answers are measured with the imprint evidence (each may be read: ~0.1 s)
MAX_ANSWER_CROPS = 3000  # at most, on a large validation split (answer_crops)
MIN_SOURCE_READS = 30  # reads of a crop source below which it takes the evidence scale fit over every read
SOURCE_FLOOR = 150  # crops of each crop source in the draw, where it has that many (its own set threshold needs 50
# answers named after the unknown-pill rule withholds some, its own evidence scale 30 reads)


def answer_crops(n: int) -> int:
    """How many of `n` validation crops the answers are calibrated on: ANSWER_CROPS, and on a large split one in
    25 up to MAX_ANSWER_CROPS (Stage 4's 75,000 crops: 3,000). The coverage that a set threshold calibrated on m
    answers gives spreads by about sqrt(0.05 * 0.95 / m): on 150 detector crops it falls below 93 % in one
    calibration of eleven; each answer may cost an imprint read (~0.1 s), minutes at Stage 4."""
    return int(min(MAX_ANSWER_CROPS, max(ANSWER_CROPS, n // 25)))


def spread_sample(n: int, limit: int, seed: int, groups: np.ndarray | None = None,
                  floor: int = SOURCE_FLOOR) -> np.ndarray:
    """Sorted indices of `limit` of `n` items drawn at random with `seed` (all of them when n <= limit). A data set
    lists its crops in the manifest's order, the combination photos' pills first and the single photos grouped by
    drug: its first few hundred crops at Stage 4 would be combination crops of the lowest codes only, and prediction
    sets fit on them hold no guarantee for the other photos.

    With `groups` (each item's crop source), each group gets at least `floor` of the draw (all of its items when it
    has fewer), each drawn at random within its group, and the rest goes to the groups by their share: at Stage 4
    combination pills are ~9 % of the validation crops, and a plain draw of 500 names fewer than the 50 their own
    set threshold needs in three draws of four."""
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if groups is None:
        return np.sort(rng.choice(n, size=limit, replace=False))
    groups = np.asarray(groups)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    floor = min(max(floor, limit // (2 * len(members))), limit // len(members))  # a larger draw, larger floors
    take = {g: min(len(m), floor) for g, m in members.items()}
    room = {g: len(m) - take[g] for g, m in members.items()}
    left = max(limit - sum(take.values()), 0)
    for g in members:  # the rest by each group's share of the items the floors left
        take[g] += left * room[g] // max(sum(room.values()), 1)
    for g in sorted(members, key=lambda g: -room[g])[: limit - sum(take.values())]:  # rounding's remainder
        take[g] += 1
    return np.sort(np.concatenate([rng.choice(members[g], size=take[g], replace=False) for g in members]))


class ValAnswer(NamedTuple):
    """One validation crop as inference sees it before the answer: the classifier's output, the imprint read (None:
    not read) and the right drug."""

    classified: Any
    read: Any
    truth: str
    source: str | None = None  # single | combination (pillsnap.infer.unknown.CROP_SOURCES); None: not known


ANSWER_BATCH = 32  # validation crops classified in one forward pass, their imprints read side by side


def val_answers(model: Any, dataset: Any, temperatures: Temperatures, class_names: list[str], class_map: dict,
                topk: int, threads: int, indices: np.ndarray, reading: bool, unknown: UnknownAnswer,
                sources: np.ndarray | None = None, check_unknown: bool = False,
                parallel: int = 0) -> list[ValAnswer]:
    """The crops of `dataset` at `indices` through the classifier (each at its source's temperature) and, where
    inference would read (the contenders' imprints differ; with `check_unknown`, any top-1 with an imprint on
    record), the reader (the costly part, done once; the answers are then pure functions of these). Crops go
    through the classifier ANSWER_BATCH at a time and their reads run `parallel` at once (0: the machine's cores
    over the threads a read takes, as inference reads a photo's pills): one crop at a time, Stage 4's 3,000 answers
    and their reads took half an hour on one read's threads while the other cores and the GPU waited."""
    import torch

    from pillsnap.infer.answer import Classified, classifier_candidates
    from pillsnap.infer.evidence import Evidence
    from pillsnap.utils.logs import progress

    evidence = Evidence(class_map, read_imprints=reading, threads=threads, check_unknown=check_unknown,
                        parallel=parallel)
    device = next(model.parameters()).device
    indices = [int(i) for i in indices]
    out = []
    batches = [indices[i:i + ANSWER_BATCH] for i in range(0, len(indices), ANSWER_BATCH)]
    for batch in progress(batches, "calibration: validation answers", "batches", LOGGER):
        crops, labels, kept = [], [], []
        for index in batch:
            try:
                crops.append(dataset.load_crop(index))  # decoded once: model and reader
            except DECODE_ERRORS as err:
                LOGGER.warning("calibration: skipping an undecodable validation crop (%s)", err)
                continue
            labels.append(int(dataset.labels[index]))
            kept.append(index)
        if not kept:
            continue
        with torch.no_grad():
            logits, feats = model(torch.stack([dataset.transform(crop) for crop in crops]).to(device))
        batch_sources = [None if sources is None else str(sources[index]) for index in kept]
        scale = torch.tensor([temperatures.of(source) for source in batch_sources], device=logits.device)
        probs = torch.softmax(logits.float() / scale[:, None], -1).cpu().numpy()
        scores = unknown.scores(probs, None if feats is None else feats.float().cpu().numpy())
        classified = classifier_candidates(probs, topk, class_names, class_map)
        reads = evidence.read_all(crops, [candidates for candidates, _ in classified]) if reading else \
            [None] * len(crops)
        out += [ValAnswer(Classified(candidates, score, reserve), read, class_names[label], source)
                for (candidates, reserve), score, read, label, source
                in zip(classified, scores, reads, labels, batch_sources, strict=True)]
    return out


EVIDENCE_SCALES = np.round(np.exp(np.linspace(np.log(0.25), np.log(2.0), 13)), 3)  # 0.25 ... 2.0


def fit_evidence_scale(items: list[ValAnswer], class_map: dict, base: Any = None) -> float:
    """The factor on the imprint read's weights (RerankWeights.imprint and .likelihood; of `base`, by default the
    policy's) that minimises the negative log-likelihood of the right drug over the validation answers where a read
    was made, like the temperature does for the classifier: the weights were chosen for accuracy, this makes the
    posterior they give mean what it says. 1.0 when no read was made. A right drug outside the candidates gets the
    probability the candidates leave."""
    from pillsnap.infer.answer import answer_candidates
    from pillsnap.infer.ranking import rerank
    from pillsnap.infer.thresholds import WEIGHTS

    read = [item for item in items if item.read is not None]
    if not read:
        return 1.0
    candidates = [answer_candidates(item.classified, item.read, class_map) for item in read]  # as the answer weighs

    def nll_at(scale: float) -> float:
        weights = (base or WEIGHTS).with_read_scaled(scale)
        total = 0.0
        for item, weighed in zip(read, candidates, strict=True):
            ranked = rerank(weighed, class_map, item.read.text, item.read.score, None, weights,
                            likelihoods=item.read.likelihoods, read_likelihood=item.read.read_likelihood)
            p = {c["mapping_code"]: c["probability"] for c in ranked.candidates}
            rest = 1.0 - sum(p.values())
            total -= np.log(max(p.get(item.truth, rest), 1e-12))
        return total / len(read)

    return float(min(EVIDENCE_SCALES, key=nll_at))


def fit_evidence_scales(items: list[ValAnswer], class_map: dict) -> tuple[float, dict[str, float] | None]:
    """The evidence scale over every answer (fit_evidence_scale) and one per crop source (None where the items'
    sources are not known): a source with MIN_SOURCE_READS reads gets its own, fit on them, else the overall one.
    A reader's word weighs differently on a whole single-pill photo and on a detector's crop of a combination
    photo, as the classifier's temperature does."""
    overall = fit_evidence_scale(items, class_map)
    if any(item.source is None for item in items):
        return overall, None
    by_source = {}
    for source in CROP_SOURCES:
        own = [item for item in items if item.source == source]
        reads = sum(item.read is not None for item in own)
        by_source[source] = fit_evidence_scale(own, class_map) if reads >= MIN_SOURCE_READS else overall
    return overall, by_source


def answer_calibration(model: Any, dataset: Any, temperature: float | Temperatures, class_names: list[str],
                       class_map: dict, topk: int, threads: int = 0, limit: int | None = None,
                       read_imprints: bool = True, unknown: UnknownAnswer | None = None,
                       sources: np.ndarray | None = None, check_unknown: bool = False, held_out: Any = None,
                       seed: int = 0, by_source: bool = True, parallel: int = 0) -> dict:
    """The final answers on `limit` (default: answer_crops of the split) validation crops drawn at random with
    `seed` (spread_sample; all of them when
    there are fewer; with `by_source`, inference.prediction_set.by_source, each crop source gets its floor of them,
    so that each can have its own set threshold and evidence scale: the figures over every answer are then of that
    mix; without it, one threshold serves every pill and the draw is plain), as inference makes them (the imprint
    read where the contenders' imprints differ, then the posterior of pillsnap.infer.answer).

    Returns `evidence_scale` (fit_evidence_scale; 1.0 without reads), `answers` (the top answers' accuracy and ECE
    at that scale, and at 1.0 under `unscaled`; None without the imprint reader, rapidocr-onnxruntime, or with
    `read_imprints` off) and `prediction_sets`: each answer named by the unknown-pill rule `unknown` (a pill it
    withholds claims no drug, its set is empty) scored under every conformal method (pillsnap.metrics.conformal),
    so that inference sets its threshold for whatever coverage it is configured with. With `check_unknown` (the
    imprint check: every pill read, a legible imprint like none of its candidates' answered "unknown"),
    `unknown_answers` measures the answers on the single-pill photos of drugs held out of training (`held_out`, a
    crop data set) against the known single-pill answers (answers_unknown_report)."""
    from pillsnap.infer.answer import decide_answer
    from pillsnap.infer.evidence import Evidence
    from pillsnap.infer.matching import KnownImprints
    from pillsnap.infer.thresholds import WEIGHTS

    temperatures = temperature if isinstance(temperature, Temperatures) else Temperatures(float(temperature))
    reading = read_imprints and Evidence(class_map, read_imprints=read_imprints).reader() is not None
    check_unknown = check_unknown and reading
    known = KnownImprints(class_map) if check_unknown else None
    unknown = unknown or UnknownAnswer("probability", None)
    limit = answer_crops(len(dataset)) if limit is None else limit
    items = val_answers(model, dataset, temperatures, class_names, class_map, topk, threads,
                        spread_sample(len(dataset), limit, seed, sources if by_source else None), reading, unknown,
                        sources, check_unknown, parallel)
    scale, scale_by_source = fit_evidence_scales(items, class_map)

    def scaled(source: str | None) -> Any:
        """The weights a crop from `source` is answered with."""
        return WEIGHTS.with_read_scaled((scale_by_source or {}).get(source, scale))

    def answered(weights: Any, items: list[ValAnswer] = items, known: Any = known) -> list:
        # `weights(source)`: per crop source; `known` set: the imprint check on (inference.imprint.unknown_check)
        return [decide_answer(item.classified, class_map, item.read, None,
                              unknown.for_answer(len(class_names), item.source), weights=weights(item.source),
                              known=known)
                for item in items]

    answers = answered(scaled)
    unknown_answers = None
    if held_out is not None and len(held_out) and check_unknown:
        # the held-out reads never fit a candidate: every turn is tried
        held_items = val_answers(model, held_out, temperatures, class_names, class_map, topk, threads,
                                 spread_sample(len(held_out), limit, seed), reading, unknown,
                                 np.full(len(held_out), "single"), check_unknown, parallel)
        unknown_answers = answers_unknown_report(answers, items, answered(scaled, held_items))
        # Inference without the check: the same reads, kept only where the contenders differ by imprint
        unknown_answers["without_imprint_check"] = answers_unknown_report(
            answered(scaled, _gated(items, class_map), None), items,
            answered(scaled, _gated(held_items, class_map), None))
    set_scores = _set_scores(answers, items)
    figures = None
    if reading:
        figures = {**_answer_figures(answers, items), "evidence_scale": scale,
                   "evidence_scale_by_source": scale_by_source,
                   "unscaled": {k: v for k, v in _answer_figures(answered(lambda source: WEIGHTS), items).items()
                                if k != "bins"}}
    # each scored answer's crop source, so that inference can give each source its own threshold
    scored_sources = [item.source for answer, item in zip(answers, items, strict=True) if not answer.unknown]
    sets = {"scores": {method: scores_to_json(scores) for method, scores in set_scores.items()},
            "sources": scored_sources if sources is not None else None,
            "n": len(set_scores["aps"]), "withheld_unknown": sum(a.unknown for a in answers),
            "imprint_reading": reading, "imprint_check": check_unknown, "topk": topk,
            "unknown_rule": unknown.rule if unknown.active else None}
    return {"evidence_scale": scale, "evidence_scale_by_source": scale_by_source, "answers": figures,
            "prediction_sets": sets, "unknown_answers": unknown_answers}


def _set_scores(answers: list, items: list[ValAnswer]) -> dict[str, list[float]]:
    """Each answer named by the unknown-pill rule (a withheld pill claims no drug, its set is empty) scored under
    every conformal method, from its candidates' probabilities and where the right drug stands among them."""
    set_scores: dict[str, list[float]] = {method: [] for method in SET_METHODS}
    for answer, item in zip(answers, items, strict=True):
        if answer.unknown:
            continue
        codes = [c["mapping_code"] for c in answer.candidates]
        where = codes.index(item.truth) if item.truth in codes else None
        probabilities = [c["probability"] for c in answer.candidates]
        for method, scores in set_scores.items():
            scores.append(nonconformity(method, probabilities, where))
    return set_scores


def _gated(items: list[ValAnswer], class_map: dict) -> list[ValAnswer]:
    """The items with the reads inference makes without the imprint check: only where the contenders differ."""
    from pillsnap.infer.ranking import should_read_imprint

    return [item if item.read is None or should_read_imprint(item.classified.topk, class_map)
            else item._replace(read=None) for item in items]


def answers_unknown_report(known: list, items: list[ValAnswer], held: list) -> dict:
    """The unknown-pill decision of the final answers: the known drugs' single-pill answers (`known`, with their
    `items`; every answer where the source is not known) against the held-out drugs' (`held`). `known_rejected` /
    `unknown_rejected`: the shares answered "unknown pill"; `unknown_rejected_by_imprint`: the held-out share the
    imprint check answered so (and the distance rule alone would not). `auroc` ranks the answers by the imprint
    check first (a foreign imprint is more telling than any distance), then by the unknown-pill score."""
    from sklearn.metrics import roc_auc_score

    single = [a for a, item in zip(known, items, strict=True) if item.source in (None, "single")]
    ranked = single + held
    raw = np.array([np.nan if a.unknown_score is None else a.unknown_score for a in ranked], np.float64)
    finite = raw[np.isfinite(raw)]
    top = (float(finite.max()) if finite.size else 0.0) + 1.0  # above every score: no distance outranks an imprint
    raw = np.nan_to_num(raw, nan=0.0, posinf=top, neginf=-top)
    scores = raw + np.array([top + 1.0 if a.unknown_by == "imprint" else 0.0 for a in ranked])
    labels = np.r_[np.zeros(len(single)), np.ones(len(held))]
    auroc = float(roc_auc_score(labels, scores)) if len(single) and len(held) else None
    return {"auroc": auroc, "known": len(single), "unknown": len(held),
            "known_rejected": float(np.mean([a.unknown for a in single])) if single else None,
            "unknown_rejected": float(np.mean([a.unknown for a in held])) if held else None,
            "unknown_rejected_by_imprint": float(np.mean([a.unknown_by == "imprint" for a in held])) if held
            else None}


def _answer_figures(answers: list, items: list[ValAnswer]) -> dict:
    """Accuracy and ECE of the top answers (the unknown-pill rule aside: every answer's top candidate counts)."""
    confidence = np.asarray([a.candidates[0]["probability"] for a in answers])
    correct = np.asarray([a.candidates[0]["mapping_code"] == item.truth for a, item in zip(answers, items,
                                                                                          strict=True)])
    return {"n": int(len(correct)), "accuracy": float(correct.mean()) if len(correct) else None,
            "ece": ece_of(confidence, correct), "ece_sampling_floor": ece_sampling_floor(confidence),
            "bins": bins_of(confidence, correct)}


def set_summary(sets: dict, method: str, coverage: float, by_source: bool = True) -> dict:
    """The calibrated set rule at `coverage` and what it gives on the calibration answers themselves (coverage
    there is at least `coverage` by construction: the honest figure is on held-out photos). The conformal sets
    before inference.prediction_set.fill_to_coverage fills them: filled, they only grow. With `by_source`, the
    thresholds of the crop sources with enough answers of their own (pillsnap.infer.artefacts.load_set_rule) and
    each source's count."""
    scores = scores_from_json(sets["scores"][method])
    sources = sets.get("sources")
    threshold, own = set_thresholds(scores, sources if by_source else None, coverage)
    counts = Counter(map(str, sources or ()))
    return {"method": method, "coverage": coverage, "threshold": finite(threshold), "n": sets["n"],
            "threshold_by_source": own or None,
            "n_by_source": None if sources is None else dict(sorted(counts.items())),
            "withheld_unknown": sets["withheld_unknown"], "imprint_reading": sets["imprint_reading"],
            "calibration_coverage": float(np.mean(scores <= threshold)) if len(scores) else None,
            # the coverage these answers' threshold gives new ones in 19 calibrations of 20 (on average at least
            # `coverage`)
            "coverage_5th_percentile": coverage_low(len(scores), coverage) if np.isfinite(threshold) else None,
            "coverage_5th_percentile_by_source": None if not own else {
                source: coverage_low(int(counts[source]), coverage) for source in own},
            "no_threshold": no_threshold_reason(scores, coverage)}


def own_thresholds_text(summary: dict) -> str:
    """set_summary's thresholds per crop source, for a log line: each source's own, or that it takes the one
    over all answers (too few of its own)."""
    counts, own = summary.get("n_by_source") or {}, summary.get("threshold_by_source") or {}
    if not counts:
        return ""
    pooled = "the one above" if summary.get("threshold") is not None else "none"
    parts = [f"{source} {own[source]:.4f} ({n} answers)" if source in own else f"{source}: {pooled} ({n} answers)"
             for source, n in counts.items()]
    return "; per crop source: " + ", ".join(parts)


def finite(value: float) -> float | None:
    """None for an infinite threshold (nothing is rejected): JSON has no infinity."""
    return value if np.isfinite(value) else None
