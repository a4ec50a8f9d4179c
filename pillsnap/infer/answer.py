"""A pill's final answer, decided in one place: its candidates (the classifier's top-k and the drugs an imprint
read brings back), whether to read its imprint, the re-ranking by the evidence (pillsnap.infer.ranking), the
unknown-pill rule that may withhold the name, the prediction set, and the answer's fields. Pure functions over
frozen inputs: no OCR, no torch, so every rule here is tested without a model.

Every threshold is a field of AnswerThresholds, with its reason; the evidence weights are RerankWeights (both in
pillsnap.infer.thresholds).
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
    class_entries,
    class_imprint_similarity,
    class_imprints,
    has_unreadable_side,
    normalize_imprint,
)
from pillsnap.infer.ranking import Reranked, imprints_differ, rerank, should_read_imprint, top_entry
from pillsnap.infer.thresholds import THRESHOLDS, WEIGHTS, AnswerThresholds, RerankWeights
from pillsnap.metrics.conformal import check_set_method, set_size

if TYPE_CHECKING:
    from pillsnap.infer.imprint import ImprintRead


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
    coverage asked for and the threshold calibrated for it over every answer (where the calibration gives none, too
    few answers or candidates that miss the right drug too often, there is no rule and answers carry no set, unless
    sources have thresholds of their own: then the others are `refused`, and a crop of no known source gets none).
    `by_source`: the thresholds calibrated on one crop source's answers alone ("single", "combination"), so that
    each path keeps the coverage on its own; a source without one takes `threshold`, calibrated on every answer,
    unless `refused` names it: a source with answers enough of its own whose candidates miss the right drug too
    often for the coverage gets no set (the reason is the value).

    With `fill`, a set also holds candidates, best first, until their probabilities add up to the coverage: the
    conformal set holds the right drug that often over all answers, but a lone drug at probability 0.6 is not one a
    person should read as sure. Filled, a one-drug ("sure") set is one whose own probability is at least the
    coverage, and the guarantee stands (the sets only grow)."""

    method: str
    coverage: float
    threshold: float
    fill: bool = False
    by_source: Mapping[str, float] | None = None
    refused: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        check_set_method(self.method)

    def for_source(self, source: str | None) -> SetRule | None:
        """The rule a crop from `source` is answered with: its source's threshold where there is one; None for a
        source `refused` (its answers carry no set)."""
        if source is not None and source in (self.refused or {}):
            return None
        threshold = (self.by_source or {}).get(source) if source is not None else None
        if threshold is None:
            return self if math.isfinite(self.threshold) else None
        return replace(self, threshold=threshold, by_source=None, refused=None)

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
    out = []
    for row in probs:
        idx = _best(row, k + thresholds.recall_max)
        top = tuple(_candidate(class_names[i], float(row[i]), class_map) for i in idx[:k])
        reserve = tuple(_candidate(class_names[i], float(row[i]), class_map) for i in idx[k:]
                        if row[i] >= thresholds.recall_min_probability)
        out.append((top, reserve))
    return out


def _best(row: np.ndarray, m: int) -> np.ndarray:
    """The indices of the `m` largest of `row`, largest first, ties in index order: what a stable sort of the whole
    row gives, from a partition first (a full sort of 5,000 classes for each crop cost more than the rest)."""
    if m >= len(row):
        return np.argsort(-row, kind="stable")
    kth = row[np.argpartition(-row, m - 1)[m - 1]]  # the m-th largest value
    if np.isnan(kth):  # fewer than m numbers: the sort's own order, NaN last
        return np.argsort(-row, kind="stable")[:m]
    tied_or_above = np.flatnonzero(row >= kth)  # in index order: the stable sort keeps it among equals
    return tied_or_above[np.argsort(-row[tied_or_above], kind="stable")][:m]


def recalled_candidates(read: ImprintRead | None, classified: Classified, class_map: Mapping[str, Mapping],
                        thresholds: AnswerThresholds = THRESHOLDS, typed: str = "") -> tuple[dict, ...]:
    """The drugs of a pill's reserve (Classified.reserve) whose imprint the pill carries: the imprint `typed` in
    (normalised; the user's word for it), else the read, when read surely (foreign_read_chars, recall_read_score);
    like none of the top-k's imprints (imprint_accept) and as like one of the drug's as conclusive_read. Each is
    marked `recalled_by_imprint`. A typed imprint recalls as a sure read does: among thousands of drugs a look-alike
    group outnumbers the top-k, and the drug whose imprint a pharmacist typed, ranked 6th, was answered "unknown
    pill", named in the reason as a drug it does not look like."""
    if typed:
        text = typed
    elif read is None or read.score < thresholds.recall_read_score or \
            len(read.normalized) < thresholds.foreign_read_chars:
        return ()
    else:
        text = read.text
    if not classified.reserve or _like_any(text, class_entries(classified.topk, class_map), thresholds.imprint_accept):
        return ()
    return tuple({**c, "recalled_by_imprint": True}
                 for c, entry in zip(classified.reserve, class_entries(classified.reserve, class_map), strict=True)
                 if _like_any(text, [entry], thresholds.conclusive_read))


def answer_candidates(classified: Classified, read: ImprintRead | None, class_map: Mapping[str, Mapping],
                      thresholds: AnswerThresholds = THRESHOLDS, typed: str = "") -> tuple[dict, ...]:
    """The candidates a pill's answer weighs: the classifier's top-k, then any drug of its reserve the typed or read
    imprint brings back (recalled_candidates). Copies: the answer adds to them."""
    return tuple(dict(c) for c in classified.topk) + recalled_candidates(read, classified, class_map, thresholds,
                                                                         typed)


def _candidate(code: str, probability: float, class_map: Mapping[str, Mapping] | None) -> dict:
    entry = (class_map or {}).get(code) or {}
    return {"mapping_code": code, "name": entry.get("name", ""), "edi_codes": list(entry.get("edi_codes") or []),
            "probability": probability}


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
    top = top_entry(candidates, class_map)
    if not class_imprints(top):
        return None
    entries = class_entries(candidates, class_map)
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
    entries = class_entries(members, class_map)
    pairs = [(a, b) for i, a in enumerate(entries) for b in entries[i + 1:]]
    typed = hints is not None and bool(normalize_imprint(hints.imprint))
    out = []
    if any(imprints_differ(class_imprints(a), class_imprints(b), thresholds.same_imprint) for a, b in pairs):
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
    typed = normalize_imprint(hints.imprint) if hints is not None else ""
    # an imprint typed in speaks for the pill only when the photo shows one (on a photo of several it may describe
    # another)
    topk = answer_candidates(classified, read, class_map, thresholds, typed if one_pill else "")
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
