"""The answer policy's numbers: the thresholds of a pill's answer and the weights of each piece of evidence, and the
ones a calibration was fit with (calibrated_evidence). Used by the answer (pillsnap.infer.answer), the re-ranking
(pillsnap.infer.ranking), the reader's early stop (pillsnap.infer.imprint) and the calibration."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace


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


def stored_number(value: object, name: str, positive: bool = False) -> float:
    """A number read from calibration.json: finite (and above zero with `positive`), else a ValueError naming
    `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"calibration.json: {name} must be a {'positive ' if positive else ''}number, got {value!r} "
                         "(recalibrate: pillsnap calibrate --exp EXP)")
    return float(value)


def calibrated_evidence(calibration: Mapping | None,
                        source: str | None = None) -> tuple[RerankWeights, AnswerThresholds]:
    """The evidence weights and thresholds a calibration's evidence scale and prediction sets were fit with, the
    weights scaled by its `evidence_scale`, or for a crop from `source` (single, combination) by that source's
    where it fit one (`evidence_scale_by_source`). One made before the candidates' likelihoods counted (no
    `likelihood_weight`) was fit without them: its answers are made without them, in the re-ranking and in the
    imprint check. One made before drugs below the top-k could be brought back by their imprint (no
    `imprint_recall: true`) is answered with the top-k alone. Without a calibration, the policy's own."""
    calibration = calibration or {}
    missing = fit_without(calibration)

    def number(key: str, default: float, within: Mapping = calibration, name: str | None = None) -> float:
        value = within.get(key)
        return default if value is None else stored_number(value, name or key)

    stale = "likelihoods" in missing
    weights = replace(WEIGHTS, likelihood=0.0 if stale else number("likelihood_weight", WEIGHTS.likelihood),
                      likelihood_cap=number("likelihood_cap", WEIGHTS.likelihood_cap))
    thresholds = replace(THRESHOLDS, foreign_likelihood_gap=math.inf) if stale else THRESHOLDS
    if "recall" in missing:  # no drug is kept aside
        thresholds = replace(thresholds, recall_min_probability=math.inf)
    scale = number("evidence_scale", 1.0)
    by_source = calibration.get("evidence_scale_by_source")
    if by_source is not None and not isinstance(by_source, Mapping):
        raise ValueError(f"calibration.json: evidence_scale_by_source must map crop sources to scales, got "
                         f"{by_source!r} (recalibrate: pillsnap calibrate --exp EXP)")
    if source is not None and by_source is not None:
        scale = number(source, scale, by_source, f"evidence_scale_by_source.{source}")
    if scale < 0:  # a negative weight would turn a read against the drug it names
        raise ValueError(f"calibration.json: the evidence scale must not be negative, got {scale} (recalibrate: "
                         "pillsnap calibrate --exp EXP)")
    return weights.with_read_scaled(scale or 1.0), thresholds  # 0: never fit, as before


# How the recogniser's own reading, which the candidates' likelihoods are measured against, is measured: "imprint"
# (a run of characters outside 0-9A-Z as "something else": pillsnap.infer.ocr.RapidOcrModels.reading_log_likelihood).
# A calibration without it was fit against the exact string; its answers are made the new way, and the log says so.
READING_REFERENCE = "imprint"


def fit_without(calibration: Mapping | None) -> tuple[str, ...]:
    """The evidence a calibration was fit without, and so is answered without (calibrated_evidence):
    "likelihoods" (no `likelihood_weight`: the candidates' likelihoods), "recall" (no `imprint_recall: true`:
    drugs below the top-k brought back by their imprint) and "reading" (no `reading_reference`: fit against the
    recogniser's reading as an exact string; the only one answered the new way, said in the log). Nothing without a
    calibration: the policy's own."""
    if not calibration:
        return ()
    if not isinstance(calibration.get("imprint_recall", False), bool):
        raise ValueError(f"calibration.json: imprint_recall must be true or false, got "
                         f"{calibration['imprint_recall']!r} (recalibrate: pillsnap calibrate --exp EXP)")
    return tuple(name for name, fit in (("likelihoods", "likelihood_weight" in calibration),
                                        ("recall", calibration.get("imprint_recall") is True),
                                        ("reading", calibration.get("reading_reference") == READING_REFERENCE))
                 if not fit)
