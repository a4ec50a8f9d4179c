"""A run's tasks, built: the stage's loaders (rank 0 first; under torchrun with worker autotune, rank 0 alone
measures), the auto batch search for the tasks that ask for it, then one Task per wanted type."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pillsnap.engine.distributed import DistInfo, all_ranks, broadcast_object, main_rank_first, shard_loader
from pillsnap.engine.oom import FAKE_OOM_BATCH_ENV, BatchChoice
from pillsnap.engine.task import Task
from pillsnap.utils import CUDA_PEAKS, TBWriter, release_cuda_cache
from pillsnap.utils.offline import ultralytics_offline

BuildLoaders = Callable[[DictConfig], Any]  # cfg -> pillsnap.data.Loaders


@dataclass
class BuiltTasks:
    """The tasks, the loaders' meta (class names, worker count), what the auto batch search chose per task, and
    whether memory is what stopped it (a trial ran out of memory or over the headroom) for any task."""

    tasks: dict[str, Task]
    meta: dict
    auto_batch: dict[str, dict] = field(default_factory=dict)
    memory_bound: bool = False


class TaskBuilder:
    """Builds the tasks of a run on this rank. The auto batch search writes the batch sizes it chose into `cfg`
    (the run's own config object), so that checkpoints and summaries carry them."""

    def __init__(self, cfg: DictConfig, info: DistInfo, device: torch.device, logger: logging.Logger,
                 tb: TBWriter) -> None:
        self.cfg, self.info, self.device, self.logger, self.tb = cfg, info, device, logger, tb

    def build(self, build_loaders: BuildLoaders, task_types: Sequence[type[Task]]) -> BuiltTasks:
        # rank 0 first: building the loaders may write the crop cache and the detection export the ranks share.
        # Importing ultralytics runs a barrier of its own when a process group is up (its settings are made on
        # rank 0 first), which would wait forever for ranks held at ours: every rank imports it before.
        if self.info.enabled and str(self.cfg.train.strategy) != "classification":
            ultralytics_offline()
        loaders = self._build_loaders(build_loaders)
        types = [t for t in task_types if t.wanted(self.cfg, loaders)]
        choices, chosen = self._auto_batch(types, loaders)
        if choices:  # rebuilt with the batch sizes the search chose, and the worker count already found
            workers = _workers_of(loaders, self.cfg)
            with main_rank_first(self.info):
                loaders = build_loaders(self._with_workers(workers))
        tasks = {t.spec.name: self._make_task(t, loaders, self.cfg, choices.get(t.spec.name)) for t in types}
        CUDA_PEAKS.reset()  # the run's peak memory is its training's, not the batch search's trials
        return BuiltTasks(tasks, loaders.meta, chosen, any(map(memory_bound, choices.values())))

    def _build_loaders(self, build_loaders: BuildLoaders) -> Any:
        """The stage's loaders on every rank, rank 0 first (main_rank_first). With dataloader.autotune_workers under
        torchrun, rank 0 alone measures the worker counts and every other rank uses its choice: each rank measuring in
        turn took as long again per rank, measured with the other ranks' loaders running, and could train with
        another count."""
        if not (self.info.enabled and self.cfg.dataloader.autotune_workers):
            with main_rank_first(self.info):
                return build_loaders(self.cfg)
        loaders, failure = None, None
        with main_rank_first(self.info):
            if self.info.is_main:
                try:
                    loaders = build_loaders(self.cfg)
                except Exception as err:  # the other ranks are told, and stop the same way (a config error: exit 2)
                    failure = err
        told = broadcast_object(self.info, _failure_or_workers(failure, loaders, self.cfg))
        if failure is not None:
            raise failure
        if isinstance(told, tuple):  # rank 0's error
            raise _as_builtin(*told)
        with main_rank_first(self.info):
            if loaders is None:
                loaders = build_loaders(self._with_workers(told))
        return loaders

    def _with_workers(self, workers: int) -> DictConfig:
        """The run's config with the loader worker count fixed at `workers` (no autotune): for rebuilding loaders."""
        cfg = copy.deepcopy(self.cfg)
        cfg.dataloader.num_workers, cfg.dataloader.autotune_workers = int(workers), False
        return cfg

    def _make_task(self, task_type: type[Task], loaders: Any, cfg: DictConfig,
                   choice: BatchChoice | None = None) -> Task:
        seed = int(self.cfg.train.seed)
        task = task_type.from_loaders(cfg, loaders, self.device, choice,
                                      shard=lambda loader: shard_loader(loader, self.info, seed))
        task.info = self.info  # the run's ranks: a task that shares its validation gathers among them
        return task

    def _auto_batch(self, types: list[type[Task]], loaders: Any) -> tuple[dict[str, BatchChoice], dict[str, dict]]:
        """The auto batch search for each task that asks for it: the choices, and what to record of them. The chosen
        sizes are written into the config."""
        sections = {t: OmegaConf.select(self.cfg, t.spec.config_section) if t.spec.config_section else None
                    for t in types}
        wanted = [t for t in types if sections[t] is not None and sections[t].get("auto_batch_tune")]
        if wanted and self.device.type != "cuda" and not os.environ.get(FAKE_OOM_BATCH_ENV):
            self.logger.info("auto batch measures GPU memory; on %s the configured batch sizes are kept",
                             self.device)
            return {}, {}
        # The probe trains uncompiled: every trial size would otherwise be a fresh compilation.
        probe_cfg = copy.deepcopy(self.cfg)
        probe_cfg.optimization.torch_compile = "none"
        choices, chosen = {}, {}
        for task_type in wanted:
            spec = task_type.spec
            task = self._make_task(task_type, loaders, probe_cfg)
            choice = self._smallest_over_ranks(spec.name, task.find_batch_size(
                int(sections[task_type].auto_batch_max), float(self.cfg.train.auto_batch_vram_headroom)))
            del task
            release_cuda_cache()  # the probe's weights, optimizer state and cached blocks are not the next one's
            choice = dataclasses.replace(choice, configured=int(OmegaConf.select(self.cfg, spec.batch_key)))
            OmegaConf.update(self.cfg, spec.batch_key, choice.batch_size)
            self.tb.add_scalar(f"{spec.tb}perf/auto_batch_found", choice.batch_size, 0)
            self.logger.info("%s auto batch: %s=%d, grad_accum %d, fp16 forced: %s", spec.name, spec.batch_key,
                             choice.batch_size, choice.grad_accum, choice.force_fp16)
            chosen[spec.name] = {"batch_size": choice.batch_size, "grad_accum": choice.grad_accum,
                                 "force_fp16": choice.force_fp16, "trials": len(choice.trials)}
            choices[spec.name] = choice
        return choices, chosen

    def _smallest_over_ranks(self, name: str, choice: BatchChoice) -> BatchChoice:
        """Under DDP every rank must train at one batch size (a rank with more steps per epoch would wait for the
        others' gradients at its last ones): the smallest any rank found, so that it fits on every GPU; fp16
        forced wins a tie."""
        found = all_ranks(self.info, choice)
        chosen = min(found, key=lambda c: (c.batch_size, not c.force_fp16))
        if len({(c.batch_size, c.force_fp16) for c in found}) > 1:
            self.logger.warning("%s auto batch: the ranks found %s; every rank trains at %d (fp16 forced: %s), the "
                                "smallest, so that it fits on every GPU", name,
                                ", ".join(f"{c.batch_size}{' fp16' if c.force_fp16 else ''}" for c in found),
                                chosen.batch_size, chosen.force_fp16)
        return chosen


def memory_bound(choice: BatchChoice) -> bool:
    """Whether memory is what stopped the search (a trial at the chosen precision ran out of memory or over the
    headroom), rather than auto_batch_max; fp32 trials that failed before fp16 was forced say nothing of it."""
    return any(outcome != "fits" for _, fp16, outcome in choice.trials if fp16 == choice.force_fp16)


def _workers_of(loaders: Any, cfg: DictConfig) -> int:
    """The worker count the loaders were built with (the config's, for a build function that does not say)."""
    return int(loaders.meta.get("num_workers", cfg.dataloader.num_workers))


def _failure_or_workers(failure: BaseException | None, loaders: Any, cfg: DictConfig) -> int | tuple[str, str] | None:
    """What rank 0 tells the others after its build: its worker count, or its error as (builtin class, message)."""
    if failure is not None:
        builtin = next(c for c in type(failure).__mro__ if getattr(builtins, c.__name__, None) is c)
        return builtin.__name__, str(failure)
    return None if loaders is None else _workers_of(loaders, cfg)


def _as_builtin(name: str, message: str) -> BaseException:
    """Rank 0's error again on another rank, as the builtin class it is (ValueError stays a config error)."""
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    return cls(f"on rank 0: {message}")
