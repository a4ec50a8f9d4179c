"""The imprint evidence of a pill: its crop is read (OCR) only when the answer policy says a read can change the
answer (pillsnap.infer.ranking.should_read_imprint), by a reader loaded on the first read."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from pillsnap.infer.matching import candidate_imprints
from pillsnap.infer.ranking import should_read_imprint
from pillsnap.infer.thresholds import THRESHOLDS, AnswerThresholds

LOGGER = logging.getLogger(__name__)


class Evidence:
    """Per predictor: the class map, whether to read imprints (and whether every pill whose top candidate has an
    imprint on record, for the imprint check: `check_unknown`), and the reader (loaded on the first read)."""

    def __init__(self, class_map: Mapping[str, Mapping], read_imprints: bool, threads: int = 0,
                 thresholds: AnswerThresholds = THRESHOLDS, check_unknown: bool = False) -> None:
        self.class_map, self.read_imprints, self.threads = class_map, read_imprints, threads
        self.thresholds, self.check_unknown = thresholds, check_unknown
        self._reader: Any = None

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

    def read(self, crop: Image.Image, topk: Sequence[Mapping]) -> Any:
        """The ImprintRead of `crop` given its classifier candidates, or None when reading is off or cannot change
        the answer (the contenders' imprints do not differ, and the unknown-pill check is off)."""
        if not self.read_imprints or not should_read_imprint(topk, self.class_map, self.thresholds,
                                                             self.check_unknown):
            return None
        reader = self.reader()
        return None if reader is None else reader.read(crop, candidate_imprints(topk, self.class_map))
