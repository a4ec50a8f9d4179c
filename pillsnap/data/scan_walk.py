"""Ingestion discovery: find label and image folders in a real or synthetic AI Hub tree (zips or extracted), or in
the competition's flat layout (`train_images/*.png` + `train_annotations/<combo>_json/...`), and cut the label
folders into chunks for the worker processes (scan_chunk.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import NamedTuple

from pillsnap.data import aihub
from pillsnap.utils.zips import read_central_directory

LOGGER = logging.getLogger(__name__)
ZIP_CHUNK_FACTOR = 16
UNREADABLE_ZIP = "unreadable_zip"
# Folder and zip names that carry AI Hub's own partition: `1.Training`, `2.Validation`, `TL_3_단일`, `VS_1_조합`
# (a number after the prefix, so that a user's own `tl_backup` or `ts_old` says nothing).
_VALIDATION_RE = re.compile(r"^(\d+\.)?validation$|^v[sl]_\d+(_|\.zip$|$)", re.IGNORECASE)
_TRAINING_RE = re.compile(r"^(\d+\.)?training$|^t[sl]_\d+(_|\.zip$|$)", re.IGNORECASE)


def aihub_part(path: str) -> str:
    """"Training", "Validation" (AI Hub's own partition, from the nearest folder or zip name that says) or ""."""
    for name in reversed(Path(path).parts):
        if _VALIDATION_RE.match(name):
            return "Validation"
        if _TRAINING_RE.match(name):
            return "Training"
    return ""


class ScanError(ValueError):
    """A scan that cannot give a usable manifest; the message is the one-line diagnosis."""


@dataclass(frozen=True)
class Location:
    """Where a code folder lives: a directory, or a zip plus the member prefix above the folder.

    `flat`: the photos lie directly in the container (the competition's `train_images/`), not in a code folder.
    """

    container: str
    is_zip: bool
    prefix: str = ""
    flat: bool = False

    def path(self, member: str) -> str:
        """The manifest path of `member` (`<code folder>/<file>` relative to this location)."""
        if self.flat:
            member = member.rpartition("/")[2]
        if self.is_zip:
            return f"zip:{self.container}!{self.prefix}{member}"
        return f"{self.container}/{member}"

    @cached_property
    def source(self) -> str:
        return Path(self.container).stem if self.is_zip else Path(self.container).name

    @cached_property
    def part(self) -> str:
        return aihub_part(f"{self.container}/{self.prefix}")


@dataclass
class Discovery:
    """What the walk found. Counts of other files feed the diagnosis of a scan that keeps nothing."""

    label_folders: list[tuple[Location, str, int]] = field(default_factory=list)  # (where, "K-x_json", n files)
    image_folders: dict[str, list[Location]] = field(default_factory=lambda: defaultdict(list))
    image_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (zip or flat dir, folder) -> photos
    flat_dirs: set[str] = field(default_factory=set)  # containers of flat photos (competition layout)
    other: Counter = field(default_factory=Counter)  # zips, PNG and JSON files outside the layouts
    unreadable_zips: list[str] = field(default_factory=list)
    # A label folder found in several places (both AI Hub partitions, a zip kept beside its extracted folder):
    # (the location scanned, folder) -> the other copies, read only for files the first lacks.
    label_copies: dict[tuple[Location, str], tuple[Location, ...]] = field(default_factory=dict)
    duplicate_folders: int = 0  # folders among those with copies found again in one partition (see _merge_copies)
    # folders and files whose names are not UTF-8 (a tree a Windows archive put in cp949): left unscanned, since
    # the manifest (Arrow, UTF-8) cannot hold their paths
    not_utf8: list[str] = field(default_factory=list)

    @property
    def code_image_folders(self) -> int:
        return sum(1 for locs in self.image_folders.values() for loc in locs if not loc.flat)


@dataclass(frozen=True)
class ChunkTask:
    task_id: str
    location: Location
    folders: tuple[str, ...]
    images: dict[str, tuple[Location, ...]]
    n_files: int
    copies: dict[str, tuple[Location, ...]] = field(default_factory=dict)  # folder -> its other copies


def is_macos_metadata(name: str) -> bool:
    """macOS's copies of file metadata: `._<name>` beside each file, and a `__MACOSX/` tree in zips made on a
    Mac. They carry the real names, so they would be counted as broken labels and unlabelled photos."""
    return name.rpartition("/")[2].startswith("._") or name.startswith("__MACOSX/") or "/__MACOSX/" in name


def is_image(name: str) -> bool:
    return name.endswith(".png") and not name.endswith("index.png") and not is_macos_metadata(name)


@lru_cache(maxsize=65536)
def _is_code_folder(name: str) -> bool:
    return bool(aihub.LABEL_DIR_RE.match(name) or aihub.IMAGE_DIR_RE.match(name))


def split_member(member: str) -> tuple[str, str] | None:
    """`[prefix/]K-x[_json]/...` -> (prefix, code folder); None for members outside a code folder."""
    head, sep, _ = member.partition("/")
    if sep and _is_code_folder(head):  # the usual layout: code folders at the top of the zip (memoised check)
        return "", head
    parts = member.split("/")
    for depth, part in enumerate(parts[:-1]):
        if aihub.LABEL_DIR_RE.match(part) or aihub.IMAGE_DIR_RE.match(part):
            return "/".join(parts[:depth]) + "/", part
    return None


def flat_image_folder(name: str) -> str | None:
    """The code folder of an AI Hub-named photo lying outside any code folder (`K-001900-..._0_2_0_2_70_000_200.png`
    -> `K-001900-...`); None for other files."""
    if not is_image(name):
        return None
    match = aihub.STEM_RE.match(name[:-4])
    return match.group(1) if match else None


def flat_member(member: str) -> tuple[str, str] | None:
    """`[prefix/]<AI Hub stem>.png` -> (prefix, code folder) for a photo outside any code folder."""
    head, _, name = member.rpartition("/")
    folder = flat_image_folder(name)
    return (f"{head}/" if head else "", folder) if folder else None


class ZipFolders(NamedTuple):
    """One zip's folders as (prefix, folder, file count), and counts of what lies outside them."""

    images: list[tuple[str, str, int]]
    labels: list[tuple[str, str, int]]
    flat: list[tuple[str, str, int]]
    other: Counter


def zip_folders(path: str) -> ZipFolders:
    """The code folders and flat photos of one zip; a broken zip has none."""
    label_counts, image_counts, flat_counts, other = Counter(), Counter(), Counter(), Counter()
    try:
        members = read_central_directory(path)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as err:  # cut short, not a zip, a name not in UTF-8
        LOGGER.warning("skipping unreadable zip %s: %s", path, err)
        return ZipFolders([], [], [], Counter({UNREADABLE_ZIP: 1}))
    for member in members:
        if is_macos_metadata(member):
            other["macOS metadata"] += 1
            continue
        where = split_member(member)
        if where is None:
            flat = flat_member(member)
            if flat is not None:
                flat_counts[flat] += 1
            else:
                other[Path(member).suffix.lower() or "folder"] += 1
        elif where[1].endswith("_json"):
            label_counts[where] += member.endswith(".json")
        else:
            image_counts[where] += is_image(member)
    return ZipFolders(*([(p, f, n) for (p, f), n in sorted(c.items())] for c in (image_counts, label_counts,
                                                                                 flat_counts)), other)


def is_label_file(name: str) -> bool:
    return name.endswith(".json") and not is_macos_metadata(name)


def _count_label_files(path: str) -> int:
    return sum(len([f for f in files if is_label_file(f)]) for _, _, files in os.walk(path))


def is_utf8(name: str) -> bool:
    """Whether a name read from the file system is UTF-8 (Python hands undecodable bytes over as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str) -> str:
    """A path for a message: its bytes where its name is not UTF-8 (surrogates cannot be printed or logged)."""
    return path if is_utf8(path) else repr(os.fsencode(path))


NOT_UTF8_FIX = ("rename them to UTF-8 (e.g. `convmv -f cp949 -t utf-8 -r --notest DIR`, or extract the archive again "
                "with `unzip -O cp949`) and scan again")


def _walk_dir(current: str, found: Discovery, stack: list[str], zips: list[str]) -> None:
    with os.scandir(current) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    flat: Counter = Counter()
    for entry in entries:
        if not is_utf8(entry.name):
            found.not_utf8.append(entry.path)
            found.other["names not UTF-8"] += 1
        elif is_macos_metadata(entry.name) or entry.name == "__MACOSX":
            found.other["macOS metadata"] += 1
        elif entry.is_dir():
            if aihub.LABEL_DIR_RE.match(entry.name):
                found.label_folders.append((Location(current, False), entry.name, _count_label_files(entry.path)))
            elif aihub.IMAGE_DIR_RE.match(entry.name):
                found.image_folders[entry.name].append(Location(current, False))
            else:
                stack.append(entry.path)
        elif entry.name.endswith(".zip"):
            zips.append(entry.path)
        elif (folder := flat_image_folder(entry.name)) is not None:
            flat[folder] += 1
        else:
            found.other[Path(entry.name).suffix.lower() or "no suffix"] += 1
    for folder, n in sorted(flat.items()):
        found.image_folders[folder].append(Location(current, False, flat=True))
        found.image_counts[(current, folder)] = n
    if flat:
        found.flat_dirs.add(current)


def _add_zip(found: Discovery, path: str, folders: ZipFolders) -> None:
    for prefix, folder, n in folders.images:
        found.image_folders[folder].append(Location(path, True, prefix))
        found.image_counts[(path, folder)] = n
    for prefix, folder, n in folders.flat:
        found.image_folders[folder].append(Location(path, True, prefix, flat=True))
        found.image_counts[(path, folder)] = found.image_counts.get((path, folder), 0) + n
        found.flat_dirs.add(f"{path}!{prefix}")
    found.label_folders.extend((Location(path, True, prefix), folder, n) for prefix, folder, n in folders.labels)
    if folders.other[UNREADABLE_ZIP]:
        found.unreadable_zips.append(path)
    found.other.update({f"in zips: {k}": v for k, v in folders.other.items()})


def discover(data_root: str | Path, pool: Executor | None = None) -> Discovery:
    """Walk `data_root` (following the real layout loosely: any depth, spaces or underscores, zips or folders;
    photos in code folders or flat in one folder). Zip directories are read in `pool` when given (reading 200
    central directories is the slow part)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    top = str(root.resolve())
    if not is_utf8(top):
        raise ScanError(f"data root {shown_path(top)} has a name that is not UTF-8: {NOT_UTF8_FIX}")
    found, zips = Discovery(), []
    stack = [top]
    while stack:
        _walk_dir(stack.pop(), found, stack, zips)
    if found.not_utf8:
        LOGGER.warning("scan: %d folder(s) or file(s) have names that are not UTF-8 and are left out with all they "
                       "hold (e.g. %s): %s", len(found.not_utf8), shown_path(found.not_utf8[0]), NOT_UTF8_FIX)
    found.other["zip"] = len(zips)
    for path, folders in zip(zips, (pool.map if pool else map)(zip_folders, zips), strict=True):
        _add_zip(found, path, folders)
    found.label_folders.sort(key=lambda t: (t[0].container, t[0].prefix, t[1]))
    _merge_copies(found)
    return found


def _merge_copies(found: Discovery) -> None:
    """One entry per label folder: a folder found in several places is scanned from one copy, and the others are
    kept in `label_copies`; each file is read once, from the first copy that has it, and keeps its own copy's
    partition. AI Hub itself ships a drug's labels in both partitions (a TL_ and a VL_ zip), whose files differ; a
    copy of the same files (a zip kept beside its extracted folder, a zip downloaded twice, an unzip stopped half-way
    or made into a folder of its own) is read once instead of being counted twice, every pill two rows and every
    photo's boxes drawn twice in the detector's labels. The photos of a folder with copies are looked up wherever any
    of its copies would look (`looked_in`).

    The copy scanned is one in a named partition, then the one with the most files, then an extracted one (faster
    to read than a zip). `duplicate_folders` counts the folders found again within one partition, or outside the
    partition folders: AI Hub's own pairing of the two partitions is not a duplicate."""
    by_folder: dict[str, list[tuple[Location, str, int]]] = defaultdict(list)
    for item in found.label_folders:
        by_folder[item[1]].append(item)
    kept, example = [], ""
    for group in by_folder.values():
        first = max(group, key=lambda t: (bool(t[0].part), t[2], not t[0].is_zip))  # max keeps the earliest
        # the chunk's size and the progress bar count every copy's files: each is read or checked
        kept.append((first[0], first[1], sum(t[2] for t in group)))
        if len(group) == 1:
            continue
        others = tuple(t[0] for t in group if t is not first)
        found.label_copies[(first[0], first[1])] = others
        parts = [loc.part for loc, _, _ in group]
        again = [loc for loc in others if not loc.part or parts.count(loc.part) > 1]
        if again:
            found.duplicate_folders += 1
            example = example or f"{first[1]} again in {again[0].container}"
    if found.duplicate_folders:
        LOGGER.warning("%d label folders are in more than one place (e.g. %s): each is scanned once, every file "
                       "from the first copy that has it", found.duplicate_folders, example)
    found.label_folders = sorted(kept, key=lambda t: (t[0].container, t[0].prefix, t[1]))


def photo_locations(label: Location, images: Sequence[Location]) -> tuple[Location, ...]:
    """Where a label folder's photos are looked up: the photo locations of its code folder, less those of AI Hub's
    other partition where its own has some (AI Hub ships a drug's Training and Validation photos in separate zips
    under the same code folder, each labelled in its own partition's label zip). A location whose partition cannot
    be told (an extracted folder with no partition name) is always looked in."""
    if not label.part:
        return tuple(images)
    own = tuple(loc for loc in images if loc.part in (label.part, ""))
    return own if any(loc.part == label.part for loc in own) else tuple(images)


def looked_in(found: Discovery, label: Location, folder: str) -> tuple[Location, ...]:
    """Where the photos of label folder `folder` (`K-x`, scanned from `label`) are looked up: each of its copies' own
    places (photo_locations), the scanned copy's first."""
    labels = (label, *found.label_copies.get((label, f"{folder}_json"), ()))
    places: dict[Location, None] = {}
    for label in labels:
        places.update(dict.fromkeys(photo_locations(label, found.image_folders.get(folder, ()))))
    return tuple(places)


def _stamp(loc: Location, folder: str) -> str:
    """What changes when the labels or photos of code folder `folder` at `loc` change: the size and time of their
    zip, or the time of their folder (a file added or removed). Part of the chunk's id, so that an interrupted scan
    resumed after a broken or half-downloaded zip was replaced reads that chunk again instead of keeping its
    missing photos."""
    path = loc.container if loc.is_zip or loc.flat else os.path.join(loc.container, folder)
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}" if loc.is_zip else str(st.st_mtime_ns)


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
        copies = {f: found.label_copies[(loc, f)] for f in folders if (loc, f) in found.label_copies}
        images = {f[:-5]: looked_in(found, loc, f[:-5]) for f in folders}
        key = (f"{loc}|{'|'.join(f'{f}:{_stamp(loc, f)}' for f in folders)}"
               + (f"|{[(f, [(str(c), _stamp(c, f)) for c in at]) for f, at in sorted(copies.items())]}"
                  if copies else "")
               + f"|{[(f, [(str(at), _stamp(at, f)) for at in places]) for f, places in sorted(images.items())]}")
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        tasks.append(ChunkTask(digest, loc, folders, images, sum(n for _, _, n in current), copies))
        current.clear()

    for item in found.label_folders:
        limit = chunk_files * (ZIP_CHUNK_FACTOR if item[0].is_zip else 1)
        if current and (item[0] != current[0][0] or sum(n for _, _, n in current) >= limit):
            flush()
        current.append(item)
    flush()
    return tasks
