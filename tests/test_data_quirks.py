"""Ingestion of trees as people keep them and labels as they break: zips kept beside their extracted folders, cut
zips, macOS metadata files, and label fields no writer should produce but a 2.6 M-file data set will hold."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from pillsnap.data import aihub
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.synth import generate_dataset
from pillsnap.utils.zips import read_central_directory

ROWS = ["photo_id", "mapping_code", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "split"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, dict, object]:
    """A small synthetic tree, extracted, and its scan."""
    base = tmp_path_factory.mktemp("quirks")
    generate_dataset(base / "data", num_classes=3, per_class=3, combo=3, seed=5, image_scale=0.05, workers=1,
                     progress=False)
    report = scan_dataset(base / "data", base / "m", workers=1, progress=False)
    return base / "data", report, load_manifest(base / "m")


def zip_beside(folder: Path) -> Path:
    """`folder` zipped as AI Hub zips are (members relative to it: `K-x_json/...`), next to it as `<folder>.zip`."""
    target = folder.with_suffix(".zip")
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return target


def partition_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_dir() and p.name[:3] in ("TL_", "TS_"))


def rows(frame) -> list[tuple]:
    return sorted(map(tuple, frame[ROWS].astype(str).to_numpy()))


def test_zips_kept_beside_their_extracted_folders_are_read_once(plain, tmp_path) -> None:
    data, before, manifest = plain
    root = shutil.copytree(data, tmp_path / "data")
    for folder in partition_folders(root):
        zip_beside(folder)
    report = scan_dataset(root, tmp_path / "m", workers=2, chunk_files=4, progress=False)
    assert report["records_kept"] == before["records_kept"] and report["label_files"] == before["label_files"]
    assert report["duplicate_label_files"] == before["label_files"]
    assert report["duplicate_label_folders"] == len([p for p in root.rglob("*_json") if p.is_dir()]) > 0
    assert rows(load_manifest(tmp_path / "m")) == rows(manifest)  # every pill once: one box per pill for YOLO


def test_a_partly_extracted_folder_is_completed_from_its_zip(plain, tmp_path) -> None:
    data, before, manifest = plain
    root = shutil.copytree(data, tmp_path / "data")
    for folder in partition_folders(root):
        zip_beside(folder)
    labels = sorted(p for p in root.rglob("*.json") if "TL_" in str(p))
    for path in labels[::2]:  # an unzip stopped half-way
        path.unlink()
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["records_kept"] == before["records_kept"]
    assert report["duplicate_label_files"] == len(labels) - len(labels[::2])
    assert rows(load_manifest(tmp_path / "m")) == rows(manifest)


def test_an_unreadable_zip_is_named_in_the_report(plain, tmp_path, caplog) -> None:
    data, before, _ = plain
    root = shutil.copytree(data, tmp_path / "data")
    first = partition_folders(root)[0]
    cut = zip_beside(first)
    shutil.rmtree(first)
    cut.write_bytes(cut.read_bytes()[:-30])  # a download cut short: no end of central directory
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["unreadable_zips"] == [str(cut.resolve())]
    assert 0 < report["records_kept"] < before["records_kept"]
    assert "could not be read" in caplog.text and cut.name in caplog.text


def test_a_member_name_flagged_utf8_but_not_utf8_does_not_lose_its_zip(plain, tmp_path) -> None:
    data, before, _ = plain
    root = shutil.copytree(data, tmp_path / "data")
    first = partition_folders(root)[0]
    labels = zip_beside(first)
    shutil.rmtree(first)
    with zipfile.ZipFile(labels, "a") as zf:
        zf.writestr("readme_abcd.txt", b"notes")
    raw = bytearray(labels.read_bytes().replace(b"abcd", "안내".encode("cp949")))  # a name in cp949 ...
    for header in (b"PK\x03\x04", b"PK\x01\x02"):
        at = raw.rfind(header) + (6 if header == b"PK\x03\x04" else 8)
        raw[at:at + 2] = struct.pack("<H", struct.unpack_from("<H", raw, at)[0] | 0x800)  # ... flagged UTF-8
    labels.write_bytes(bytes(raw))
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(labels).namelist()  # the standard library refuses the whole zip
    assert "readme_" in "".join(read_central_directory(str(labels)))
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["unreadable_zips"] == [] and report["records_kept"] == before["records_kept"]


@pytest.fixture
def split_tree(plain, tmp_path) -> tuple[Path, dict, object]:
    """The small tree with every other single-pill photo and label in AI Hub's Validation partition under the same
    code folders (as AI Hub ships them), and its scan."""
    from aihub_trees import split_partitions

    root = shutil.copytree(plain[0], tmp_path / "split")
    assert split_partitions(root) > 0
    report = scan_dataset(root, tmp_path / "m_split", workers=1, progress=False)
    assert report["duplicate_label_folders"] == 0  # AI Hub's own pairing of the partitions is no duplicate
    return root, report, load_manifest(tmp_path / "m_split")


def same_rows(frame) -> list[tuple]:
    return sorted(map(tuple, frame[[*ROWS, "aihub_part"]].astype(str).to_numpy()))


def test_other_partition_labels_unzipped_outside_the_partition_folders(split_tree, tmp_path) -> None:
    """Validation labels unzipped into a folder of their own: each label still finds its photo, and its row keeps
    the photo's partition, so the split still takes AI Hub's Validation as test."""
    root, before, manifest = split_tree
    shutil.move(str(next(root.rglob("VL_1_단일"))), root / "labels_val")
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["records_kept"] == before["records_kept"] and report["skipped"]["missing_image"] == 0
    assert same_rows(load_manifest(tmp_path / "m")) == same_rows(manifest)
    assert report["split"]["aihub_validation_is_test"] == before["split"]["aihub_validation_is_test"]


def test_a_copy_of_one_partitions_labels_beside_both_partitions_is_read_once(split_tree, tmp_path) -> None:
    root, before, manifest = split_tree
    shutil.copytree(next(root.rglob("TL_1_단일")), root / "mylabels")  # `unzip -d mylabels TL_1_단일.zip`
    report = scan_dataset(root, tmp_path / "m", workers=2, chunk_files=3, progress=False)
    assert report["records_kept"] == before["records_kept"] and report["image_without_label"] == 0
    assert report["duplicate_label_files"] > 0 and report["duplicate_label_folders"] > 0
    assert same_rows(load_manifest(tmp_path / "m")) == same_rows(manifest)


def test_macos_metadata_files_are_not_labels_or_photos(plain, tmp_path) -> None:
    data, before, manifest = plain
    root = shutil.copytree(data, tmp_path / "data")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        (path.parent / f"._{path.name}").write_bytes(b"\0\5\26\7 Mac OS X metadata")
    folder = partition_folders(root)[0]
    with zipfile.ZipFile(folder.with_suffix(".zip"), "w") as zf:  # zipped on a Mac: __MACOSX/ beside the files
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            zf.write(path, f"__MACOSX/{name}" if path.name.startswith("._") else name)
    shutil.rmtree(folder)
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["label_files"] == before["label_files"] and report["records_kept"] == before["records_kept"]
    assert report["image_without_label"] == 0 and report["records_skipped"] == 0
    assert rows(load_manifest(tmp_path / "m")) == rows(manifest)


def test_a_label_naming_its_photo_under_a_folder_is_kept(plain, tmp_path) -> None:
    data, before, _ = plain
    root = shutil.copytree(data, tmp_path / "data")
    for path in root.rglob("*.json"):
        label = json.loads(path.read_text(encoding="utf-8"))
        image = label["images"][0]
        image["file_name"] = f"{path.parent.name.removesuffix('_json')}\\{image['file_name']}"
        path.write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["records_kept"] == before["records_kept"] and report["skipped"]["file_name_mismatch"] == 0


def label() -> dict:
    fields = {k: "" for k in aihub.IMAGE_KEYS if k != "id"}
    fields.update(file_name="K-000030_0_2_0_1_90_300_200.png", width=976, height=1280, drug_N="K-000030",
                  dl_mapping_code="K-000030", camera_la=90, camera_lo=300)
    return aihub.build_label(fields, (356, 540, 200, 200), 1, 1)


@pytest.mark.parametrize("mutate", [
    lambda d: d["images"][0].update(width="inf"),
    lambda d: d["images"][0].update(width=3_000_000_000, height=3_000_000_000),  # past the manifest's int32
    lambda d: d["annotations"][0].update(bbox=[1e400, 0, 10, 10]),  # json reads 1e400 as infinity
])
def test_numbers_no_manifest_can_hold_are_bad_fields(mutate) -> None:
    data = label()
    mutate(data)
    with pytest.raises(aihub.LabelError) as err:
        aihub.parse_label(data)
    assert err.value.reason == "bad_field"


def test_fields_nothing_depends_on_never_drop_a_label() -> None:
    data = label()
    data["images"][0].update(id="img_001", camera_la="90도")
    rec = aihub.parse_label(data)
    assert rec.image_id == 0 and rec.camera_la == -1  # the file name's 90 is kept; the JSON's is a mismatch
    assert aihub.attribute_mismatches(rec, aihub.parse_file_name(rec.file_name)) == ["camera_la"]
    data["images"][0].update(id=None, camera_la=None)
    assert aihub.parse_label(data).camera_la == 0


def test_unattested_photo_codes_keep_the_labels_own_words_and_are_never_a_mismatch() -> None:
    """Only some file-name codes have a real spelling we have seen (back_color 2 = 연회색 배경, ...); the others'
    words are our own. A real label writing its own word for back_color 0, or our word for code 1 at code 0, was
    stored as our word and counted as a disagreement with its file name."""
    data = label()
    data["images"][0].update(file_name="K-000030_0_0_0_0_90_300_200.png", back_color="검정 배경", light_color="백색광",
                             drug_dir="앞면")
    rec = aihub.parse_label(data)
    info = aihub.parse_file_name(rec.file_name)
    assert aihub.file_name_attributes(info, rec)[:3] == ("앞면", "검정 배경", "백색광")
    assert aihub.attribute_mismatches(rec, info) == []
    data["images"][0].update(back_color="청색 배경")  # our made-up word for code 1, on a code-0 photo
    assert aihub.attribute_mismatches(aihub.parse_label(data), info) == []
    data["images"][0].update(back_color="연회색 배경")  # another code's real word: a mismatch, not kept
    rec = aihub.parse_label(data)
    assert aihub.attribute_mismatches(rec, info) == ["back_color"]
    assert aihub.file_name_attributes(info, rec)[1] == "검은색 배경"
    data["images"][0].update(file_name="K-000030_0_2_1_1_90_300_200.png", back_color="", drug_dir="앞면",
                             light_color="주광색")
    rec = aihub.parse_label(data)
    info = aihub.parse_file_name(rec.file_name)
    assert aihub.file_name_attributes(info, rec)[:3] == ("뒷면", "연회색 배경", "주광색")  # attested: the file name's
    assert aihub.attribute_mismatches(rec, info) == ["drug_dir"]


def test_a_lone_surrogate_is_replaced_so_the_class_map_can_be_written(tmp_path) -> None:
    data = json.loads('{"name": "\\ud83d\\uc57d \\ud83d\\ude00"}')  # a cut emoji, a whole one
    info = aihub.class_info({"dl_name": data["name"]})
    assert info["name"] == "\ufffd약 \U0001f600"
    (tmp_path / "x.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")


def test_a_camera_angle_past_the_manifest_column_is_a_bad_file_name() -> None:
    with pytest.raises(ValueError, match="out of range"):
        aihub.parse_file_name("K-000030_0_2_0_1_90_40000_200.png")


def test_a_copy_extracted_outside_the_partition_folders_keeps_the_partition(plain, tmp_path) -> None:
    data, before, manifest = plain
    root = shutil.copytree(data, tmp_path / "data")
    for folder in partition_folders(root):
        if folder.name.startswith("TL_"):  # labels unzipped again into a folder that names no partition
            shutil.copytree(folder, root / "unzipped", dirs_exist_ok=True)
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["records_kept"] == before["records_kept"] and report["duplicate_label_files"] > 0
    scanned = load_manifest(tmp_path / "m")
    assert rows(scanned) == rows(manifest) and set(scanned["aihub_part"]) == {"Training"}


def test_a_label_of_the_same_name_in_both_partitions_is_read_once_and_counted_apart(split_tree, tmp_path) -> None:
    root, before, _ = split_tree
    training = next(root.rglob("TL_1_단일"))
    validation = next(root.rglob("VL_1_단일"))
    label = next(training.rglob("*.json"))
    twin = validation / label.relative_to(training)
    twin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(label, twin)  # the same photo name labelled in the other partition too
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["duplicate_label_files_across_partitions"] == 1 and report["duplicate_label_files"] == 0
    assert report["records_kept"] == before["records_kept"]
