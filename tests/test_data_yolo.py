"""YOLO export: layout, normalised labels, idempotence, stale files, incomplete photos left out."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pillsnap.data.scan import load_manifest
from pillsnap.data.yolo import build_detection_loader, count_images, export_yolo


def combos(manifest_dir):
    manifest = load_manifest(manifest_dir)
    return manifest[manifest.image_type == "combination"]


def test_export_layout_and_labels(manifest_dir, tmp_path):
    rows = combos(manifest_dir)
    data_yaml = export_yolo(rows, tmp_path / "yolo")
    data = yaml.safe_load(data_yaml.read_text())
    assert data["names"] == {0: "pill"} and data["nc"] == 1 and data["train"] == "images/train"
    total = sum(count_images(data_yaml, s) for s in ("train", "val", "test"))
    assert total == rows["photo_id"].nunique()
    photo = rows.iloc[0]
    label = (tmp_path / "yolo" / "labels" / photo.split / f"{photo.photo_id}.txt").read_text().splitlines()
    assert len(label) == (rows.photo_id == photo.photo_id).sum()
    expected = (photo.bbox_x + photo.bbox_w / 2) / photo.width
    assert any(abs(float(line.split()[1]) - expected) < 1e-5 for line in label)
    image = tmp_path / "yolo" / "images" / photo.split / f"{photo.photo_id}.png"
    assert image.is_symlink() and os.readlink(image) == photo.image_path


def test_export_is_idempotent_and_removes_stale_files(manifest_dir, tmp_path):
    rows = combos(manifest_dir)
    data_yaml = export_yolo(rows, tmp_path / "yolo")
    stamps = {p: p.lstat().st_mtime_ns for p in (tmp_path / "yolo").rglob("*") if p.is_file() or p.is_symlink()}
    export_yolo(rows, tmp_path / "yolo")
    assert stamps == {p: p.lstat().st_mtime_ns for p in (tmp_path / "yolo").rglob("*") if p.is_file() or p.is_symlink()}
    one_photo = rows[rows.photo_id == rows.photo_id.iloc[0]]
    export_yolo(one_photo, tmp_path / "yolo")
    assert sum(count_images(data_yaml, s) for s in ("train", "val", "test")) == 1
    assert len(list((tmp_path / "yolo" / "labels").rglob("*.txt"))) == 1


def test_incomplete_photos_are_left_out(manifest_dir, tmp_path):
    rows = combos(manifest_dir).copy()
    first = rows.photo_id.iloc[0]
    rows.loc[rows.photo_id == first, "incomplete_gt"] = True
    export_yolo(rows, tmp_path / "yolo")
    assert not list((tmp_path / "yolo").rglob(f"{first}.*"))
    export_yolo(rows, tmp_path / "yolo2", include_incomplete=True)
    assert list((tmp_path / "yolo2").rglob(f"{first}.txt"))


def test_ultralytics_val_loader(manifest_dir, tmp_path):
    rows = combos(manifest_dir).assign(split="val")
    data_yaml = export_yolo(rows, tmp_path / "yolo")
    loader = build_detection_loader(data_yaml, "val", 64, 2, 0, train=False)
    batch = next(iter(loader))
    assert batch["img"].shape[0] == 2 and batch["img"].shape[1] == 3
    assert batch["bboxes"].shape[0] == len(batch["batch_idx"]) > 0


def test_label_lines_of_interleaved_rows_group_by_photo_in_row_order(tmp_path):
    """The export builds every photo's label in one pass over arrays (a DataFrame per photo took minutes at the
    full data set's size): rows of different photos interleaved and unsorted still give each photo its own lines,
    pills in row order, and each photo its own image."""
    import pandas as pd

    from pillsnap.data.yolo import _label_texts

    rows = pd.DataFrame({"photo_id": ["b", "a", "b", "c", "a"], "image_path": ["/b", "/a", "/b", "/c", "/a"],
                         "bbox_x": [0, 10, 20, 5, 40], "bbox_y": [0, 10, 20, 5, 0], "bbox_w": [10, 20, 30, 10, 10],
                         "bbox_h": [10, 20, 30, 10, 20], "width": [100] * 5, "height": [200] * 5})
    texts = _label_texts(rows)
    assert [(p, path) for p, path, _ in texts] == [("a", "/a"), ("b", "/b"), ("c", "/c")]
    assert texts[0][2] == "0 0.200000 0.100000 0.200000 0.100000\n0 0.450000 0.050000 0.100000 0.100000\n"
    assert texts[1][2].splitlines()[1] == "0 0.350000 0.175000 0.300000 0.150000"
    assert _label_texts(rows.iloc[:0]) == []


def test_photos_copied_out_of_zips_must_fit_on_the_disk(tmp_path, monkeypatch):
    """Zipped photos are copied out (plain files are linked): an export whose copies would not fit is refused
    before anything is written, with the size measured from the zips; photos already copied need nothing."""
    import shutil
    from collections import namedtuple

    import pytest

    from pillsnap.data.scan import scan_dataset
    from pillsnap.data.synth import generate_dataset
    from pillsnap.utils.io import DiskSpaceError

    generate_dataset(tmp_path / "data", 3, 2, 3, seed=0, zip_output=True, image_scale=0.05, workers=1,
                     progress=False)
    scan_dataset(tmp_path / "data", tmp_path / "m", workers=1, progress=False)
    rows = combos(tmp_path / "m")
    assert rows["image_path"].str.startswith("zip:").all()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match=r"detection export \(\d+ photos copied out of zips\) needs"):
        export_yolo(rows, tmp_path / "yolo")
    assert not list((tmp_path / "yolo").rglob("*.png"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    export_yolo(rows, tmp_path / "yolo")
    copied = list((tmp_path / "yolo").rglob("*.png"))
    assert len(copied) == rows["photo_id"].nunique() and not any(p.is_symlink() for p in copied)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    export_yolo(rows, tmp_path / "yolo")  # everything is there: nothing to copy, nothing to refuse
    # a zip fetched again (another time): its photos are copied out again, each in its own file's place (no more
    # disk asked), and carry the zip's time
    archive = rows["image_path"].iloc[0][len("zip:"):].split("!")[0]
    os.utime(archive, ns=(10**9, 10**9))
    export_yolo(rows, tmp_path / "yolo")
    assert all(p.stat().st_mtime_ns == 10**9 for p in (tmp_path / "yolo").rglob("*.png"))


def test_jpeg_export_resizes_each_photo_to_the_detector_size_with_the_same_labels(manifest_dir, tmp_path):
    """Stages 3-4 export the detector's photos resized to its input size as JPEGs (ultralytics resizes every photo
    it loads to that size anyway): the labels, relative to the image, are the photos export's own."""
    from PIL import Image

    rows = combos(manifest_dir)
    plain = export_yolo(rows, tmp_path / "photos")
    small = export_yolo(rows, tmp_path / "jpeg", image_format="jpeg", image_size=96)
    for split in ("train", "val", "test"):
        assert count_images(small, split) == count_images(plain, split)
    photo = rows[rows.split == "train"].iloc[0]
    image = tmp_path / "jpeg" / "images" / "train" / f"{photo.photo_id}.jpg"
    assert not image.is_symlink() and not list((tmp_path / "jpeg" / "images" / "train").glob("*.png"))
    # validation and test keep the photos themselves: the mAP they give is on the photos, as at stages 1-2
    held = [p for split in ("val", "test") for p in (tmp_path / "jpeg" / "images" / split).iterdir()]
    assert held and all(p.suffix == ".png" and p.is_symlink() for p in held)
    with Image.open(image) as opened:  # ultralytics' own sizes: the longer side to 96, the other rounded up
        import math

        scale = 96 / max(photo.width, photo.height)
        assert opened.format == "JPEG" and opened.size == (min(math.ceil(photo.width * scale), 96),
                                                           min(math.ceil(photo.height * scale), 96))
    for label in (tmp_path / "photos" / "labels").rglob("*.txt"):
        assert (tmp_path / "jpeg" / "labels" / label.parent.name / label.name).read_text() == label.read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "jpeg").rglob("*") if p.is_file()}
    export_yolo(rows, tmp_path / "jpeg", image_format="jpeg", image_size=96)  # nothing is resized again
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "jpeg").rglob("*") if p.is_file()}
    train = rows[rows.split == "train"]
    big = export_yolo(train.head(3), tmp_path / "big", image_format="jpeg", image_size=4000)  # never enlarged
    with Image.open(next((tmp_path / "big" / "images").rglob("*.jpg"))) as opened:
        assert opened.size == (int(photo.width), int(photo.height))
    assert count_images(big, "train") == train.head(3)["photo_id"].nunique()
    batch = next(iter(build_detection_loader(small, "train", 96, 2, 0, train=True)))
    assert batch["img"].shape[-1] == 96 and len(batch["bboxes"]) > 0


def test_jpeg_export_leaves_an_undecodable_photo_out_with_its_label(manifest_dir, tmp_path):
    rows = combos(manifest_dir).assign(split="train")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = rows.photo_id.iloc[0]
    rows.loc[rows.photo_id == first, "image_path"] = str(broken)
    data_yaml = export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)
    assert not list((tmp_path / "yolo").rglob(f"{first}.*"))
    assert sum(count_images(data_yaml, s) for s in ("train", "val", "test")) == rows.photo_id.nunique() - 1


def test_a_jpeg_export_that_would_fill_the_disk_is_refused_before_a_photo_is_written(manifest_dir, tmp_path,
                                                                                     monkeypatch):
    import shutil
    from collections import namedtuple

    import pytest

    from pillsnap.utils.io import DiskSpaceError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match="photos as 96 px JPEGs"):
        export_yolo(combos(manifest_dir).assign(split="train"), tmp_path / "yolo", image_format="jpeg",
                    image_size=96)
    assert not list((tmp_path / "yolo").rglob("*.jpg"))


def test_a_resized_jpeg_or_zip_copy_is_made_again_when_its_photo_changes(manifest_dir, tmp_path):
    """Data generated again under the same names (a new synthetic seed) must not leave the old pixels under the new
    labels: a file made from a photo carries the photo's time and is made again when that differs."""
    import shutil

    import numpy as np
    from PIL import Image

    rows = combos(manifest_dir).assign(split="train").copy()
    first = rows.photo_id.iloc[0]
    photo = tmp_path / "photo.png"
    shutil.copy(rows.loc[rows.photo_id == first, "image_path"].iloc[0], photo)
    rows.loc[rows.photo_id == first, "image_path"] = str(photo)
    export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)
    made = tmp_path / "yolo" / "images" / "train" / f"{first}.jpg"
    before = np.asarray(Image.open(made), float)
    others = {p: p.stat().st_mtime_ns for p in made.parent.iterdir() if p != made}
    Image.fromarray(255 - np.asarray(Image.open(photo).convert("RGB"))).save(photo)  # new pixels, same name
    later = made.stat().st_mtime_ns + 10**10  # fetched again later (a time apart, whatever the clock's grain)
    os.utime(photo, ns=(later, later))
    export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)
    assert np.abs(np.asarray(Image.open(made), float) - (255 - before)).mean() < 4  # the new photo's pixels
    assert others == {p: p.stat().st_mtime_ns for p in made.parent.iterdir() if p != made}  # the rest untouched
    photo.write_bytes(b"\x89PNG\r\n\x1a\n no longer a photo")  # a photo replaced by a broken one: left out
    os.utime(photo, ns=(later + 10**10, later + 10**10))
    export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)
    assert not made.exists() and not (tmp_path / "yolo" / "labels" / "train" / f"{first}.txt").exists()


def test_a_jpeg_export_of_photos_out_of_reach_stops_instead_of_training_no_detector(manifest_dir, tmp_path):
    import pytest

    rows = combos(manifest_dir).assign(split="train", image_path=str(tmp_path / "gone" / "photo.png"))
    with pytest.raises(ValueError, match="none of the .* training photos could be decoded"):
        export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)


def test_photos_out_of_reach_leave_an_existing_jpeg_export_as_it_is(manifest_dir, tmp_path):
    """A data disk not mounted says nothing about the files made from its photos: they are kept, not deleted."""
    import shutil

    rows = combos(manifest_dir).assign(split="train").copy()
    shutil.copytree(Path(rows.image_path.iloc[0]).parents[2], tmp_path / "data")
    old_root = str(Path(rows.image_path.iloc[0]).parents[2])
    rows["image_path"] = rows.image_path.str.replace(old_root, str(tmp_path / "data"), regex=False)
    data_yaml = export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64)
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "yolo").rglob("*") if p.is_file()}
    (tmp_path / "data").rename(tmp_path / "unmounted")
    assert export_yolo(rows, tmp_path / "yolo", image_format="jpeg", image_size=64) == data_yaml
    assert made == {p: p.stat().st_mtime_ns for p in (tmp_path / "yolo").rglob("*") if p.is_file()}


def test_zipped_photos_export_past_a_readme_name_zipfile_refuses_and_a_member_gone(tmp_path):
    """A photo zip holding a member name flagged UTF-8 that is not (a readme in cp949): the scan and the loaders read
    it, and so does the export (zipfile refuses the whole archive). A member gone since the scan is left out with its
    label, like an undecodable photo, and the others are copied out."""
    import struct
    import zipfile

    import pytest

    from pillsnap.data.scan import scan_dataset
    from pillsnap.data.synth import generate_dataset

    generate_dataset(tmp_path / "data", 3, 2, 3, seed=0, zip_output=True, image_scale=0.05, workers=1,
                     progress=False)
    scan_dataset(tmp_path / "data", tmp_path / "m", workers=1, progress=False)
    rows = combos(tmp_path / "m").assign(split="val")  # photos as they are: copied out of the zip
    archive = Path(rows["image_path"].iloc[0][len("zip:"):].split("!")[0])
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("readme_abcd.txt", b"notes")
    raw = bytearray(archive.read_bytes().replace(b"abcd", "안내".encode("cp949")))
    for header, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.rfind(header) + flags
        raw[at:at + 2] = struct.pack("<H", struct.unpack_from("<H", raw, at)[0] | 0x800)
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(archive)
    gone = rows.photo_id.iloc[0]
    rows.loc[rows.photo_id == gone, "image_path"] = f"zip:{archive}!K-000000/gone.png"
    data_yaml = export_yolo(rows, tmp_path / "yolo")
    assert count_images(data_yaml, "val") == rows.photo_id.nunique() - 1
    assert not list((tmp_path / "yolo").rglob(f"{gone}.*"))
