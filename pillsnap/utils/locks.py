"""One writer at a time: an advisory lock on a file (flock), which the kernel drops when its holder exits or is
killed, so a crashed process never leaves a stale lock behind.

`file_lock(path, wait=False)` refuses at once with `BusyError`, which names the holder (its pid, host, command
and start time, written into the lock file by whoever holds it); `wait=True` queues behind the holder instead.
On a shared network file system the lock holds across machines only where the file system supports it (Linux
NFS v4 maps flock onto its byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class BusyError(RuntimeError):
    """Another process holds the lock; the message names it."""


def holder_text(path: Path) -> str:
    """'pid 123 on host since 2026-12-06 01:02:03 UTC: pillsnap train --cfg x.yaml' from a lock file (as much as
    its holder wrote; 'another process' if it wrote nothing yet or the file is unreadable)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    text = f"pid {info['pid']} on {info.get('host', '?')}"
    if "since" in info:
        text += f" since {info['since']}"
    return text + (f": {info['command']}" if info.get("command") else "")


@contextmanager
def file_lock(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, parent folders too) for the block. `wait=False`:
    raise BusyError naming the holder instead of waiting for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise BusyError(f"{path} is held by {holder_text(path)}") from None
        try:
            _write_holder(fd)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of whoever is refused (the file itself stays: removing a lock file
    would let two processes lock two different files of one name)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
