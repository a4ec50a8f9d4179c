"""Read a pill's imprint from its crop with RapidOCR (PP-OCRv4 detection + recognition ONNX models, shipped
inside the `rapidocr-onnxruntime` wheel, so it works offline).

The detector runs once, for its text map; the crop is then turned so that the text (or, failing that, the pill's
long axis) runs left to right, and its text lines are recognised at that turn and the opposite one, then at the
two cross turns and the four diagonals only when needed, each group in one batch. A score line is found in the
relief and erased first (the text runs across it). The reading that best fits a candidate's imprint (without
candidates: the most confident one) wins.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pillsnap.infer.answer import THRESHOLDS
from pillsnap.infer.matching import imprint_key, imprint_similarity, normalize_imprint
from pillsnap.infer.preprocess import pill_mask

LOGGER = logging.getLogger(__name__)
# RapidOCR's recogniser reads lines scaled to this height (its model's input), padded to ReaderSettings.rec_width.
REC_HEIGHT = 48
REC_BATCH = 16  # lines recognised per call: all of a search step's (max_lines 3 x 2 turns) fit in one
DET_STRIDE = 32  # the text detector's input sides must be multiples of its stride
_ENGINES: dict[tuple[int, int], Any] = {}
_ENGINE_LOCK = threading.Lock()


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
    are measured against (a candidate far below it is not on the pill)."""

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
    rec_width: int = 160  # lines are padded to at least this width (imprints are short: 2-8 characters)
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


def rapidocr_available() -> bool:
    """Whether the OCR engine can be imported (callers skip reading, with a warning, when it cannot)."""
    import importlib.util

    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


class LineRead(NamedTuple):
    """One text line as the recogniser reads it: the text, its mean confidence and the per-frame character
    probabilities (frames x characters), from which the likelihood of any other text follows (None from a
    recogniser that gives none)."""

    text: str
    score: float
    probs: np.ndarray | None = None


class RapidOcrModels:
    """RapidOCR's detection network, used for its per-pixel text map (the reader finds lines itself, in the
    pill's frame), and its line recogniser. Anything with `text_map` and `recognise` can stand in for it
    (`log_likelihoods` too, for the candidates' likelihoods).

    Uses RapidOCR's `text_det.infer` and `text_rec`, which are not its documented API: pyproject pins the 1.4
    series, and this class is the only place that touches them."""

    def __init__(self, threads: int = 0, rec_width: int = ReaderSettings.rec_width) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
            from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH, root_dir
            from rapidocr_onnxruntime.utils import read_yaml
        except ImportError as err:
            raise ImportError("imprint reading needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime") from err
        # rec_img_shape: lines are padded to at least this width; imprints are 2-8 characters, so 160 px rather
        # than the default 320 (made for document lines) halves recognition time.
        self._ocr = RapidOCR(rec_batch_num=REC_BATCH, rec_img_shape=[3, REC_HEIGHT, rec_width], intra_op_num_threads=1)
        # Our own sessions: ONNX Runtime's thread pool spins for a while after each run by default, and in a
        # process that also runs torch it takes the cores from the classifier (measured on 2 cores: resnet18 at
        # 64 px went from 21 ms to 680 ms per crop next to a spinning reader).
        paths = read_yaml(DEFAULT_CFG_PATH)
        self._ocr.text_det.infer.session = _session(root_dir / paths["Det"]["model_path"], threads)
        self._ocr.text_rec.session.session = _session(root_dir / paths["Rec"]["model_path"], threads)
        characters = self._ocr.text_rec.postprocess_op.character  # index 0 is CTC's blank
        self._index = {c: i for i, c in enumerate(characters) if i}
        self._spaces = [i for c, i in self._index.items() if c.isspace()]  # " " and the ideographic space
        self._forms_of: dict[str, list[int]] = {}

    def text_map(self, bgr: np.ndarray) -> np.ndarray:
        """Text probability per pixel, HxW float in [0, 1] (the detector's shrunk text kernels)."""
        import cv2

        h, w = bgr.shape[:2]
        size = tuple(max(DET_STRIDE, round(side / DET_STRIDE) * DET_STRIDE) for side in (w, h))
        x = (cv2.resize(bgr, size).astype(np.float32) / 255.0 - 0.5) / 0.5  # the network's input scaling, to [-1, 1]
        prob = self._ocr.text_det.infer(x.transpose(2, 0, 1)[None])[0][0, 0]
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)

    def recognise(self, patches: Sequence[np.ndarray]) -> list[LineRead]:
        """Each BGR line image read, in batches of REC_BATCH: the lines are scaled to the recogniser's height and
        padded to the widest line's width (or rec_width), as RapidOCR does."""
        rec, out = self._ocr.text_rec, []
        _, height, width = rec.rec_image_shape
        for start in range(0, len(patches), REC_BATCH):
            batch = patches[start:start + REC_BATCH]
            ratio = max(width / height, *(p.shape[1] / p.shape[0] for p in batch))
            probs = rec.session(np.stack([rec.resize_norm_img(p, ratio) for p in batch]).astype(np.float32))[0]
            texts = rec.postprocess_op(probs)
            out += [LineRead(str(text), float(score), p) for (text, score, *_), p in zip(texts, probs, strict=True)]
        return out

    def log_likelihoods(self, lines: Sequence[np.ndarray], texts: Sequence[str]) -> list[float]:
        """ln P(text | lines) for each text: CTC's probability that the lines' frames (joined in order) spell
        exactly it, summed over every alignment. A character's upper- and lower-case and full-width forms count
        as one and a space (of any width) as nothing, as imprints are compared; -inf for a text with a character
        the recogniser does not know (Hangul)."""
        probs = np.concatenate(lines)
        chars = sorted({c for t in texts for c in t if self._forms(c)})
        columns = [probs[:, [0, *self._spaces]].sum(1)] + [probs[:, self._forms(c)].sum(1) for c in chars]
        where = {c: k + 1 for k, c in enumerate(chars)}
        return ctc_log_likelihoods(np.stack(columns, 1), [[where.get(c, -1) for c in t] for t in texts])

    def _forms(self, char: str) -> list[int]:
        """The recogniser's columns for every form of a character: upper and lower case, full width."""
        if char not in self._forms_of:
            forms = {char, char.upper(), char.lower()}
            forms |= {chr(ord(f) + 0xFEE0) for f in forms if "!" <= f <= "~"}  # ASCII's full-width forms
            self._forms_of[char] = sorted(self._index[f] for f in forms if f in self._index)
        return self._forms_of[char]


def ctc_log_likelihoods(probs: np.ndarray, labels: Sequence[Sequence[int]]) -> list[float]:
    """ln P(labels | frames) under CTC (blank at index 0) for each label sequence, by torch's CTC loss over the
    frames' probabilities (frames x characters); the empty sequence is every frame blank. A sequence with a
    character index below 1, or longer than the frames allow, is impossible: -inf."""
    import torch

    log_blank = float(np.log(np.maximum(probs[:, 0], 1e-12)).sum())
    out = [log_blank if not seq else -math.inf for seq in labels]
    ok = [i for i, seq in enumerate(labels) if seq and min(seq) > 0 and len(seq) <= len(probs)]
    if not ok:
        return out
    # only the columns the sequences use (and the blank) take part: CTC never looks at the others
    columns = sorted({0, *(c for i in ok for c in labels[i])})
    where = {c: k for k, c in enumerate(columns)}
    log_probs = torch.from_numpy(np.log(np.maximum(probs[:, columns], 1e-12))).float()
    n = len(ok)
    targets = torch.zeros((n, max(len(labels[i]) for i in ok)), dtype=torch.long)
    for row, i in enumerate(ok):
        targets[row, :len(labels[i])] = torch.tensor([where[c] for c in labels[i]])
    losses = torch.nn.functional.ctc_loss(
        log_probs[:, None, :].expand(-1, n, -1), targets, torch.full((n,), len(probs), dtype=torch.long),
        torch.tensor([len(labels[i]) for i in ok]), blank=0, reduction="none", zero_infinity=False)
    for row, i in enumerate(ok):
        out[i] = -float(losses[row])
    return out


def _session(path: Any, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Always an explicit count: with 0, ONNX Runtime pins one thread to each core, and next to torch's threads
    # that made the classifier 10x slower.
    opts.intra_op_num_threads = threads if threads > 0 else min(4, os.cpu_count() or 1)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def get_models(threads: int = 0, rec_width: int = ReaderSettings.rec_width) -> RapidOcrModels:
    """The OCR models, loaded once per setting and shared by every reader of the process (~0.5 s to load)."""
    with _ENGINE_LOCK:
        key = (threads, rec_width)
        if key not in _ENGINES:
            _ENGINES[key] = RapidOcrModels(threads, rec_width)
        return _ENGINES[key]


# ---- geometry ------------------------------------------------------------------------------------------------
# Pixel counts are at the reader's work size (ReaderSettings.work_px, 480 px on the long side), where a 2-character
# imprint covers a few hundred text pixels.
MIN_MASK_PIXELS = 10  # fewer pixels than this have no meaningful spread: no axis, no band
TEXT_FOUND_PIXELS = 12  # text-map pixels on the pill that count as text found; fewer are specks
# The text's own axis is trusted only for this much text, clearly longer than high (a 2+ character line is; one
# glyph or a logo is not): on a round pill it is the only axis there is.
TEXT_AXIS_PIXELS, TEXT_ELONGATION = 30, 1.3
PILL_ELONGATION = 1.15  # a pill at least this much longer than wide is read along its long axis (a disc has none)
EXTENT_PERCENTILE = 95  # a mask's half-extent along an axis, robust to a few stray pixels
# Where imprints sit when the detector marks no text: the middle 70 % of the pill's length and 30 % of its width,
# away from the rim's shading.
BAND_ALONG, BAND_ACROSS = 0.7, 0.3
LINE_GAP = 0.3  # text rows split by a gap under this share of the taller line are one line (Hangul, a score line)
MIN_LINE_AREA = 12  # a line box smaller than this many pixels is a speck, not a character

def principal_axis(mask: np.ndarray) -> tuple[float, float]:
    """(angle, elongation) of a mask: the long axis' counter-clockwise angle from the x axis in degrees, in
    [0, 180), and the ratio of the long to the short spread (1 for a disc)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < MIN_MASK_PIXELS:
        return 0.0, 1.0
    cov = np.cov(np.stack([xs, -ys]).astype(np.float64))  # y flipped: angles counter-clockwise as seen
    values, vectors = np.linalg.eigh(cov)
    vx, vy = vectors[:, 1]
    elongation = math.sqrt(max(values[1], 1e-9) / max(values[0], 1e-9))
    return math.degrees(math.atan2(vy, vx)) % 180.0, elongation


def reading_axis(text: np.ndarray, pill: np.ndarray) -> float:
    """Where the text runs: along the text itself when its pixels are clearly longer than high (the only axis a
    round pill offers), else along the pill's long axis, else the crop's x axis."""
    angle, elongation = principal_axis(text)
    if text.sum() >= TEXT_AXIS_PIXELS and elongation >= TEXT_ELONGATION:
        return angle
    angle, elongation = principal_axis(pill)
    return angle if elongation >= PILL_ELONGATION else 0.0


def central_band(pill: np.ndarray, angle: float) -> np.ndarray:
    """The middle of the pill along `angle`, where imprints sit: read when the detector marks no text."""
    ys, xs = np.nonzero(pill)
    if len(xs) < MIN_MASK_PIXELS:
        return np.ones_like(pill, dtype=bool)
    theta = math.radians(angle)
    along, across = np.array([math.cos(theta), -math.sin(theta)]), np.array([math.sin(theta), math.cos(theta)])
    yy, xx = np.mgrid[0:pill.shape[0], 0:pill.shape[1]]
    pts = np.stack([xx - xs.mean(), yy - ys.mean()], -1)
    on = np.stack([xs - xs.mean(), ys - ys.mean()], 1)
    half_long = np.percentile(np.abs(on @ along), EXTENT_PERCENTILE) * BAND_ALONG
    half_short = np.percentile(np.abs(on @ across), EXTENT_PERCENTILE) * BAND_ACROSS
    return (np.abs(pts @ along) <= half_long) & (np.abs(pts @ across) <= half_short)


def turn(image: np.ndarray, angle: float, nearest: bool = False) -> np.ndarray:
    """`image` turned `angle` degrees counter-clockwise, on a canvas grown to hold all of it."""
    import cv2

    h, w = image.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    size = (int(round(h * sin + w * cos)), int(round(h * cos + w * sin)))
    rot[:, 2] += np.array(size) / 2 - np.array([w / 2, h / 2])
    if nearest:  # a mask: nothing outside it
        return cv2.warpAffine(image, rot, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return cv2.warpAffine(image, rot, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def _row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rows.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def text_lines(text: np.ndarray, max_lines: int = 3, unclip: float = 1.6) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each line of upright text pixels, top to bottom, grown like the detector's own boxes
    (by unclip x area / perimeter: its text kernels are shrunk). Lines split by a thin gap are joined."""
    runs: list[list[int]] = []
    for y0, y1 in _row_runs(text.any(axis=1)):
        if runs and y0 - runs[-1][1] < LINE_GAP * max(y1 - y0, runs[-1][1] - runs[-1][0]):
            runs[-1][1] = y1
        else:
            runs.append([y0, y1])
    boxes = []
    for y0, y1 in runs:
        cols = np.flatnonzero(text[y0:y1].any(axis=0))
        if len(cols) and (y1 - y0) * (cols[-1] + 1 - cols[0]) >= MIN_LINE_AREA:
            boxes.append((int(cols[0]), y0, int(cols[-1]) + 1, y1))
    boxes = sorted(sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))[:max_lines], key=lambda b: b[1])
    return [_grow(b, unclip, text.shape) for b in boxes]


def _grow(box: tuple[int, int, int, int], unclip: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = unclip * w * h / (2 * (w + h))
    return (max(0, math.floor(x0 - d)), max(0, math.floor(y0 - d)),
            min(shape[1], math.ceil(x1 + d)), min(shape[0], math.ceil(y1 + d)))


# ---- score lines ---------------------------------------------------------------------------------------------
# A score line is a straight groove across the whole face through the middle, with the imprint's characters on
# either side ("I분할선Y"): the text runs across it. Found on the plain work image (local contrast makes the rim
# and the noise look like lines too), among the straight segments of its relief strokes.
SCORE_MIN_LENGTH = 0.6  # of the pill's short extent: a score line spans the face (letters are shorter)
SCORE_MAX_OFFSET = 0.08  # of the short extent: how far from the pill's centre it may pass
SCORE_MIN_TURN = 60.0  # degrees from a long pill's long axis: a score line is cut across it
SCORE_LONG_PILL = 1.3  # elongation from which a pill has a long axis (a tilted camera squashes a disc by ~1.1)
SCORE_WIDTH = 0.1  # of the short extent: the groove erased before reading, with its shading
SCORE_EXTEND = 0.3  # the found segment is extended by this share of its length at each end, to the rim
STROKE_GROW = 9  # pixels: strokes are grown by this much to join a character's parts into one line
# A detector line box this much taller than wide (for its width) is a blob over a logo and letters, or letters
# and a score line, not one line of text: its lines are cut again from the relief strokes' rows.
BLOB_ASPECT = 0.6
RELIEF_KERNEL = 0.05  # of the work size: wider than a stroke, narrower than a character
RIM_ERODE = 0.06  # of the work size: the rim's shading is not a groove


def relief_strokes(rgb: np.ndarray, pill: np.ndarray) -> np.ndarray:
    """HxW bool: the engraved (or printed) strokes inside the pill, as bright or dark detail narrower than
    RELIEF_KERNEL (morphological top-hat and black-hat of the lightness), away from the rim."""
    import cv2

    n = max(rgb.shape[:2])
    light = cv2.GaussianBlur(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)[:, :, 0], (0, 0), 2)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(n * RELIEF_KERNEL) | 1,) * 2)
    detail = np.maximum(cv2.morphologyEx(light, cv2.MORPH_TOPHAT, kernel),
                        cv2.morphologyEx(light, cv2.MORPH_BLACKHAT, kernel))
    rim = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(n * RIM_ERODE) | 1,) * 2)
    inner = cv2.erode(pill.astype(np.uint8), rim) > 0
    if inner.sum() < MIN_MASK_PIXELS:
        return inner
    return (detail > 0.6 * np.percentile(detail[inner], 97)) & inner


def find_score_line(strokes: np.ndarray, pill: np.ndarray) -> tuple[float, tuple[int, int, int, int], float] | None:
    """(angle, segment x0 y0 x1 y1, the pill's short extent) of a score line among the relief strokes
    (relief_strokes), or None: the longest straight stroke segment that spans the face (SCORE_MIN_LENGTH)
    through its centre (SCORE_MAX_OFFSET), across a long pill's long axis (SCORE_MIN_TURN). Angles
    counter-clockwise from the x axis, in [0, 180)."""
    import cv2

    ys, xs = np.nonzero(pill)
    if len(xs) < MIN_MASK_PIXELS:
        return None
    short = float(min(np.ptp(xs), np.ptp(ys)))
    segments = cv2.HoughLinesP(strokes.astype(np.uint8) * 255, 2, np.pi / 90, threshold=max(1, int(short * 0.25)),
                               minLineLength=int(short * SCORE_MIN_LENGTH), maxLineGap=int(short * 0.06))
    pill_angle, elongation = principal_axis(pill)
    best = None
    for x0, y0, x1, y1 in ([] if segments is None else segments.reshape(-1, 4).tolist()):
        length = math.hypot(x1 - x0, y1 - y0)
        offset = abs((x1 - x0) * (y0 - ys.mean()) - (x0 - xs.mean()) * (y1 - y0)) / max(length, 1.0)
        angle = math.degrees(math.atan2(-(y1 - y0), x1 - x0)) % 180.0
        turn_from_axis = abs((angle - pill_angle + 90.0) % 180.0 - 90.0)
        if offset > SCORE_MAX_OFFSET * short or (elongation >= SCORE_LONG_PILL and turn_from_axis < SCORE_MIN_TURN):
            continue
        if best is None or length > best[0]:
            best = (length, angle, (x0, y0, x1, y1))
    return None if best is None else (best[1], best[2], short)


def erase_line(bgr: np.ndarray, segment: tuple[int, int, int, int], width: float) -> tuple[np.ndarray, np.ndarray]:
    """The image with a score line's groove painted over from its surroundings (the segment extended to the rim),
    and the mask of what was kept: the recogniser sees "I Y", not a tall bar between two letters."""
    import cv2

    x0, y0, x1, y1 = segment
    dx, dy = (x1 - x0) * SCORE_EXTEND, (y1 - y0) * SCORE_EXTEND
    line = np.zeros(bgr.shape[:2], np.uint8)
    cv2.line(line, (round(x0 - dx), round(y0 - dy)), (round(x1 + dx), round(y1 + dy)), 255, max(1, round(width)))
    return cv2.inpaint(bgr, line, 5, cv2.INPAINT_TELEA), line == 0


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
    """Reads imprints on pill crops. The OCR models load on the first read and are shared by every reader of the
    process; `models` replaces them (any object with RapidOcrModels' `text_map` and `recognise`)."""

    def __init__(self, settings: ReaderSettings | None = None, models: Any = None) -> None:
        self.settings = settings or ReaderSettings()
        self._models = models

    @property
    def models(self) -> Any:
        if self._models is None:
            self._models = get_models(self.settings.threads, self.settings.rec_width)
        return self._models

    def read(self, crop: Image.Image, candidates: Sequence[str] = ()) -> ImprintRead:
        """Read the imprint on one pill crop (the pill on its plain backdrop, as the pipeline crops it).

        `candidates`: imprints of the classes in the running (e.g. the top-k's print_front/print_back); the
        reading that fits one of them best wins, and a close fit ends the search early."""
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
                *values, mine = self.models.log_likelihoods([probs for _, probs in group], [*texts, said])
                best, own = np.maximum(best, values), max(own, mine)
        return ({t: float(v) for t, v in zip(texts, best, strict=True) if np.isfinite(v)},
                own if np.isfinite(own) else None)
