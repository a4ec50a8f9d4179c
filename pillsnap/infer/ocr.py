"""The OCR engine behind the imprint reader: RapidOCR's PP-OCRv4 text detector and line recogniser (ONNX models
shipped inside the `rapidocr-onnxruntime` wheel, so it works offline), run in our own ONNX Runtime sessions, and
the likelihood of any text under the recogniser's per-frame probabilities (CTC). Nothing here loads until used."""

from __future__ import annotations

import contextlib
import math
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from pillsnap.utils.devices import usable_cores

# RapidOCR's recogniser reads lines scaled to this height (its model's input), padded to at least a width
# (rec_width; REC_WIDTH by default: imprints are short, 2-8 characters).
REC_HEIGHT, REC_WIDTH = 48, 160
# lines recognised per call: all of one step of the reader's search (pillsnap.infer.imprint: ReaderSettings.max_lines
# 3 at each of 2 turns) fit in one
REC_BATCH = 16
DET_STRIDE = 32  # the text detector's input sides must be multiples of its stride
# The characters an imprint is compared in (pillsnap.infer.matching.normalize_imprint keeps these and Hangul, which
# this recogniser does not know): a reading's other characters count as "something else" (reading_log_likelihood).
IMPRINT_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_THREADS = 4  # ONNX Runtime threads a read takes when not told (inference.imprint.threads 0)
# per setting (threads, rec_width): the model sets loaded, and those not leased now
_SETS: dict[tuple[int, int], tuple[list[Any], list[Any]]] = {}
_LEASES = threading.local()  # a thread's leased set during its read
_ENGINE_LOCK = threading.Lock()


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

    def __init__(self, threads: int = 0, rec_width: int = REC_WIDTH) -> None:
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

    def reading_log_likelihood(self, lines: Sequence[np.ndarray], text: str) -> float:
        """ln P(text | lines) for the recogniser's own reading of the lines, as an imprint: its characters outside
        IMPRINT_ALPHABET (a dot, glyphs read from a logo's strokes) count as "something else" there, whichever
        glyphs. What a reading says about an imprint is which imprint characters stand where, and that something
        else stands between them; the recogniser spreads "something else" over thousands of glyphs, so the
        likelihood of the exact string would sit far below what the lines say, and every candidate imprint would
        look close to it. A character counts in its compatibility form (a full-width A, a circled 1 are A and 1),
        its probability too (_imprint_forms). A run of other characters is spelled either as one "something else"
        (adjacent glyphs: CTC would need a blank between two of the same label) or one each (glyphs with blanks
        between): the likelier of the two, and never less than the exact string."""
        probs = np.concatenate(lines)
        mapped = []
        for char in "".join(text.split()):
            form = unicodedata.normalize("NFKC", char).upper()
            mapped.append(form if len(form) == 1 and form in IMPRINT_ALPHABET else None)
        chars = sorted({c for c in mapped if c is not None})
        forms = self._imprint_forms()
        blank = probs[:, [0, *self._spaces]].sum(1)
        imprint = probs[:, forms["*"]].sum(1)
        columns = [blank] + [probs[:, forms[c]].sum(1) for c in chars] + [np.maximum(1.0 - blank - imprint, 0.0)]
        where, other = {c: k + 1 for k, c in enumerate(chars)}, len(chars) + 1
        each = [other if c is None else where[c] for c in mapped]
        runs = [label for k, label in enumerate(each) if label != other or k == 0 or each[k - 1] != other]
        pooled = max(ctc_log_likelihoods(np.stack(columns, 1), [each] if runs == each else [each, runs]))
        if None not in mapped:  # imprint characters only: their pooled columns hold the exact ones
            return pooled
        return max(pooled, self.log_likelihoods(lines, [text])[0])

    def _imprint_forms(self) -> dict[str, list[int]]:
        """Each imprint character's columns: every character of the recogniser's whose compatibility form,
        upper-cased, is it (both cases, full width, circled and superscript digits); "*": all of them."""
        if not hasattr(self, "_imprint_forms_of"):
            out: dict[str, list[int]] = {c: [] for c in IMPRINT_ALPHABET}
            for char, index in self._index.items():
                form = unicodedata.normalize("NFKC", char).upper()
                if len(form) == 1 and form in out:
                    out[form].append(index)
            forms = {c: sorted(v) for c, v in out.items()}
            forms["*"] = sorted(i for v in out.values() for i in v)
            self._imprint_forms_of = forms  # whole when another thread sees it
        return self._imprint_forms_of

    def _forms(self, char: str) -> list[int]:
        """The recogniser's columns for every form of a character: upper and lower case, full width."""
        if char not in self._forms_of:
            forms = {f for f in (char, char.upper(), char.lower()) if len(f) == 1}  # "ß".upper() is "SS"
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


def read_threads(threads: int) -> int:
    """The ONNX Runtime threads of a read: `threads`, or (0) the machine's cores, at most MAX_THREADS."""
    return threads if threads > 0 else min(MAX_THREADS, usable_cores())


def _session(path: Any, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Always an explicit count: with 0, ONNX Runtime pins one thread to each core, and next to torch's threads
    # that made the classifier 10x slower.
    opts.intra_op_num_threads = read_threads(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def get_models(threads: int = 0, rec_width: int = REC_WIDTH) -> RapidOcrModels:
    """OCR models of this setting: the set the calling thread has leased for its read (lease_models), else the
    process's first set, loaded on first use (~0.5 s and ~60 MB)."""
    leased = getattr(_LEASES, "models", None)
    if leased is not None and leased[0] == (threads, rec_width):
        return leased[1]
    with _ENGINE_LOCK:
        loaded, free = _SETS.setdefault((threads, rec_width), ([], []))
        if not loaded:
            loaded.append(RapidOcrModels(threads, rec_width))
            free.append(loaded[0])
        return loaded[0]


@contextlib.contextmanager
def lease_models(threads: int = 0, rec_width: int = REC_WIDTH) -> Iterator[RapidOcrModels]:
    """A set of OCR models for this thread alone while the block runs (a read): a free one, or one loaded now.
    Concurrent runs of one ONNX Runtime session take turns on its one pool of `threads` threads, so reads side by
    side (Evidence.read_all) or in several serving threads each need a set; the sets stay loaded for the next
    reads, as many as were ever in use at once. Nested in a lease, the thread's own set."""
    key = (threads, rec_width)
    leased = getattr(_LEASES, "models", None)
    if leased is not None and leased[0] == key:
        yield leased[1]
        return
    with _ENGINE_LOCK:
        loaded, free = _SETS.setdefault(key, ([], []))
        models = free.pop() if free else None
    if models is None:  # loaded outside the lock: other threads lease theirs meanwhile
        models = RapidOcrModels(threads, rec_width)
        with _ENGINE_LOCK:
            loaded.append(models)
    _LEASES.models = (key, models)
    try:
        yield models
    finally:
        _LEASES.models = leased
        with _ENGINE_LOCK:
            free.append(models)

