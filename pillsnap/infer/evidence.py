"""What besides the classifier decides a pill's answer: its imprint, read when the contenders' imprints differ, and
the user's hints (imprint text, colour, shape). Both re-rank the classifier's candidates through infer/matching.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from PIL import Image

from pillsnap.infer.matching import Hints, candidate_imprints, normalize_imprint, rerank, should_read_imprint

LOGGER = logging.getLogger(__name__)
NO_EVIDENCE = {"imprint_read": None, "imprint_unresolved": False, "ranking_changed": False, "hints_conflict": False,
               "conflicts": []}


class Evidence:
    """Per predictor: the class map, whether to read imprints, and the reader (loaded on the first read)."""

    def __init__(self, class_map: Mapping[str, Mapping], read_imprints: bool, threads: int = 0) -> None:
        self.class_map, self.read_imprints, self.threads = class_map, read_imprints, threads
        self._reader: Any = None

    def reader(self) -> Any:
        """The imprint reader, or None (with one warning) when rapidocr-onnxruntime is not installed."""
        if self._reader is None:
            from pillsnap.infer.imprint import ImprintReader, ReaderSettings, rapidocr_available

            if not rapidocr_available():
                LOGGER.warning("imprint reading is on (inference.imprint.enabled) but rapidocr-onnxruntime is not "
                               "installed: answers use the classifier and hints only")
                self.read_imprints = False
                return None
            self._reader = ImprintReader(ReaderSettings(threads=self.threads))
        return self._reader

    def _read(self, crop: Image.Image, topk: list[dict]) -> Any:
        if not self.read_imprints or not should_read_imprint(topk, self.class_map):
            return None
        reader = self.reader()
        return None if reader is None else reader.read(crop, candidate_imprints(topk, self.class_map))

    def apply(self, crop: Image.Image, topk: list[dict], hints: Hints | None) -> tuple[list[dict], dict]:
        """(candidates best first, answer fields: imprint_read, imprint_unresolved, ranking_changed,
        hints_conflict, conflicts and, when read, imprint {text, score, angle, seconds, ...}).

        `imprint_unresolved`: the contenders look alike and differ by imprint, but what was read matches none of
        them (a plain side up, or an unreadable imprint) and the user gave no imprint: the answer between them is
        the classifier's guess, and the other side of the pill, or its imprint typed in, would settle it."""
        read = self._read(crop, topk)
        if read is None and (hints is None or hints.empty()):
            return topk, dict(NO_EVIDENCE)
        reranked = rerank(topk, self.class_map, read.text if read else None, read.score if read else 1.0, hints)
        fields = reranked.flags()
        typed = hints is not None and bool(normalize_imprint(hints.imprint))
        fields["imprint_unresolved"] = bool(read is not None and not typed and not any(
            c.get("imprint_match") for c in reranked.candidates))
        if read is not None:
            fields["imprint"] = read.to_dict()
        return reranked.candidates, fields
