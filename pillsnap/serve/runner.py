"""Runs predictions off the event loop: a fixed pool of worker threads and a bounded queue in front of it.

The event loop only parses requests and writes answers, so /health and /metrics answer at once while models run.
torch and onnxruntime release the GIL inside their kernels, so threads (not processes) suffice and the models
are loaded once. A dedicated pool keeps predictions from taking the threads Starlette uses for its own work.
Jobs wait for a worker on the event loop (a semaphore), not in the pool's own queue, so that whether the client is
still there can be asked at the moment a worker frees up: a job whose client left is dropped, not run.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pillsnap.serve.errors import ServerBusy
from pillsnap.serve.metrics import ServeMetrics

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while its job waited for a worker; the job was dropped."""


class InferenceRunner:
    """At most `workers` jobs run at once; at most `max_queue` are running or waiting, and the next is refused
    with ServerBusy (503) instead of growing an unbounded backlog that would time out anyway."""

    def __init__(self, workers: int, max_queue: int, metrics: ServeMetrics | None = None) -> None:
        self.workers, self.max_queue = workers, max_queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pillsnap-infer")
        self._jobs = 0  # touched only on the event loop thread, so it needs no lock
        self._metrics = metrics
        self._free: asyncio.Semaphore | None = None  # made on first use, inside the server's event loop

    @property
    def jobs(self) -> int:
        """Jobs running or waiting now."""
        return self._jobs

    async def run(self, fn: Callable[..., T], *args: object, gone: Callable[[], Awaitable[bool]] | None = None,
                  admitted: bool = False) -> T:
        """Run fn(*args) on a worker thread and await its result. `gone` is asked once a worker is free; when it
        says True the job is dropped with ClientGone. `admitted`: the next photo of a batch already let in, which
        is not refused half-way for want of a queue slot."""
        if self._jobs >= self.max_queue and not admitted:
            raise ServerBusy(f"All {self.max_queue} prediction slots are taken (serving.max_queue); retry shortly")
        if self._free is None:
            self._free = asyncio.Semaphore(self.workers)
        self._set_jobs(self._jobs + 1)
        try:
            async with self._free:
                if gone is not None and await gone():
                    raise ClientGone()
                return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._set_jobs(self._jobs - 1)

    def _set_jobs(self, value: int) -> None:
        self._jobs = value
        if self._metrics is not None:
            self._metrics.queue.set(value)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
