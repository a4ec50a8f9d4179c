"""The training loaders' sampler: each epoch's order drawn from (seed, epoch) alone, and a pass that starts part-way
through it (a run resumed from a checkpoint saved inside an epoch)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """One rank's share (all of it in a single process) of an epoch's shuffled order, which depends on the seed and
    the epoch alone (`set_epoch` before each epoch, as for DistributedSampler).

    torch's RandomSampler draws from the DataLoader's generator, which the loader also draws its worker seed from
    whenever it starts its workers. A run that keeps persistent workers and a run resumed in a new process therefore
    shuffled the same epoch differently; this order is the same in both.

    `skip(n)`: the passes of this epoch leave out the first n indices of this rank's order, without reading them,
    so a run resumed inside an epoch sees the rest of that epoch's own order. The skip lasts until the next
    `set_epoch` rather than for one pass: a loader with workers may start a pass and drop it before the one it
    serves (torch does so when it batches nothing itself, batch_size=None)."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False) -> None:
        # seed_epoch's rule (seed * 1000 + epoch): DistributedSampler's own (seed + epoch) would give the runs of
        # seeds 1 and 2 the same orders one epoch apart
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed) * 1000,
                         drop_last=drop_last)
        self._skip = 0

    def skip(self, n: int) -> None:
        """Leave out the first `n` indices of this epoch's passes."""
        self._skip = max(int(n), 0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self._skip, None)
