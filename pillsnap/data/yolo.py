"""The one YOLO export (images + labels txt + data.yaml, one class `pill`) and detection loaders built with
ultralytics' own dataset, augmentation and collate. Export is idempotent: unchanged files are not rewritten.
"""

from __future__ import annotations

import logging
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

from pillsnap.utils import atomic_path, ensure_dir
from pillsnap.utils.boxes import xywh_to_xyxy, xyxy_to_cxcywh
from pillsnap.utils.images import read_bytes, split_zip_path
from pillsnap.utils.io import check_free_space, save_text
from pillsnap.utils.offline import ultralytics_offline

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
NAMES = {0: "pill"}


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


def _place_image(source: str, dest: Path) -> bool:
    """Symlink a plain file (cheap); copy a zip member out once. Returns True when something was written."""
    if source.startswith("zip:"):
        if dest.is_file():
            return False
        with atomic_path(dest) as tmp:
            tmp.write_bytes(read_bytes(source))
        return True
    if dest.is_symlink() and os.readlink(dest) == source:
        return False
    # made under a private name and moved into place: another process exporting the same photos at once (two
    # commands, or ranks) finds either no link or a whole one, never a FileExistsError between check and link
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lnk")
    os.symlink(source, tmp)
    os.replace(tmp, dest)
    return True


def _check_copy_space(rows: pd.DataFrame, out_dir: Path) -> None:
    """Photos inside zips are copied out (the others are linked): refuse an export whose copies would not fit on
    the disk, measured from the zips' own directories before anything is written (a Stage 4 export of the zipped
    real data copies tens of thousands of 976 x 1280 photos)."""
    photos = rows.drop_duplicates("photo_id")
    zipped = photos[photos["image_path"].astype(str).str.startswith("zip:")]
    need = 0
    by_zip: dict[str, list[str]] = {}
    for photo_id, split, path in zip(zipped["photo_id"], zipped["split"], zipped["image_path"].astype(str),
                                     strict=True):
        if not (out_dir / "images" / split / f"{photo_id}.png").is_file():
            archive, member = split_zip_path(path)
            by_zip.setdefault(archive, []).append(member)
    for archive, members in by_zip.items():
        with zipfile.ZipFile(archive) as opened:
            need += sum(opened.getinfo(member).file_size for member in members)
    if need:
        check_free_space(out_dir, need, f"the detection export ({sum(map(len, by_zip.values())):,} photos copied "
                         "out of zips)", "point paths.cache_dir at a larger disk, or extract the zips once and scan "
                         "the extracted tree (photos on disk are linked, not copied)")


def _remove_stale(directory: Path, keep: set[str]) -> int:
    removed = 0
    for path in directory.iterdir():
        if path.name not in keep and path.suffix in (".png", ".txt"):
            path.unlink()
            removed += 1
    return removed


def _export_split(photos: pd.DataFrame, out_dir: Path, split: str) -> dict[str, int]:
    images, labels = ensure_dir(out_dir / "images" / split), ensure_dir(out_dir / "labels" / split)
    written = 0
    names = set()
    for photo_id, image_path, text in _label_texts(photos):
        names.add(photo_id)
        written += _place_image(image_path, images / f"{photo_id}.png")
        written += _write_if_changed(labels / f"{photo_id}.txt", text)
    removed = _remove_stale(images, {f"{n}.png" for n in names}) + _remove_stale(labels, {f"{n}.txt" for n in names})
    if written or removed:  # ultralytics' label cache would otherwise describe the previous export
        (out_dir / "labels" / f"{split}.cache").unlink(missing_ok=True)
    return {"photos": len(names), "written": written, "removed": removed}


def _log_left_out(rows: pd.DataFrame) -> None:
    if not rows.empty:
        LOGGER.info("YOLO export: %d photos left out of detection: a pill without a box, or boxes that overlap or "
                    "outnumber the pills (label_checks in scan_report.json)", rows["photo_id"].nunique())


def export_yolo(rows: pd.DataFrame, out_dir: str | Path, include_single: bool = False,
                include_incomplete: bool = False) -> Path:
    """Export the rows' photos (combination; optionally single) per split to YOLO format; returns data.yaml.

    Photos flagged `incomplete_gt` are left out by default: an unlabelled pill would be taught as background, a
    copied box as a pill where there is none.
    """
    out_dir = ensure_dir(Path(out_dir).resolve())
    keep = rows["image_type"].eq("combination") | (include_single & rows["image_type"].eq("single"))
    if not include_incomplete:
        _log_left_out(rows[keep & rows["incomplete_gt"].astype(bool)])
        keep &= ~rows["incomplete_gt"].astype(bool)
    rows = rows[keep]
    _check_copy_space(rows, out_dir)
    summary = {s: _export_split(rows[rows["split"] == s], out_dir, s) for s in SPLITS}
    data = {"path": str(out_dir), **{s: f"images/{s}" for s in SPLITS}, "nc": 1, "names": NAMES}
    data_yaml = out_dir / "data.yaml"
    _write_if_changed(data_yaml, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    LOGGER.info("YOLO export %s: %s", out_dir, summary)
    return data_yaml


def count_images(data_yaml: str | Path, split: str) -> int:
    data = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    folder = Path(data["path"]) / data[split]
    return sum(1 for p in folder.glob("*.png")) if folder.is_dir() else 0


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
