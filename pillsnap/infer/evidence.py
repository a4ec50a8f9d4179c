"""The imprint evidence of a pill: its crop is read (OCR) only when the answer policy says a read can change the
answer (pillsnap.infer.ranking.should_read_imprint), by a reader loaded on the first read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from pillsnap.infer.matching import candidate_imprints
from pillsnap.infer.ocr import read_threads
from pillsnap.infer.ranking import should_read_imprint
from pillsnap.infer.thresholds import THRESHOLDS, AnswerThresholds
from pillsnap.utils.devices import usable_cores

LOGGER = logging.getLogger(__name__)


class Evidence:
    """Per predictor: the class map, whether to read imprints (and whether every pill whose top candidate has an
    imprint on record, for the imprint check: `check_unknown`), and the reader (loaded on the first read).
    `parallel`: the pills of one photo read at once (read_all), each on its own `threads` OCR threads (each read
    leases its own OCR sessions: pillsnap.infer.ocr.lease_models); 0: the machine's cores over the threads per
    read. The predictor's one pool serves every serving thread."""

    def __init__(self, class_map: Mapping[str, Mapping], read_imprints: bool, threads: int = 0,
                 thresholds: AnswerThresholds = THRESHOLDS, check_unknown: bool = False, parallel: int = 0) -> None:
        self.class_map, self.read_imprints, self.threads = class_map, read_imprints, threads
        self.thresholds, self.check_unknown = thresholds, check_unknown
        self._reader: Any = None
        self.parallel = parallel if parallel > 0 else max(1, usable_cores() // read_threads(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def reader(self) -> Any:
        """The imprint reader, or None (with one warning) when rapidocr-onnxruntime is not installed."""
        if self._reader is None:
            from pillsnap.infer.imprint import ImprintReader, ReaderSettings
            from pillsnap.infer.ocr import rapidocr_available

            if not rapidocr_available():
                LOGGER.warning("imprint reading is on (inference.imprint.enabled) but rapidocr-onnxruntime is not "
                               "installed: answers use the classifier and hints only")
                self.read_imprints = False
                return None
            settings = ReaderSettings(threads=self.threads, stop_similarity=self.thresholds.conclusive_read)
            self._reader = ImprintReader(settings)
        return self._reader

    def read_all(self, crops: Sequence[Image.Image], topks: Sequence[Sequence[Mapping]]) -> list[Any]:
        """read() of each crop, up to `parallel` at once. A read is ~130 ms of ONNX Runtime and OpenCV work, which
        release the GIL: the pills of a combination photo, read one after another, made its answer 4 reads long."""
        if self.parallel <= 1 or len(crops) < 2:
            return [self.read(crop, topk) for crop, topk in zip(crops, topks, strict=True)]
        with self._pool_lock:  # serving threads share the predictor
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="pillsnap-read")
        return list(self._pool.map(self.read, crops, topks))

    def read(self, crop: Image.Image, topk: Sequence[Mapping]) -> Any:
        """The ImprintRead of `crop` given its classifier candidates, or None when reading is off or cannot change
        the answer (the contenders' imprints do not differ, and the unknown-pill check is off)."""
        if not self.read_imprints or not should_read_imprint(topk, self.class_map, self.thresholds,
                                                             self.check_unknown):
            return None
        reader = self.reader()
        return None if reader is None else reader.read(crop, candidate_imprints(topk, self.class_map))
