"""Whether reading a pill's imprint can change its answer (should_read_imprint), and the re-ranking: the
classifier's candidates weighed by the evidence (the imprint read, the recogniser's likelihoods, the user's hints)
into a posterior, best first. Pure functions over the class map: no OCR, no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pillsnap.infer.matching import (
    Hints,
    class_entries,
    class_imprint_similarity,
    class_imprints,
    color_agreement,
    has_unreadable_side,
    imprint_similarity,
    normalize_imprint,
    shape_agreement,
)
from pillsnap.infer.thresholds import THRESHOLDS, WEIGHTS, AnswerThresholds, RerankWeights

# ---- when to read ----------------------------------------------------------------------------------------------

def should_read_imprint(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping],
                        thresholds: AnswerThresholds = THRESHOLDS, check_unknown: bool = False) -> bool:
    """Whether OCR can change the answer: the top-1 and another contender (AnswerThresholds.read_top_n,
    read_min_probability) have imprints that differ (similarity below same_imprint, or one has text and the other
    none). When the contenders share an imprint, or only one is in the running, a read cannot tell them apart.
    With `check_unknown` (the imprint check), also whenever the top-1 has an imprint on record: a legible read like
    none of the candidates' imprints answers the pill "unknown" (foreign_imprint)."""
    if check_unknown and class_imprints(top_entry(candidates, class_map)):
        return True
    contenders = [c for c in candidates[:thresholds.read_top_n]
                  if float(c.get("probability", 0.0)) >= thresholds.read_min_probability]
    if len(contenders) < 2:
        return False
    sides = [class_imprints(entry) for entry in class_entries(contenders, class_map)]
    return any(imprints_differ(sides[0], other, thresholds.same_imprint) for other in sides[1:])



def top_entry(candidates: Sequence[Mapping], class_map: Mapping[str, Mapping]) -> Mapping:
    """The class-map entry of the top candidate ({} when there is none)."""
    return class_entries(candidates[:1], class_map)[0] if candidates else {}


def imprints_differ(a: tuple[str, ...], b: tuple[str, ...], same_above: float) -> bool:
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
    entries = class_entries(candidates, class_map)
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
