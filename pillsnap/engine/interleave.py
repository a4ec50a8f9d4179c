"""Interleaving of the tasks' steps (the design's rule for two tasks: `step % (d + c) < d` -> detection)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


def interleave_schedule(steps: Mapping[str, int], shares: Mapping[str, int]) -> Iterator[str]:
    """Yield task names: each task's share of consecutive steps, in the order of `shares`, repeated.

    When the task whose turn it is has no steps left, the next one in order that has steps takes the slot, so
    exactly steps[name] names are produced for every task (a task with a zero share gets the leftover tail).
    """
    if set(steps) - set(shares):
        raise ValueError(f"no interleave share for {sorted(set(steps) - set(shares))}")
    order = [name for name in shares if name in steps]
    left = {name: int(steps[name]) for name in order}
    if not order:
        return
    cycle = [name for name in order for _ in range(max(int(shares[name]), 0))] or order
    step = 0
    while any(left.values()):
        wanted = order.index(cycle[step % len(cycle)])
        name = next(n for n in order[wanted:] + order[:wanted] if left[n] > 0)
        left[name] -= 1
        step += 1
        yield name
