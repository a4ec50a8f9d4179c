"""Progressive stage sampling (seed: stage 1-4), class-stratified, nested and deterministic.

A class's rank and a photo's rank come from a salted hash, so stage k (more classes, larger quota) always
contains stage k-1's classes and photos, and the same seed always gives the same stage.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pillsnap.config import stage_settings
from pillsnap.utils.arrays import place_in_runs

LOGGER = logging.getLogger(__name__)


def stable_hash(seed: int, values: Iterable[str]) -> np.ndarray:
    """Deterministic 63-bit hash per string, salted by `seed` (63 bits so int64 keeps -1 free as a sentinel).

    Vectorised SipHash (pandas.util.hash_array): the scan hashes every photo id, so this must be cheap.
    """
    key = hashlib.md5(str(seed).encode()).hexdigest()[:16]
    array = np.asarray(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, dtype=object)
    if not len(array):
        return np.zeros(0, dtype=np.int64)
    return (pd.util.hash_array(array, hash_key=key) >> np.uint64(1)).astype(np.int64)


def stage_classes(codes: Iterable[str], max_classes: int, seed: int) -> list[str]:
    """The `max_classes` codes of lowest hash rank, sorted by code (nested: a prefix of one fixed ranking)."""
    codes = sorted(set(codes))
    if max_classes <= 0:
        raise ValueError(f"max_classes must be positive, got {max_classes}")
    ranked = [codes[i] for i in np.argsort(stable_hash(seed, codes), kind="stable")]
    return sorted(ranked[:max_classes])


def _factorized(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's index into the column's distinct values (a missing value is one of them), and those values."""
    codes, uniques = pd.factorize(column, use_na_sentinel=False)
    return codes, np.asarray(uniques, dtype=object)


def _take_per_group(group: np.ndarray, rank: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Positions (into the arrays) of the rows kept: within each `group`, the `quota` rows of lowest `rank`, ties in
    row order."""
    order = np.lexsort((np.arange(len(group)), rank, group))
    return np.sort(order[place_in_runs(group[order]) < quota[order]])


def _sample_singles(code: np.ndarray, split: np.ndarray, photo_rank: np.ndarray, per_class: int) -> np.ndarray:
    """Positions of the single-pill rows kept (given each row's class code, split and photo rank): up to
    `per_class` training and validation photos of each class, each split its share of them, and the test split's
    photos in the same proportion on top: the design's stage sizes count the photos a stage trains and validates on
    (Stage 3: 81,475 + 18,525), and the test split is held back until the end."""
    split_code, split_names = _factorized(pd.Series(split))
    group = code.astype(np.int64) * len(split_names) + split_code
    split_size = np.bincount(group, minlength=int(group.max(initial=-1)) + 1)[group]
    not_test = np.asarray([name != "test" for name in split_names])[split_code]
    used = np.bincount(code, weights=not_test, minlength=int(code.max(initial=-1)) + 1)[code].astype(np.int64)
    # a class held out whole (test only) keeps its test share of the quota as it had
    used = np.where(used > 0, used, split_size)
    quota = np.minimum(np.ceil(per_class * split_size / used), split_size).astype(int)
    return _take_per_group(group, photo_rank, quota)


def _sample_combinations(photo: np.ndarray, hit: np.ndarray, photo_ids: np.ndarray, photo_rank: np.ndarray,
                         max_photos: int) -> np.ndarray:
    """Positions of the combination rows kept, given each row's photo (an index into `photo_ids`, whose ranks are
    `photo_rank`) and whether its pill is a stage class. Detection is class-agnostic: a combination photo serves the
    stage when any of its pills is a stage class; at most `max_photos` such photos, those of lowest rank."""
    served = np.unique(photo[hit])
    served = served[np.argsort(photo_ids[served].astype(str), kind="stable")]  # ties in rank go by photo id
    keep = np.zeros(len(photo_ids), dtype=bool)
    keep[served[np.argsort(photo_rank[served], kind="stable")[:max_photos]]] = True
    return np.flatnonzero(keep[photo])


def classification_candidates(manifest: pd.DataFrame, cfg: DictConfig) -> pd.Series:
    """Rows that can train or test the classifier: single-pill rows and, with `data.combo_crops`, the pills of
    combination photos; in both cases only pills whose own box is sound (`box_issue` empty)."""
    kinds = ["single", "combination"] if bool(cfg.data.combo_crops) else ["single"]
    sound = manifest["box_issue"].fillna("").eq("") if "box_issue" in manifest else True
    return manifest["image_type"].isin(kinds) & sound


def classification_rows(stage_rows: pd.DataFrame) -> pd.DataFrame:
    """The stage's classifier rows (select_stage marks them in `stage_class`)."""
    return stage_rows[stage_rows["stage_class"]]


def _no_classification_rows(cfg: DictConfig, manifest: pd.DataFrame) -> ValueError:
    if not bool(cfg.data.combo_crops) and (manifest["image_type"] == "combination").any():
        return ValueError("The manifest has no single-pill rows and data.combo_crops=false: set "
                          "data.combo_crops=true so that the pills of combination photos train the classifier")
    return ValueError("The manifest has no soundly boxed pill to classify: check scan_report.json "
                      "(skipped records, label_checks) and rerun `pillsnap data scan`")


def select_stage(manifest: pd.DataFrame, cfg: DictConfig, stage: int | None = None) -> pd.DataFrame:
    """Rows of `manifest` used by `stage` (default data.progressive_validation.current_stage), with a bool column
    `stage_class`: the row is one of the stage's classifier rows (see classification_candidates).

    Classes are drawn from the classifier candidates with a training row (so a class seen only in combination
    photos can be one), and a class left with none after sampling is not a stage class (_trained).
    Single-pill rows: `max_classes` classes, about `max_samples / max_classes` training and validation photos per
    class (split shares kept), and test photos in proportion on top. Combination rows: photos with at least one
    stage class, at most `max_samples` photos; their pills of stage classes classify when `data.combo_crops` is on.
    With progressive validation disabled every row is used.
    """
    candidates = classification_candidates(manifest, cfg).to_numpy(dtype=bool, na_value=False)
    if not candidates.any():
        raise _no_classification_rows(cfg, manifest)
    code, class_codes = _factorized(manifest["mapping_code"])
    split = manifest["split"].to_numpy(dtype=object, na_value=np.nan)  # pd.NA cannot be compared
    if not cfg.data.progressive_validation.enabled:
        stage_class = _trained(code, class_codes, split, candidates, stage)
        return manifest.assign(stage_class=stage_class).reset_index(drop=True)
    settings = stage_settings(cfg, stage)
    seed = int(cfg.data.split_seed)
    # Worked on per-row arrays of codes, and the frame is cut once at the end: at Stage 4's 2.6 M rows, filtering,
    # sorting and `isin` on the frame's string columns took ~45 s and ~6 GB.
    # Drawn among the drugs with a training row: one seen only in a held-out combination photo would be an output
    # the classifier never trains and a test class always wrong.
    trainable = candidates & (split == "train")
    pool = np.unique(code[trainable if trainable.any() else candidates])
    classes = stage_classes(class_codes[pool].tolist(), int(settings.max_classes), seed)
    if len(classes) < int(settings.max_classes):  # AI Hub's "5,000 kinds" hold about 4,500 drugs with photos
        LOGGER.warning("stage %s asks for %d classes; the data has %d with a training row: the stage trains on "
                       "those, each with a larger share of max_samples", stage or
                       cfg.data.progressive_validation.current_stage, int(settings.max_classes), len(classes))
    per_class = max(1, math.ceil(int(settings.max_samples) / len(classes)))
    in_stage = pd.Series(class_codes).isin(classes).to_numpy()[code]
    photo, photo_ids = _factorized(manifest["photo_id"])
    kind = manifest["image_type"]
    singles = np.flatnonzero(kind.eq("single").to_numpy(dtype=bool, na_value=False) & in_stage)
    combos = np.flatnonzero(kind.eq("combination").to_numpy(dtype=bool, na_value=False))
    photo_rank = np.zeros(len(photo_ids), dtype=np.int64)  # ranked: the photos that can be drawn (Stage 1: few)
    ranked = np.unique(np.concatenate([photo[singles], photo[combos[in_stage[combos]]]]))
    photo_rank[ranked] = stable_hash(seed, photo_ids[ranked])
    chosen = singles[_sample_singles(code[singles], split[singles], photo_rank[photo[singles]], per_class)]
    kept_combos = combos[_sample_combinations(photo[combos], in_stage[combos], photo_ids, photo_rank,
                                              int(settings.max_samples))]
    keep = np.zeros(len(manifest), dtype=bool)
    keep[chosen] = keep[kept_combos] = True
    rows = manifest[keep]  # the frame cut once: each cut passes over all of its string columns
    taken = np.flatnonzero(keep)
    if not manifest.index.is_monotonic_increasing:  # the rows in the manifest's index order, as always
        order = np.argsort(manifest.index.to_numpy()[taken], kind="stable")
        rows, taken = rows.iloc[order], taken[order]
    stage_class = _trained(code[taken], class_codes, split[taken], candidates[taken] & in_stage[taken], stage)
    LOGGER.info("stage %s: %d classes, %d single rows (<= %d per class), %d combination photos",
                stage or cfg.data.progressive_validation.current_stage, len(np.unique(code[taken][stage_class])),
                len(chosen), per_class, len(np.unique(photo[kept_combos])))
    return rows.assign(stage_class=stage_class).reset_index(drop=True)


_SAID: set[tuple] = set()  # the warnings _trained gave in this process


def _trained(code: np.ndarray, class_codes: np.ndarray, split: np.ndarray, stage_class: np.ndarray,
             stage: int | None) -> np.ndarray:
    """`stage_class` (per row, rows given by their class `code` into `class_codes` and their split) without the
    classes that kept no training row (their only photos held out, or sampled away with the stage's combination
    photos), said in the log: such a class would be a classifier output never trained, and every one of its
    validation and test pills wrong. Their photos still serve the detector."""
    trained = np.zeros(len(class_codes), dtype=bool)
    trained[code[stage_class & (split == "train")]] = True
    untrained = stage_class & ~trained[code]
    if untrained.any():
        left = sorted(class_codes[np.unique(code[untrained])].tolist())
        said = (stage, len(code), tuple(left))
        if said in _SAID:  # the loaders, the stage evaluation and the reports each select the stage
            return stage_class & ~untrained
        _SAID.add(said)
        LOGGER.warning("stage %s: %d class(es) have no training row among the stage's rows and are left out of the "
                       "classifier (their %d held-out pill(s) serve detection only): %s%s", stage or "-", len(left),
                       int(untrained.sum()), ", ".join(left[:10]), " ..." if len(left) > 10 else "")
    return stage_class & ~untrained


def sample_by_kind(photos: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """At most `n` rows of `photos` (one per photo), as many of each `image_type` drawn at random with `seed` (what
    a kind with too few photos cannot use goes to the others), and each row's weight: its kind's share of `photos`
    over the rows drawn of it, normalised over the kinds drawn (the weights sum to 1). Nine in ten real photos show
    one pill: a plain draw of ten would hold no combination photo a third of the time, and the manifest's first
    rows are combination photos only."""
    kinds = [group for _, group in photos.groupby(photos["image_type"].fillna(""), sort=True)]
    take, left = {}, max(int(n), 0)
    for position, i in enumerate(sorted(range(len(kinds)), key=lambda k: len(kinds[k]))):
        take[i] = min(len(kinds[i]), left // (len(kinds) - position))
        left -= take[i]
    drawn = [group.sample(n=take[i], random_state=seed) for i, group in enumerate(kinds) if take[i]]
    if not drawn:
        return photos.iloc[:0], np.zeros(0)
    weights = np.concatenate([np.full(take[i], len(group) / take[i]) for i, group in enumerate(kinds) if take[i]])
    return pd.concat(drawn), weights / weights.sum()
