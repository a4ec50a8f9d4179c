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
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any

# What ends a run from outside: Ctrl-C; `kill`, a scheduler's stop, torchrun ending its workers (TERM); a closed
# terminal or ssh session (HUP); SLURM's warning before the end of a job's time (`--signal=USR1@N`); Ctrl-\ and
# torchrun passing on a SIGQUIT it was sent (one of the four it forwards by default), which killed the ranks with
# nothing saved.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGQUIT") if hasattr(signal, name))
EXIT_INTERRUPTED = 130  # a command's exit code after a stop (128 + SIGINT, as shells report Ctrl-C)


# A stop that lands while the training steps (stops_at_safe_points) is noted, not raised: the loop saves its place
# at the next step and then stops. The same stop often comes twice at once (`timeout` and SLURM signal the whole
# process group, scripts/train.sh passes it on); one that comes again this much later is a person insisting: it
# raises at once, without the save.
STOP_AGAIN_S = 5.0


class _Deferral:
    """Whether the training steps take stops at their safe points now (a depth), and the stop noted there."""

    def __init__(self) -> None:
        self.depth = 0
        self.noted: str | None = None
        self.noted_at = 0.0
        self.acting = False  # the noted stop taken: its save under way (a stop again may still cut it short)


_DEFERRAL = _Deferral()
# Under torchrun each rank is its launcher's child. A launcher that dies (of a signal it does not pass on, such as
# SLURM's SIGUSR1 sent to its process group; of SIGKILL; with its node's session) leaves its ranks training on,
# detached and holding the folder, until a time limit kills them with nothing saved: the training's steps take the
# launcher's end as a stop (stop_requested). Its pid when the run started; empty outside torchrun.
_LAUNCHER: list[int] = []
LAUNCHER_GONE = "torchrun, this rank's launcher, has ended"


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
    stop on), and a second interrupt would cut short the saving of the run's state that the first one began.

    From the first stop on, for good, the ends of this process's children are expected, not errors: torch's
    DataLoader watches its workers through SIGCHLD and raised "DataLoader worker is killed by signal: Terminated"
    inside the interrupt (or at the process's exit) when a stop sent to the whole process group (`timeout`, SLURM,
    `kill -- -PGID`) ended them too, so that a run with loader workers ended as a crash with its status left at
    "running"."""
    if not _in_main_thread():
        yield
        return
    stopping: list[str] = []
    _DEFERRAL.__init__()
    _LAUNCHER[:] = [os.getppid()] if "TORCHELASTIC_RUN_ID" in os.environ else []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        pending = _DEFERRAL.noted is not None or _DEFERRAL.acting
        if stopping and pending and _DEFERRAL.depth == 0:
            # noted in the steps, which an error then left before acting on it: nothing defers it any more
            _DEFERRAL.noted, _DEFERRAL.acting = None, False
            raise KeyboardInterrupt(f"signal {name}")
        if stopping and pending and time.monotonic() - _DEFERRAL.noted_at > STOP_AGAIN_S:
            _DEFERRAL.noted, _DEFERRAL.acting = None, False
            raise KeyboardInterrupt(f"signal {name}, again: stopping now, without saving the training's place")
        if stopping:
            _say(f"{name} received while stopping on {stopping[0]}: ignored (SIGKILL stops at once, losing what "
                 "is not saved)")
            return
        stopping.append(name)
        _expect_children_to_end()
        if _DEFERRAL.depth > 0:
            _DEFERRAL.noted, _DEFERRAL.noted_at = name, time.monotonic()
            _say(f"{name} received: saving the training's place after this step, then stopping (the same signal "
                 f"again, {STOP_AGAIN_S:g} s or more from now, stops at once without saving)")
            return
        raise KeyboardInterrupt(f"signal {name}")

    try:
        with _handling(signums, interrupt):
            yield
    finally:
        _DEFERRAL.__init__()  # a stop noted in this block is this block's
        if not stopping:  # after a stop, for good: the dead workers' loaders end only as the process exits
            _watch_children_again()


@contextmanager
def stops_at_safe_points() -> Iterator[None]:
    """Inside the block (the training's steps, within stops_as_interrupt), the first stop signal does not raise
    where it lands: it is noted, and the block asks `stop_requested()` between steps, saves its place and raises
    KeyboardInterrupt itself (a pre-emption, SLURM's warning or `kill` lost up to train.checkpoint_interval_minutes
    of training). A stop noted and not acted on when the block ends raises then. Outside the block, and where
    stops are not handled (another thread), nothing changes."""
    if not _in_main_thread():
        yield
        return
    _DEFERRAL.depth += 1
    try:
        yield
    finally:
        _DEFERRAL.depth -= 1
        if _DEFERRAL.depth == 0:  # a stop acted on has stopped the steps: later ones are ignored, as at any stop
            _DEFERRAL.acting = False
    noted = _DEFERRAL.noted
    if noted is not None and _DEFERRAL.depth == 0:
        _DEFERRAL.noted = None
        raise KeyboardInterrupt(f"signal {noted}")


def stop_requested() -> str | None:
    """The stop signal noted inside stops_at_safe_points and not yet acted on (its name), else None. Under torchrun
    the end of the launcher counts as one (LAUNCHER_GONE): its ranks are then another process's children."""
    if _DEFERRAL.noted is None and _LAUNCHER and _DEFERRAL.depth > 0 and os.getppid() != _LAUNCHER[0]:
        _LAUNCHER.clear()
        _DEFERRAL.noted, _DEFERRAL.noted_at = LAUNCHER_GONE, time.monotonic()
        _say(f"{LAUNCHER_GONE}: saving the training's place after this step, then stopping")
    return _DEFERRAL.noted


def acting_on_stop() -> str:
    """The noted stop's name, now taken: the caller raises KeyboardInterrupt after saving its place (the same
    signal again, STOP_AGAIN_S after the first, still stops the save where it is)."""
    noted, _DEFERRAL.noted, _DEFERRAL.acting = _DEFERRAL.noted, None, True
    return noted or "stop"


def _default_action(signum: int) -> None:
    """What the signal does to a process that never set a handler: a child forked from a stopping run (a pool's
    replacement worker) before its own start set its handlers must end at its pool's SIGTERM, not copy the run's
    "already stopping, ignored" and wait for good on a queue lock the pool holds."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# The SIGCHLD handler (torch's) set aside by a stop. After a stop it stays aside for the rest of the process (torch
# installs its handler once): a dead worker is then found by the loader's own liveness check, about 5 s later; a
# later stops_as_interrupt block ending without a stop puts it back.
_SET_ASIDE: list[Any] = []


def _expect_children_to_end() -> None:
    """From a stop on, this process's children ending is expected, not an error: torch's SIGCHLD handler, which
    raises as soon as a loader worker has died of a signal, is set aside (see stops_as_interrupt)."""
    child_ended = getattr(signal, "SIGCHLD", None)
    if child_ended is not None and not _SET_ASIDE and callable(signal.getsignal(child_ended)):
        # a handler that does nothing, not SIG_DFL: a SIGCHLD already caught but not yet handled would find no
        # handler and Python would print "Signal 17 ignored due to race condition"
        _SET_ASIDE.append(signal.signal(child_ended, _child_ended))


def _child_ended(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD after a stop: the children are being stopped too."""


def _watch_children_again() -> None:
    if _SET_ASIDE:
        signal.signal(signal.SIGCHLD, _SET_ASIDE.pop())


def _leave_at_first(signums: tuple[signal.Signals, ...], leaving: BaseException) -> None:
    """Each of `signums` (those not ignored) raises `leaving` in this process, once: the others are ignored from
    then on, so that a second stop cannot cut the way out short."""
    signums = _handled(signums)

    def leave(signum: int, frame: FrameType | None) -> None:
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise leaving

    for signum in signums:
        signal.signal(signum, leave)


def pool_worker_signals() -> None:
    """A process pool's worker, at its start (the crop cache's, the scan's, the generator's). Ctrl-C is left to the
    parent, which ends the pool. Any other stop ends the worker by SystemExit (exit code 130, without a traceback),
    which releases the locks it holds on the pool's queues on its way out: killed while holding one, a worker left
    the parent's Pool.terminate waiting for that lock for good. A forked worker inherited the trainer's handlers
    instead (stops_as_interrupt), whose KeyboardInterrupt printed a traceback per worker. A signal ignored in the
    parent (`nohup`) stays ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _leave_at_first(tuple(s for s in STOP_SIGNALS if s != signal.SIGINT), SystemExit(EXIT_INTERRUPTED))


def loader_worker_signals() -> None:
    """A DataLoader worker, at its start: Ctrl-C, SIGHUP and SIGUSR1 end it quietly, once (KeyboardInterrupt, which
    torch's worker loop takes as its end). SIGTERM stays torch's: a worker exits at once when its trainer ends it,
    even one stuck in native code, and dies of anyone else's (the trainer, stopping, no longer takes that for an
    error: stops_as_interrupt). A signal ignored in the trainer stays ignored."""
    _leave_at_first(tuple(s for s in STOP_SIGNALS if s != signal.SIGTERM), KeyboardInterrupt("stopped"))


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
        _expect_children_to_end()  # the stop's children may end while the block finishes

    with _handling(signums, hold) as previous:
        yield
    if caught:
        _deliver(*caught[0], previous[caught[0][0]])


@contextmanager
def _handling(signums: tuple[signal.Signals, ...], handler: Any) -> Iterator[dict[int, Any]]:
    """`handler` for each of `signums` not ignored, for the block; yields the handlers it replaced, put back after.
    The handler is this process's: a child forked inside the block (a pool's worker, before its own start sets its
    handlers) takes the signal's default action instead."""
    owner = os.getpid()

    def own(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            return _default_action(signum)
        return handler(signum, frame)

    previous = {signum: signal.signal(signum, own) for signum in _handled(signums)}
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
