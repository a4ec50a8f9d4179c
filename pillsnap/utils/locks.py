"""One writer at a time: an advisory lock on a file (flock), which the kernel drops when its holder exits or is
killed, so a crashed process leaves no stale lock behind on a local disk.

`file_lock(path, wait=False)` refuses at once with `BusyError`, which names the holder (its pid, host, command
and start time, written into the lock file by whoever holds it, with its role and, once it lets go, when);
`wait=True` queues behind the holder instead. `holder_alive` tells from that record whether the holder still
holds the lock (the training monitor's question).
Processes forked while a lock is held (loader workers, pools) close their copy of it at once: a copy would keep
the lock after its holder was killed, for as long as the child lived.

On a network file system the lock is only as good as the file system's locking: Linux NFS clients turn flock
into byte-range locks, which hold across machines, but a crashed client's lock lasts until its lease expires.
Where the file system cannot lock at all, the block runs unlocked after a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LOGGER = logging.getLogger(__name__)
# flock's answers where the file system does not lock (NFS without its lock service, Lustre without flock)
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_HELD: set[int] = set()  # the descriptors of the locks this process holds
RUN_LOCK = "run.lock"  # in an experiment folder: held by the one process that trains, calibrates or evaluates


def _forget_in_child() -> None:
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)  # the child's duplicate only: the parent's descriptor keeps the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class BusyError(RuntimeError):
    """Another process holds the lock; the message names it."""


def read_holder(path: str | Path) -> dict | None:
    """What the last holder of a lock file wrote about itself (pid, host, since, since_unix, command); None when
    there is no such file or nothing readable in it. The file stays after its holder lets go."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def holder_alive(info: dict) -> bool | None:
    """Whether the process that wrote `info` still holds its lock: False once it let go (`released_unix`) or
    ended; None where this machine cannot see it (another host, another container's process ids). The process is
    told apart from a newer one that took its pid over by its start time in clock ticks since boot, which a step
    of the wall clock does not move."""
    if info.get("released_unix") is not None:
        return False
    here = _identity()
    if info.get("host") != socket.gethostname() or info.get("pid_ns", here["pid_ns"]) != here["pid_ns"]:
        return None
    if info.get("boot_id", here["boot_id"]) != here["boot_id"]:
        return False  # the machine was restarted since
    pid = int(info["pid"])
    state = _proc_state(pid)
    if state is None:  # no /proc entry to read: gone, or hidden from this user (EPERM: there)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # there, and not ours to signal
        return True
    status, start_ticks = state
    return status != "Z" and start_ticks == info.get("start_ticks", start_ticks)


def holder_text(path: Path) -> str:
    """'pid 123 on host since 2026-12-06 01:02:03 UTC: pillsnap train --cfg x.yaml' from a lock file (as much as
    its holder wrote; 'another process' if it wrote nothing yet or the file is unreadable)."""
    info = read_holder(path)
    if info is None:
        return "another process"
    text = f"pid {info['pid']} on {info.get('host', '?')}"
    if "since" in info:
        text += f" since {info['since']}"
    return text + (f": {info['command']}" if info.get("command") else "")


@contextmanager
def file_lock(path: str | Path, wait: bool = False, role: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, parent folders too) for the block. `wait=False`:
    raise BusyError naming the holder instead of waiting for it. `role`: what the holder does, written beside its
    pid (the monitor follows the "train" holder of an experiment folder); the file says when it was let go."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)  # group-writable where the umask allows (shared folders)
    except PermissionError as err:  # its holder could not name itself in it, and NFS locks need write access
        raise BusyError(f"{path} cannot be opened for writing ({err.strerror}): it belongs to another user; "
                        "make it writable for you (chmod g+w) or remove it when no run is using the folder") from None
    try:
        if not _lock(fd, path, wait):
            yield
            return
        _HELD.add(fd)
        info = _write_holder(fd, role)
        try:
            yield
        finally:
            _HELD.discard(fd)
            with suppress(OSError):  # a full disk must not keep the lock
                _rewrite(fd, {**info, "released_unix": time.time()})
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock(fd: int, path: Path, wait: bool) -> bool:
    """Lock `fd`; False (after a warning) where the file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise BusyError(f"{path} is held by {holder_text(path)}") from None
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        LOGGER.warning("cannot lock %s (%s): going on without it, so nothing keeps a second process out",
                       path, err.strerror)
        return False
    return True


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc (Linux); None without."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces and ")"
    return fields[0], int(fields[19])


def _identity() -> dict:
    """This process's start (clock ticks since boot), the machine's boot and the process-id namespace, where
    /proc has them (None elsewhere)."""
    def read(path: str, link: bool = False) -> str | None:
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None

    state = _proc_state(os.getpid())
    return {"start_ticks": state[1] if state else None, "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", link=True)}


def _command() -> str:
    """This process's command line as its user typed it ('python -m pillsnap.train ...' rather than 'train.py')."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    prog = [Path(sys.executable).name, "-m", name.removesuffix(".__main__")] if name else [Path(sys.argv[0]).name]
    return shlex.join(prog + sys.argv[1:]) if sys.argv and sys.argv[0] else ""


def _write_holder(fd: int, role: str | None) -> dict:
    """Who holds the lock, for the message of whoever is refused and for the training monitor (the file itself
    stays: removing a lock file would let two processes lock two different files of one name)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "role": role,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "since_unix": time.time(),
            "command": _command(), **_identity()}
    _rewrite(fd, info)
    return info


def _rewrite(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
