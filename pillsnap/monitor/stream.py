"""Follow the training metrics stream ({exp_dir}/reports/metrics.jsonl) incrementally, like `tail -F`: whole lines
only, a file that does not exist yet, and a file truncated or replaced when a run restarts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

LOGGER = logging.getLogger(__name__)


READ_LIMIT = 8 << 20  # bytes read per poll: a stream of hundreds of MB is taken in bounded bites


def read_new_records(path: str | Path, offset: int = 0, limit: int = READ_LIMIT) -> tuple[list[dict], int]:
    """Records appended since byte `offset` (whole lines of at most about `limit` bytes), and the new offset. A
    trailing partial line is left for next time; so is what lies past the limit (the offset says how far it got)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read(limit)
            while chunk and b"\n" not in chunk and len(chunk) % limit == 0:  # one line longer than the limit
                more = fh.read(limit)
                if not more:
                    break
                chunk += more
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1  # only whole lines; a writer may be mid-line
    return parse_lines(chunk[:end], path), offset + end


def parse_lines(chunk: bytes, path: Path) -> list[dict]:
    """JSON objects of `chunk`'s lines; a malformed line is logged and skipped, never fatal to the dashboard."""
    records = []
    for line in chunk.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            LOGGER.warning("skipping malformed metrics line in %s: %.80r", path, line)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class Chunk(NamedTuple):
    """What one poll found: the new records, and whether the file was replaced or truncated first (then the
    records are the new file's from its start, and whatever was built from the old file is stale)."""

    records: list[dict]
    reset: bool
    more: bool = False  # the read stopped at its limit: poll again for the rest


class StreamFollower:
    """Reads what was appended to one metrics stream since the last `poll()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file being read

    def poll(self) -> Chunk:
        reset = self._check_replaced()
        start = self.offset
        records, self.offset = read_new_records(self.path, self.offset, READ_LIMIT)
        try:  # a read that got this far stopped at its limit, not at the end (metrics lines are short)
            more = self.offset - start >= READ_LIMIT // 2 and os.stat(self.path).st_size > self.offset
        except FileNotFoundError:
            more = False
        return Chunk(records, reset, more)

    def _check_replaced(self) -> bool:
        """True when the file is no longer the one read so far: another inode (a new run wrote a new file), or
        shorter than what was read (truncated). Starts over from byte 0 then."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False  # not there (yet, or again): keep waiting, keep what was shown
        identity = (stat.st_dev, stat.st_ino)
        replaced = self._identity is not None and (identity != self._identity or stat.st_size < self.offset)
        self._identity = identity
        if replaced:
            LOGGER.info("metrics stream %s was replaced or truncated; reading it from the start", self.path)
            self.offset = 0
        return replaced
