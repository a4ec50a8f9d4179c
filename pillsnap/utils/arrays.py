"""Arrays filled batch by batch: one array of the expected size, written in place as batches come, instead of a list
of batch arrays and a concatenation that holds everything twice (at Stage 4 a validation split's [N, 5,000]
probabilities are 1.5 GB)."""

from __future__ import annotations

import numpy as np


class RowFiller:
    """Rows appended batch by batch into one array of `expected` rows, created with the first batch's row shape
    and dtype; grown by doubling if more rows come than expected (a sampler that repeats), trimmed to the rows that
    came (`result`)."""

    def __init__(self, expected: int) -> None:
        self.expected = max(int(expected), 1)
        self.array: np.ndarray | None = None
        self.filled = 0

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if self.array is None:
            self.array = np.empty((self.expected, *batch.shape[1:]), batch.dtype)
        end = self.filled + len(batch)
        if end > len(self.array):
            grown = np.empty((max(end, 2 * len(self.array)), *self.array.shape[1:]), self.array.dtype)
            grown[:self.filled] = self.array[:self.filled]
            self.array = grown
        self.array[self.filled:end] = batch
        self.filled = end

    def result(self, empty_shape: tuple[int, ...] = (0,), dtype: type = np.float32) -> np.ndarray:
        """The rows that came (an array of `empty_shape` and `dtype` when none did)."""
        if self.array is None:
            return np.zeros(empty_shape, dtype)
        return self.array[:self.filled]


def place_in_runs(values: np.ndarray) -> np.ndarray:
    """Each item's place (0, 1, ...) in its run of equal neighbours: for values grouped by a sort, its rank within
    its group."""
    if not len(values):
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return np.arange(len(values)) - np.repeat(starts, np.diff(np.r_[starts, len(values)]))
