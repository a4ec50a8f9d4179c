"""What the trainer, loop, checkpoints, callbacks and reports need to know about a task, declared as data.

Each Task class carries one TaskSpec; everything outside the task reads the spec instead of comparing task names,
so a new task is a new Task subclass with its spec, and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """A task's names and roles in a run.

    name: checkpoint files {name}_{last,best}.pt, the metrics.json key, the task in log lines and JSONL records.
    config_section: dotted key of its config section (amp, auto_batch_tune, auto_batch_max).
    batch_key: dotted key of its loader batch size (the auto batch search writes its choice there).
    tb_prefix: TensorBoard tag prefix ("" keeps the design's bare train/loss, val/accuracy...).
    log_prefix: text before its [train] log line.
    checkpoint_aliases: kind -> an extra file name for that checkpoint (hard links: last.pt, best.pt).
    summary_keys: validation metrics copied into metrics.json's entry for the task.
    ratio_index: its share is train.interleave_ratio[ratio_index]; None: one step per cycle, after the others.
    counts_for_time_cap: its samples and classes seen are what the stage time-cap rule counts.
    class_probabilities: its validation gives class probabilities, so reports and calibration apply to it.
    shared_validation: under DDP every rank validates its share of the split (rank 0 joins them); else rank 0
        validates alone while the others wait.
    """

    name: str
    config_section: str = ""
    batch_key: str = ""
    tb_prefix: str | None = None
    log_prefix: str | None = None
    checkpoint_aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    summary_keys: tuple[str, ...] = ()
    ratio_index: int | None = None
    counts_for_time_cap: bool = False
    class_probabilities: bool = False
    shared_validation: bool = False

    @property
    def tb(self) -> str:
        return f"{self.name}/" if self.tb_prefix is None else self.tb_prefix

    @property
    def log(self) -> str:
        return f"({self.name}) " if self.log_prefix is None else self.log_prefix


def spec_of(task: Any) -> TaskSpec:
    """The spec of a task object (a bare spec named after it when it declares none, e.g. a test double)."""
    return getattr(task, "spec", None) or TaskSpec(str(task.name))


def specs_by_name(specs: Iterable[TaskSpec]) -> dict[str, TaskSpec]:
    return {spec.name: spec for spec in specs}


def lookup(specs: Mapping[str, TaskSpec], name: str) -> TaskSpec:
    """The spec registered under `name`, or a bare one (its own TensorBoard folder and log prefix)."""
    return specs.get(name) or TaskSpec(name)


def interleave_shares(specs: Iterable[TaskSpec], ratio: list[int]) -> dict[str, int]:
    """Steps per cycle for each task, in cycle order: tasks named by train.interleave_ratio in its order, then the
    others with one step each."""
    if min(ratio, default=0) < 0 or sum(ratio) < 1:
        raise ValueError(f"train.interleave_ratio must be non-negative steps per task ([detection, classification]) "
                         f"with a positive sum, got {ratio}")
    specs = list(specs)
    for spec in specs:
        if spec.ratio_index is not None and spec.ratio_index >= len(ratio):
            raise ValueError(f"train.interleave_ratio {ratio} has no entry {spec.ratio_index} for task {spec.name}")
    named = sorted((s for s in specs if s.ratio_index is not None), key=lambda s: s.ratio_index)
    shares = {s.name: int(ratio[s.ratio_index]) for s in named}
    shares.update({s.name: 1 for s in specs if s.ratio_index is None})
    return shares
