"""Hard-case log: one JSON line per difficult prediction in {exp_dir}/hard_cases/YYYYMMDD.jsonl (+ thumbnails)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pillsnap.utils import append_jsonl, ensure_dir

LOGGER = logging.getLogger(__name__)
THUMBNAIL_PX = 160


class HardCaseLog:
    """Appends hard cases for weekly review; thumbnails are optional small JPEGs beside the log."""

    def __init__(self, exp_dir: str | Path, thumbnails: bool = False) -> None:
        self.root = Path(exp_dir) / "hard_cases"
        self.thumbnails = thumbnails

    def path_for_today(self) -> Path:
        return self.root / f"{time.strftime('%Y%m%d', time.gmtime())}.jsonl"

    def _save_thumbnail(self, image: Image.Image, key: str) -> str:
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        path = ensure_dir(self.root / "thumbnails") / f"{key}.jpg"
        thumb.convert("RGB").save(path, quality=85)
        return str(path)

    def write(self, result: dict[str, Any], reasons: list[str], image: Image.Image | None = None) -> Path:
        """Append one record (the prediction summary and why it is hard); returns the log path."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        key = hashlib.sha1(f"{stamp}{result.get('image')}{time.perf_counter_ns()}".encode()).hexdigest()[:12]
        record = {
            "time": stamp, "id": key, "reasons": reasons, "image": result.get("image"),
            **{k: result.get(k) for k in ("mode", "mode_used", "gating_score", "single_confidence",
                                          "fallback_reason", "num_detections")},
            "pills": [{"bbox": p["bbox"], "mapping_code": p["mapping_code"], "probability": p["probability"]}
                      for p in result.get("pills", [])],
        }
        if self.thumbnails and image is not None:
            record["thumbnail"] = self._save_thumbnail(image, key)
        path = self.path_for_today()
        append_jsonl(path, record)
        LOGGER.debug("hard case (%s) -> %s", ", ".join(reasons), path)
        return path
