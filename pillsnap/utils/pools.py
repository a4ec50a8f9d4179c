"""Process pools forked from a run: their workers take stops as utils.signals.pool_worker_signals says, and a pool
that has done its work ends without a signal."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from typing import Any

from pillsnap.utils.signals import pool_worker_signals


def _start_worker(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    pool_worker_signals()
    if initializer is not None:
        initializer(*initargs)


def forked_imap(func: Callable[[Any], Any], items: Iterable[Any], workers: int, chunksize: int,
                initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """`func` over `items` in `workers` forked processes, results in order (multiprocessing's imap). Done, the pool
    is closed and joined, so that its workers leave on their own; left early (an error, a stop, the consumer
    gone), it is terminated."""
    with get_context("fork").Pool(workers, initializer=_start_worker, initargs=(initializer, initargs)) as pool:
        yield from pool.imap(func, items, chunksize=chunksize)
        pool.close()
        pool.join()
