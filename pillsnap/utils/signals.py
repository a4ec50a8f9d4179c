"""Stop signals: handled as an interrupt (a status, a resume hint) instead of the default sudden death, and held back
while something must be written whole.

Only the main thread can set a signal handler; elsewhere both contexts do nothing. A signal the process was started
with ignored stays ignored: `nohup` ignores SIGHUP, and bash starts a script's background commands with SIGINT
ignored (scripts/train.sh passes Ctrl-C on to its trainer as SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

# What ends a run from outside: Ctrl-C; `kill`, a scheduler's stop, torchrun ending its workers (TERM); a closed
# terminal or ssh session (HUP); SLURM's warning before the end of a job's time (`--signal=USR1@N`).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, name))
EXIT_INTERRUPTED = 130  # a command's exit code after a stop (128 + SIGINT, as shells report Ctrl-C)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _say(text: str) -> None:
    """A line on stderr from inside a signal handler. Not through logging: the signal may have landed inside a
    write to the same stream, and writing to it again there raises "reentrant call" in the middle of the very
    write (a checkpoint commit) the handler protects."""
    with suppress(OSError):
        os.write(2, f"pillsnap: {text}\n".encode(errors="replace"))


def _handled(signums: tuple[signal.Signals, ...]) -> tuple[signal.Signals, ...]:
    return tuple(signum for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN)


@contextmanager
def stops_as_interrupt(signums: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """The first stop signal ends the block the way Ctrl-C does (KeyboardInterrupt): the run says how it ended and
    how to resume, where the default action would kill it without a word. Later ones are logged and ignored: a stop
    often comes twice (`timeout` and SLURM signal the whole process group, and scripts/train.sh passes the same
    stop on), and a second interrupt would cut short the saving of the run's state that the first one began."""
    if not _in_main_thread():
        yield
        return
    stopping: list[str] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping:
            _say(f"{name} received while stopping on {stopping[0]}: ignored (SIGKILL stops at once, losing what "
                 "is not saved)")
            return
        stopping.append(name)
        raise KeyboardInterrupt(f"signal {name}")

    with _handling(signums, interrupt):
        yield


def pool_worker_signals() -> None:
    """A process pool's worker, at its start: Ctrl-C is left to the parent, which stops the pool, and a termination
    ends the worker at once. A forked worker inherits the parent's handlers: under stops_as_interrupt, the SIGTERM
    with which a pool ends its workers raised KeyboardInterrupt in each, which printed a traceback at every normal
    end of the pool and could leave a worker waiting on the pool's queue, with the parent waiting on it for good.
    A signal ignored in the parent (`nohup`) stays ignored: a worker dying of it would leave its task unfinished."""
    for signum in _handled(STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else signal.SIG_DFL)


def loader_worker_signals() -> None:
    """A DataLoader worker, at its start: a stop signal ends it quietly (KeyboardInterrupt, which torch's worker
    loop takes as its end, exiting 0). torch's own handler made a worker die of a SIGTERM its trainer had not sent,
    and the trainer's loader then raised "DataLoader worker is killed by signal: Terminated" inside the trainer's
    own interrupt: a stop sent to the whole process group (`timeout`, SLURM, `kill -- -PGID`) ended a run with
    loader workers as a crash, with its status left at "running". A signal ignored in the trainer stays ignored."""

    def end(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for signum in _handled(STOP_SIGNALS):
        signal.signal(signum, end)


@contextmanager
def held_signals(signums: tuple[signal.Signals, ...] = STOP_SIGNALS, doing: str = "") -> Iterator[None]:
    """The signals are held back while the block runs and handled, the first of them, as they would have been
    when it ends: a checkpoint commit, or a write to a full pipe, is never cut in half. `doing` ("writing the
    checkpoints") is said on stderr when a signal arrives, so that the wait is not taken for a hang."""
    if not _in_main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if not caught and doing:
            _say(f"{signal.Signals(signum).name} received: {doing} first")
        caught.append((signum, frame))

    with _handling(signums, hold) as previous:
        yield
    if caught:
        _deliver(*caught[0], previous[caught[0][0]])


@contextmanager
def _handling(signums: tuple[signal.Signals, ...], handler: Any) -> Iterator[dict[int, Any]]:
    """`handler` for each of `signums` not ignored, for the block; yields the handlers it replaced, put back after."""
    previous = {signum: signal.signal(signum, handler) for signum in _handled(signums)}
    try:
        yield previous
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def _deliver(signum: int, frame: FrameType | None, handler: Any) -> None:
    """What `handler` (the one in place before the hold) would have done with the signal."""
    if callable(handler):
        handler(signum, frame)  # Python's own SIGINT handler raises KeyboardInterrupt here
    elif handler in (signal.SIG_DFL, None):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # the default action, now that the handler is back
