"""Read a pill's imprint from its crop with RapidOCR (pillsnap.infer.ocr).

The detector runs once, for its text map; the crop is then turned so that the text (or, failing that, the pill's
long axis) runs left to right, and its text lines are recognised at that turn and the opposite one, then at the
two cross turns and the four diagonals only when needed, each group in one batch. A score line is found in the
relief and erased first (the text runs across it; pillsnap.infer.imprint_geometry). The reading that best fits a
candidate's imprint (without candidates: the most confident one) wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from pillsnap.infer.imprint_geometry import (
    BLOB_ASPECT,
    SCORE_WIDTH,
    STROKE_GROW,
    TEXT_FOUND_PIXELS,
    central_band,
    erase_line,
    find_score_line,
    reading_axis,
    relief_strokes,
    text_lines,
    turn,
)
from pillsnap.infer.matching import imprint_key, imprint_similarity, normalize_imprint
from pillsnap.infer.ocr import REC_WIDTH, get_models, lease_models
from pillsnap.infer.preprocess import pill_mask
from pillsnap.infer.thresholds import THRESHOLDS

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImprintRead:
    """One crop's reading. `text` is what was recognised (lines joined by spaces, "" when nothing was);
    `score` the recogniser's mean confidence in [0, 1]; `angle` the counter-clockwise turn in degrees that
    made it readable; `matched` / `similarity` the candidate imprint it fits best, when candidates were given.
    `matched_by` says which evidence picked `matched` (pick_candidate): "text" when the read is like it as text
    (imprint_accept), else "likelihood", the candidate the recogniser's probabilities find strictly likeliest on
    the lines, when every candidate could be measured ("Y" read from "I|Y" picks "IY" over "5" and "213" although
    it matches none of them as text); `similarity` stays the read text's similarity to `matched`. A choice among
    the candidates, not evidence that the imprint is there.
    `likelihoods`, when candidates were given: for each candidate imprint (normalised) the recogniser can spell,
    the natural log of the probability that the lines read say exactly it (the best line, or the lines together,
    at the best turn for it). A garbled read still says which candidate the strokes fit: "F" is far likelier
    under "F7" than under "76". `read_likelihood`: the same for the recogniser's own reading, what the candidates
    are measured against (a candidate far below it is not on the pill), measured as an imprint: characters outside
    the imprint alphabet count as "something else" (pillsnap.infer.ocr.RapidOcrModels.reading_log_likelihood)."""

    text: str
    score: float
    angle: float
    seconds: float
    text_found: bool  # the detector marked text on the pill (else the pill's central band was read)
    matched: str | None = None
    similarity: float | None = None
    likelihoods: dict[str, float] | None = None
    read_likelihood: float | None = None
    matched_by: str | None = None

    @property
    def normalized(self) -> str:
        return normalize_imprint(self.text)

    def to_dict(self) -> dict:
        return {**asdict(self), "normalized": self.normalized}


@dataclass(frozen=True)
class ReaderSettings:
    """How the reader works. The defaults were chosen on rotated synthetic pill crops (bench/bench_imprint.py):
    a larger work size or recogniser width cost more and read no better. The diagonal turns, score lines and
    stroke rows on crops drawn from real label fields (bench/reader_real_labels.py)."""

    work_px: int = 480  # the crop's long side before detection; the detector's cost grows with its square
    # Local contrast (CLAHE on lightness, 4 x 4 tiles) before reading: debossed imprints on pale pills are shallow
    # shading. On the demo's validation crops it raised exact reads from 51 % to 65 %. 0 turns it off.
    contrast_clip: float = 6.0
    rec_width: int = REC_WIDTH  # lines are padded to at least this width
    text_threshold: float = 0.3  # text-map probability that marks a text pixel
    max_lines: int = 3  # lines recognised at most
    unclip: float = 1.6  # a line's box grows around its text pixels as the detector's own boxes do
    min_line_score: float = 0.3  # a line read with less confidence is dropped
    # with candidates: a reading that fits one this well ends the search early (the answer policy's conclusive read)
    stop_similarity: float = THRESHOLDS.conclusive_read
    stop_score: float = 0.95  # without candidates: a reading this confident ends the search early
    threads: int = 0  # ONNX Runtime threads (0: the machine's cores, at most 4)
    # How many of TURN_GROUPS may be tried. The third (diagonal turns) found the right imprint among 3 candidates
    # for 3 more of 90 real-label crops but cost 37 % more time per read (bench/reader_real_labels.py), and reading
    # is nearly all of the pipeline's time: off by default.
    turn_groups: int = 2
    score_lines: bool = True  # find a score line, read across it with its groove erased
    # a detector line box that is a blob (BLOB_ASPECT) is cut into lines again along the relief strokes' rows
    stroke_lines: bool = True

# ---- reading -------------------------------------------------------------------------------------------------

# A reading's fit to the candidates: how well it matches one decides, the recogniser's confidence breaks ties and
# rules when nothing matches.
FIT_SIMILARITY, FIT_SCORE = 0.75, 0.25
# Turns tried, relative to the reading axis, a group at a time until a reading is conclusive: the axis and its
# opposite, the cross turns, then the diagonals (a logo beside the text, or a score line, can tilt the axis).
TURN_GROUPS = ((0.0, 180.0), (90.0, 270.0), (45.0, 225.0, 135.0, 315.0))
CONTRAST_TILES = 4  # CLAHE tiles per side: each a quarter of the crop, holding strokes and the pill around them


@dataclass(frozen=True)
class _Reading:
    text: str
    score: float
    angle: float
    fit: float = 0.0
    matched: str | None = None
    similarity: float | None = None
    likelihoods: dict[str, float] | None = None
    read_likelihood: float | None = None


def local_contrast(rgb: np.ndarray, clip: float, tiles: int = CONTRAST_TILES) -> np.ndarray:
    """CLAHE on the lightness channel: engraved and printed strokes stand out from the pill's shading."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


RESIZE_TOLERANCE = 0.05  # a crop within 5 % of the work size is read as it is: resampling it would only blur
MIN_WORK_SIDE = 8  # a sliver of a crop still gets a few pixels across


def _work_image(crop: Image.Image, work_px: int, contrast_clip: float = 0.0) -> np.ndarray:
    """The crop as RGB (local contrast raised when `contrast_clip` > 0) with its long side at `work_px`: small
    crops are enlarged, so that engraved strokes are a few pixels wide for the detector, and large ones shrunk,
    which bounds the cost."""
    crop = crop.convert("RGB")
    if contrast_clip > 0:
        crop = Image.fromarray(local_contrast(np.asarray(crop), contrast_clip))
    scale = work_px / max(crop.size)
    if abs(scale - 1.0) > RESIZE_TOLERANCE:
        size = (max(MIN_WORK_SIDE, round(crop.width * scale)), max(MIN_WORK_SIDE, round(crop.height * scale)))
        crop = crop.resize(size, Image.BICUBIC if scale > 1 else Image.BILINEAR)
    return np.asarray(crop)


def _widen(box: tuple[int, int, int, int], text: np.ndarray) -> tuple[int, int, int, int]:
    """A line box stretched to the text pixels across its rows (stroke rows can miss a faint character)."""
    x0, y0, x1, y1 = box
    cols = np.flatnonzero(text[y0:y1].any(axis=0))
    return (min(x0, int(cols[0])), y0, max(x1, int(cols[-1]) + 1), y1) if len(cols) else box


def pick_candidate(text: str, matched: str | None, similarity: float | None, likelihoods: dict[str, float] | None,
                   targets: Sequence[str]) -> tuple[str | None, float | None, str | None]:
    """(imprint, text similarity, "text" | "likelihood") of the candidate a read fits best, normalised ("*A1", a
    logo and A1, as "A1"): the one its text is like (imprint_accept or better); else the one the recogniser's
    probabilities find strictly likeliest on the lines, when every candidate was measured (one the recogniser
    cannot spell, a Hangul imprint or a logo alone, could be the truth); else the text's best fit, however weak.

    Either way it is a choice among the candidates, not evidence that the imprint is there. On lines that show
    little, CTC rightly finds a one-character imprint the likeliest to have been missed, so a pill with no imprint
    at all is still "matched" to the shortest candidate: the answer policy weighs the likelihoods per drug itself
    and leaves a drug with a plain side out of them. On crops drawn from the real label fields the likelihoods pick
    the right imprint among three a little more often than the text does (bench/reader_real_labels.py)."""
    if matched is not None and (similarity or 0.0) >= THRESHOLDS.imprint_accept:
        return normalize_imprint(matched), similarity, "text"
    keys: dict[str, list[str]] = {}
    for target in targets:
        keys.setdefault(normalize_imprint(target), []).append(target)
    measured = sorted(((k, v) for k, v in (likelihoods or {}).items() if k in keys and math.isfinite(v)),
                      key=lambda kv: -kv[1])
    if keys and "" not in keys and set(keys) == {k for k, _ in measured} and (
            len(measured) == 1 or measured[0][1] > measured[1][1]):
        imprint = measured[0][0]
        read = max(imprint_similarity(text, t) for t in keys[imprint]) if normalize_imprint(text) else None
        return imprint, read, "likelihood"
    if matched is None:
        return None, None, None
    return normalize_imprint(matched), similarity, "text"


class ImprintReader:
    """Reads imprints on pill crops. Each read leases a set of OCR models of its own (pillsnap.infer.ocr.lease_models:
    reads side by side each run on their own ONNX Runtime threads), loaded at the first read that finds none free
    and shared by every reader of the process; `models` replaces them (any object with
    pillsnap.infer.ocr.RapidOcrModels' `text_map` and `recognise`)."""

    def __init__(self, settings: ReaderSettings | None = None, models: Any = None) -> None:
        self.settings = settings or ReaderSettings()
        self._models = models

    @property
    def models(self) -> Any:
        if self._models is not None:
            return self._models
        return get_models(self.settings.threads, self.settings.rec_width)

    def read(self, crop: Image.Image, candidates: Sequence[str] = ()) -> ImprintRead:
        """Read the imprint on one pill crop (the pill on its plain backdrop, as the pipeline crops it).

        `candidates`: imprints of the classes in the running (e.g. the top-k's print_front/print_back); the
        reading that fits one of them best wins, and a close fit ends the search early."""
        if self._models is not None:
            return self._read(crop, candidates)
        with lease_models(self.settings.threads, self.settings.rec_width):  # `models` is this set during the read
            return self._read(crop, candidates)

    def _read(self, crop: Image.Image, candidates: Sequence[str]) -> ImprintRead:
        start = time.perf_counter()
        rgb = _work_image(crop, self.settings.work_px, self.settings.contrast_clip)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        pill = pill_mask(rgb)
        text = (self.models.text_map(bgr) > self.settings.text_threshold) & pill
        bgr, text, rows, axis = self._relief(crop, bgr, text, pill)
        found = bool(text.sum() >= TEXT_FOUND_PIXELS)
        targets = [c for c in dict.fromkeys(imprint_key(c) for c in candidates) if c]
        region = text if found else central_band(pill, axis)
        best = self._search(bgr, region, rows if found else None, -axis, targets)
        seconds = time.perf_counter() - start
        LOGGER.debug("imprint: %r (score %.2f, turn %.0f, text found: %s) in %.0f ms", best.text, best.score,
                     best.angle, found, seconds * 1000)
        matched, similarity, matched_by = pick_candidate(best.text, best.matched, best.similarity, best.likelihoods,
                                                         targets)
        return ImprintRead(best.text, round(best.score, 4), round(best.angle % 360.0, 1), round(seconds, 4),
                           found, matched, None if similarity is None else round(similarity, 4),
                           best.likelihoods, best.read_likelihood, matched_by)

    def _relief(self, crop: Image.Image, bgr: np.ndarray, text: np.ndarray,
                pill: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
        """The image, the text pixels, where the lines' rows are (None: the text pixels') and the reading axis,
        from the relief: a score line erased (the text then runs across it), and the detector's text region
        narrowed to its strokes for the rows, so that a logo and the letters (which the detector marks as one
        blob) fall on separate, tight lines once the crop is turned."""
        if not (self.settings.score_lines or self.settings.stroke_lines):
            return bgr, text, None, reading_axis(text, pill)
        import cv2

        plain = _work_image(crop, self.settings.work_px)
        plain_pill = pill_mask(plain)  # the contrast-raised mask lost a third of the reads on the real-label bench
        strokes = relief_strokes(plain, plain_pill)
        score = find_score_line(strokes, plain_pill) if self.settings.score_lines else None
        if score is not None:  # the detector marked the groove as text too: it looks again without it
            bgr, keep = erase_line(bgr, score[1], SCORE_WIDTH * score[2])
            text = (self.models.text_map(bgr) > self.settings.text_threshold) & pill & keep
            strokes &= keep
        rows = None
        if self.settings.stroke_lines:
            grown = cv2.dilate(strokes.astype(np.uint8), np.ones((STROKE_GROW, STROKE_GROW), np.uint8)) > 0
            rows = text & grown if (text & grown).sum() >= TEXT_FOUND_PIXELS else None
        return bgr, text, rows, reading_axis(text, pill) if score is None else (score[0] + 90.0) % 180.0

    def _search(self, bgr: np.ndarray, text: np.ndarray, rows: np.ndarray | None, base: float,
                targets: list[str]) -> _Reading:
        """The reading axis and its opposite first; the next group of TURN_GROUPS only when that was not
        conclusive. The candidates' likelihoods are each one's best over the turns tried."""
        best, likelihoods, own = _Reading("", 0.0, base), {}, -math.inf
        for turns in TURN_GROUPS[:self.settings.turn_groups]:
            turns = tuple(base + t for t in turns)
            for reading in self._recognise(bgr, text, rows, turns, targets):
                if reading.fit > best.fit:
                    best = reading
                for imprint, value in (reading.likelihoods or {}).items():
                    likelihoods[imprint] = max(value, likelihoods.get(imprint, -math.inf))
                own = max(own, reading.read_likelihood if reading.read_likelihood is not None else -math.inf)
            if self._conclusive(best, targets):
                break
        if not targets:
            return best
        return replace(best, likelihoods={k: round(v, 2) for k, v in likelihoods.items()},
                       read_likelihood=round(own, 2) if np.isfinite(own) else None)

    def _conclusive(self, best: _Reading, targets: list[str]) -> bool:
        if targets:
            return (best.similarity or 0.0) >= self.settings.stop_similarity
        return best.score >= self.settings.stop_score

    def _recognise(self, bgr: np.ndarray, text: np.ndarray, rows: np.ndarray | None, turns: Sequence[float],
                   targets: list[str]) -> list[_Reading]:
        """One recognition call for every line at every turn; one reading per turn. The lines' rows come from
        `rows` when given, their width from the text pixels in those rows."""
        lines: list[list[np.ndarray]] = []
        for angle in turns:
            image, mask = turn(bgr, angle), turn(text.astype(np.uint8), angle, nearest=True) > 0
            boxes = text_lines(mask, self.settings.max_lines, self.settings.unclip)
            if rows is not None and any(y1 - y0 > BLOB_ASPECT * (x1 - x0) for x0, y0, x1, y1 in boxes):
                row_mask = turn(rows.astype(np.uint8), angle, nearest=True) > 0
                boxes = [_widen(b, mask) for b in text_lines(row_mask, self.settings.max_lines, self.settings.unclip)]
            lines.append([image[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
        results = iter(self.models.recognise([p for group in lines for p in group]))
        return [self._reading([next(results) for _ in group], angle, targets)
                for group, angle in zip(lines, turns, strict=True)]

    def _reading(self, parts: Sequence[tuple], angle: float, targets: list[str]) -> _Reading:
        likelihoods, own = self._likelihoods(parts, targets)
        kept = [(text.strip(), score) for text, score, *_ in parts
                if score >= self.settings.min_line_score and normalize_imprint(text)]
        if not kept:
            return _Reading("", 0.0, angle, likelihoods=likelihoods, read_likelihood=own)
        text = " ".join(t for t, _ in kept)
        score = sum(s * len(t) for t, s in kept) / sum(len(t) for t, _ in kept)
        if not targets:
            return _Reading(text, score, angle, fit=score)
        similarity, matched = max((imprint_similarity(text, t), t) for t in targets)
        return _Reading(text, score, angle, FIT_SIMILARITY * similarity + FIT_SCORE * score, matched, similarity,
                        likelihoods, own)

    def _likelihoods(self, parts: Sequence[tuple], targets: list[str]) -> tuple[dict[str, float], float | None]:
        """ln P(imprint | lines) of each candidate imprint at one turn, and that of the recogniser's own reading
        of the same lines when it read something (what the candidates are measured against: a candidate far
        below it is not there):
        the best over each run of adjacent lines (an imprint may be one line, or two beside a logo's or a groove's
        strokes). Empty without candidates, lines, or a recogniser that gives probabilities."""
        texts = list(dict.fromkeys(t for t in map(normalize_imprint, targets) if t))
        lines = [(part[0], part[2]) for part in parts if len(part) > 2 and part[2] is not None]
        if not texts or not lines or not hasattr(self.models, "log_likelihoods"):
            return {}, None
        best, own = np.full(len(texts), -np.inf), -math.inf
        for start in range(len(lines)):
            for stop in range(start + 1, len(lines) + 1):
                group = lines[start:stop]
                said = "".join("".join(text.split()) for text, _ in group)
                if not said:  # lines read as nothing say only how few characters a candidate has
                    continue
                frames = [probs for _, probs in group]
                if hasattr(self.models, "reading_log_likelihood"):
                    values = self.models.log_likelihoods(frames, texts)
                    mine = self.models.reading_log_likelihood(frames, said)
                else:
                    *values, mine = self.models.log_likelihoods(frames, [*texts, said])
                best, own = np.maximum(best, values), max(own, mine)
        return ({t: float(v) for t, v in zip(texts, best, strict=True) if np.isfinite(v)},
                own if np.isfinite(own) else None)
