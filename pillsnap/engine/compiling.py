"""torch.compile for a task's model, announced and warmed up when the task is built, with eager as the fallback."""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn

from pillsnap.engine.distributed import DistInfo, all_ranks
from pillsnap.utils import is_out_of_memory, try_torch_compile
from pillsnap.utils.torch_utils import training_compile_mode

if TYPE_CHECKING:
    from pillsnap.engine.task import Task

LOGGER = logging.getLogger(__name__)


def compile_for_training(task: Task, model: nn.Module) -> nn.Module:
    """`model` compiled per optimization.torch_compile when the task supports it, warmed up now on one training
    chunk of random inputs: a failing backend falls back to eager here (with a warning) instead of in the middle of
    an epoch, and the long first compile is announced instead of looking like a hang."""
    mode = str(task.cfg.optimization.torch_compile)
    if not task.compile_model or mode == "none":
        return model
    LOGGER.info("compiling the %s model with torch.compile(mode=%s): the first steps take longer (minutes for "
                "max-autotune); training compiles as mode=%s, without CUDA graphs, whose outputs the next step "
                "overwrites, the gradients accumulated over chunks among them", task.name, mode,
                training_compile_mode(mode))
    start = time.monotonic()
    compiled = try_torch_compile(model, mode)
    ranks = _process_group()
    # Under DDP the warm-up runs a compiled copy of the bare model: through the DDP wrapper it would broadcast
    # buffers and all-reduce gradients, and a rank whose compile fails would leave the others waiting in those
    # collectives (a crash under gloo, a hang under NCCL). Every rank then trains compiled, or every rank eager.
    trial = compiled if ranks.world_size == 1 or compiled is model else try_torch_compile(task.raw_model, mode)
    failed = compiled is model or trial is task.raw_model
    if not failed:
        try:
            warm_up(task, trial)
        except Exception as err:  # compile backends fail in many ways (no C++ compiler, unsupported op); eager works
            if is_out_of_memory(err):  # the training loop's OOM recovery deals with memory, not the compiler
                LOGGER.warning("%s: the compile warm-up ran out of memory (%s); compiling at the first steps "
                               "instead", task.name, err)
            else:
                LOGGER.warning("%s: torch.compile(mode=%s) failed in its warm-up, training eager instead: %s",
                               task.name, mode, err)
                failed = True
    # on the wait group (train.ddp_timeout_minutes): a rank whose compile failed at once waits here for the others'
    # whole max-autotune compile, which outlasts NCCL's 10-minute watchdog
    if ranks.world_size > 1 and any(all_ranks(ranks, failed)) and not failed:
        LOGGER.warning("%s: torch.compile failed on another rank: every rank trains eager", task.name)
        failed = True
    if failed:
        return model
    LOGGER.info("%s: torch.compile warm-up done in %.1f s", task.name, time.monotonic() - start)
    return compiled


def _process_group() -> DistInfo:
    """The ranks of the process group, when one is up (the task's own DistInfo is set after it is built)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistInfo()


def warm_up(task: Task, model: nn.Module) -> None:
    """One forward and backward of a training chunk through `model`; weights, BatchNorm statistics and gradients
    are restored, so the warm-up leaves no trace in training."""
    saved = copy.deepcopy(task.raw_model.state_dict())
    eager, task.model = task.model, model  # chunk_loss runs through task.model
    try:
        with task.precision.context(task.device):
            loss = task.chunk_loss(task.random_batch(task.knobs.batch_size))
        loss.backward()
    finally:
        task.model = eager
        task.optimizer.zero_grad(set_to_none=True)
        task.raw_model.load_state_dict(saved)
