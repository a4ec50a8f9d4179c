"""The train/val/test split of the scan: whole split groups of near-duplicate photos, AI Hub's partition honoured.

A split group (`split_group`, see scan_chunk.split_group) is a combination with all its camera angles and shots,
or one single-pill sweep. Groups are drawn within strata (a class for single-pill photos, all combinations
together) in the order of a salted hash, so the split is deterministic for `data.split_seed`. Where the data holds
AI Hub's own `Validation` photos of a kind (single or combination), those groups are the test split of that kind
and val is drawn from the `Training` groups; otherwise test and val are both drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pillsnap.data.scan_chunk import SPLIT_KEY

LOGGER = logging.getLogger(__name__)
COMBO_STRATUM = "__combination__"  # combination photos are one stratum (their pills span classes)
SPLITS = np.array(["train", "val", "test"], dtype=object)
TRAIN, VAL, TEST = 0, 1, 2
# AI Hub's Validation is a test split when its groups hold at least half of this share (or of data.test_ratio, if
# smaller) of a kind's photos: 10 of its 91 single-pill zips are Validation zips, about 11 %
MIN_HELD_SHARE = 0.1
_COLUMNS = ["mapping_code", "image_type", "photo_id", "aihub_part", SPLIT_KEY]


def _part_groups(path: Path) -> pd.DataFrame:
    """One row per split group of one part: stratum, image type, photos, photos from AI Hub Validation."""
    frame = pq.read_table(path, columns=_COLUMNS).to_pandas().drop_duplicates("photo_id")
    frame["stratum"] = frame["mapping_code"].where(frame["image_type"] == "single", COMBO_STRATUM)
    frame["aihub_val"] = frame["aihub_part"] == "Validation"
    return frame.groupby(SPLIT_KEY).agg(stratum=("stratum", "first"), image_type=("image_type", "first"),
                                        photos=("photo_id", "size"), aihub_val=("aihub_val", "sum"))


def collect_groups(part_files: list[Path]) -> pd.DataFrame:
    """Split groups over all parts (a group can span parts: one class in a Training and a Validation zip)."""
    frames = [_part_groups(p) for p in part_files]
    frames = [f for f in frames if len(f)] or [pd.DataFrame(columns=["stratum", "image_type", "photos", "aihub_val"])]
    groups = pd.concat(frames)
    return groups.groupby(level=0).agg(stratum=("stratum", "first"), image_type=("image_type", "first"),
                                       photos=("photos", "sum"), aihub_val=("aihub_val", "sum"))


def _take(photos: np.ndarray, target: int, min_groups: int, max_groups: int) -> int:
    """How many leading groups hold `target` photos (at least `min_groups`, at most `max_groups`)."""
    needed = int(np.searchsorted(np.cumsum(photos), target) + 1) if target > 0 else 0
    return max(0, min(max(needed, min_groups), max_groups))


def _draw(photos: np.ndarray, ratios: tuple[float, float]) -> np.ndarray:
    """Split codes for groups in hash order: test first, then val, by photo share; every stratum of >= 3 groups
    gets at least one group of each non-zero share, and train keeps at least one group."""
    codes = np.full(len(photos), TRAIN, dtype=np.int8)
    n, total, start = len(photos), int(photos.sum()), 0
    for code, ratio in ((TEST, ratios[1]), (VAL, ratios[0])):
        k = _take(photos[start:], round(total * ratio), 1 if n >= 3 and ratio > 0 else 0, n - start - 1)
        codes[start:start + k] = code
        start += k
    return codes


def _assign_stratum(group: pd.DataFrame, honour: bool, val_ratio: float,
                    test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(group hashes, split codes) of one stratum."""
    group = group.sort_index()  # the salted hash order
    if not honour:
        return group.index.to_numpy(), _draw(group["photos"].to_numpy(), (val_ratio, test_ratio))
    held = (2 * group["aihub_val"] >= group["photos"]).to_numpy()  # mostly AI Hub Validation photos
    codes = np.where(held, TEST, TRAIN).astype(np.int8)
    codes[~held] = _draw(group["photos"].to_numpy()[~held], (val_ratio, 0.0))
    return group.index.to_numpy(), codes


def _assign_kind(of_kind: pd.DataFrame, honour: bool, val_ratio: float,
                 test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(group hashes, split codes) of one image type, stratum by stratum."""
    parts = [_assign_stratum(group, honour, val_ratio, test_ratio) for _, group in of_kind.groupby("stratum")]
    return np.concatenate([k for k, _ in parts]), np.concatenate([c for _, c in parts])


def unusable_test(of_kind: pd.DataFrame, keys: np.ndarray, codes: np.ndarray, test_ratio: float) -> str | None:
    """Why AI Hub's Validation groups cannot be a kind's test split, or None when they can: they hold under half of
    `test_ratio` or of MIN_HELD_SHARE of the photos, whichever is smaller (Validation photos scattered through
    sweeps of mostly Training photos follow their groups out of test), or most of their photos are of classes
    with no training group (AI Hub held out other drugs, not other photos of the same drugs: a test of classes the
    classifier never trains)."""
    frame = of_kind.loc[keys].assign(code=codes)
    in_test = frame["code"].eq(TEST)
    total, held = int(frame["photos"].sum()), int(frame.loc[in_test, "photos"].sum())
    floor = 0.5 * min(test_ratio, MIN_HELD_SHARE)  # AI Hub's own share may differ from test_ratio; not by this much
    if held < floor * total:
        return f"its Validation groups hold {held} of {total} photos, under the {floor:.1%} a test split needs"
    trained = set(frame.loc[frame["code"].eq(TRAIN), "stratum"])
    untrained = int(frame.loc[in_test & ~frame["stratum"].isin(trained), "photos"].sum())
    if of_kind["image_type"].iloc[0] == "single" and 2 * untrained > held:
        return f"{untrained} of its {held} Validation photos are of drugs with no Training photo"
    return None


def assign_splits(groups: pd.DataFrame, val_ratio: float, test_ratio: float) -> tuple[pd.Series, dict]:
    """Split code (0 train, 1 val, 2 test) per split group hash, and a summary of the rule applied."""
    keys, codes, honoured, fallback, moved = [], [], {}, {}, 0
    for kind, of_kind in groups.groupby("image_type"):
        honour = bool(of_kind["aihub_val"].sum() > 0)
        k, c = _assign_kind(of_kind, honour, val_ratio, test_ratio)
        why = unusable_test(of_kind, k, c, test_ratio) if honour and test_ratio > 0 else None
        if why is not None:  # drawn as for data without AI Hub's partition
            LOGGER.warning("split: AI Hub's Validation photos of the %s kind cannot be its test split (%s): test is "
                           "drawn from all its groups (data.test_ratio=%g) instead", kind, why, test_ratio)
            fallback[str(kind)] = why
            honour = False
            k, c = _assign_kind(of_kind, honour, val_ratio, test_ratio)
        honoured[str(kind)] = honour
        if honour:  # Validation photos that followed their group out of test (a kind drawn as usual moves none)
            moved += int(of_kind.loc[k[c != TEST], "aihub_val"].sum())
        keys.append(k)
        codes.append(c)
    series = pd.Series(np.concatenate(codes) if codes else np.zeros(0, np.int8),
                       index=np.concatenate(keys) if keys else np.zeros(0, np.int64))
    summary = {"groups": int(len(groups)), "aihub_validation_is_test": honoured,
               "aihub_validation_photos_not_in_test": moved, "aihub_validation_not_usable": fallback}
    if moved:
        LOGGER.warning("split: %d AI Hub Validation photos share a split group with more Training photos and "
                       "follow their group out of the test split", moved)
    return series, summary


def with_split(table: pa.Table, splits: pd.Series) -> pa.Table:
    """Fill the `split` column of a part from its groups' split codes and drop the group hash."""
    keys = table.column(SPLIT_KEY).to_numpy()
    codes = splits.to_numpy()[splits.index.get_indexer(keys)]
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(SPLITS[codes], pa.string()))
    return table.drop_columns([SPLIT_KEY])
