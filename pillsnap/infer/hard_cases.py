"""Hard-case log: one JSON line per difficult prediction in {exp_dir}/hard_cases/YYYYMMDD.jsonl, and the files kept
beside it (the API's uploads in uploads/, optional thumbnails in thumbnails/), each folder held under a cap.

Kept files are named by server-made ids (uuid4 hex), never by anything a client sent: two requests cannot write
the same file, and a client cannot pick a path. A record whose file was later pruned keeps the path it had.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pillsnap.utils import append_jsonl, atomic_path

LOGGER = logging.getLogger(__name__)
THUMBNAIL_PX = 160
HARD_CASES_DIR, UPLOADS_DIR, THUMBNAILS_DIR = "hard_cases", "uploads", "thumbnails"
# The API request a prediction serves, so that its record can be joined with the access log. A context variable
# because the predictor knows nothing of HTTP: the service sets it around Predictor.predict on the same thread.
_REQUEST_ID: ContextVar[str | None] = ContextVar("hard_case_request_id", default=None)


@contextmanager
def for_request(request_id: str | None) -> Iterator[None]:
    """Hard-case records written inside this block carry `request_id` (already sanitised by the API)."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


@dataclass(frozen=True)
class KeepLimits:
    """How much one folder of kept files may hold (the inference.hard_cases keys max_files, max_mb,
    retention_days). A disk that fills up stops the server, so there is always a limit."""

    max_files: int = 500
    max_bytes: int = 200 * 2**20
    retention_days: float = 30.0

    @classmethod
    def from_config(cls, hard_cases: Any) -> KeepLimits:
        limits = cls(int(hard_cases.max_files), int(float(hard_cases.max_mb) * 2**20),
                     float(hard_cases.retention_days))
        if limits.max_files < 1 or limits.max_bytes < 1 or limits.retention_days <= 0:
            from pillsnap.config import ConfigError

            raise ConfigError(f"inference.hard_cases.max_files, max_mb and retention_days must be positive, got "
                              f"{hard_cases.max_files}, {hard_cases.max_mb}, {hard_cases.retention_days}")
        return limits


def files_to_prune(files: Sequence[tuple[str, float, int]], limits: KeepLimits, now: float) -> list[str]:
    """Which kept files go, given (name, mtime, size) each: every one older than retention_days, then the oldest
    until at most max_files remain, holding at most max_bytes together."""
    cutoff = now - limits.retention_days * 86400
    gone = [name for name, mtime, _ in files if mtime < cutoff]
    fresh = sorted((f for f in files if f[1] >= cutoff), key=lambda f: f[1])
    count, total = len(fresh), sum(size for _, _, size in fresh)
    for name, _, size in fresh:
        if count <= limits.max_files and total <= limits.max_bytes:
            break
        gone.append(name)
        count, total = count - 1, total - size
    return gone


class KeptFiles:
    """One folder of kept files: `new_path` names a file (before it is known whether it will be kept, so that a
    record can point at it), `keep` writes it atomically and prunes the folder to its limits."""

    def __init__(self, root: str | Path, limits: KeepLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or KeepLimits()
        self._lock = threading.Lock()  # API workers keep files from several threads

    def new_path(self, suffix: str) -> Path:
        return self.root / f"{uuid.uuid4().hex}{suffix}"

    def keep(self, path: Path, data: bytes) -> bool:
        """Write `data` at `path` (from new_path) and prune; False when the file alone is over the byte cap."""
        if path.parent != self.root:
            raise ValueError(f"{path} is not a name from {self.root}: use new_path()")
        if len(data) > self.limits.max_bytes:
            LOGGER.warning("not keeping %s: %d bytes is over the %d of inference.hard_cases.max_mb", path.name,
                           len(data), self.limits.max_bytes)
            return False
        with self._lock:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            self._prune()
        return True

    def prune(self) -> list[str]:
        """Delete what is over the limits now; returns the names deleted."""
        with self._lock:
            return self._prune()

    def _prune(self) -> list[str]:
        gone = files_to_prune(list(self._listing()), self.limits, time.time())
        for name in gone:
            (self.root / name).unlink(missing_ok=True)  # another process may have pruned it first
        if gone:
            LOGGER.info("pruned %d kept file(s) from %s (inference.hard_cases limits)", len(gone), self.root)
        return gone

    def _listing(self) -> Iterator[tuple[str, float, int]]:
        if not self.root.is_dir():
            return
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file():  # .name.*.tmp: a write in progress
                    continue
                stat = entry.stat()
                yield entry.name, stat.st_mtime, stat.st_size


def upload_store(exp_dir: str | Path, hard_cases: Any) -> KeptFiles | None:
    """Where the API keeps the upload behind each hard case (under the inference.hard_cases limits), or None when
    hard cases are not logged: then no upload is written anywhere. Prunes it at once, so that limits lowered in
    the config, or a server that was down past the retention, take effect on start rather than at the next case."""
    if not hard_cases.enabled:
        return None
    store = KeptFiles(Path(exp_dir) / HARD_CASES_DIR / UPLOADS_DIR, KeepLimits.from_config(hard_cases))
    store.prune()
    return store


class HardCaseLog:
    """Appends hard cases for weekly review; thumbnails are optional small JPEGs beside the log."""

    def __init__(self, exp_dir: str | Path, thumbnails: bool = False, limits: KeepLimits | None = None) -> None:
        self.root = Path(exp_dir) / HARD_CASES_DIR
        self.limits = limits or KeepLimits()
        self.thumbnails = KeptFiles(self.root / THUMBNAILS_DIR, self.limits) if thumbnails else None

    @classmethod
    def from_config(cls, exp_dir: str | Path, hard_cases: Any) -> HardCaseLog:
        """From the inference.hard_cases section."""
        return cls(exp_dir, bool(hard_cases.thumbnails), KeepLimits.from_config(hard_cases))

    def path_for_today(self) -> Path:
        return self.root / f"{time.strftime('%Y%m%d', time.gmtime())}.jsonl"

    def _save_thumbnail(self, image: Image.Image, store: KeptFiles) -> str | None:
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        thumb.convert("RGB").save(buffer, format="JPEG", quality=85)
        path = store.new_path(".jpg")
        return str(path) if store.keep(path, buffer.getvalue()) else None

    def write(self, result: dict[str, Any], reasons: list[str], image: Image.Image | None = None) -> Path:
        """Append one record (the prediction summary, why it is hard, the API request it served); returns the log
        path."""
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "id": uuid.uuid4().hex[:12],
            "reasons": reasons, "image": result.get("image"), "request_id": _REQUEST_ID.get(),
            **{k: result.get(k) for k in ("mode", "mode_used", "gating_score", "single_confidence",
                                          "fallback_reason", "num_detections")},
            "pills": [{"bbox": p["bbox"], "mapping_code": p["mapping_code"], "probability": p["probability"],
                       "prediction_set": None if p.get("prediction_set") is None
                       else [m["mapping_code"] for m in p["prediction_set"]]}
                      for p in result.get("pills", [])],
        }
        if self.thumbnails is not None and image is not None:
            record["thumbnail"] = self._save_thumbnail(image, self.thumbnails)
        path = self.path_for_today()
        append_jsonl(path, record)
        LOGGER.debug("hard case (%s) -> %s", ", ".join(reasons), path)
        return path
