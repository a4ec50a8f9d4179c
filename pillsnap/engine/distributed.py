"""DDP plumbing for `torchrun` (NCCL on GPU, gloo on CPU); a single process sees world_size 1 and no-ops."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pillsnap.data.samplers import EpochSampler

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The ranks' second group (gloo, host side) for waiting on work rank 0 does alone: validation, checkpoints. Its
# timeout is train.ddp_timeout_minutes; the training collectives keep the backend's own (NCCL: 10 minutes), so a
# real hang between steps still shows within minutes.
_WAIT_GROUP: Any = None


def init_distributed(timeout_minutes: float = 120.0) -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); else single process.
    `timeout_minutes`: how long the other ranks wait for rank 0's lone work between epochs (a Stage 4 validation
    outlasts NCCL's default 10 minutes, which would stop the run), through a second gloo group used by
    `barrier`, `broadcast_object` and `gather_to_main`."""
    global _WAIT_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        LOGGER.info("DDP: rank %d/%d (local %d) on %s", rank, world, local_rank, backend)
    if _WAIT_GROUP is None:  # also when another library started the process group
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(minutes=float(timeout_minutes)))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank owns cuda:{local_rank}; CPU stays CPU."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    """Every rank waits here for the others (for as long as train.ddp_timeout_minutes: rank 0 may be writing
    checkpoints)."""
    if info.enabled:
        dist.barrier(group=_WAIT_GROUP)


def any_rank(info: DistInfo, flag: bool, device: Any) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer); the flag itself in a single process.
    For decisions every rank must take together, such as skipping a step: a rank that skips alone leaves the
    others waiting in the gradient all-reduce."""
    return any_ranks(info, [flag], device)[0]


def any_ranks(info: DistInfo, flags: Sequence[bool], device: Any) -> list[bool]:
    """Each of `flags` as any_rank answers it, in one all-reduce."""
    if not info.enabled:
        return [bool(f) for f in flags]
    box = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return [bool(v) for v in box.tolist()]


def sum_over_ranks(info: DistInfo, values: list[float], device: Any) -> list[float]:
    """Each of `values` summed over every rank (float64, so that long sums keep their digits); the values
    themselves in a single process. Every rank must call it at the same point."""
    if not info.enabled:
        return list(values)
    box = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(box)
    return box.tolist()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (so that all ranks take the same early-stop/best decisions)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)  # the others may wait a whole validation for it
    return box[0]


def all_ranks(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank; [obj] in a single process."""
    if not info.enabled:
        return [obj]
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, obj, group=_WAIT_GROUP)
    return parts


@contextmanager
def main_rank_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first, then the first rank of every other node, then all the others: for work that
    writes files the ranks then read (the crop cache, the detection export, ultralytics' label cache). Ranks
    writing them at once race: a symlink made by one rank between another's check and its own `os.symlink` stopped
    that rank. Each node's first rank goes before the rest for nodes that do not share the folder. When a block
    fails, the ranks after it are still let go (they meet the same error, unless it was that rank's own). The block
    must run no collective of its own (the other ranks wait in ours): a library whose import runs one is imported
    on every rank before."""
    if not info.enabled:
        yield
        return
    turn = 0 if info.is_main else 1 if info.local_rank == 0 else 2
    for _ in range(turn):
        barrier(info)
    try:
        yield
    except KeyboardInterrupt:
        # a stop: this rank leaves now (the others leave on their own copy of it, or find this one gone). Waiting
        # in the turns left met the ranks that had already left, and gloo's "Connection closed by peer" replaced the
        # stop: rank 0 ended as a crash with a traceback and no resume line
        raise
    except BaseException:
        _let_the_others_go(info, turn)
        raise
    _let_the_others_go(info, turn)


def _let_the_others_go(info: DistInfo, turn: int) -> None:
    # one turn more than there are: no rank leaves before the last has run its block. Rank 0 left as the last
    # began, and met them next in a collective of the default group (DDP's construction), under NCCL's 10-minute
    # watchdog instead of train.ddp_timeout_minutes, while 7 ranks built Stage 4's loaders
    for _ in range(3 - turn):
        barrier(info)


def gather_to_main(info: DistInfo, obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others); [obj] in a single process."""
    if not info.enabled:
        return [obj]
    parts: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, parts, dst=0, group=_WAIT_GROUP)
    return parts


class StridedSampler(Sampler[int]):
    """Every world_size-th index from `rank`, in order, none repeated: each rank's share of an evaluation split
    (DistributedSampler pads the shares to one length with repeated crops, which would count them twice)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader_over(loader: DataLoader, sampler: Sampler[int], **extra: Any) -> DataLoader:
    """`loader` again over `sampler`: its data set, batch size, collate, workers (with their prefetch, persistence
    and start-up) and pinning, plus `extra` DataLoader arguments. Pinned batches go to the current device, which
    is this rank's GPU (torch.cuda.set_device ran first); torch ignores `pin_memory_device` now, with a warning at
    every epoch."""
    workers: dict[str, Any] = ({"prefetch_factor": loader.prefetch_factor,
                                "persistent_workers": loader.persistent_workers} if loader.num_workers else {})
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, **workers, **extra)


def eval_share(loader: DataLoader, info: DistInfo) -> DataLoader:
    """This rank's share of an evaluation loader (StridedSampler), with the loader's batch size, workers and
    collate."""
    if loader.batch_size is None:
        raise ValueError("a validation loader built on a batch_sampler cannot be shared between ranks")
    context = {"multiprocessing_context": loader.multiprocessing_context} if loader.num_workers else {}
    return _loader_over(loader, StridedSampler(len(loader.dataset), info.rank, info.world_size),
                        timeout=loader.timeout, generator=loader.generator, **context)


def shard_loader(loader: DataLoader | None, info: DistInfo, seed: int) -> DataLoader | None:
    """Rebuild a training loader with an EpochSampler so each rank reads a disjoint shard."""
    if loader is None or not info.enabled:
        return loader
    if isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == info.world_size:
        return loader  # already sharded (a single process's EpochSampler has one replica: it is sharded here)
    sampler = EpochSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank, seed=seed,
                           drop_last=loader.drop_last)
    return _loader_over(loader, sampler, drop_last=loader.drop_last)


def cleanup(info: DistInfo, abort: bool = False) -> None:
    """Leave the process group. `abort`: this rank stops while the others may be inside a collective (an OOM under
    DDP). NCCL's graceful teardown flushes the collectives in flight and waits for them, so a rank leaving a broken
    step would wait until NCCL's watchdog ends it, and torchrun would restart the job only then; its communicators
    are aborted instead (torch's experimental `_abort_process_group`, NCCL only). gloo just closes."""
    global _WAIT_GROUP
    if info.enabled and dist.is_initialized():
        from torch.distributed import distributed_c10d

        abort_all = getattr(distributed_c10d, "_abort_process_group", None)
        if abort and dist.get_backend() == "nccl" and abort_all is not None:
            try:
                abort_all()
            except Exception as err:  # leaving anyway: the process exits next
                LOGGER.warning("aborting the NCCL communicators failed (%s); leaving without them", err)
        else:
            dist.destroy_process_group()
    _WAIT_GROUP = None


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's values (in place)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.broadcast(t.data, src=0)
