"""Latency that a busy machine measures the same way twice: a bounded sample streamed from its source (memory does
not grow with the split), warm-up calls, every input timed over several passes with its median kept, then the p95
over the inputs. A pass that is slowed by a neighbour moves a median little; one slow pass cannot move it at all."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SAMPLES = 24  # inputs timed per figure (the pipeline times fewer photos: see eval/stage_eval.py)
WARMUP = 3  # untimed calls first: lazy initialisation, cuDNN autotuning, caches
MIN_REPEATS, MAX_REPEATS = 3, 5  # passes over the sample; more only while the time budget allows
BUDGET_S = 30.0  # seconds per figure after which no further pass starts (the minimum passes always run)


@dataclass(frozen=True)
class Latency:
    """One figure: p95 and median over the inputs of each input's median time, in ms, and how it was measured."""

    p95_ms: float
    median_ms: float
    samples: int
    repeats: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def take(items: Iterable[Any], n: int) -> list[Any]:
    """The first `n` items, reading no further: from a loader, only those batches (and its prefetch) are decoded."""
    iterator = iter(items)
    try:
        return list(itertools.islice(iterator, n))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def loader_items(loader: Iterable[Any], split: Callable[[Any], Iterable[Any]]) -> Iterator[Any]:
    """Single inputs, one batch of `loader` at a time (`split` turns a batch into its items); a batch whose every
    item failed to decode (None: data.datasets.safe_collate) gives none."""
    for batch in loader:
        if batch is not None:
            yield from split(batch)


def synchronizer(device: Any) -> Callable[[], None]:
    """A call that waits for the device's queued work: CUDA kernels run asynchronously to the host clock."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def device_name(device: Any) -> str:
    """"NVIDIA H200" for a CUDA device, the processor for the CPU."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def passes(device: Any, target_device: str) -> tuple[int, int]:
    """(fewest, most) timed passes: on the device class the targets were set for, enough for a steady median; on
    another the figure is only reported (not comparable), so one pass after the warm-up will do."""
    import torch

    return (MIN_REPEATS, MAX_REPEATS) if torch.device(device).type == target_device else (1, 1)


def weighted_percentile(values: Iterable[float], weights: Iterable[float], q: float) -> float:
    """The q-th percentile of `values` where each stands for its weight's share of the population (the smallest
    value whose cumulative share reaches q %)."""
    values, weights = np.asarray(list(values), np.float64), np.asarray(list(weights), np.float64)
    order = np.argsort(values, kind="stable")
    share = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][min(int(np.searchsorted(share, q / 100 - 1e-12)), len(values) - 1)])


def measure(fn: Callable[[Any], Any], inputs: list[Any], device: Any, repeats: tuple[int, int] = (MIN_REPEATS,
            MAX_REPEATS), budget_s: float = BUDGET_S, weights: list[float] | None = None) -> Latency | None:
    """Time `fn` on each input (see the module docstring) over `repeats` (fewest, most) passes; None without
    inputs. With `weights` (each input's share of the population it was drawn from, e.g. a stratified sample of
    single and combination photos) the p95 and median are those of the population (weighted_percentile)."""
    if not inputs:
        return None
    fewest, most = repeats
    sync = synchronizer(device)
    for item in itertools.islice(itertools.cycle(inputs), WARMUP):
        fn(item)
    sync()
    times: list[list[float]] = [[] for _ in inputs]
    start = time.perf_counter()
    for done in range(most):
        if done >= fewest and time.perf_counter() - start > budget_s:
            break
        for i, item in enumerate(inputs):
            t0 = time.perf_counter()
            fn(item)
            sync()
            times[i].append(time.perf_counter() - t0)
    medians = [statistics.median(t) * 1000 for t in times]
    if weights is not None:
        p95, median = weighted_percentile(medians, weights, 95), weighted_percentile(medians, weights, 50)
    else:
        p95, median = float(np.percentile(medians, 95)), statistics.median(medians)
    return Latency(round(p95, 3), round(median, 3), len(inputs), len(times[0]), str(device))
