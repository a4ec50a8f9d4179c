"""The one YOLO export (images + labels txt + data.yaml, one class `pill`) and detection loaders built with
ultralytics' own dataset, augmentation and collate. Export is idempotent: unchanged files are not rewritten.

The export's images are the photos themselves (`photos`: linked, or copied out of zips), or (`jpeg`,
data.detection_export) the training split's photos resized to the detector's input size and stored as JPEGs:
ultralytics resizes every photo it loads to that size anyway, and decoding a 976x1280 PNG was most of a detector
training image's cost (bench/detection_data.py). Labels are relative to the image's size, so they are the same.
Validation and test keep the photos as they are: they are read once an epoch, and the mAP they report is the
detector's on the photos themselves, as at stages 1-2.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import zipfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pillsnap.config.stage import DETECTION_EXPORTS
from pillsnap.utils import atomic_path, ensure_dir
from pillsnap.utils.boxes import xywh_to_xyxy, xyxy_to_cxcywh
from pillsnap.utils.devices import usable_cores
from pillsnap.utils.images import DECODE_ERRORS, ImageLimits, jpeg_bytes, read_bytes, read_image, split_zip_path
from pillsnap.utils.io import check_free_space, save_text
from pillsnap.utils.offline import ultralytics_offline
from pillsnap.utils.pools import forked_imap
from pillsnap.utils.zips import read_central_directory

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
NAMES = {0: "pill"}
SUFFIX = {"photos": ".png", "jpeg": ".jpg"}
# The disk an export of resized JPEGs may take, as a share of its pixels' raw bytes: quality-95 JPEGs of the
# synthetic photos take ~0.1 of them; real photos, noisier, more.
JPEG_SHARE_OF_RAW = 0.3


def _label_texts(photos: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(photo_id, image_path, YOLO label lines) per photo, sorted by photo id: class 0 and each box as centre and
    size divided by the image width or height, the pills in row order. One pass over arrays: a DataFrame per photo
    cost ~2 ms, minutes at the full data set's ~100,000 photos."""
    photos = photos.sort_values("photo_id", kind="stable")
    xywh = photos[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].to_numpy(dtype=np.float64)
    image_size = photos[["width", "height", "width", "height"]].to_numpy(dtype=np.float64)
    boxes = (xyxy_to_cxcywh(xywh_to_xyxy(xywh)) / image_size).tolist() if len(photos) else []
    lines = [f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for cx, cy, w, h in boxes]
    ids, paths = photos["photo_id"].tolist(), photos["image_path"].tolist()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]] + [len(ids)]
    return [(ids[a], paths[a], "".join(lines[a:b])) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    save_text(path, text)
    return True


def _source_time(source: str) -> int | None:
    """The modification time (ns) of a photo, or of the zip holding it; None when it cannot be reached. A file made
    from a photo (a copy out of a zip, a resized JPEG) is given this time, and made again when the photo's differs:
    data generated or fetched again under the same names must not leave its old pixels under new labels."""
    try:
        return os.stat(split_zip_path(source)[0] if source.startswith("zip:") else source).st_mtime_ns
    except OSError:
        return None


# Times are compared within this much: a folder on a file system keeping coarser times than the photos' (FAT 2 s,
# some network file systems 1 s) would otherwise make every file again at every export.
STAMP_TOLERANCE_NS = 2_000_000_000


def _made_from(dest: Path, source: str) -> bool:
    """Whether `dest` was made from `source` as it now is (see _source_time). A photo out of reach (a data disk not
    mounted) says nothing about the file made from it: a file there is kept."""
    try:
        made = dest.stat().st_mtime_ns
    except OSError:
        return False
    stamp = _source_time(source)
    return stamp is None or abs(made - stamp) <= STAMP_TOLERANCE_NS


def _stamp(path: Path, stamp: int | None) -> None:
    if stamp is not None:
        os.utime(path, ns=(stamp, stamp))


def _place_image(source: str, dest: Path) -> bool:
    """Symlink a plain file (cheap); copy a zip member out once. Returns True when something was written."""
    if source.startswith("zip:"):
        if dest.is_file() and _made_from(dest, source):
            return False
        stamp = _source_time(source)  # before reading: a zip replaced meanwhile is copied again next time
        with atomic_path(dest) as tmp:
            tmp.write_bytes(read_bytes(source))
            _stamp(tmp, stamp)  # on the temp file: the file in place always carries its time
        return True
    if dest.is_symlink() and os.readlink(dest) == source:
        return False
    # made under a private name and moved into place: another process exporting the same photos at once (two
    # commands, or ranks) finds either no link or a whole one, never a FileExistsError between check and link
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lnk")
    os.symlink(source, tmp)
    os.replace(tmp, dest)
    return True


class _ResizeJob:
    """Picklable worker: a (photo, destination) job -> the photo written to the destination as a JPEG at `size` px
    on the longer side, resized as ultralytics resizes what it loads (OpenCV, linear, its rounding; never enlarged),
    in the frame its labels are in (no EXIF turn) and stamped with the photo's time; False for a photo that cannot be
    decoded. Each worker writes its own files: the parent holds no images."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, job: tuple[str, Path]) -> bool:
        import cv2
        from PIL import Image

        source, dest = job
        stamp = _source_time(source)  # before reading: a photo replaced meanwhile is made again next time
        try:
            pixels = np.asarray(read_image(source, ImageLimits(upright=False)))
        except DECODE_ERRORS as err:
            LOGGER.warning("YOLO export: skipping undecodable %s: %s", source, err)
            if stamp is not None:  # the photo is there and broken: a JPEG of what it was before goes too
                dest.unlink(missing_ok=True)
            return False
        height, width = pixels.shape[:2]
        scale = self.size / max(height, width)
        if scale < 1:
            size = (min(math.ceil(width * scale), self.size), min(math.ceil(height * scale), self.size))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(jpeg_bytes(Image.fromarray(pixels)))
            _stamp(tmp, stamp)
        return True


def _resized_jpegs(jobs: list[tuple[str, Path]], size: int) -> set[Path]:
    """Write each (photo, destination) job's resized JPEG, in every usable core; returns the destinations of the
    photos that could not be decoded (none is left there: their photos are left out, labels too)."""
    job = _ResizeJob(size)
    done = map(job, jobs) if len(jobs) < 16 else forked_imap(job, jobs, usable_cores(), chunksize=4)
    return {dest for (_, dest), made in zip(jobs, done, strict=True) if not made}


def _zip_copies(photos: pd.DataFrame, out_dir: Path) -> tuple[int, int]:
    """(bytes, photos) of the photos inside zips not yet copied out, measured from the zips' own directories."""
    zipped = photos[photos["image_path"].astype(str).str.startswith("zip:")]
    by_zip: dict[str, list[str]] = {}
    for photo_id, split, path in zip(zipped["photo_id"], zipped["split"], zipped["image_path"].astype(str),
                                     strict=True):
        if not (out_dir / "images" / split / f"{photo_id}.png").is_file():  # one made again replaces itself
            archive, member = split_zip_path(path)
            by_zip.setdefault(archive, []).append(member)
    need, count = 0, 0
    for archive, members in by_zip.items():
        # the zip's directory as the loaders read it (a name flagged UTF-8 that is not costs that member, where
        # zipfile refuses the archive); a PNG's stored size is its size, and deflate barely shrinks one
        try:
            entries = read_central_directory(archive)
        except DECODE_ERRORS:  # out of reach or broken: its photos are left out when placed, each named
            continue
        found = [entries[member] for member in members if member in entries]  # the others are left out when placed
        need += sum(entry.compress_size for entry in found)
        count += len(found)
    return need, count


def _resized_bytes(photos: pd.DataFrame, out_dir: Path, size: int) -> tuple[int, int]:
    """(bytes, photos) of the resized JPEGs not yet written, estimated at JPEG_SHARE_OF_RAW of their pixels."""
    scale = np.minimum(1.0, size / photos[["width", "height"]].max(axis=1).to_numpy(float))
    missing = np.array([not (out_dir / "images" / split / f"{pid}.jpg").is_file()  # one made again replaces itself
                        for pid, split in zip(photos["photo_id"], photos["split"], strict=True)], bool)
    raw = photos["width"].to_numpy(float) * scale * photos["height"].to_numpy(float) * scale * 3
    return int((raw * missing).sum() * JPEG_SHARE_OF_RAW), int(missing.sum())


def _check_copy_space(rows: pd.DataFrame, out_dir: Path, image_format: str = "photos", size: int = 640) -> None:
    """Refuse an export whose files would not fit on the disk, before anything is written: the photos inside zips
    copied out (the others are linked; a Stage 4 export of the zipped real data copies tens of thousands of
    976 x 1280 photos) and, with `image_format` jpeg, the training photos' resized JPEGs."""
    photos = rows.drop_duplicates("photo_id")
    resized = photos["split"].eq("train") if image_format == "jpeg" else np.zeros(len(photos), bool)
    copied, n_copied = _zip_copies(photos[~resized], out_dir)
    written, n_written = _resized_bytes(photos[resized], out_dir, size) if resized.any() else (0, 0)
    if copied + written:
        parts = [f"{n:,} photos {what}" for n, what in ((n_copied, "copied out of zips"),
                                                       (n_written, f"as {size} px JPEGs")) if n]
        check_free_space(out_dir, copied + written, f"the detection export ({', '.join(parts)})",
                         "point paths.cache_dir at a larger disk" + (", or extract the zips once and scan the "
                                                                     "extracted tree (photos on disk are linked, not "
                                                                     "copied)" if n_copied else ""))


def _remove_stale(directory: Path, keep: set[str]) -> int:
    removed = 0
    for path in directory.iterdir():
        if path.name not in keep and path.suffix in (".png", ".jpg", ".txt"):
            path.unlink()
            removed += 1
    return removed


def _export_split(photos: pd.DataFrame, out_dir: Path, split: str, image_format: str = "photos",
                  size: int = 640) -> dict[str, int]:
    images, labels = ensure_dir(out_dir / "images" / split), ensure_dir(out_dir / "labels" / split)
    suffix = SUFFIX[image_format]
    entries = _label_texts(photos)
    failed: set[Path] = set()
    if image_format == "jpeg":  # photos not yet resized; one that cannot be decoded is left out, label and all
        jobs = [(path, images / f"{pid}{suffix}") for pid, path, _ in entries
                if not _made_from(images / f"{pid}{suffix}", path)]
        failed = _resized_jpegs(jobs, size)
        written = len(jobs) - len(failed)
    else:
        written = 0
        for pid, path, _ in entries:
            try:
                written += _place_image(path, images / f"{pid}{suffix}")
            except (KeyError, zipfile.BadZipFile, FileNotFoundError) as err:  # a zip or member gone or damaged
                # since the scan: as an undecodable photo (a disk that fills up while copying still stops the export)
                LOGGER.warning("YOLO export: skipping unreadable %s: %s", path, err)
                failed.add(images / f"{pid}{suffix}")
    entries = [entry for entry in entries if images / f"{entry[0]}{suffix}" not in failed]
    names = {pid for pid, _, _ in entries}
    written += sum(_write_if_changed(labels / f"{pid}.txt", text) for pid, _, text in entries)
    removed = (_remove_stale(images, {f"{n}{suffix}" for n in names})
               + _remove_stale(labels, {f"{n}.txt" for n in names}))
    if written or removed:  # ultralytics' label cache would otherwise describe the previous export
        (out_dir / "labels" / f"{split}.cache").unlink(missing_ok=True)
    return {"photos": len(names), "written": written, "removed": removed, "undecodable": len(failed)}


def _log_left_out(rows: pd.DataFrame) -> None:
    if not rows.empty:
        LOGGER.info("YOLO export: %d photos left out of detection: a pill without a box, or boxes that overlap or "
                    "outnumber the pills (label_checks in scan_report.json)", rows["photo_id"].nunique())


def export_yolo(rows: pd.DataFrame, out_dir: str | Path, include_single: bool = False,
                include_incomplete: bool = False, image_format: str = "photos", image_size: int = 640) -> Path:
    """Export the rows' photos (combination; optionally single) per split to YOLO format; returns data.yaml.
    `image_format` (DETECTION_EXPORTS): the photos as they are, or the training split's resized to `image_size` px as
    JPEGs (validation and test keep the photos).

    Photos flagged `incomplete_gt` are left out by default: an unlabelled pill would be taught as background, a
    copied box as a pill where there is none.
    """
    if image_format not in DETECTION_EXPORTS:
        raise ValueError(f"data.detection_export={image_format!r}: use one of {', '.join(DETECTION_EXPORTS)}")
    out_dir = ensure_dir(Path(out_dir).resolve())
    keep = rows["image_type"].eq("combination") | (include_single & rows["image_type"].eq("single"))
    if not include_incomplete:
        _log_left_out(rows[keep & rows["incomplete_gt"].astype(bool)])
        keep &= ~rows["incomplete_gt"].astype(bool)
    rows = rows[keep]
    _check_copy_space(rows, out_dir, image_format, image_size)
    summary = {s: _export_split(rows[rows["split"] == s], out_dir, s, image_format if s == "train" else "photos",
                                image_size) for s in SPLITS}
    _check_unreadable(summary["train"], out_dir)
    data = {"path": str(out_dir), **{s: f"images/{s}" for s in SPLITS}, "nc": 1, "names": NAMES}
    data_yaml = out_dir / "data.yaml"
    _write_if_changed(data_yaml, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    LOGGER.info("YOLO export %s: %s", out_dir, summary)
    return data_yaml


def _check_unreadable(train: dict[str, int], out_dir: Path) -> None:
    """Photos of the training split that could not be decoded for the resized export: a warning past the share of
    unreadable data a stage tolerates, an error when none could be (the photos out of reach: a disk not mounted, a
    zip moved), since the detector would otherwise not train at all and nothing would say so."""
    from pillsnap.data.cache import UNREADABLE_LIMIT

    failed, asked = train["undecodable"], train["undecodable"] + train["photos"]
    if failed and not train["photos"]:
        raise ValueError(f"the detection export {out_dir}: none of the {failed:,} training photos could be decoded "
                         "(the log names each): are the photos in reach under paths.data_root?")
    if failed > UNREADABLE_LIMIT * asked:
        LOGGER.warning("YOLO export %s: %d of the %d training photos could not be decoded, more than the %.0f%% of "
                       "unreadable data a stage tolerates: were the photos out of reach? They are tried again at the "
                       "next export", out_dir, failed, asked, 100 * UNREADABLE_LIMIT)


def count_images(data_yaml: str | Path, split: str) -> int:
    data = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    folder = Path(data["path"]) / data[split]
    return sum(1 for p in folder.iterdir() if p.suffix in (".png", ".jpg")) if folder.is_dir() else 0


def _hyp(image_size: int, batch_size: int, workers: int, augment: Mapping[str, Any] | None) -> Any:
    """ultralytics' training arguments for its dataset: our sizes and the detection augmentation (train.detection.
    augment, in ultralytics' names; close_mosaic is applied by the step loop, not the dataset)."""
    from ultralytics.cfg import get_cfg

    extra = {k: v for k, v in (augment or {}).items() if k != "close_mosaic"}
    return get_cfg(overrides={"imgsz": image_size, "batch": batch_size, "workers": workers, "single_cls": True,
                              "task": "detect", "mode": "train", "cache": False, "plots": False, **extra})


def build_detection_loader(data_yaml: str | Path, split: str, image_size: int, batch_size: int, workers: int,
                           train: bool, device: str = "cpu", augment: Mapping[str, Any] | None = None) -> Any:
    """An ultralytics dataloader for one split of an export (batch = the ultralytics dict; on train, ultralytics'
    augmentation as `augment` sets it: HSV, flips, scale, translate, mosaic)."""
    ultralytics_offline()  # before the first ultralytics import: no hub or DNS look-ups
    from ultralytics.data import build_dataloader, build_yolo_dataset

    data = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    data["channels"] = 3
    ucfg = _hyp(image_size, batch_size, workers, augment if train else None)
    dataset = build_yolo_dataset(ucfg, str(Path(data["path"]) / data[split]), batch_size, data,
                                 mode="train" if train else "val", rect=not train, stride=32)
    loader = build_dataloader(dataset, batch_size, workers, shuffle=train, rank=-1, drop_last=False,
                              pin_memory=device.startswith("cuda"), device=device)
    # its workers start at the first iteration: each seeds itself as ultralytics does, then freezes what it inherited
    loader.worker_init_fn = partial(start_worker, loader.worker_init_fn)
    return loader


def start_worker(seed: Callable[[int], None] | None, worker_id: int) -> None:
    """A detection loader worker's start: ultralytics' seeding, then `data.datasets.worker_init`."""
    from pillsnap.data.datasets import worker_init

    if seed is not None:
        seed(worker_id)
    worker_init(worker_id)


def close_mosaic(loader: Any, augment: Mapping[str, Any] | None = None) -> bool:
    """Stop mosaic (and mixup, copy-paste) in a training loader from now on, as ultralytics' own trainer does for
    its last `close_mosaic` epochs; False when the loader has no mosaic to stop."""
    dataset = getattr(loader, "dataset", None)
    # ultralytics marks a closed dataset with mosaic=False (the attribute is absent before)
    if not getattr(dataset, "augment", False) or getattr(dataset, "mosaic", True) is False:
        return False
    ultralytics_offline()
    dataset.mosaic = False
    dataset.close_mosaic(hyp=_hyp(int(dataset.imgsz), 1, 0, augment))
    if hasattr(loader, "reset"):  # worker processes hold their own copy of the dataset: restart them
        loader.reset()
    return True
