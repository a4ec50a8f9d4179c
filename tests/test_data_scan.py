"""Ingestion: manifests, class map, splits, bad records counted by reason, zips, resume, parallel."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pillsnap.data import aihub, scan_chunk
from pillsnap.data.scan import load_class_map, load_manifest, scan_dataset

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "aihub_real_labels"
W, H = 40, 50


def label_bytes(stem: str, code: str, bbox=(5, 5, 10, 12), file_name: str | None = None) -> bytes:
    fields = {k: "" for k in aihub.IMAGE_KEYS if k != "id"}
    fields.update(file_name=file_name or f"{stem}.png", width=W, height=H, drug_N=code, dl_mapping_code=code,
                  dl_name=f"약 {code}\u00a0", drug_shape="원형", color_class1="하양", di_edi_code="1,2")
    return aihub.dump_label(aihub.build_label(fields, bbox, 1, 1))


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), (120, 130, 140)).save(path)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def broken_root(tmp_path) -> Path:
    """Hand-written tree with one record per bad-record reason, plus good single and combination records."""
    root = tmp_path / "data"
    img, lab = root / "원천데이터" / "TS_1_단일" / "K-000001", root / "라벨링데이터" / "TL_1_단일" / "K-000001_json"
    stem = "K-000001_0_2_0_1_90_{:03d}_200"
    for lo in (0, 20, 60, 80, 100, 120, 140):  # images; 40 is missing on purpose
        png(img / f"{stem.format(lo)}.png")
    png(img / "K-000001_index.png")
    write(lab / f"{stem.format(0)}.json", label_bytes(stem.format(0), "K-000001"))
    write(lab / f"{stem.format(20)}.json", label_bytes(stem.format(20), "K-000001")[:200])  # truncated
    write(lab / f"{stem.format(40)}.json", label_bytes(stem.format(40), "K-000001"))  # no image
    write(lab / f"{stem.format(60)}.json", label_bytes(stem.format(60), "K-000001", bbox=(35, 5, 10, 10)))
    write(lab / f"{stem.format(80)}.json", label_bytes(stem.format(80), "K-000001", bbox=(5, 5, 0, 10)))
    write(lab / f"{stem.format(120)}.json", label_bytes(stem.format(120), "K-12AB"))
    write(lab / f"{stem.format(140)}.json", label_bytes(stem.format(140), "K-000001", file_name="other.png"))
    write(lab / "notes.json", b"{}")  # not an AI Hub file name; image 100 has no label
    combo = "K-000001-000002-000003"
    cstem = f"{combo}_0_2_0_2_70_000_200"
    png(root / "원천데이터" / "TS_1_조합" / combo / f"{cstem}.png")
    clab = root / "라벨링데이터" / "TL_1_조합" / f"{combo}_json"
    write(clab / "K-000001" / f"{cstem}.json", label_bytes(cstem, "K-000001", bbox=(1, 1, 10, 10)))
    write(clab / "K-000002" / f"{cstem}.json", label_bytes(cstem, "K-000002", bbox=(20, 20, 10, 10)))
    write(clab / "K-000009" / f"{cstem}.json", label_bytes(cstem, "K-000009", bbox=(5, 30, 5, 5)))
    return root


def test_every_bad_record_reason_is_counted(broken_root, tmp_path):
    report = scan_dataset(broken_root, tmp_path / "out", workers=1, progress=False)
    skipped = report["skipped"]
    assert skipped["bad_json"] == 1 and skipped["missing_image"] == 1
    assert skipped["bbox_outside_image"] == 1 and skipped["bbox_zero_size"] == 1
    assert skipped["bad_code"] == 1 and skipped["bad_file_name"] == 1
    assert skipped["file_name_mismatch"] == 1 and skipped["code_not_in_folder"] == 1
    assert report["label_files"] == 11 and report["records_kept"] == 3 and report["records_skipped"] == 8
    assert report["image_without_label"] == 1  # *index.png is not an image of the data set
    assert report["photos"] == {"single": 1, "combination": 1} and report["incomplete_gt_photos"] == 1
    manifest = load_manifest(tmp_path / "out")
    combo = manifest[manifest["image_type"] == "combination"]
    assert sorted(combo["mapping_code"]) == ["K-000001", "K-000002"] and combo["incomplete_gt"].all()
    assert combo["split"].nunique() == 1 and combo["photo_id"].nunique() == 1
    assert set(load_class_map(tmp_path / "out")) == {"K-000001", "K-000002"}  # no class from skipped records


def test_manifest_columns_and_files(manifest_dir, synth_root):
    manifest = load_manifest(manifest_dir)
    for column in ("image_path", "label_path", "mapping_code", "image_type", "source", "split", "photo_id", "width",
                   "height", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "incomplete_gt", "drug_dir", "back_color",
                   "light_color", "camera_la", "camera_lo"):
        assert column in manifest.columns
    csv = pd.read_csv(manifest_dir / "manifest.csv")
    assert len(csv) == len(manifest) and list(csv.columns) == list(manifest.columns)
    assert set(manifest["image_type"]) == {"single", "combination"}
    assert set(manifest["source"]) == {"TL_1_단일", "TL_1_조합"}
    assert all(Path(p).is_file() for p in manifest["image_path"])
    singles = manifest[manifest["image_type"] == "single"]
    assert len(singles) == 36 and singles["photo_id"].is_unique
    assert ((manifest["bbox_x"] + manifest["bbox_w"]) <= manifest["width"]).all()


def test_splits_have_no_leakage_and_are_stratified(manifest_dir):
    manifest = load_manifest(manifest_dir)
    assert (manifest.groupby("photo_id")["split"].nunique() == 1).all()
    assert (manifest.groupby("split_group")["split"].nunique() == 1).all()  # no near-duplicates across splits
    singles = manifest[manifest["image_type"] == "single"]
    per_class = singles.groupby(["mapping_code", "split"]).size().unstack(fill_value=0)
    # 6 photos per class in sweeps of 1-2 photos: about one photo each for test and val, never none
    assert (per_class["val"] >= 1).all() and (per_class["test"] >= 1).all() and (per_class["train"] >= 3).all()
    combos = manifest[manifest["image_type"] == "combination"].drop_duplicates("photo_id")
    assert set(combos["split"]) == {"train", "val", "test"}


def test_split_depends_on_seed_only(synth_root, manifest_dir, tmp_path):
    again = scan_dataset(synth_root, tmp_path / "again", workers=1, progress=False)
    other = scan_dataset(synth_root, tmp_path / "other", workers=1, split_seed=7, progress=False)
    base = load_manifest(manifest_dir).set_index("label_path")["split"]
    assert load_manifest(tmp_path / "again").set_index("label_path")["split"].equals(base)
    assert not load_manifest(tmp_path / "other").set_index("label_path")["split"].equals(base)
    assert again["rows_per_split"] == load_manifest(manifest_dir)["split"].value_counts().to_dict()
    saved = json.loads((tmp_path / "again" / "scan_report.json").read_text())
    assert all(type(v) is int for v in saved["rows_per_split"].values())  # numbers, not numpy-as-str
    assert other["records_kept"] == again["records_kept"]


def test_class_map_and_report(manifest_dir):
    classes = load_class_map(manifest_dir)
    codes = list(classes)
    assert codes == sorted(codes) and len(codes) == 6
    entry = classes[codes[0]]
    assert entry["index"] == 0 and entry["shape"] and entry["colors"] and entry["edi_codes"]
    for key in ("name", "name_en", "company", "print_front", "print_back", "line_front", "line_back", "form"):
        assert key in entry
    assert not any(e["name"].endswith("\u00a0") for e in classes.values())


def test_zipped_tree_gives_the_same_manifest(tmp_path):
    from pillsnap.data.synth import generate_dataset

    args = dict(num_classes=3, per_class=3, combo=2, seed=2, image_scale=0.05, workers=1, progress=False)
    generate_dataset(tmp_path / "plain", **args)
    generate_dataset(tmp_path / "zipped", zip_output=True, **args)
    plain = scan_dataset(tmp_path / "plain", tmp_path / "m1", workers=1, progress=False)
    zipped = scan_dataset(tmp_path / "zipped", tmp_path / "m2", workers=1, progress=False)
    assert plain["records_kept"] == zipped["records_kept"] >= 9 + 2 * 2
    a, b = load_manifest(tmp_path / "m1"), load_manifest(tmp_path / "m2")
    assert b["image_path"].str.startswith("zip:").all() and ".zip!K-" in b["image_path"].iloc[0]
    cols = ["photo_id", "mapping_code", "split", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
    assert a[cols].sort_values(cols).reset_index(drop=True).equals(b[cols].sort_values(cols).reset_index(drop=True))


def test_parallel_scan_equals_serial(synth_root, manifest_dir, tmp_path):
    report = scan_dataset(synth_root, tmp_path / "par", workers=2, chunk_files=5, progress=False)
    assert report["chunks"] > 2
    cols = ["label_path", "split", "bbox_x", "incomplete_gt"]
    assert load_manifest(tmp_path / "par")[cols].sort_values("label_path").reset_index(drop=True).equals(
        load_manifest(manifest_dir)[cols].sort_values("label_path").reset_index(drop=True))


class MachineDown(RuntimeError):
    pass


def test_interrupted_scan_resumes_without_reparsing(synth_root, tmp_path, monkeypatch):
    calls: list[str] = []
    armed = [True]
    real = scan_chunk.process_chunk

    def flaky(task, parts_dir, seed):
        calls.append(task.task_id)
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise MachineDown  # the machine went down mid-scan
        return real(task, parts_dir, seed)

    monkeypatch.setattr("pillsnap.data.scan.process_chunk", flaky)
    with pytest.raises(MachineDown):
        scan_dataset(synth_root, tmp_path / "m", workers=1, chunk_files=5, progress=False)
    done = calls[:2]
    calls.clear()
    report = scan_dataset(synth_root, tmp_path / "m", workers=1, chunk_files=5, progress=False)
    assert not set(done) & set(calls) and len(calls) == report["chunks"] - 2
    assert report["records_kept"] == 36 + sum(1 for _ in synth_root.rglob("K-*-*_json/K-*/*.json"))
    assert not (tmp_path / "m" / "parts").exists()


def test_missing_root_and_empty_root_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_dataset(tmp_path / "nope", tmp_path / "out", workers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No AI Hub label folders"):
        scan_dataset(tmp_path / "empty", tmp_path / "out", workers=1)


@pytest.mark.skipif(not REAL_LABELS.is_dir(), reason="shared/spec/aihub_real_labels not present")
def test_real_combination_labels_scan(tmp_path):
    """The 8 real labels in a zipped tree with blank 976x1280 photos: errors counted, gaps flagged."""
    root = tmp_path / "real"
    (root / "라벨링데이터").mkdir(parents=True)
    (root / "원천데이터").mkdir()
    with zipfile.ZipFile(root / "라벨링데이터" / "TL_2_조합.zip", "w") as zf:
        for path in sorted(REAL_LABELS.rglob("*.json")):
            zf.write(path, path.relative_to(REAL_LABELS).as_posix())
    with zipfile.ZipFile(root / "원천데이터" / "TS_2_조합.zip", "w") as zf:
        for folder in sorted(p.name[:-5] for p in REAL_LABELS.glob("*_json")):
            stem = next((REAL_LABELS / f"{folder}_json").rglob("*.json")).stem
            blank = tmp_path / "blank.png"
            Image.new("RGB", (976, 1280), (200, 200, 200)).save(blank)
            zf.write(blank, f"{folder}/{stem}.png")
    report = scan_dataset(root, tmp_path / "out", workers=1, progress=False)
    assert report["label_files"] == 8 and report["skipped"]["bbox_outside_image"] == 1
    assert report["records_kept"] == 7 and report["photos"]["combination"] == 4
    manifest = load_manifest(tmp_path / "out")
    full = manifest[manifest["photo_id"].str.startswith("K-001900-016548-018110-021026")]
    assert len(full) == 4 and not full["incomplete_gt"].any()
    partial = manifest[~manifest["photo_id"].str.startswith("K-001900-016548-018110-021026")]
    assert partial["incomplete_gt"].all() and set(partial["source"]) == {"TL_2_조합"}
    names = load_class_map(tmp_path / "out")
    assert names["K-016548"]["shape"] == "" and names["K-018110"]["edi_codes"][-1] == "E00210421"
    shutil.rmtree(root)


def test_zip_directory_reader_matches_zipfile(tmp_path):
    from pillsnap.utils.zips import read_central_directory, read_member

    path = tmp_path / "TL_9_단일.zip"
    path.write_bytes(b"prepended bytes " * 4)  # a zip appended to other data still reads
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("K-000001_json/a.json", "{\"약\": 1}" * 50, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("K-000001/a.png", b"\x89PNG", compress_type=zipfile.ZIP_STORED)
        with zf.open("K-000001_json/big.json", "w", force_zip64=True) as fh:
            fh.write(b"[1, 2]")
    entries = read_central_directory(str(path))
    with zipfile.ZipFile(path) as zf:
        assert list(entries) == zf.namelist()
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, entry in entries.items():
                assert read_member(fd, entry, name) == zf.read(name)
        finally:
            os.close(fd)
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(zipfile.BadZipFile):
        read_central_directory(str(corrupt))


def test_folders_whose_names_are_not_utf8_are_left_out_and_named(broken_root, tmp_path, caplog):
    """A tree a Windows archive extracted in cp949 (단일 as b'\\xb4\\xdc\\xc0\\xcf'): the scan stopped with
    UnicodeEncodeError in Arrow. Now such folders are left out with a warning that names them and says the fix."""
    cp949 = os.fsdecode("단일".encode("cp949"))
    bad = broken_root / "원천데이터" / f"TS_2_{cp949}"
    png(bad / "K-000004" / "K-000004_0_2_0_1_90_000_200.png")
    write(broken_root / "라벨링데이터" / f"TL_2_{cp949}" / "K-000004_json" / "K-000004_0_2_0_1_90_000_200.json",
          label_bytes("K-000004_0_2_0_1_90_000_200", "K-000004"))
    with caplog.at_level("WARNING"):
        report = scan_dataset(broken_root, tmp_path / "out", workers=1, progress=False)
    assert report["records_kept"] == 3 and "K-000004" not in set(load_class_map(tmp_path / "out"))
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warned) == 1 and "2 folder(s)" in warned[0] and r"\xb4\xdc\xc0\xcf" in warned[0]
    assert len(report["names_not_utf8"]) == 2 and all(r"\xb4\xdc\xc0\xcf" in name for name in report["names_not_utf8"])
    assert json.loads((tmp_path / "out" / "scan_report.json").read_text())["names_not_utf8"] == report["names_not_utf8"]
    only_bad = tmp_path / "only_bad"
    write(only_bad / f"TL_{cp949}" / "K-000004_json" / "K-000004_0_2_0_1_90_000_200.json",
          label_bytes("K-000004_0_2_0_1_90_000_200", "K-000004"))
    with pytest.raises(ValueError, match="not UTF-8.*convmv"):
        scan_dataset(only_bad, tmp_path / "out2", workers=1, progress=False)
    from pillsnap.cli import main as cli_main

    caplog.clear()
    assert cli_main(["data", "scan", "--data-root", str(only_bad / f"TL_{cp949}"), "--out", str(tmp_path / "o3")]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "data root" in error and "not UTF-8" in error and "\n" not in error  # one line, no traceback


def test_a_scan_resumed_after_a_photo_zip_changed_reads_again_only_the_chunks_that_use_it(tmp_path, monkeypatch):
    """A scan interrupted while a photo zip was still downloading (readable, photos missing), resumed once it was
    whole, kept the chunks it had finished with those photos missing: a chunk's id did not depend on its photos."""
    import zipfile

    from pillsnap.data.scan_walk import discover, make_tasks
    from pillsnap.data.synth import generate_dataset

    root = tmp_path / "zipped"
    generate_dataset(root, num_classes=3, per_class=3, combo=2, seed=2, image_scale=0.05, workers=1, progress=False,
                     zip_output=True)
    whole = scan_dataset(root, tmp_path / "whole", workers=1, progress=False)
    single = next(p for p in root.rglob("TS_*.zip") if "단일" in p.name)
    saved = single.read_bytes()
    with zipfile.ZipFile(single) as zf:  # the single-pill photo zip, short of one photo
        members = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(single, "w") as zf:
        for info, data in members[:-1]:
            zf.writestr(info, data)
    calls, real = [], scan_chunk.process_chunk

    def stops_at_the_second(task, parts_dir, seed):
        calls.append(task.task_id)
        if len(calls) == 2:
            raise MachineDown
        return real(task, parts_dir, seed)

    monkeypatch.setattr("pillsnap.data.scan.process_chunk", stops_at_the_second)
    with pytest.raises(MachineDown):
        scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    done = calls[0]  # the combination chunk (its label zip sorts first), whose photos did not change
    single.write_bytes(saved)  # the download finished
    calls.clear()
    monkeypatch.setattr("pillsnap.data.scan.process_chunk",
                        lambda task, *args: calls.append(task.task_id) or real(task, *args))
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    assert report["records_kept"] == whole["records_kept"] and not report["skipped"].get("missing_image")
    assert len(calls) == 1 and done not in calls  # the finished chunk is kept, the changed one read again
    # one photo zip changed: only the chunks whose photos it holds get another id
    ids = {t.location.container: t.task_id for t in make_tasks(discover(root), 2000)}
    assert ids == {t.location.container: t.task_id for t in make_tasks(discover(root), 2000)}  # nothing changed
    with zipfile.ZipFile(single, "a") as zf:
        zf.writestr("K-999999/extra.txt", b"x")
    after = {t.location.container: t.task_id for t in make_tasks(discover(root), 2000)}
    changed = {container for container in ids if ids[container] != after[container]}
    assert changed and all("단일" in Path(c).name for c in changed) and len(changed) < len(ids)


def test_a_chunk_id_follows_its_label_folders_and_their_copies(synth_root, tmp_path):
    """A chunk reads a drug's labels from each partition's copy of its folder (AI Hub ships both): a copy changed
    between an interrupted scan and its resume must make the chunk be read again."""
    from aihub_trees import split_partitions

    from pillsnap.data.scan_walk import discover, make_tasks

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    assert split_partitions(root) > 0
    before = {t.task_id for t in make_tasks(discover(root), 2000)}
    assert before == {t.task_id for t in make_tasks(discover(root), 2000)}
    copy = next(p for p in root.rglob("VL_1_단일/K-*_json"))
    next(copy.glob("*.json")).unlink()  # the copy lost a label: its folder changed
    assert {t.task_id for t in make_tasks(discover(root), 2000)} != before


def test_a_drug_filed_in_another_drugs_folders_keeps_the_path_its_photo_has(tmp_path):
    """A photo and its label filed under another code's folders (K-000031's in K-000030/, K-000030_json/): the row is
    the photo's own drug at the path where the photo lies, not at the path its name would give (which does not
    exist, so that training dropped it every epoch and the detector's export failed on it)."""
    root = tmp_path / "data"
    img, lab = root / "원천데이터" / "TS_1_단일" / "K-000030", root / "라벨링데이터" / "TL_1_단일" / "K-000030_json"
    for code in ("K-000030", "K-000031"):
        for lo in range(0, 100, 20):
            stem = f"{code}_0_2_0_1_90_{lo:03d}_200"
            png(img / f"{stem}.png")
            write(lab / f"{stem}.json", label_bytes(stem, code))
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    rows = load_manifest(tmp_path / "m")
    assert report["records_kept"] == 10 and set(rows["mapping_code"]) == {"K-000030", "K-000031"}
    assert all(Path(path).is_file() for path in rows["image_path"])
