"""Prediction sets with a coverage guarantee: split conformal prediction over a classifier's answers.

Each calibration answer gets a nonconformity score from its candidates' probabilities (best first) and the true
class. The threshold is the ceil((n + 1) * coverage)-th smallest of n such scores; a new answer's set holds every
candidate whose score would be at most that threshold. When calibration and new answers are exchangeable, the set
holds the right class with probability at least `coverage` (Angelopoulos & Bates, "A gentle introduction to
conformal prediction and distribution-free uncertainty quantification", 2021). Arrays and plain values only.

Two scores:
- "aps" (adaptive prediction sets, Romano et al. 2020, without the random tie-break): the probability mass of the
  candidates down to and including the right one. Sets grow where the answer is spread over several candidates.
- "lac" (least ambiguous classifier, Sadinle et al. 2019): one minus the right candidate's probability. The
  smallest sets on average, less adaptive.
The top candidate is always in the set: a set is never empty because the threshold is tight (that only adds
coverage). A right class outside the candidates scores infinity: no threshold covers it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

SET_METHODS = {
    "aps": "the candidates' probability mass down to the right one (sets adapt to how spread the answer is)",
    "lac": "one minus the right candidate's probability (smallest sets on average)",
}


def check_set_method(name: str) -> str:
    if name not in SET_METHODS:
        raise ValueError(f"prediction-set method must be one of {sorted(SET_METHODS)}, got {name!r}")
    return name


def candidate_scores(method: str, probabilities: Sequence[float]) -> np.ndarray:
    """The score each candidate (probabilities best first) would have if it were the right one."""
    p = np.asarray(probabilities, np.float64)
    return np.cumsum(p) if check_set_method(method) == "aps" else 1.0 - p


def nonconformity(method: str, probabilities: Sequence[float], true_index: int | None) -> float:
    """One calibration answer's score: `true_index` is the right class's place among the candidates (None: not
    among them, infinity)."""
    if true_index is None or true_index >= len(probabilities):
        return math.inf
    return float(candidate_scores(method, probabilities)[true_index])


def scores_to_json(scores: Sequence[float]) -> list[float | None]:
    """Scores as calibration.json stores them: JSON has no infinity, so a right class outside the candidates is
    null."""
    return [round(float(s), 9) if math.isfinite(s) else None for s in scores]


def scores_from_json(stored: Sequence[float | None]) -> np.ndarray:
    """The scores stored by scores_to_json, null read back as infinity."""
    return np.asarray([math.inf if s is None else float(s) for s in stored], np.float64)


def conformal_threshold(scores: Sequence[float], coverage: float) -> float:
    """The threshold that gives sets of at least `coverage` on answers exchangeable with these: the
    ceil((n + 1) * coverage)-th smallest score; infinity (every candidate in every set) when there are too few
    scores for that coverage."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = math.ceil((len(ordered) + 1) * coverage)
    return float(ordered[rank - 1]) if rank <= len(ordered) else math.inf


def coverage_low(n: int, coverage: float, chance: float = 0.05) -> float | None:
    """The coverage a set threshold calibrated on `n` answers falls below only with probability `chance` (over
    calibration draws): split conformal's coverage, given the calibration answers, follows Beta(k, n + 1 - k) with k
    the threshold's rank (Vovk 2012; Angelopoulos & Bates 2021, section 3.2). Its mean, k / (n + 1), is at least
    `coverage` (the guarantee); a small calibration spreads it. None when `n` gives no threshold."""
    from scipy.stats import beta

    rank = math.ceil((n + 1) * coverage)
    if n < 1 or rank > n:
        return None
    return float(beta.ppf(chance, rank, n + 1 - rank))


def no_threshold_reason(scores: Sequence[float], coverage: float) -> str | None:
    """Why the scores give no finite threshold at `coverage` (None when they do): too few of them, or the right
    class outside the candidates (an infinite score) in more of them than the coverage may leave out. Either way
    no set of those candidates holds the right class that often, so none may claim to."""
    values = np.asarray(scores, np.float64)
    if math.isfinite(conformal_threshold(values, coverage)):
        return None
    n = len(values)
    rank = math.ceil((n + 1) * coverage)
    if rank > n:
        needed = n + 1
        while math.ceil((needed + 1) * coverage) > needed:  # the rank rule's own arithmetic, floats and all
            needed += 1
        return f"{n} calibration answers are too few for {coverage:.0%} coverage (at least {needed} are needed)"
    found = int(np.isfinite(values).sum())
    return (f"the candidates (inference.topk) hold the right drug in {found} of the {n} calibration answers "
            f"({1 - found / n:.1%} missed), and {coverage:.0%} coverage needs it in at least {rank}: raise "
            f"inference.topk or lower inference.prediction_set.coverage")


def _own_scores(scores: Sequence[float], groups: Sequence[str | None],
                min_count: int) -> Iterator[tuple[str, np.ndarray]]:
    """(group, its scores) for each group with at least `min_count` scores, in name order; scores of no group
    (None) are left out."""
    labels = np.asarray([None if g is None else str(g) for g in groups], object)
    values = np.asarray(scores, np.float64)
    if len(labels) != len(values):
        raise ValueError(f"{len(values)} scores but {len(labels)} groups")
    for group in sorted({g for g in labels if g is not None}):
        own = values[labels == group]
        if len(own) >= min_count:
            yield group, own


def group_thresholds(scores: Sequence[float], groups: Sequence[str | None], coverage: float,
                     min_count: int) -> dict[str, float]:
    """Each group's own threshold at `coverage` (Mondrian conformal prediction: sets calibrated on a group's answers
    hold the right class at least that often on that group's new answers, not only over all groups), for the groups
    with at least `min_count` scores and a finite threshold; scores of no group (None) are left out."""
    thresholds = {group: conformal_threshold(own, coverage) for group, own in _own_scores(scores, groups, min_count)}
    return {group: t for group, t in thresholds.items() if math.isfinite(t)}


def group_refusals(scores: Sequence[float], groups: Sequence[str | None], coverage: float,
                   min_count: int) -> dict[str, str]:
    """The groups with `min_count` scores of their own that still give no threshold at `coverage` (their candidates
    miss the right class too often), each with why: the threshold over every group would give their sets a
    coverage their own answers do not have, so they get none."""
    reasons = {group: no_threshold_reason(own, coverage) for group, own in _own_scores(scores, groups, min_count)}
    return {group: reason for group, reason in reasons.items() if reason is not None}


def lower_bound(scores: Sequence[float], miss_rate: float) -> float:
    """A one-sided conformal bound: a new score exchangeable with these falls below it with probability at most
    `miss_rate`. The floor((n + 1) * miss_rate)-th smallest score; minus infinity (nothing falls below) when there
    are too few scores for that rate."""
    if not 0.0 < miss_rate < 1.0:
        raise ValueError(f"miss rate must be between 0 and 1, got {miss_rate}")
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = math.floor((len(ordered) + 1) * miss_rate)
    return float(ordered[rank - 1]) if rank >= 1 else -math.inf


def set_size(method: str, probabilities: Sequence[float], threshold: float, fill_to: float | None = None) -> int:
    """How many of the candidates (probabilities best first) the set holds: those scoring at most `threshold`,
    and always the top one. With APS the scores grow down the list, so the set is a prefix; with LAC too, since
    the candidates come best first. `fill_to`: at least as many as it takes for their probabilities to add up to
    it (mass_size)."""
    if not len(probabilities):
        return 0
    inside = candidate_scores(method, probabilities) <= threshold
    size = max(1, int(np.argmin(inside)) if not inside.all() else len(inside))
    return size if fill_to is None else max(size, mass_size(probabilities, fill_to))


def mass_size(probabilities: Sequence[float], level: float) -> int:
    """How many of the candidates (probabilities best first) it takes for their probabilities to add up to
    `level`; all of them when they never do."""
    reached = np.flatnonzero(np.cumsum(np.asarray(probabilities, np.float64)) >= level - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(probabilities)


def coverage_report(covered: Sequence[bool], sizes: Sequence[int]) -> dict:
    """Empirical coverage and set sizes of answers given as (right class in its set?, set size)."""
    covered_arr, sizes_arr = np.asarray(covered, bool), np.asarray(sizes, np.int64)
    if not len(covered_arr):
        return {"n": 0, "coverage": None, "mean_set_size": None, "sure_share": None}
    return {"n": int(len(covered_arr)), "coverage": float(covered_arr.mean()),
            "mean_set_size": float(sizes_arr.mean()), "sure_share": float((sizes_arr == 1).mean())}
