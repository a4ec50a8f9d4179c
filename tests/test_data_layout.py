"""Layouts the scan recognises (AI Hub's, the competition's flat train_images/ + train_annotations/, folders or a
zip), and the diagnosis of a scan that keeps no record (exit 2 at the command line, one line)."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
from aihub_trees import competition_tree, needs_real

from pillsnap.cli import main as cli_main
from pillsnap.data.scan import ScanError, load_manifest, scan_dataset


@needs_real
def test_competition_layout_reads_like_the_aihub_layout(tmp_path, caplog):
    root = competition_tree(tmp_path / "comp")
    with caplog.at_level(logging.INFO, logger="pillsnap.data.scan"):
        report = scan_dataset(root, tmp_path / "out", workers=1, progress=False)
    assert report["layout"]["name"] == "competition" and "competition layout" in caplog.text
    assert report["label_files"] == 8 and report["records_kept"] == 7
    assert report["skipped"]["bbox_outside_image"] == 1 and report["skipped"]["missing_image"] == 0
    assert report["image_without_label"] == 1  # the unlabelled test_images/ photo
    manifest = load_manifest(tmp_path / "out")
    assert manifest["image_path"].map(lambda p: Path(p).parent.name).eq("train_images").all()
    assert all(Path(p).is_file() for p in manifest["image_path"])
    assert (manifest["image_path"].map(lambda p: Path(p).stem) == manifest["photo_id"]).all()


@needs_real
def test_zipped_competition_layout(tmp_path):
    plain = competition_tree(tmp_path / "comp")
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "ai03-level1-project.zip", "w") as zf:
        for path in sorted(plain.rglob("*")):
            if path.is_file():
                zf.write(path, f"data/{path.relative_to(plain).as_posix()}")
    a = scan_dataset(plain, tmp_path / "m1", workers=1, progress=False)
    b = scan_dataset(zipped, tmp_path / "m2", workers=1, progress=False)
    assert b["layout"]["name"] == "competition" and a["records_kept"] == b["records_kept"] == 7
    rows = load_manifest(tmp_path / "m2")
    assert rows["image_path"].str.startswith("zip:").all() and "!data/train_images/K-" in rows["image_path"].iloc[0]
    cols = ["photo_id", "mapping_code", "split", "bbox_x", "incomplete_gt"]
    left = load_manifest(tmp_path / "m1")[cols].sort_values(cols).reset_index(drop=True)
    assert left.equals(rows[cols].sort_values(cols).reset_index(drop=True))


@needs_real
def test_labels_without_photos_fail_with_a_diagnosis(tmp_path):
    root = competition_tree(tmp_path / "comp", with_images=False)
    with pytest.raises(ScanError) as err:
        scan_dataset(root, tmp_path / "out", workers=1, progress=False)
    text = str(err.value)
    assert "kept no record" in text and "5 label folders" in text and "Expected" in text
    assert "Nearest recognised layout: the competition layout" in text and "missing_image: 8" in text
    assert "train_images/" in text  # where the photos should be
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    saved = json.loads((tmp_path / "out" / "scan_report.json").read_text(encoding="utf-8"))
    assert saved["records_kept"] == 0 and saved["diagnosis"] == text


def test_cli_scan_that_keeps_nothing_exits_2_with_one_line(tmp_path, caplog):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        (root / f"IMG_{i:04d}.png").write_bytes(b"\x89PNG")
    code = cli_main(["data", "scan", "--data-root", str(root), "--out", str(tmp_path / "out"), "--workers", "1"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "3 .png" in errors[0] and "No AI Hub label folders" in errors[0]
    assert "Nearest recognised layout: none" in errors[0]


def test_json_in_wrongly_named_folders_points_at_the_folder_names(tmp_path):
    labels = tmp_path / "data" / "annotations" / "pill_1"
    labels.mkdir(parents=True)
    (labels / "K-000001_0_2_0_2_70_000_200.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ScanError, match="renamed label folders"):
        scan_dataset(tmp_path / "data", tmp_path / "out", workers=1, progress=False)
