"""Ingestion workers: turn one chunk of label folders into manifest rows (one Parquet part per chunk), with the
label checks of scan_checks.py and the photo attributes taken from the file name.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections import Counter, OrderedDict, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pillsnap.data import aihub
from pillsnap.data.scan_checks import PhotoCheck, check_photo
from pillsnap.data.scan_walk import (
    ChunkTask,
    Location,
    flat_image_folder,
    flat_member,
    is_image,
    is_label_file,
    is_macos_metadata,
    split_member,
)
from pillsnap.data.stages import stable_hash
from pillsnap.utils import atomic_path, save_json
from pillsnap.utils.zips import ZipEntry, read_central_directory, read_member

LOGGER = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    ("image_path", pa.string()), ("label_path", pa.string()), ("mapping_code", pa.string()),
    ("image_type", pa.string()), ("source", pa.string()), ("split", pa.string()), ("photo_id", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bbox_x", pa.int32()), ("bbox_y", pa.int32()),
    ("bbox_w", pa.int32()), ("bbox_h", pa.int32()), ("incomplete_gt", pa.bool_()), ("drug_dir", pa.string()),
    ("back_color", pa.string()), ("light_color", pa.string()), ("camera_la", pa.int16()), ("camera_lo", pa.int16()),
    ("box_issue", pa.string()), ("split_group", pa.string()), ("aihub_part", pa.string()),
])
SPLIT_KEY = "split_key"  # hash of split_group, only in the parts: the merge turns it into `split`
PART_SCHEMA = MANIFEST_SCHEMA.append(pa.field(SPLIT_KEY, pa.int64()))


# Chunks are sorted by container: a worker needs one label zip at a time, its photos' zips, and the zips of the
# folders' copies (AI Hub's other partition: a VL_ zip beside a TL_ one, and its VS_ photos).
@lru_cache(maxsize=6)
def _zip_entries(path: str) -> dict[str, ZipEntry]:
    return read_central_directory(path)


@lru_cache(maxsize=6)
def _zip_members(path: str) -> dict[str, list[str]]:
    """Zip file members grouped by their code folder (flat photos under `prefix + folder` too); cached: one zip
    serves many chunks in a worker."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in _zip_entries(path):
        where = None if is_macos_metadata(name) else split_member(name) or flat_member(name)
        if where is not None and not name.endswith("/"):
            grouped[where[0] + where[1]].append(name)
    return grouped


@lru_cache(maxsize=4)
def _flat_dir(path: str) -> dict[str, list[str]]:
    """Photos of a flat folder grouped by their code folder (listed once per worker, not once per folder)."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in os.listdir(path):
        folder = flat_image_folder(name)
        if folder is not None:
            grouped[folder].append(name)
    return grouped


_FDS: OrderedDict[str, int] = OrderedDict()  # the zips a worker reads labels from, the most recent last


def _raw_fd(path: str) -> int:
    """An open descriptor of `path`, read with os.pread only (safe to share across fork); at most 4 are kept open,
    the least recently used closed (a folder's copies in other zips must not leak one per read)."""
    fd = _FDS.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_FDS) >= 4:
            os.close(_FDS.popitem(last=False)[1])
    _FDS[path] = fd
    return fd


def _label_members(loc: Location, folder: str) -> list[str]:
    """Label files of one `K-x_json` folder, relative to the location (single: flat; combination: per pill)."""
    if loc.is_zip:
        names = _zip_members(loc.container).get(loc.prefix + folder, [])
        return sorted(n[len(loc.prefix):] for n in names if is_label_file(n))
    base = os.path.join(loc.container, folder)
    out = []
    for dirpath, _, files in os.walk(base):
        rel = os.path.relpath(dirpath, loc.container)
        out.extend(f"{rel}/{f}".replace(os.sep, "/") for f in files if is_label_file(f))
    return sorted(out)


def _folder_files(loc: Location, folder: str) -> list[str]:
    if loc.is_zip:
        return [m.rpartition("/")[2] for m in _zip_members(loc.container).get(loc.prefix + folder, [])]
    if loc.flat:
        return _flat_dir(loc.container).get(folder, [])
    try:
        return os.listdir(os.path.join(loc.container, folder))
    except OSError:
        return []


def _image_names(locs: tuple[Location, ...], folder: str) -> dict[str, Location]:
    names: dict[str, Location] = {}
    for loc in locs:
        for name in _folder_files(loc, folder):
            if is_image(name):
                names.setdefault(name, loc)
    return names


def _read(loc: Location, member: str) -> bytes:
    if loc.is_zip:
        name = loc.prefix + member
        return read_member(_raw_fd(loc.container), _zip_entries(loc.container)[name], name)
    with open(f"{loc.container}/{member}", "rb") as fh:
        return fh.read()


def split_group(info: aihub.FileNameInfo) -> str:
    """The photos that go to one split together (near-duplicates must not straddle train and val/test).

    Combination: every photo of the combination (all camera angles and shots of the same pills). Single pill:
    one sweep, i.e. the azimuths of one side under one light and backdrop at one elevation (the same placement
    turned on a turntable), so that other sweeps of the class, with both sides, remain for training.
    """
    if info.is_combination:
        return info.folder
    return f"{info.folder}_{info.drug_dir}_{info.back_color}_{info.light_color}_{info.camera_la}"


class _ChunkState:
    def __init__(self) -> None:
        self.rows: list[tuple] = []  # one tuple per row in MANIFEST_SCHEMA order (cheapest to append)
        self.counts: Counter = Counter()
        self.classes: dict[str, dict[str, Any]] = {}

    def add(self, rec: aihub.LabelRecord, info: aihub.FileNameInfo, paths: tuple[str, str], source: Location,
            part: str, incomplete: bool, issue: str) -> None:
        x, y, w, h = rec.bbox
        drug_dir, back, light, la, lo = aihub.file_name_attributes(info, rec)  # the file name is the truth
        self.rows.append((paths[0], paths[1], rec.mapping_code, "combination" if info.is_combination else "single",
                          source.source, "", info.stem, rec.width, rec.height, x, y, w, h, incomplete, drug_dir,
                          back, light, la, lo, issue, split_group(info), part))

    def table(self, seed: int) -> pa.Table:
        columns = list(zip(*self.rows, strict=True)) if self.rows else [[] for _ in MANIFEST_SCHEMA.names]
        columns.append(stable_hash(seed, columns[MANIFEST_SCHEMA.get_field_index("split_group")]))
        return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, PART_SCHEMA, strict=True)],
                                    schema=PART_SCHEMA)


def _parse_one(loc: Location, member: str, info: aihub.FileNameInfo, state: _ChunkState) -> aihub.LabelRecord:
    try:
        raw = _read(loc, member)
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise aihub.LabelError("unreadable", f"{member}: {err}") from err
    data = aihub.decode_label(raw)
    rec = aihub.parse_label(data, with_info=False)
    # the file's own name: a label may give it under a folder (`K-x/K-x_0_2_0_2_70_000_200.png`, or with "\\")
    if rec.file_name.replace("\\", "/").rpartition("/")[2].rsplit(".", 1)[0] != info.stem:
        raise aihub.LabelError("file_name_mismatch", f"{member} describes {rec.file_name}")
    if rec.mapping_code not in info.codes:
        raise aihub.LabelError("code_not_in_folder", f"{rec.mapping_code} not in folder codes {info.codes}")
    image = data["images"][0]
    if aihub.has_multi_valued_color(image):
        state.counts["multi_valued_colour"] += 1
    if rec.mapping_code not in state.classes:  # class metadata is read once per class per chunk
        state.classes[rec.mapping_code] = aihub.class_info(image)
    return rec


LabelFile = tuple[Location, str]  # where a label file is, and its path there (`K-x_json/...json`)


def _parse_records(state: _ChunkState, members: list[LabelFile],
                   info: aihub.FileNameInfo) -> list[tuple[LabelFile, aihub.LabelRecord]]:
    records = []
    for loc, member in members:
        try:
            records.append(((loc, member), _parse_one(loc, member, info, state)))
        except aihub.LabelError as err:
            state.counts[err.reason] += 1
            LOGGER.debug("skip %s: %s", member, err)
    return records


def _count_checks(state: _ChunkState, info: aihub.FileNameInfo, records: list[aihub.LabelRecord],
                  check: PhotoCheck) -> None:
    counts = state.counts
    for rec in records:
        wrong = aihub.attribute_mismatches(rec, info)
        if wrong:
            counts["attribute_mismatch"] += 1
            counts.update(f"attribute_mismatch:{name}" for name in wrong)
    if check.incomplete:
        counts.update(check.reasons)
        counts["incomplete_gt_photos"] += 1
        counts["box_issue_rows"] += sum(1 for issue in check.issues if issue)
    counts["photos_combination" if info.is_combination else "photos_single"] += 1


def _process_photo(state: _ChunkState, stem: str, members: list[LabelFile], images: dict[str, Location],
                   image_folder: str) -> None:
    """One photo's label files -> its rows; the photo is looked up in `image_folder` (the label folder's own photo
    folder), and its path is where it was found, also when its name says another folder (a drug filed in
    another drug's folders)."""
    try:
        info = aihub.parse_file_name(stem)
    except ValueError:
        state.counts["bad_file_name"] += len(members)
        return
    image_loc = images.get(f"{stem}.png")
    if image_loc is None:
        state.counts["missing_image"] += len(members)  # labels whose photo is absent
        return
    records = _parse_records(state, members, info)
    if not records:
        return
    check = check_photo(info.codes, [r for _, r in records])
    image_path = image_loc.path(f"{image_folder}/{stem}.png")
    for ((loc, member), rec), issue in zip(records, check.issues, strict=True):
        # a label copy in no named partition (unzipped into a folder of its own) takes its photo's partition
        state.add(rec, info, (image_path, loc.path(member)), loc, loc.part or image_loc.part, check.incomplete,
                  issue)
    state.counts["kept"] += len(records)
    _count_checks(state, info, [r for _, r in records], check)


def _label_files(task: ChunkTask, folder: str, counts: Counter) -> list[LabelFile]:
    """The label files of one folder: the chunk's own, then those only another copy of the folder holds (the
    same files in two copies are read once and counted as `duplicate_label_files`)."""
    files = [(task.location, member) for member in _label_members(task.location, folder)]
    seen = {member: task.location.part for _, member in files}
    for copy in task.copies.get(folder, ()):
        for member in _label_members(copy, folder):
            if member not in seen:
                seen[member] = copy.part
                files.append((copy, member))
            elif copy.part and seen[member] and copy.part != seen[member]:
                # the same photo name in both of AI Hub's partitions: read once, counted apart (not seen so far)
                counts["duplicate_label_files_across_partitions"] += 1
            else:
                counts["duplicate_label_files"] += 1
    return files


def process_chunk(task: ChunkTask, parts_dir: str, seed: int) -> dict[str, Any]:
    """Parse one chunk of label folders, write `part-<id>.parquet` + `.json` stats; return the stats."""
    state = _ChunkState()
    # The folders grouped by where their copies are (AI Hub's other partition: a drug's VL_ zip and its photos'
    # VS_ zip): folder after folder alternating between such zips would read their indexes again every time.
    for folder in sorted(task.folders, key=lambda f: tuple(loc.container for loc in task.copies.get(f, ()))):
        image_folder = folder[: -len("_json")]
        images = _image_names(task.images.get(image_folder, ()), image_folder)
        by_stem: dict[str, list[LabelFile]] = defaultdict(list)
        for loc, member in _label_files(task, folder, state.counts):
            by_stem[member.rpartition("/")[2][:-5]].append((loc, member))
        state.counts["label_files"] += sum(len(v) for v in by_stem.values())
        for stem, members in sorted(by_stem.items()):
            _process_photo(state, stem, members, images, image_folder)
        state.counts["image_without_label"] += len({n[:-4] for n in images} - set(by_stem))
    table = state.table(seed)
    with atomic_path(Path(parts_dir) / f"part-{task.task_id}.parquet") as tmp:
        pq.write_table(table, tmp)
    stats = {"task_id": task.task_id, "counts": dict(state.counts), "classes": state.classes,
             "folders": [f[:-5] for f in task.folders]}
    save_json(Path(parts_dir) / f"part-{task.task_id}.json", stats)  # written last: marks the chunk done
    return stats
