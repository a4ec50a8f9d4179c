"""Where an imprint lies on a pill crop, in plain geometry: the pill's and the text's axes, the band where imprints
sit, the text lines of a mask, turns, and the score line (a groove across the face) found in the relief and erased
before reading. Arrays in, arrays out; OpenCV is imported only when a function needs it."""

from __future__ import annotations

import math

import numpy as np

# Pixel counts are at the reader's work size (pillsnap.infer.imprint.ReaderSettings.work_px, 480 px on the long
# side), where a 2-character imprint covers a few hundred text pixels.
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
