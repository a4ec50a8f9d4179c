"""A pill's final answer, decided in one place. The classifier's top-k is re-ranked by the evidence (the imprint
read, the user's hints) into a posterior, the unknown-pill rule may withhold the name, and the answer's fields are
filled. Pure functions over frozen inputs: no OCR, no torch, so every rule here is tested without a model.

Every threshold is a field of AnswerThresholds, with its reason; the evidence weights are RerankWeights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pillsnap.infer.matching import (
    Hints,
    KnownImprints,
    class_imprint_similarity,
    class_imprints,
    color_agreement,
    has_unreadable_side,
    imprint_similarity,
    normalize_imprint,
    shape_agreement,
)
from pillsnap.metrics.conformal import check_set_method, set_size

if TYPE_CHECKING:
    from pillsnap.infer.imprint import ImprintRead


@dataclass(frozen=True)
class AnswerThresholds:
    """The thresholds of a pill's answer. The first five are on the one imprint-similarity scale of
    pillsnap.infer.matching.imprint_similarity (0: nothing alike, 1: the same imprint), lowest first."""

    # Similarity that counts as no evidence at all: two unrelated 3-5 character strings rarely score above 0.5
    # (2 % of random pairs), so a garbage read cannot reorder the classifier's answer.
    imprint_floor: float = 0.5
    # A read at least this similar to an imprint is taken as that imprint: OCR's near misses of real imprints
    # ("BSF" for "BSP": 0.67, "GTH" for "DGTH") pass, 0.5 % of random pairs do.
    imprint_accept: float = 0.6
    # Two classes' imprints this similar look the same to the reader, so a read cannot tell them apart and none
    # is made. Above the accept level: imprints a near miss could confuse are still worth reading.
    same_imprint: float = 0.8
    # A pill the unknown-pill rule rejects is still named when its imprint reads this close to the top candidate's:
    # an imprint is what identifies a drug, but overruling a rejection needs more than accepting a read does.
    unknown_override: float = 0.9
    # The reader stops turning the crop once a reading fits a candidate this well: such a read already overrules
    # the unknown-pill rule, and the two cross turns would double the reading time for nothing.
    conclusive_read: float = 0.9
    # A read is made only when the top-1 and another of the top `read_top_n` candidates holding at least
    # `read_min_probability` differ by imprint: below that the classifier has ruled a candidate out. Chosen with
    # RerankWeights.imprint on the demo's validation crops.
    read_top_n: int = 3
    read_min_probability: float = 0.01
    # An imprint counts against the drugs a pill looks like (it is answered "unknown") only when it is legible: at
    # least this many characters (one character fits a part of almost any imprint), read with at least this
    # confidence (the recogniser's own), and none of the candidates' imprints as alike as imprint_floor.
    foreign_read_chars: int = 2
    foreign_read_score: float = 0.5
    # When the top drug has a side OCR cannot read (plain, a logo or a score line alone, or not on record: an enrolled
    # drug given one imprint), a read may come from that side, where OCR makes a stray letter or two of a logo or a
    # groove: such a read counts only with at least this many characters at this confidence.
    foreign_read_chars_blank_side: int = 3
    foreign_read_score_blank_side: float = 0.8
    # Or, by the recogniser's own probabilities: it reads something with at least this confidence, like none of the
    # candidates' imprints as text, and finds every readable side of every candidate more than this many nats
    # (3,000x) less likely on those lines than what it reads. This catches a one-character read ("8" for "C0"),
    # which the text cannot hold against anything. On the demo, no known single-pill validation crop was rejected
    # with it (bench/reader_likelihoods.py).
    foreign_likelihood_score: float = 0.8
    foreign_likelihood_gap: float = 8.0
    # A drug the classifier ranked below the top-k comes back as a candidate when the imprint is read surely as its
    # own: at least foreign_read_chars characters, at least this confidence, as alike as conclusive_read. Among
    # thousands of look-alike white tablets the right one can rank below the top-k, and its imprint is what tells it
    # apart; but its look argues against it, so the read must be near-certain (the demo's validation reads that
    # brought one back were at 0.99-1.00; a held-out pill's "HC" at 0.57 would have been named as the known "HC").
    # Only where the read is like none of the top-k's imprints (imprint_accept): a near miss of a top-k drug's
    # ("BSF" for "BSP") is that drug, not another one printed "BSF". A drug brought back never overrules the
    # unknown-pill rule or the box check, which a conclusive read of a top-k drug does.
    recall_read_score: float = 0.9
    # Only a drug the classifier left at least this probability. This is no look filter: the classifier's tail is
    # not calibrated, and on the demo drugs of another colour or shape held up to 0.05 beyond the top-5 (median
    # 0.002); it only bounds the reserve. The look is guarded by the unknown-pill rule, which a recall never
    # overrules.
    recall_min_probability: float = 0.001
    recall_max: int = 20  # drugs kept aside per pill at most (Classified.reserve)


@dataclass(frozen=True)
class RerankWeights:
    """Log-odds each piece of evidence adds to a candidate's log-probability."""

    # A perfect OCR match, scaled by the recogniser's confidence. Strong, because the classifier cannot see an
    # imprint and its preference between look-alike twins is close to a guess: chosen on the demo's validation
    # crops, where 10 (with read_min_probability 0.01) was right for 0.858 against 0.756 for 4.
    imprint: float = 10.0
    # Per nat by which a candidate's imprint is less likely on the lines read than what the recogniser reads there
    # itself (its own probabilities: ImprintRead.likelihoods, .read_likelihood), counted down to `likelihood_cap`
    # nats: beyond that an imprint is not on the lines, whichever it is. Only beside a legible read that matched
    # no candidate: it tells candidates apart where the read is garbled ("F" for "F7" against "76"). Chosen on the
    # demo's validation answers (bench/reader_likelihoods.py: cap 8 fit better than 6, 10 no better); the
    # calibrated evidence scale applies to it as to `imprint`.
    likelihood: float = 1.0
    likelihood_cap: float = 8.0
    hint_imprint: float = 12.0  # what the user typed is trusted more than OCR
    color: float = 2.5
    shape: float = 2.0

    def with_read_scaled(self, factor: float) -> RerankWeights:
        """These weights with the imprint read's scaled by `factor` (the calibrated evidence scale)."""
        return replace(self, imprint=self.imprint * factor, likelihood=self.likelihood * factor)


THRESHOLDS, WEIGHTS = AnswerThresholds(), RerankWeights()


def calibrated_evidence(calibration: Mapping | None) -> tuple[RerankWeights, AnswerThresholds]:
    """The evidence weights and thresholds a calibration's evidence scale and prediction sets were fit with, the
    weights scaled by its `evidence_scale`. One made before the candidates' likelihoods counted (no
    `likelihood_weight`) was fit without them: its answers are made without them, in the re-ranking and in the
    imprint check. One made before drugs below the top-k could be brought back by their imprint (no
    `imprint_recall: true`) is answered with the top-k alone. Without a calibration, the policy's own."""
    calibration = calibration or {}
    missing = fit_without(calibration)

    def number(key: str, default: float) -> float:
        value = calibration.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"calibration.json: {key} must be a number, got {value!r} (recalibrate: pillsnap "
                             f"calibrate --exp EXP)")
        return float(value)

    stale = "likelihoods" in missing
    weights = replace(WEIGHTS, likelihood=0.0 if stale else number("likelihood_weight", WEIGHTS.likelihood),
                      likelihood_cap=number("likelihood_cap", WEIGHTS.likelihood_cap))
    thresholds = replace(THRESHOLDS, foreign_likelihood_gap=math.inf) if stale else THRESHOLDS
    if "recall" in missing:  # no drug is kept aside
        thresholds = replace(thresholds, recall_min_probability=math.inf)
    return weights.with_read_scaled(number("evidence_scale", 1.0) or 1.0), thresholds  # 0: never fit, as before


def fit_without(calibration: Mapping | None) -> tuple[str, ...]:
    """The evidence a calibration was fit without, and so is answered without (calibrated_evidence):
    "likelihoods" (no `likelihood_weight`: the candidates' likelihoods) and "recall" (no `imprint_recall: true`:
    drugs below the top-k brought back by their imprint). Nothing without a calibration: the policy's own."""
    if not calibration:
        return ()
    if not isinstance(calibration.get("imprint_recall", False), bool):
        raise ValueError(f"calibration.json: imprint_recall must be true or false, got "
                         f"{calibration['imprint_recall']!r} (recalibrate: pillsnap calibrate --exp EXP)")
    return tuple(name for name, fit in (("likelihoods", "likelihood_weight" in calibration),
                                        ("recall", calibration.get("imprint_recall") is True)) if not fit)


class Classified(NamedTuple):
    """One crop through the classifier: its candidates best first (dicts with mapping_code, name, edi_codes and the
    calibrated probability), how unknown it looks under the run's rule (higher: less like any known drug; None
    when the rule is off) and `reserve`, the drugs beyond the top-k a conclusive imprint read may bring back
    (classifier_candidates; recalled_candidates)."""

    topk: tuple[dict, ...]
    unknown_score: float | None
    reserve: tuple[dict, ...] = ()


@dataclass(frozen=True)
class UnknownRule:
    """What the answer needs of the unknown-pill rule: its name, the threshold calibrated for it (None: off) and how
    many drugs are known (for the reason it gives)."""

    rule: str
    threshold: float | None
    num_known: int


@dataclass(frozen=True)
class SetRule:
    """The prediction-set rule calibrated for these weights: the conformal score (pillsnap.metrics.conformal), the
    coverage asked for and the threshold calibrated for it (infinity: too few calibration answers for that coverage,
    every candidate is in the set).

    With `fill`, a set also holds candidates, best first, until their probabilities add up to the coverage: the
    conformal set holds the right drug that often over all answers, but a lone drug at probability 0.6 is not one a
    person should read as sure. Filled, a one-drug ("sure") set is one whose own probability is at least the
    coverage, and the guarantee stands (the sets only grow)."""

    method: str
    coverage: float
    threshold: float
    fill: bool = False

    def __post_init__(self) -> None:
        check_set_method(self.method)

    def size(self, candidates: Sequence[Mapping]) -> int:
        return set_size(self.method, [float(c.get("probability") or 0.0) for c in candidates], self.threshold,
                        self.coverage if self.fill else None)


def classifier_candidates(probs: np.ndarray, k: int, class_names: Sequence[str],
                          class_map: Mapping[str, Mapping] | None = None,
                          thresholds: AnswerThresholds = THRESHOLDS) -> list[tuple[tuple[dict, ...], tuple[dict, ...]]]:
    """Each row's top-k candidates from probabilities [N, C], best first (ties keep the class order): mapping_code,
    name, edi_codes (from the class map) and probability; and its reserve, the drugs after them holding at least
    recall_min_probability (at most recall_max), which a conclusive imprint read may bring back. The one top-k of
    inference and calibration."""
    probs = np.asarray(probs, dtype=np.float32)
    k = min(int(k), probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k + thresholds.recall_max]
    out = []
    for row, idx in zip(probs, order, strict=True):
        top = tuple(_candidate(class_names[i], float(row[i]), class_map) for i in idx[:k])
        reserve = tuple(_candidate(class_names[i], float(row[i]), class_map) for i in idx[k:]
                        if row[i] >= thresholds.recall_min_probability)
        out.append((top, reserve))
    return out


def recalled_candidates(read: ImprintRead | None, classified: Classified, class_map: Mapping[str, Mapping],
                        thresholds: AnswerThresholds = THRESHOLDS) -> tuple[dict, ...]:
    """The drugs of a pill's reserve (Classified.reserve) whose imprint the read is: read surely (foreign_read_chars,
    recall_read_score), like none of the top-k's imprints (imprint_accept) and as like one of the drug's as
    conclusive_read. Each is marked `recalled_by_imprint`."""
    if read is None or read.score < thresholds.recall_read_score or \
            len(read.normalized) < thresholds.foreign_read_chars or not classified.reserve:
        return ()
    if _like_any(read.text, _entries(classified.topk, class_map), thresholds.imprint_accept):
        return ()
    return tuple({**c, "recalled_by_imprint": True}
                 for c, entry in zip(classified.reserve, _entries(classified.reserve, class_map), strict=True)
                 if _like_any(read.text, [entry], thresholds.conclusive_read))


def answer_candidates(classified: Classified, read: ImprintRead | None, class_map: Mapping[str, Mapping],
                      thresholds: AnswerThresholds = THRESHOLDS) -> tuple[dict, ...]:
    """The candidates a pill's answer weighs: the classifier's top-k, then any drug of its reserve the imprint read
    brings back (recalled_candidates). Copies: the answer adds to them."""
    return tuple(dict(c) for c in classified.topk) + recalled_candidates(read, classified, class_map, thresholds)


def _candidate(code: str, probability: float, class_map: Mapping[str, Mapping] | None) -> dict:
    entry = (class_map or {}).get(code) or {}
    return {"mapping_code": code, "name": entry.get("name", ""), "edi_codes": list(entry.get("edi_codes") or []),
            "probability": probability}


# ---- when to read ----------------------------------------------------------------------------------------------

def should_read_imprint(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping],
                        thresholds: AnswerThresholds = THRESHOLDS, check_unknown: bool = False) -> bool:
    """Whether OCR can change the answer: the top-1 and another contender (AnswerThresholds.read_top_n,
    read_min_probability) have imprints that differ (similarity below same_imprint, or one has text and the other
    none). When the contenders share an imprint, or only one is in the running, a read cannot tell them apart.
    With `check_unknown` (the imprint check), also whenever the top-1 has an imprint on record: a legible read like
    none of the candidates' imprints answers the pill "unknown" (foreign_imprint)."""
    if check_unknown and class_imprints(_top_entry(candidates, class_map)):
        return True
    contenders = [c for c in candidates[:thresholds.read_top_n]
                  if float(c.get("probability", 0.0)) >= thresholds.read_min_probability]
    if len(contenders) < 2:
        return False
    sides = [class_imprints(entry) for entry in _entries(contenders, class_map)]
    return any(_imprints_differ(sides[0], other, thresholds.same_imprint) for other in sides[1:])


def _top_entry(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> Mapping:
    """The class-map entry of the top candidate ({} when there is none)."""
    return _entries(candidates[:1], class_map)[0] if candidates else {}


def _entries(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> list[Mapping]:
    """The candidates' class-map entries ({} for a drug not in the map)."""
    return [class_map.get(str(c.get("mapping_code"))) or {} for c in candidates]


def _imprints_differ(a: tuple[str, ...], b: tuple[str, ...], same_above: float) -> bool:
    """Two classes' imprints differ when some side of one has no look-alike side on the other: twins that share
    a back imprint ("5") but not the front can still be told apart when the front faces the camera."""
    def covered(xs: tuple[str, ...], ys: tuple[str, ...]) -> bool:
        return all(any(imprint_similarity(x, y) >= same_above for y in ys) for x in xs)

    return not (covered(a, b) and covered(b, a))


# ---- re-ranking ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reranked:
    """Candidates best first, each with what matched; whether the top answer changed, and which hints the
    top answer contradicts (`conflicts`: "imprint", "color", "shape")."""

    candidates: list[dict]
    changed: bool
    conflicts: tuple[str, ...] = ()
    imprint_read: str | None = None

    @property
    def hints_conflict(self) -> bool:
        return bool(self.conflicts)

    def flags(self) -> dict:
        """The answer-level fields: imprint_read, ranking_changed, hints_conflict, conflicts."""
        return {"imprint_read": self.imprint_read, "ranking_changed": self.changed,
                "hints_conflict": self.hints_conflict, "conflicts": list(self.conflicts)}


def _strength(similarity: float, floor: float) -> float:
    """Similarity above the floor, rescaled to [0, 1]."""
    return max(0.0, similarity - floor) / max(1e-6, 1.0 - floor)


def _verdict(agreement: int | None) -> str | None:
    return None if agreement is None else {1: "match", 0: "near", -1: "mismatch"}[agreement]


def _hint_terms(hints: Hints, entry: Mapping, w: RerankWeights,
                t: AnswerThresholds) -> tuple[dict[str, str | None], float]:
    """Per-hint verdicts for one class and the log-odds they add."""
    agreements = {"imprint": None, "color": color_agreement(hints.colors, entry),
                  "shape": shape_agreement(hints.shape, entry)}
    logit = 0.0
    if normalize_imprint(hints.imprint):  # one similarity (its cost grows with the text) gives verdict and weight
        sim = class_imprint_similarity(hints.imprint, entry)
        agreements["imprint"] = 1 if sim >= t.imprint_accept else (0 if sim > t.imprint_floor else -1)
        logit = w.hint_imprint * (2.0 * _strength(sim, t.imprint_floor) - 1.0)  # graded: a near miss ranks above
    logit += w.color * (agreements["color"] or 0) + w.shape * (agreements["shape"] or 0)
    return {k: _verdict(v) for k, v in agreements.items()}, logit


def likelihood_gaps(entries: Sequence[Mapping], likelihoods: Mapping[str, float] | None,
                    reference: float | None = None) -> list[float | None]:
    """Per class: by how many nats its imprint (its likelier side) is less likely on the lines read than the
    `reference` (the recogniser's own reading, ImprintRead.read_likelihood) or the likeliest class, whichever is
    likelier, from the reader's `likelihoods`. None where the read cannot say: a side OCR cannot read (plain, marks
    alone, or not on record: the lines may be a groove's strokes or a stray letter, and counting a plain side as
    "nothing read" cost the demo's answers), or an imprint the recogniser cannot spell."""
    finite = {t: v for t, v in (likelihoods or {}).items() if math.isfinite(v)}
    values: list[float | None] = []
    for entry in entries:
        texts = [normalize_imprint(side) for side in class_imprints(entry)]
        measurable = texts and not has_unreadable_side(entry) and all(t in finite for t in texts)
        values.append(max(finite[t] for t in texts) if measurable else None)
    known = [v for v in values if v is not None]
    if reference is not None and math.isfinite(reference):
        known.append(reference)
    top = max(known, default=None)
    return [None if v is None else v - top for v in values]


def _scored(rank: int, cand: Mapping, entry: Mapping, read: str | None, read_score: float,
            hints: Hints | None, w: RerankWeights, t: AnswerThresholds) -> tuple[float, dict]:
    out = dict(cand)
    logit = math.log(max(float(cand.get("probability", 0.0)), 1e-12))
    out["classifier_rank"] = rank
    if read is not None:
        sim = class_imprint_similarity(read, entry)
        out["imprint_similarity"], out["imprint_match"] = round(sim, 3), sim >= t.imprint_accept
        logit += w.imprint * max(0.0, min(1.0, read_score)) * _strength(sim, t.imprint_floor)
    if hints is not None and not hints.empty():
        out["hint_match"], hint_logit = _hint_terms(hints, entry, w, t)
        logit += hint_logit
    return logit, out


def _with_likelihoods(scored: list[tuple[float, dict]], entries: Sequence[Mapping], likelihoods: Mapping[str, float],
                      reference: float | None, w: RerankWeights) -> list[tuple[float, dict]]:
    """The candidates' likelihoods (likelihood_gaps, each counted down to -likelihood_cap) moving probability among
    the candidates they can measure only: those keep their total, the others and the rest keep theirs. Spoken
    only where the read text matched no candidate: a read that did already says which it is."""
    if any(out.get("imprint_match") for _, out in scored):
        return scored
    gaps = likelihood_gaps(entries, likelihoods, reference)
    measured = [i for i, gap in enumerate(gaps) if gap is not None]
    if len(measured) < 2:
        return scored
    moved = {i: scored[i][0] + w.likelihood * max(gaps[i], -w.likelihood_cap) for i in measured}
    shift = _logsumexp([scored[i][0] for i in measured]) - _logsumexp(list(moved.values()))
    out = list(scored)
    for i, logit in moved.items():
        out[i] = (logit + shift, {**scored[i][1], "imprint_likelihood": round(gaps[i], 2)})
    return out


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def rerank(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping], read: str | None = None,
           read_score: float = 1.0, hints: Hints | None = None, weights: RerankWeights = WEIGHTS,
           thresholds: AnswerThresholds = THRESHOLDS, likelihoods: Mapping[str, float] | None = None,
           read_likelihood: float | None = None) -> Reranked:
    """Re-rank the classifier's top-k (dicts with `mapping_code`, `probability`, best first) with an imprint
    read (`read`, the reader's text; `read_score`, its confidence in [0, 1]; `likelihoods` and `read_likelihood`,
    what the recogniser's probabilities say of the candidates and of its own reading: ImprintRead) and the user's
    hints.

    Each returned candidate is a copy whose `probability` is the posterior given the evidence: the classifier's
    probability times each piece of evidence's odds, renormalised together with the probability the classifier
    left outside these candidates (which no evidence speaks for). The classifier's own stays in
    `classifier_probability`; `classifier_rank` is its place in the classifier's order; when given,
    `imprint_similarity` / `imprint_match`, `imprint_likelihood` (likelihood_gaps) and `hint_match` ({"imprint",
    "color", "shape"}: "match" | "near" | "mismatch" | None). Give calibrated probabilities: the evidence weights
    are log-odds. An empty read counts as no read."""
    if not candidates:
        return Reranked([], False, (), read)
    read = read if read and normalize_imprint(read) else None
    entries = _entries(candidates, class_map)
    scored = [_scored(i, c, entry, read, read_score, hints, weights, thresholds)
              for i, (c, entry) in enumerate(zip(candidates, entries, strict=True))]
    # Lines that read as nothing legible say little, and where the classifier has ruled out every look-alike that
    # differs by imprint (a read made only for the imprint check) they have nothing to choose between
    if read is not None and likelihoods and weights.likelihood > 0 and should_read_imprint(candidates, class_map,
                                                                                         thresholds):
        scored = _with_likelihoods(scored, entries, likelihoods, read_likelihood, weights)
    rest = 1.0 - sum(float(c.get("probability", 0.0)) for c in candidates)
    posterior = _softmax([s for s, _ in scored] + ([math.log(rest)] if rest > 1e-9 else []))
    for (_, out), p in zip(scored, posterior, strict=False):
        out["classifier_probability"], out["probability"] = out.get("probability", 0.0), p
    ranked = [out for _, out in sorted(scored, key=lambda so: -so[0])]  # stable: ties keep the classifier's order
    verdicts = ranked[0].get("hint_match") or {}
    conflicts = tuple(k for k, v in verdicts.items() if v == "mismatch")
    changed = ranked[0].get("mapping_code") != candidates[0].get("mapping_code")
    return Reranked(ranked, changed, conflicts, read)


# ---- the unknown-pill rule -------------------------------------------------------------------------------------

def unknown_reason(rule: UnknownRule, score: float | None) -> str | None:
    """Why a pill with this unknown-pill score is answered "unknown pill", or None when it is not."""
    if score is None or rule.threshold is None or score <= rule.threshold:
        return None
    if rule.rule == "probability":
        return (f"top-1 probability {1 - score:.2f} is below {1 - rule.threshold:.2f}: not one of the "
                f"{rule.num_known} known drugs, or too unclear to name; nearest candidates in topk")
    return (f"its look is farther from every one of the {rule.num_known} known drugs (distance {score:.0f}) than "
            f"the right validation answers (up to {rule.threshold:.0f}): not a known drug; nearest candidates in topk")


def foreign_imprint(read: ImprintRead | None, typed: str, candidates: Sequence[Mapping],
                    class_map: Mapping[str, Mapping], known: KnownImprints | None = None,
                    thresholds: AnswerThresholds = THRESHOLDS) -> str | None:
    """Why a pill is answered "unknown pill" by its imprint, or None. The imprint `typed` in (normalised; "" when
    none), else the one read when legible (AnswerThresholds.foreign_read_chars, foreign_read_score; stricter when
    the top drug has a side OCR cannot read), is like none of the candidates' imprints (below imprint_floor, what
    unrelated strings reach): the drugs the pill looks like do not carry it. Held against the candidates, not every
    known drug: among thousands of short imprints almost any read is like one of them by chance
    (bench/unknown_imprint_check.py). With `known`, the reason names the known drug whose imprint it is, if any (it
    may be that drug, photographed unlike its training photos). Or, for a read, by the recogniser's own
    probabilities: every candidate imprint is far less likely on the lines than what it reads with confidence
    (AnswerThresholds.foreign_likelihood_score, foreign_likelihood_gap). Never said when the top drug has no imprint
    on record (an enrolled drug given without them)."""
    top = _top_entry(candidates, class_map)
    if not class_imprints(top):
        return None
    entries = _entries(candidates, class_map)
    drugs = "the drug" if len(candidates) == 1 else f"the {len(candidates)} drugs"
    by_text = _foreign_by_text(read, typed, top, entries, drugs, known, thresholds)
    if by_text is not None or typed:
        return by_text
    if not _foreign_by_likelihood(read, entries, thresholds):
        return None
    return (f"its imprint reads {read.normalized!r} (confidence {read.score:.2f}), and the recogniser finds every "
            f"imprint of {drugs} it looks like more than {math.exp(thresholds.foreign_likelihood_gap):,.0f}x less "
            f"likely there than what it reads: not one of them; nearest candidates in topk")


def _foreign_by_text(read: ImprintRead | None, typed: str, top: Mapping, entries: Sequence[Mapping], drugs: str,
                     known: KnownImprints | None, thresholds: AnswerThresholds) -> str | None:
    """foreign_imprint's reason when the typed or legible read imprint is like none of the `entries`' imprints."""
    if typed:
        text, said, chars = typed, f"the imprint typed in, {typed!r},", thresholds.foreign_read_chars
    else:
        chars, score = ((thresholds.foreign_read_chars_blank_side, thresholds.foreign_read_score_blank_side)
                        if has_unreadable_side(top) else (thresholds.foreign_read_chars, thresholds.foreign_read_score))
        if read is None or read.score < score:
            return None
        text, said = read.normalized, f"its imprint reads {read.normalized!r} (confidence {read.score:.2f}) and"
    if len(text) < chars or _like_any(text, entries, thresholds.imprint_floor):
        return None
    match = known.closest(text) if known is not None else None
    whose = (f" (it is the imprint of {match.code}, {match.imprint!r}, a drug it does not look like)"
             if match is not None and match.similarity >= thresholds.imprint_accept else "")
    return (f"{said} is like none of the imprints of {drugs} it looks like{whose}: not one of them; nearest "
            f"candidates in topk")


def _like_any(text: str, entries: Sequence[Mapping], level: float) -> bool:
    """Whether an imprint is at least `level` like one of the entries' (imprint_floor: then it is no evidence
    against them)."""
    return any(class_imprint_similarity(text, entry) >= level for entry in entries)


def _foreign_by_likelihood(read: ImprintRead | None, entries: Sequence[Mapping], thresholds: AnswerThresholds) -> bool:
    """Whether the read is confident, like none of the candidates' imprints as text (a near miss like "GTH" for
    "DGTH" costs CTC a dropped character's worth of nats), and every readable side of every candidate is more than
    foreign_likelihood_gap nats below what the recogniser reads. Never when the top drug has a side OCR cannot read
    (the lines may come from it) or a side the recogniser cannot spell."""
    if read is None or not read.normalized or read.score < thresholds.foreign_likelihood_score:
        return False
    if read.read_likelihood is None or not math.isfinite(read.read_likelihood) or has_unreadable_side(entries[0]):
        return False
    if _like_any(read.normalized, entries, thresholds.imprint_floor):
        return False
    likelihoods = read.likelihoods or {}
    sides = [normalize_imprint(side) for entry in entries for side in class_imprints(entry)]
    if not all(math.isfinite(likelihoods.get(side, math.nan)) for side in sides):
        return False
    return max(likelihoods[side] for side in sides) < read.read_likelihood - thresholds.foreign_likelihood_gap


# ---- what is left open ----------------------------------------------------------------------------------------

NARROWERS = {  # what would shrink a prediction set, in the order a person would try them
    "other_side": "photograph the other side of the pill",
    "imprint": "type the imprint you see (--imprint)",
    "color": "give its colour (--color)",
    "shape": "give its shape (--shape)",
}


def narrow_by(members: Sequence[Mapping], class_map: Mapping[str, Mapping], hints: Hints | None,
              thresholds: AnswerThresholds = THRESHOLDS) -> tuple[str, ...]:
    """What would tell the drugs of a set apart (keys of NARROWERS): their imprints differ (the other side, or the
    imprint typed in), their colours or their shapes differ, and the user has not already said so. Empty when
    nothing a person sees on the pill separates them."""
    entries = [class_map.get(str(m.get("mapping_code"))) or {} for m in members]
    pairs = [(a, b) for i, a in enumerate(entries) for b in entries[i + 1:]]
    typed = hints is not None and bool(normalize_imprint(hints.imprint))
    out = []
    if any(_imprints_differ(class_imprints(a), class_imprints(b), thresholds.same_imprint) for a, b in pairs):
        out += ["other_side"] + ([] if typed else ["imprint"])
    if (hints is None or not hints.colors) and any(
            set(a.get("colors") or ()) != set(b.get("colors") or ()) for a, b in pairs):
        out.append("color")
    if (hints is None or not hints.shape) and any(a.get("shape") != b.get("shape") for a, b in pairs):
        out.append("shape")
    return tuple(out)


def set_note(members: Sequence[Mapping], narrowers: Sequence[str], coverage: float) -> str | None:
    """The set in words for a person, or None for a sure (one-drug) answer."""
    if len(members) < 2:
        return None
    names = " or ".join(f"{m['mapping_code']} {m.get('name') or ''}".strip() for m in members)
    how = "; ".join(NARROWERS[n] for n in narrowers) or "nothing on the pill tells them apart: check the package"
    return f"one of {names} (at {coverage:.0%} confidence): {how}"


# ---- the answer ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictionSet:
    """The drugs a pill may be at the calibrated coverage, best first (empty for an unknown pill), and what would
    shrink the set (keys of NARROWERS)."""

    members: tuple[dict, ...]
    coverage: float
    narrow_by: tuple[str, ...] = ()
    # False when a filled set could not reach the coverage (too few candidates): one drug left is then not sure
    reached: bool = True

    @property
    def sure(self) -> bool:
        return len(self.members) == 1 and self.reached

    def to_dict(self) -> dict:
        members = [{k: m.get(k) for k in ("mapping_code", "name", "probability")} for m in self.members]
        note = set_note(self.members, self.narrow_by, self.coverage)
        if len(self.members) == 1 and not self.reached:
            only = self.members[0]
            note = (f"{only['mapping_code']} {only.get('name') or ''}".strip() + f" is the only candidate left, but "
                    f"not {self.coverage:.0%} probable: check the package")
        return {"prediction_set": members, "set_coverage": self.coverage, "sure": self.sure,
                "narrow_by": list(self.narrow_by), "set_note": note}


NO_SET = {"prediction_set": None, "set_coverage": None, "sure": None, "narrow_by": [], "set_note": None}


@dataclass(frozen=True)
class PillAnswer:
    """One pill's final answer. `candidates`: best first after the evidence (the classifier's own when no
    evidence spoke); `unknown_reason` set: the name (and its probability) is withheld and the candidates are the
    nearest known drugs. `prediction_set`: the drugs it may be at the calibrated coverage (None without a
    calibrated set rule; empty for an unknown pill).

    `imprint_unresolved`: the contenders look alike and differ by imprint, but what was read matches none of them
    (a plain side up, or an unreadable imprint) and the user typed no imprint: the choice between them rests on the
    classifier and, at most, on how likely the recogniser finds each imprint on the lines it could not read
    (RerankWeights.likelihood), and the other side of the pill, or its imprint typed in, would settle it. Never said
    of an unknown pill: an imprint that matches no known drug is what an unknown pill has."""

    candidates: tuple[dict, ...]
    unknown_score: float | None
    unknown_reason: str | None = None
    read: ImprintRead | None = None
    imprint_read: str | None = None
    imprint_unresolved: bool = False
    ranking_changed: bool = False
    conflicts: tuple[str, ...] = ()
    prediction_set: PredictionSet | None = None
    # what withheld the name: "look" (the unknown-pill rule) | "imprint" | "box" (it may hold no pill) | None
    unknown_by: str | None = None

    @property
    def unknown(self) -> bool:
        return self.unknown_reason is not None

    def to_dict(self) -> dict:
        """The answer's fields of a pill in predict's result (the API's and `pillsnap predict --json`'s)."""
        top = dict(self.candidates[0])
        if self.unknown:  # no drug is named, so no probability is stated either
            top.update(mapping_code=None, name="", edi_codes=[], probability=None, classifier_probability=None)
        fields = {**top, "topk": [dict(c) for c in self.candidates], "imprint_read": self.imprint_read,
                  "imprint_unresolved": self.imprint_unresolved, "ranking_changed": self.ranking_changed,
                  "hints_conflict": bool(self.conflicts), "conflicts": list(self.conflicts),
                  **(self.prediction_set.to_dict() if self.prediction_set else NO_SET)}
        if self.read is not None:
            fields["imprint"] = self.read.to_dict()
        return {**fields, "unknown": self.unknown, "unknown_score": self.unknown_score,
                "unknown_reason": self.unknown_reason, "unknown_by": self.unknown_by}


def prediction_set(candidates: Sequence[dict], unknown: bool, rule: SetRule, class_map: Mapping[str, Mapping],
                   hints: Hints | None, thresholds: AnswerThresholds = THRESHOLDS) -> PredictionSet:
    """The answer's set under `rule`: empty for an unknown pill (no known drug is claimed), else the candidates the
    rule keeps, with what would tell them apart."""
    if unknown:
        return PredictionSet((), rule.coverage)
    members = tuple(candidates[:rule.size(candidates)])
    narrowers = narrow_by(members, class_map, hints, thresholds) if len(members) > 1 else ()
    mass = sum(float(m.get("probability") or 0.0) for m in members)
    return PredictionSet(members, rule.coverage, narrowers, reached=not rule.fill or mass >= rule.coverage - 1e-12)


def decide_answer(classified: Classified, class_map: Mapping[str, Mapping], read: ImprintRead | None,
                  hints: Hints | None, unknown: UnknownRule, thresholds: AnswerThresholds = THRESHOLDS,
                  weights: RerankWeights = WEIGHTS, set_rule: SetRule | None = None,
                  known: KnownImprints | None = None, one_pill: bool = True,
                  box_doubt: str | None = None) -> PillAnswer:
    """One pill's answer from its classifier output, its imprint read (None: not read), the user's hints and the
    unknown-pill rule: the evidence re-ranks the candidates; a pill the rule rejects is answered "unknown" unless
    its imprint reads as the top candidate's (AnswerThresholds.unknown_override). With the imprint check on
    (`known`: every known drug's imprints, to name the one a foreign imprint belongs to), a pill whose legible
    imprint is like none of its candidates' is answered "unknown" too (foreign_imprint); an imprint typed in is
    held against the pill only when the photo shows `one_pill` (on a photo of several it may describe another).
    A detector box that may hold no pill (`box_doubt`, its reason: pillsnap.infer.box_check) is named as no drug
    either, before the other rules, unless its imprint reads as the top candidate's: a pill's imprint on it is
    what proves it a pill. With a calibrated `set_rule`, the answer carries its prediction set."""
    hints = None if hints is None or hints.empty() else hints
    topk = answer_candidates(classified, read, class_map, thresholds)
    if read is None and hints is None:
        ranked = Reranked(list(topk), False)
    else:
        ranked = rerank(topk, class_map, read.text if read else None, read.score if read else 1.0, hints, weights,
                        thresholds, read.likelihoods if read else None, read.read_likelihood if read else None)
    candidates = tuple(ranked.candidates)
    # a conclusive read of a top-k drug overrules the unknown-pill rule and the box check; one of a drug brought
    # back from below the top-k does not: the pill's look argues against that drug
    conclusive = bool(candidates) and float(candidates[0].get("imprint_similarity") or 0.0) >= \
        thresholds.unknown_override and not candidates[0].get("recalled_by_imprint")
    reason, unknown_by = (box_doubt, "box") if box_doubt and not conclusive else (None, None)
    if reason is None and not conclusive:
        reason = unknown_reason(unknown, classified.unknown_score)
        unknown_by = "look" if reason else None
    typed = normalize_imprint(hints.imprint) if hints is not None else ""
    if reason is None and known is not None:
        reason = foreign_imprint(read, typed if one_pill else "", candidates, class_map, known, thresholds)
        unknown_by = "imprint" if reason else None
    # look-alike contenders that differ by imprint, and a read that matched none of them (a read made only for the
    # imprint check, with no such contenders, leaves nothing unresolved)
    unresolved = (read is not None and not typed and reason is None
                  and should_read_imprint(classified.topk, class_map, thresholds)
                  and not any(c.get("imprint_match") for c in candidates))
    pset = None if set_rule is None else prediction_set(candidates, reason is not None, set_rule, class_map, hints,
                                                        thresholds)
    conflicts = () if unknown_by == "box" else ranked.conflicts  # a box that may hold no pill names nothing
    return PillAnswer(candidates, classified.unknown_score, reason, read, ranked.imprint_read, unresolved,
                      ranked.changed, conflicts, pset, unknown_by)
