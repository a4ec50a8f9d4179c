"""Preprocessed crop cache: each classifier row (a pill) decoded, cropped and resized once into uint8 memory-mapped
.npy shards, so that training reads a slice of a page-cached file instead of decoding a 976x1280 PNG.

Keyed by the manifest row's `label_path` (unique per row); building is incremental (only rows missing from
the index are decoded) and each shard is written to a temp file and moved into place. A row whose photo cannot be
decoded is kept in the index as unreadable (shard -1): training leaves it out, a later build that can write tries it
again, and a read-only cache lacking only such rows, no more than UNREADABLE_LIMIT of those asked, is used as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pillsnap.data.datasets import crop_rows, pill_crop
from pillsnap.utils import atomic_path, ensure_dir, read_json, save_json
from pillsnap.utils.devices import usable_cores
from pillsnap.utils.images import DECODE_ERRORS
from pillsnap.utils.io import check_free_space
from pillsnap.utils.locks import BusyError, file_lock
from pillsnap.utils.pools import forked_imap

LOGGER = logging.getLogger(__name__)
BUILD_LOCK = "build.lock"  # in a cache's folder: held by the process adding crops to it
UNREADABLE = (-1, -1)  # the slot of a row whose photo could not be decoded
# A read-only cache may lack at most this share of the rows asked of it as unreadable (the share of unreadable data
# the stage advisor tolerates): more than that, the photos were more likely out of reach when it was built (a share
# not mounted) than broken, and training on what is left would be training on a part of the data without a word.
UNREADABLE_LIMIT = 0.01
SHARD_ROWS = 2048  # 2048 x 384 x 384 x 3 = 0.9 GB per shard at full size: big sequential files, few of them


OWN_FOLDER = "point paths.cache_dir at a folder of your own, or train from the photos (data.cache.enabled=false)"


class CacheError(ValueError):
    """A crop cache that cannot be made or added to (its folder cannot be created or written): one line."""


class CachedCrops:
    """Read side of the cache: `get(label_path)` -> PIL RGB crop of size image_size (KeyError if absent).
    `index`: the rows with a crop; `unreadable`: the rows whose photos could not be decoded when it was built."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = read_json(self.root / "meta.json")
        self.image_size = int(meta["image_size"])
        index = pd.read_parquet(self.root / "index.parquet") if (self.root / "index.parquet").is_file() else None
        entries = [] if index is None else list(zip(index["key"], index["shard"], index["offset"], strict=True))
        self.index: dict[str, tuple[int, int]] = {k: (int(s), int(o)) for k, s, o in entries if s >= 0}
        self.unreadable: frozenset[str] = frozenset(k for k, s, _ in entries if s < 0)
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """(shard, offset) of each key as an int array [n, 2]; (-1, -1) where the key has no crop. A dataset looks
        its rows up once, so that its loader workers read array slots instead of this dict (see CropTable)."""
        return np.array([self.index.get(key, UNREADABLE) for key in keys], dtype=np.int64).reshape(len(keys), 2)

    def read(self, shard: int, offset: int) -> Image.Image:
        """The crop at a slot from `slots`; KeyError for a key that had none."""
        if shard < 0:
            raise KeyError("no cached crop for this row (it could not be decoded when the cache was built)")
        if shard not in self._shards:
            self._shards[shard] = np.load(self.root / f"shard_{shard:05d}.npy", mmap_mode="r")
        return Image.fromarray(np.ascontiguousarray(self._shards[shard][offset]), "RGB")

    def get(self, key: str) -> Image.Image:
        return self.read(*self.index[key])

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened lazily in each DataLoader worker instead of being pickled.
        return {**self.__dict__, "_shards": {}}


def cache_root(cache_dir: str | Path, image_size: int, crop_margin: float) -> Path:
    return Path(cache_dir) / f"crops_s{image_size}_m{crop_margin:g}"


class _CropJob:
    """Picklable worker: one manifest row -> uint8 [S, S, 3] crop, or None when it cannot be decoded."""

    def __init__(self, image_size: int, crop_margin: float) -> None:
        self.image_size, self.crop_margin = image_size, crop_margin

    def __call__(self, row: Any) -> np.ndarray | None:
        try:
            crop = pill_crop(row, self.crop_margin)
        except DECODE_ERRORS as err:
            LOGGER.warning("cache: skipping undecodable %s: %s", row.image_path, err)
            return None
        return np.asarray(crop.resize((self.image_size, self.image_size), Image.BILINEAR), dtype=np.uint8)


def _crops(rows: pd.DataFrame, job: _CropJob, workers: int) -> Any:
    items = crop_rows(rows)
    if workers <= 1 or len(items) < 64:
        yield from map(job, items)
        return
    yield from forked_imap(job, items, workers, chunksize=16)


def _write_shard(root: Path, shard: int, arrays: list[np.ndarray], size: int) -> None:
    path = root / f"shard_{shard:05d}.npy"
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(arrays), size, size, 3))
        for i, arr in enumerate(arrays):
            out[i] = arr
        out.flush()
        del out


def _save_index(root: Path, index: dict[str, tuple[int, int]], unreadable: set[str]) -> None:
    """The crops' slots, and each unreadable row at shard -1, in one file written atomically."""
    entries = {**dict.fromkeys(sorted(unreadable), UNREADABLE), **index}
    frame = pd.DataFrame({"key": list(entries), "shard": [v[0] for v in entries.values()],
                          "offset": [v[1] for v in entries.values()]})
    with atomic_path(root / "index.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def build_cache(rows: pd.DataFrame, cache_dir: str | Path, image_size: int, crop_margin: float,
                workers: int = 0, progress: bool = False) -> CachedCrops:
    """Make sure every row (the classifier's manifest rows) has a cached crop; returns the read side.

    One process at a time adds to a cache (two experiments share `paths.cache_dir` by default): two builders
    would each number their shards from the same index and write over each other's, and an index would then
    name another row's crop under a label, silently. A second builder waits, then adds only what is still
    missing. A cache that lacks nothing is only read, and may be read-only (a teammate's, a shared mount); so may
    one that lacks only rows recorded as unreadable, no more than UNREADABLE_LIMIT of them."""
    root = cache_root(cache_dir, image_size, crop_margin)
    if (root / "meta.json").is_file():
        cache = CachedCrops(root)
        lacking = rows.loc[~rows["label_path"].isin(cache.index), "label_path"]
        if lacking.empty:
            return cache
        if lacking.isin(cache.unreadable).all() and not os.access(root, os.W_OK):
            count = lacking.nunique()
            share = count / rows["label_path"].nunique()
            if share > UNREADABLE_LIMIT:
                raise CacheError(f"the crop cache {root} cannot be written, and {count} of these rows "
                                 f"({share:.1%}) have no crop in it: their photos could not be decoded when it was "
                                 f"built, more than the {UNREADABLE_LIMIT:.0%} a cache may lack (were the photos out "
                                 f"of reach then?). Build it again where they can be read, or {OWN_FOLDER}")
            LOGGER.warning("the crop cache %s cannot be written, and %d of these rows have no crop in it: their "
                           "photos could not be decoded when it was built. Training leaves them out", root, count)
            return cache
    try:
        ensure_dir(root)
    except OSError as err:
        raise CacheError(f"the crop cache folder {root} cannot be created ({err.strerror}): {OWN_FOLDER}") from err
    if not os.access(root, os.W_OK):
        raise CacheError(f"the crop cache {root} lacks crops of these rows and its folder cannot be written: "
                         f"{OWN_FOLDER}")
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(root / BUILD_LOCK, role="cache"))
        except BusyError as err:
            LOGGER.info("the crop cache %s is being added to by another process (%s): waiting for it", root, err)
            held.enter_context(file_lock(root / BUILD_LOCK, wait=True, role="cache"))
        return _add_missing(rows, root, image_size, crop_margin, workers, progress)


def _add_missing(rows: pd.DataFrame, root: Path, image_size: int, crop_margin: float, workers: int,
                 progress: bool) -> CachedCrops:
    if not (root / "meta.json").is_file():
        save_json(root / "meta.json", {"image_size": image_size, "crop_margin": crop_margin, "format": "npy"})
    cache = CachedCrops(root)
    missing = rows[~rows["label_path"].isin(cache.index)].drop_duplicates("label_path")
    if missing.empty:
        return cache
    check_space(root, len(missing), image_size)
    index, unreadable = dict(cache.index), set(cache.unreadable)
    shard = 1 + max((s for s, _ in index.values()), default=-1)
    job, workers = _CropJob(image_size, crop_margin), workers or usable_cores()
    keys, arrays = [], []
    for key, arr in tqdm(zip(missing["label_path"], _crops(missing, job, workers), strict=True),
                         total=len(missing), desc="cache", unit="crop", disable=not progress):
        if arr is None:
            unreadable.add(key)
            continue
        unreadable.discard(key)
        keys.append(key)
        arrays.append(arr)
        if len(arrays) == SHARD_ROWS:
            shard = _flush(root, shard, keys, arrays, index, unreadable, image_size)
    if arrays:
        _flush(root, shard, keys, arrays, index, unreadable, image_size)
    elif unreadable != cache.unreadable:  # nothing left to write but what could not be read
        _save_index(root, index, unreadable)
    failed = missing[missing["label_path"].isin(unreadable)]
    LOGGER.info("cache %s: %d crops added (%d in all)%s", root, len(index) - len(cache.index), len(index),
                f"; {len(failed)} could not be cut, their {failed['image_path'].nunique()} photos undecodable: left "
                "out of training, tried again at the next build" if len(failed) else "")
    asked = rows["label_path"].nunique()
    if len(failed) > UNREADABLE_LIMIT * asked:
        LOGGER.warning("cache %s: %d of the %d rows asked could not be cut, more than the %.0f%% of unreadable data "
                       "a stage tolerates: were the photos out of reach?", root, len(failed), asked,
                       100 * UNREADABLE_LIMIT)
    return CachedCrops(root)


def check_space(root: Path, crops: int, image_size: int) -> None:
    """Refuse a cache that would fill its disk: at Stage 4, 500,000 crops of 384 px are 221 GB."""
    check_free_space(root, crops * image_size * image_size * 3, f"the crop cache ({crops:,} crops of {image_size} px)",
                     "point paths.cache_dir at a larger disk, or train from the photos (data.cache.enabled=false)")


def _flush(root: Path, shard: int, keys: list[str], arrays: list[np.ndarray],
           index: dict[str, tuple[int, int]], unreadable: set[str], size: int) -> int:
    _write_shard(root, shard, arrays, size)
    index.update({k: (shard, i) for i, k in enumerate(keys)})
    _save_index(root, index, unreadable)  # after the shard: an index never points at a shard that is not there
    keys.clear()
    arrays.clear()
    return shard + 1
