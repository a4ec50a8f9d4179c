"""Interleaving of detection and classification steps (the design's rule): `step % (d + c) < d` -> detection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

DETECTION, CLASSIFICATION = "detection", "classification"


def interleave_schedule(det_steps: int, cls_steps: int, ratio: Sequence[int] = (1, 1)) -> Iterator[str]:
    """Yield task names, `d` detection steps then `c` classification steps, repeated.

    When one task has no steps left the other one continues alone, so exactly `det_steps`
    detection and `cls_steps` classification names are produced.
    """
    if len(ratio) != 2 or min(ratio) < 0 or sum(ratio) < 1:
        raise ValueError(f"train.interleave_ratio must be [det>=0, cls>=0] with a positive sum, got {ratio}")
    d, c = int(ratio[0]), int(ratio[1])
    # A zero share for a task that still has steps would starve it: give it the leftover tail instead.
    step, left = 0, {DETECTION: det_steps, CLASSIFICATION: cls_steps}
    while left[DETECTION] > 0 or left[CLASSIFICATION] > 0:
        wanted = DETECTION if step % (d + c) < d else CLASSIFICATION
        other = CLASSIFICATION if wanted == DETECTION else DETECTION
        name = wanted if left[wanted] > 0 else other
        left[name] -= 1
        step += 1
        yield name
