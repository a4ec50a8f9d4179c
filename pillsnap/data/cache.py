"""Preprocessed crop cache: each classifier row (a pill) decoded, cropped and resized once into shards, so that
training reads a small piece of a page-cached file instead of decoding a 976x1280 PNG.

Two formats (`data.cache.format`): `npy`, uint8 memory-mapped .npy shards (the fastest read, S x S x 3 bytes a crop:
221 GB for Stage 4's 500,000 crops of 384 px), and `jpeg`, each crop a JPEG (quality JPEG_QUALITY, full-resolution
colour) in shards of concatenated bytes, about 14x smaller (~31 KB a 384 px crop of the synthetic photos: Stage 4's
in ~16 GB, which the page cache holds) for ~1 ms of decoding a crop (bench/bench_data_cache.py).

Keyed by the manifest row's `label_path` (unique per row), with the box each crop was cut at: building is
incremental (only rows missing from the index, or whose box has changed since, are decoded: a label file corrected
under the same name) and each shard is written to a temp file and moved into place. A row whose photo cannot be
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
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pillsnap.config.stage import CACHE_FORMATS
from pillsnap.data.datasets import BOX, crop_rows, pill_crop
from pillsnap.utils import atomic_path, ensure_dir, read_json, save_json
from pillsnap.utils.devices import usable_cores
from pillsnap.utils.images import DECODE_ERRORS, JPEG_QUALITY, ImageLimits, decode_image, jpeg_bytes
from pillsnap.utils.io import check_free_space
from pillsnap.utils.locks import BusyError, file_lock
from pillsnap.utils.pools import forked_imap

LOGGER = logging.getLogger(__name__)
BUILD_LOCK = "build.lock"  # in a cache's folder: held by the process adding crops to it
UNREADABLE = (-1, -1, 0)  # the slot (shard, offset, bytes) of a row whose photo could not be decoded
# A read-only cache may lack at most this share of the rows asked of it as unreadable (the share of unreadable data
# the stage advisor tolerates): more than that, the photos were more likely out of reach when it was built (a share
# not mounted) than broken, and training on what is left would be training on a part of the data without a word.
UNREADABLE_LIMIT = 0.01
SHARD_ROWS = 2048  # 2048 x 384 x 384 x 3 = 0.9 GB per shard at full size: big sequential files, few of them
RAW = ImageLimits(upright=False)  # a cached JPEG is read as it was written
# A JPEG cache's size is known only once crops are encoded: each shard, before it is written, checks the disk for
# the crops still to write at the mean size of those encoded so far, with this to spare (the rows come class by
# class, and the first classes' photos may compress better than the rest).
JPEG_SIZE_SPARE = 1.25


OWN_FOLDER = "point paths.cache_dir at a folder of your own, or train from the photos (data.cache.enabled=false)"


class CacheError(ValueError):
    """A crop cache that cannot be made or added to (its folder cannot be created or written): one line."""


class CachedCrops:
    """Read side of the cache: `get(label_path)` -> PIL RGB crop of size image_size (KeyError if absent).
    `index`: the rows with a crop, each at its slot (shard, offset, bytes: the row in an npy shard, or where its
    JPEG lies in a jpeg shard); `unreadable`: the rows whose photos could not be decoded when it was built."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = read_json(self.root / "meta.json")
        self.image_size = int(meta["image_size"])
        self.format = str(meta.get("format", "npy"))
        index = pd.read_parquet(self.root / "index.parquet") if (self.root / "index.parquet").is_file() else None
        entries = [] if index is None else list(zip(
            index["key"], index["shard"], index["offset"],
            index["nbytes"] if "nbytes" in index else np.zeros(len(index), np.int64), strict=True))
        self.index: dict[str, tuple[int, int, int]] = {k: (int(s), int(o), int(n)) for k, s, o, n in entries
                                                       if s >= 0}
        self.unreadable: frozenset[str] = frozenset(k for k, s, _, _ in entries if s < 0)
        # opened where they are read, once each: npy memory maps, or (jpeg) unbuffered files read by os.pread, which
        # keeps no position, so forked loader workers may share one. Both close when the reader is collected.
        self._shards: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """The slot of each key as an int array [n, 3]; UNREADABLE where the key has no crop. A dataset looks its
        rows up once, so that its loader workers read array slots instead of this dict (see CropTable)."""
        return np.array([self.index.get(key, UNREADABLE) for key in keys], dtype=np.int64).reshape(len(keys), 3)

    def read(self, shard: int, offset: int, nbytes: int = 0) -> Image.Image:
        """The crop at a slot from `slots`; KeyError for a key that had none. A JPEG that cannot be decoded (a
        damaged shard) raises what a broken photo raises, so the dataset drops its sample."""
        if shard < 0:
            raise KeyError("no cached crop for this row (it could not be decoded when the cache was built)")
        if self.format == "jpeg":
            if shard not in self._shards:
                opened = open(self.root / f"shard_{shard:05d}.jpegs", "rb", buffering=0)  # noqa: SIM115
                if self._shards.setdefault(shard, opened) is not opened:  # another thread opened it first
                    opened.close()
            data = os.pread(self._shards[shard].fileno(), nbytes, offset)
            # an ImageError (an OSError: the dataset drops the sample) for damaged bytes, never PIL's many kinds
            return decode_image(data, f"{self.root / f'shard_{shard:05d}.jpegs'} at byte {offset} (rebuild the "
                                      "cache)", RAW)
        if shard not in self._shards:
            self._shards[shard] = np.load(self.root / f"shard_{shard:05d}.npy", mmap_mode="r")
        return Image.fromarray(np.ascontiguousarray(self._shards[shard][offset]), "RGB")

    def get(self, key: str) -> Image.Image:
        return self.read(*self.index[key])

    def cut_elsewhere(self, rows: pd.DataFrame) -> np.ndarray:
        """Which rows have a crop cut at another box than the row's own (a label file corrected since, under the same
        name): such a crop is not the row's. An index from before boxes were kept trusts its crops."""
        return _moved(_saved_boxes(self.root), rows)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps and files are opened again, lazily, where it is unpickled (a spawned worker) instead of being
        # pickled.
        return {**self.__dict__, "_shards": {}}


def cache_root(cache_dir: str | Path, image_size: int, crop_margin: float, fmt: str = "npy") -> Path:
    """The folder of the cache of crops of this size and margin in format `fmt` (each format has its own)."""
    name = f"crops_s{image_size}_m{crop_margin:g}"
    return Path(cache_dir) / (name if fmt == "npy" else f"{name}_{fmt}{JPEG_QUALITY}")


class _CropJob:
    """Picklable worker: one manifest row -> its crop, uint8 [S, S, 3] (npy) or a JPEG's bytes (jpeg), or None when
    it cannot be decoded."""

    def __init__(self, image_size: int, crop_margin: float, fmt: str = "npy") -> None:
        self.image_size, self.crop_margin, self.fmt = image_size, crop_margin, fmt

    def __call__(self, row: Any) -> np.ndarray | bytes | None:
        try:
            crop = pill_crop(row, self.crop_margin)
        except DECODE_ERRORS as err:
            LOGGER.warning("cache: skipping undecodable %s: %s", row.image_path, err)
            return None
        crop = crop.resize((self.image_size, self.image_size), Image.BILINEAR)
        return jpeg_bytes(crop) if self.fmt == "jpeg" else np.asarray(crop, dtype=np.uint8)


def _crops(rows: pd.DataFrame, job: _CropJob, workers: int) -> Any:
    items = crop_rows(rows)
    if workers <= 1 or len(items) < 64:
        yield from map(job, items)
        return
    yield from forked_imap(job, items, workers, chunksize=16)


def _write_shard(root: Path, shard: int, crops: list[Any], size: int, fmt: str) -> list[tuple[int, int]]:
    """One shard of `crops` written atomically; (offset, bytes) of each crop in it."""
    if fmt == "jpeg":
        with atomic_path(root / f"shard_{shard:05d}.jpegs") as tmp:
            Path(tmp).write_bytes(b"".join(crops))
        ends = np.cumsum([len(c) for c in crops]).tolist()
        return [(end - len(c), len(c)) for end, c in zip(ends, crops, strict=True)]
    with atomic_path(root / f"shard_{shard:05d}.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(crops), size, size, 3))
        for i, arr in enumerate(crops):
            out[i] = arr
        out.flush()
        del out
    return [(i, 0) for i in range(len(crops))]


def _saved_boxes(root: Path) -> pd.DataFrame:
    """The box each indexed crop was cut at, by key (empty for an index from before boxes were kept)."""
    path = root / "index.parquet"
    columns = pq.read_schema(path).names if path.is_file() else []
    if not set(BOX) <= set(columns):
        return pd.DataFrame(columns=list(BOX), dtype=float)
    return pd.read_parquet(path, columns=["key", *BOX]).set_index("key")


def _moved(saved: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Which `rows` have a box other than the one `saved` (_saved_boxes) says their crop was cut at; a row whose box
    is not known (an older index) is trusted."""
    if saved.empty or rows.empty:
        return np.zeros(len(rows), bool)
    known = saved.reindex(rows["label_path"]).to_numpy(float)
    now = rows[list(BOX)].to_numpy(float)
    return ~np.isnan(known).any(axis=1) & ~np.isclose(known, now, rtol=0, atol=1e-6).all(axis=1)


def _save_index(root: Path, index: dict[str, tuple[int, int, int]], unreadable: set[str],
                boxes: pd.DataFrame) -> None:
    """The crops' slots and the boxes they were cut at (`boxes`, by key), and each unreadable row at shard -1, in
    one file written atomically."""
    entries = {**dict.fromkeys(sorted(unreadable), UNREADABLE), **index}
    frame = pd.DataFrame({"key": list(entries), "shard": [v[0] for v in entries.values()],
                          "offset": [v[1] for v in entries.values()], "nbytes": [v[2] for v in entries.values()]})
    frame[list(BOX)] = boxes.reindex(frame["key"]).to_numpy(float) if len(frame) else np.zeros((0, len(BOX)))
    with atomic_path(root / "index.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def build_cache(rows: pd.DataFrame, cache_dir: str | Path, image_size: int, crop_margin: float,
                workers: int = 0, progress: bool = False, fmt: str = "npy") -> CachedCrops:
    """Make sure every row (the classifier's manifest rows) has a cached crop in format `fmt` (CACHE_FORMATS); returns
    the read side.

    One process at a time adds to a cache (two experiments share `paths.cache_dir` by default): two builders
    would each number their shards from the same index and write over each other's, and an index would then
    name another row's crop under a label, silently. A second builder waits, then adds only what is still
    missing. A cache that lacks nothing is only read, and may be read-only (a teammate's, a shared mount); so may
    one that lacks only rows recorded as unreadable, no more than UNREADABLE_LIMIT of them."""
    if fmt not in CACHE_FORMATS:
        raise CacheError(f"data.cache.format={fmt!r} is not a crop cache format: use one of {', '.join(CACHE_FORMATS)}")
    root = cache_root(cache_dir, image_size, crop_margin, fmt)
    if (root / "meta.json").is_file():
        cache = CachedCrops(root)
        lacking = rows.loc[~rows["label_path"].isin(cache.index) | cache.cut_elsewhere(rows), "label_path"]
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
        return _add_missing(rows, root, image_size, crop_margin, workers, progress, fmt)


def _add_missing(rows: pd.DataFrame, root: Path, image_size: int, crop_margin: float, workers: int,
                 progress: bool, fmt: str = "npy") -> CachedCrops:
    if not (root / "meta.json").is_file():
        meta = {"image_size": image_size, "crop_margin": crop_margin, "format": fmt}
        save_json(root / "meta.json", {**meta, "quality": JPEG_QUALITY} if fmt == "jpeg" else meta)
    cache = CachedCrops(root)
    saved = _saved_boxes(root)
    moved = _moved(saved, rows)
    missing = rows[~rows["label_path"].isin(cache.index) | moved].drop_duplicates("label_path")
    if missing.empty:
        return cache
    # the boxes the crops are (or will be) cut at: this build's rows' own over those kept before; a row is in the
    # saved index only once its crop is, so the box saved with a slot is always the one it was cut at
    boxes = missing.set_index("label_path")[list(BOX)].astype(float).combine_first(saved)
    if fmt == "npy":  # known before anything is decoded; a JPEG cache's once its first shard is encoded
        check_space(root, len(missing), image_size * image_size * 3, image_size)
    shards = _Shards(root, image_size, fmt, cache, boxes, rows.loc[moved, "label_path"], len(missing))
    job, workers = _CropJob(image_size, crop_margin, fmt), workers or usable_cores()
    for key, crop in tqdm(zip(missing["label_path"], _crops(missing, job, workers), strict=True),
                          total=len(missing), desc="cache", unit="crop", disable=not progress):
        if crop is None:
            shards.skip(key)
        else:
            shards.add(key, crop)
    shards.flush()
    if shards.changed:  # nothing left to write but what could not be read
        shards.save_index()
    failed = missing[missing["label_path"].isin(shards.unreadable)]
    LOGGER.info("cache %s: %d crops added (%d in all)%s", root, len(shards.index) - len(cache.index),
                len(shards.index), f"; {len(failed)} could not be cut, their {failed['image_path'].nunique()} photos "
                "undecodable: left out of training, tried again at the next build" if len(failed) else "")
    asked = rows["label_path"].nunique()
    if len(failed) > UNREADABLE_LIMIT * asked:
        LOGGER.warning("cache %s: %d of the %d rows asked could not be cut, more than the %.0f%% of unreadable data "
                       "a stage tolerates: were the photos out of reach?", root, len(failed), asked,
                       100 * UNREADABLE_LIMIT)
    return CachedCrops(root)


class _Shards:
    """The crops a build adds to a cache, a shard at a time: each shard is written, then the index, so that an index
    never points at a shard that is not there. Before each shard of a JPEG cache the disk is checked for the
    `to_write` crops left, at the mean size of those encoded so far (a JPEG's size is known only once it is encoded):
    the first check comes before anything is written, a later one stops a build whose photos compress worse than
    its first, with the shards written so far kept for the next build. `moved`: rows whose crop was cut at an old
    box, taken out of the index at once, so that a build that stops never leaves them indexed."""

    def __init__(self, root: Path, size: int, fmt: str, cache: CachedCrops, boxes: pd.DataFrame,
                 moved: Sequence[str], to_write: int) -> None:
        self.root, self.size, self.fmt, self.boxes, self.to_write = root, size, fmt, boxes, to_write
        self.index, self.unreadable = dict(cache.index), set(cache.unreadable)
        self.next_shard = 1 + max((slot[0] for slot in self.index.values()), default=-1)
        for key in moved:
            self.index.pop(key, None)
        self.changed = len(self.index) != len(cache.index)  # the index to save holds something the saved one lacks
        self.keys: list[str] = []
        self.crops: list[Any] = []
        self.encoded = self.encoded_bytes = 0

    def skip(self, key: str) -> None:
        """A row whose photo could not be decoded: recorded as unreadable."""
        self.changed |= key not in self.unreadable
        self.unreadable.add(key)
        self.to_write -= 1

    def add(self, key: str, crop: Any) -> None:
        self.unreadable.discard(key)
        self.keys.append(key)
        self.crops.append(crop)
        if len(self.crops) == SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the crops added since the last shard, if any, as a shard, then the index."""
        if not self.crops:
            return
        if self.fmt == "jpeg":
            self._check_jpeg_space()
        places = _write_shard(self.root, self.next_shard, self.crops, self.size, self.fmt)
        self.index.update({k: (self.next_shard, offset, nbytes)
                           for k, (offset, nbytes) in zip(self.keys, places, strict=True)})
        self.save_index()
        self.to_write -= len(self.crops)
        self.next_shard += 1
        self.keys.clear()
        self.crops.clear()

    def save_index(self) -> None:
        _save_index(self.root, self.index, self.unreadable, self.boxes)
        self.changed = False

    def _check_jpeg_space(self) -> None:
        self.encoded += len(self.crops)
        self.encoded_bytes += sum(map(len, self.crops))
        mean = self.encoded_bytes / self.encoded
        check_space(self.root, self.to_write, mean * JPEG_SIZE_SPARE, self.size,
                    f"; {mean / 1024:.0f} KB a crop in the {self.encoded:,} encoded so far, counted with "
                    f"{JPEG_SIZE_SPARE - 1:.0%} to spare")


def check_space(root: Path, crops: int, crop_bytes: float, image_size: int, estimated: str = "") -> None:
    """Refuse a cache that would fill its disk: at Stage 4, 500,000 crops of 384 px are 221 GB as npy."""
    check_free_space(root, int(crops * crop_bytes), f"the crop cache ({crops:,} crops of {image_size} px{estimated})",
                     "point paths.cache_dir at a larger disk, or train from the photos (data.cache.enabled=false)")
