"""Ingestion internals: find label/image folders in a real or synthetic AI Hub tree (zips or extracted), and
turn one chunk of label folders into manifest rows (run in worker processes, one Parquet part per chunk).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pillsnap.data import aihub
from pillsnap.data.stages import stable_hash
from pillsnap.data.zipdir import ZipEntry, read_central_directory, read_member
from pillsnap.utils import atomic_path, save_json

LOGGER = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("image_path", pa.string()), ("label_path", pa.string()), ("mapping_code", pa.string()),
    ("image_type", pa.string()), ("source", pa.string()), ("split", pa.string()), ("photo_id", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bbox_x", pa.int32()), ("bbox_y", pa.int32()),
    ("bbox_w", pa.int32()), ("bbox_h", pa.int32()), ("incomplete_gt", pa.bool_()), ("drug_dir", pa.string()),
    ("back_color", pa.string()), ("light_color", pa.string()), ("camera_la", pa.int16()), ("camera_lo", pa.int16()),
])


ZIP_CHUNK_FACTOR = 16
SPLIT_KEY = "split_key"  # per-photo hash, only in the parts: the merge turns it into `split`
PART_SCHEMA = MANIFEST_SCHEMA.append(pa.field(SPLIT_KEY, pa.int64()))


@dataclass(frozen=True)
class Location:
    """Where a code folder lives: a directory, or a zip plus the member prefix above the folder."""

    container: str
    is_zip: bool
    prefix: str = ""

    def path(self, member: str) -> str:
        if self.is_zip:
            return f"zip:{self.container}!{self.prefix}{member}"
        return f"{self.container}/{member}"

    @cached_property
    def source(self) -> str:
        return Path(self.container).stem if self.is_zip else Path(self.container).name


@dataclass
class Discovery:
    label_folders: list[tuple[Location, str, int]] = field(default_factory=list)  # (where, "K-x_json", n files)
    image_folders: dict[str, list[Location]] = field(default_factory=lambda: defaultdict(list))
    zip_image_counts: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkTask:
    task_id: str
    location: Location
    folders: tuple[str, ...]
    images: dict[str, tuple[Location, ...]]
    n_files: int


def _is_image(name: str) -> bool:
    return name.endswith(".png") and not name.endswith("index.png")


@lru_cache(maxsize=65536)
def _is_code_folder(name: str) -> bool:
    return bool(aihub.LABEL_DIR_RE.match(name) or aihub.IMAGE_DIR_RE.match(name))


def _split_member(member: str) -> tuple[str, str] | None:
    """`[prefix/]K-x[_json]/...` -> (prefix, code folder); None for members outside a code folder."""
    head, sep, _ = member.partition("/")
    if sep and _is_code_folder(head):  # the usual layout: code folders at the top of the zip (memoised check)
        return "", head
    parts = member.split("/")
    for depth, part in enumerate(parts[:-1]):
        if aihub.LABEL_DIR_RE.match(part) or aihub.IMAGE_DIR_RE.match(part):
            return "/".join(parts[:depth]) + "/", part
    return None


ZipFolders = tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]


def zip_folders(path: str) -> ZipFolders:
    """(image folders, label folders) of one zip as (prefix, folder, file count); a broken zip has none."""
    label_counts: Counter = Counter()
    image_counts: Counter = Counter()
    try:
        members = read_central_directory(path)
    except (zipfile.BadZipFile, OSError) as err:
        LOGGER.warning("skipping unreadable zip %s: %s", path, err)
        return [], []
    for member in members:
        where = _split_member(member)
        if where is None:
            continue
        if where[1].endswith("_json"):
            label_counts[where] += member.endswith(".json")
        else:
            image_counts[where] += _is_image(member)
    return ([(p, f, n) for (p, f), n in sorted(image_counts.items())],
            [(p, f, n) for (p, f), n in sorted(label_counts.items())])


def _count_label_files(path: str) -> int:
    return sum(len([f for f in files if f.endswith(".json")]) for _, _, files in os.walk(path))


def discover(data_root: str | Path, pool: Executor | None = None) -> Discovery:
    """Walk `data_root` (following the real layout loosely: any depth, spaces or underscores, zips or folders).

    Zip directories are read in `pool` when given (reading 200 central directories is the slow part).
    """
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    found, zips = Discovery(), []
    stack = [str(root.resolve())]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir():
                if aihub.LABEL_DIR_RE.match(entry.name):
                    found.label_folders.append((Location(current, False), entry.name,
                                                _count_label_files(entry.path)))
                elif aihub.IMAGE_DIR_RE.match(entry.name):
                    found.image_folders[entry.name].append(Location(current, False))
                else:
                    stack.append(entry.path)
            elif entry.name.endswith(".zip"):
                zips.append(entry.path)
    for path, (images, labels) in zip(zips, (pool.map if pool else map)(zip_folders, zips), strict=True):
        for prefix, folder, n in images:
            found.image_folders[folder].append(Location(path, True, prefix))
            found.zip_image_counts[(path, folder)] = n
        found.label_folders.extend((Location(path, True, prefix), folder, n) for prefix, folder, n in labels)
    found.label_folders.sort(key=lambda t: (t[0].container, t[0].prefix, t[1]))
    return found


def make_tasks(found: Discovery, chunk_files: int) -> list[ChunkTask]:
    """Group consecutive label folders of one container into chunks of about `chunk_files` label files
    (16x that inside a zip: each chunk makes a worker read the label and image zip directories, ~0.1 s per 20K
    members each, so a real TL zip of 20-30K labels is one chunk).

    A folder is never split, so all pill labels of one combination photo land in the same chunk.
    """
    tasks: list[ChunkTask] = []
    current: list[tuple[Location, str, int]] = []

    def flush() -> None:
        if not current:
            return
        loc = current[0][0]
        folders = tuple(f for _, f, _ in current)
        images = {f[:-5]: tuple(found.image_folders.get(f[:-5], ())) for f in folders}
        digest = hashlib.sha1(f"{loc}|{'|'.join(folders)}".encode()).hexdigest()[:16]
        tasks.append(ChunkTask(digest, loc, folders, images, sum(n for _, _, n in current)))
        current.clear()

    for item in found.label_folders:
        limit = chunk_files * (ZIP_CHUNK_FACTOR if item[0].is_zip else 1)
        if current and (item[0] != current[0][0] or sum(n for _, _, n in current) >= limit):
            flush()
        current.append(item)
    flush()
    return tasks


@lru_cache(maxsize=2)  # chunks are sorted by container: a worker needs one label zip at a time
def _zip_entries(path: str) -> dict[str, ZipEntry]:
    return read_central_directory(path)


@lru_cache(maxsize=2)
def _zip_members(path: str) -> dict[str, list[str]]:
    """Zip file members grouped by their code folder (cached: one zip serves many chunks in a worker)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in _zip_entries(path):
        where = _split_member(name)
        if where is not None and not name.endswith("/"):
            grouped[where[0] + where[1]].append(name)
    return grouped


@lru_cache(maxsize=2)
def _raw_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY)  # read with os.pread only: safe to share across fork


def _label_members(loc: Location, folder: str) -> list[str]:
    """Label files of one `K-x_json` folder, relative to the location (single: flat; combination: per pill)."""
    if loc.is_zip:
        names = _zip_members(loc.container).get(loc.prefix + folder, [])
        return sorted(n[len(loc.prefix):] for n in names if n.endswith(".json"))
    base = os.path.join(loc.container, folder)
    out = []
    for dirpath, _, files in os.walk(base):
        rel = os.path.relpath(dirpath, loc.container)
        out.extend(f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(".json"))
    return sorted(out)


def _image_names(locs: tuple[Location, ...], folder: str) -> dict[str, Location]:
    names: dict[str, Location] = {}
    for loc in locs:
        if loc.is_zip:
            members = _zip_members(loc.container).get(loc.prefix + folder, [])
            files = [m.rpartition("/")[2] for m in members]
        else:
            try:
                files = os.listdir(os.path.join(loc.container, folder))
            except OSError:
                files = []
        for name in files:
            if _is_image(name):
                names.setdefault(name, loc)
    return names


def _read(loc: Location, member: str) -> bytes:
    if loc.is_zip:
        name = loc.prefix + member
        return read_member(_raw_fd(loc.container), _zip_entries(loc.container)[name], name)
    with open(f"{loc.container}/{member}", "rb") as fh:
        return fh.read()


class _ChunkState:
    def __init__(self) -> None:
        self.rows: list[tuple] = []  # one tuple per row in MANIFEST_SCHEMA order (cheapest to append)
        self.counts: Counter = Counter()
        self.classes: dict[str, dict[str, Any]] = {}

    def add(self, rec: aihub.LabelRecord, image_path: str, label_path: str, image_type: str, source: str,
            stem: str, incomplete: bool) -> None:
        x, y, w, h = rec.bbox
        self.rows.append((image_path, label_path, rec.mapping_code, image_type, source, "", stem, rec.width,
                          rec.height, x, y, w, h, incomplete, rec.drug_dir, rec.back_color, rec.light_color,
                          rec.camera_la, rec.camera_lo))

    def table(self, seed: int) -> pa.Table:
        columns = list(zip(*self.rows, strict=True)) if self.rows else [[] for _ in MANIFEST_SCHEMA.names]
        columns.append(stable_hash(seed, columns[MANIFEST_SCHEMA.get_field_index("photo_id")]))
        return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, PART_SCHEMA, strict=True)],
                                    schema=PART_SCHEMA)


def _parse_one(loc: Location, member: str, stem: str, codes: tuple[str, ...],
               known: dict[str, dict[str, Any]]) -> aihub.LabelRecord:
    try:
        raw = _read(loc, member)
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise aihub.LabelError("unreadable", f"{member}: {err}") from err
    data = aihub.decode_label(raw)
    rec = aihub.parse_label(data, with_info=False)
    if rec.file_name.rsplit(".", 1)[0] != stem:
        raise aihub.LabelError("file_name_mismatch", f"{member} describes {rec.file_name}")
    if rec.mapping_code not in codes:
        raise aihub.LabelError("code_not_in_folder", f"{rec.mapping_code} not in folder codes {codes}")
    if rec.mapping_code not in known:  # class metadata is read once per class per chunk
        known[rec.mapping_code] = aihub.class_info(data["images"][0])
    return rec


def _process_photo(state: _ChunkState, loc: Location, stem: str, members: list[str],
                   images: dict[str, Location]) -> None:
    try:
        info = aihub.parse_file_name(stem)
    except ValueError:
        state.counts["bad_file_name"] += len(members)
        return
    image_loc = images.get(f"{stem}.png")
    if image_loc is None:
        state.counts["missing_image"] += len(members)  # labels whose photo is absent
        return
    records = []
    for member in members:
        try:
            records.append((member, _parse_one(loc, member, stem, info.codes, state.classes)))
        except aihub.LabelError as err:
            state.counts[err.reason] += 1
            LOGGER.debug("skip %s: %s", member, err)
    image_type = "combination" if info.is_combination else "single"
    # A photo whose pills are not all labelled (missing file or skipped record) has incomplete detection GT.
    incomplete = info.is_combination and len({r.mapping_code for _, r in records}) < len(info.codes)
    image_path, source = image_loc.path(f"{info.folder}/{stem}.png"), loc.source
    for member, rec in records:
        state.add(rec, image_path, loc.path(member), image_type, source, stem, incomplete)
    state.counts["kept"] += len(records)
    if records:
        state.counts[f"photos_{image_type}"] += 1
        state.counts["incomplete_gt_photos"] += int(incomplete)


def process_chunk(task: ChunkTask, parts_dir: str, seed: int) -> dict[str, Any]:
    """Parse one chunk of label folders, write `part-<id>.parquet` + `.json` stats; return the stats."""
    state = _ChunkState()
    for folder in task.folders:
        image_folder = folder[: -len("_json")]
        images = _image_names(task.images.get(image_folder, ()), image_folder)
        by_stem: dict[str, list[str]] = defaultdict(list)
        for member in _label_members(task.location, folder):
            by_stem[member.rpartition("/")[2][:-5]].append(member)
        state.counts["label_files"] += sum(len(v) for v in by_stem.values())
        for stem, members in sorted(by_stem.items()):
            _process_photo(state, task.location, stem, members, images)
        state.counts["image_without_label"] += len({n[:-4] for n in images} - set(by_stem))
    table = state.table(seed)
    with atomic_path(Path(parts_dir) / f"part-{task.task_id}.parquet") as tmp:
        pq.write_table(table, tmp)
    stats = {"task_id": task.task_id, "counts": dict(state.counts), "classes": state.classes,
             "folders": [f[:-5] for f in task.folders]}
    save_json(Path(parts_dir) / f"part-{task.task_id}.json", stats)  # written last: marks the chunk done
    return stats
