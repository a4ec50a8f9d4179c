"""Label quality checks of the scan, on the real label files and hand-broken copies: overlapping (copied or moved)
boxes, box counts against the pills in the file name, attributes against the file name, multi-valued colours."""

from __future__ import annotations

import copy
import logging

import pytest
from aihub_trees import FULL, aihub_tree, needs_real

from pillsnap.data import aihub
from pillsnap.data.scan import load_class_map, load_manifest, scan_dataset
from pillsnap.data.scan_checks import OVERLAP_LIMIT, check_photo, overlap_share
from pillsnap.data.yolo import export_yolo

pytestmark = needs_real
BOXES = {"K-001900": [173, 279, 201, 141], "K-016548": [140, 866, 240, 240], "K-018110": [628, 845, 323, 306],
         "K-021026": [674, 274, 176, 173]}  # the real boxes of the fully labelled photo


def full_photo_edit(changes: dict[str, dict]) -> callable:
    """An edit that applies `changes[code]` (annotation or images[0] fields) to the labels of the full photo."""
    def edit(code: str, label: dict) -> dict | None:
        if code not in changes or not label["images"][0]["file_name"].startswith(FULL):
            return label
        change = changes[code]
        if change is None:
            return None
        label = copy.deepcopy(label)
        label["images"][0].update(change.get("image", {}))
        label["annotations"][0].update(change.get("annotation", {}))
        label["annotations"] += change.get("more_annotations", [])
        return label
    return edit


def scan(tmp_path, changes: dict[str, dict]) -> tuple[dict, object]:
    root = aihub_tree(tmp_path / "data", full_photo_edit(changes))
    report = scan_dataset(root, tmp_path / "out", workers=1, progress=False)
    return report, load_manifest(tmp_path / "out")


def full_rows(manifest):
    return manifest[manifest["photo_id"].str.startswith(FULL)].set_index("mapping_code")


def test_the_real_labels_as_published_pass_the_box_checks(tmp_path):
    report, manifest = scan(tmp_path, {})
    checks = report["label_checks"]
    assert checks["overlapping_boxes"] == 0 and checks["box_count_above_pills"] == 0
    assert checks["attribute_mismatch"] == 0 and checks["multi_valued_colour"] == 0
    # the four partially labelled photos (and the one whose only label is outside the image) lack boxes
    assert checks["box_count_below_pills"] == 3 and report["incomplete_gt_photos"] == 3
    full = full_rows(manifest)
    assert len(full) == 4 and not full["incomplete_gt"].any() and (full["box_issue"] == "").all()


def test_a_copied_box_flags_the_photo_and_both_pills(tmp_path, caplog):
    report, manifest = scan(tmp_path, {"K-016548": {"annotation": {"bbox": BOXES["K-001900"]}}})
    assert report["label_checks"]["overlapping_boxes"] == 1
    assert report["label_checks"]["left_out_of_classification_rows"] == 2
    full = full_rows(manifest)
    assert full["incomplete_gt"].all()
    assert full.loc["K-001900", "box_issue"] == full.loc["K-016548", "box_issue"] == "overlap"
    assert full.loc["K-018110", "box_issue"] == full.loc["K-021026", "box_issue"] == ""  # sound pills still count
    with caplog.at_level(logging.INFO, logger="pillsnap.data.yolo"):
        export_yolo(manifest.assign(split="train"), tmp_path / "yolo")
    assert not list((tmp_path / "yolo").rglob(f"{FULL}*"))  # left out of detection training ...
    assert "left out of detection" in caplog.text  # ... and said so


def test_a_moved_box_over_another_pill_is_flagged(tmp_path):
    x, y, _, _ = BOXES["K-018110"]
    report, manifest = scan(tmp_path, {"K-021026": {"annotation": {"bbox": [x + 40, y + 30, 176, 173]}}})
    assert report["label_checks"]["overlapping_boxes"] == 1
    assert set(full_rows(manifest).query("box_issue == 'overlap'").index) == {"K-018110", "K-021026"}


def test_boxes_that_touch_a_little_are_not_flagged(tmp_path):
    x, y, w, h = BOXES["K-018110"]
    moved = [x - 150, y + 40, 176, 173]  # overlaps K-018110 by about a sixth of its own area
    assert 0 < overlap_share(moved, BOXES["K-018110"]) < OVERLAP_LIMIT
    report, manifest = scan(tmp_path, {"K-021026": {"annotation": {"bbox": moved}}})
    assert report["label_checks"]["overlapping_boxes"] == 0 and not full_rows(manifest)["incomplete_gt"].any()


def test_more_boxes_than_pills(tmp_path):
    extra = {"area": 1, "iscrowd": 0, "bbox": [10, 10, 50, 50], "category_id": 1, "ignore": 0, "segmentation": [],
             "id": 99, "image_id": 833}
    report, manifest = scan(tmp_path, {"K-021026": {"more_annotations": [extra]}})
    assert report["label_checks"]["box_count_above_pills"] == 1
    full = full_rows(manifest)
    assert full.loc["K-021026", "box_issue"] == "extra_box" and full["incomplete_gt"].all()
    assert (full.drop(index="K-021026")["box_issue"] == "").all()


def test_fewer_boxes_than_pills(tmp_path):
    report, manifest = scan(tmp_path, {"K-016548": None})
    assert report["label_checks"]["box_count_below_pills"] == 4  # the 3 published gaps and this one
    full = full_rows(manifest)
    assert len(full) == 3 and full["incomplete_gt"].all() and (full["box_issue"] == "").all()


def test_attributes_come_from_the_file_name(tmp_path):
    report, manifest = scan(tmp_path, {"K-001900": {"image": {"camera_la": 90}},
                                       "K-018110": {"image": {"drug_dir": "뒷면", "light_color": "주광색"}},
                                       "K-021026": {"image": {"back_color": "아무 배경"}}})  # unknown text: not judged
    checks = report["label_checks"]
    assert checks["attribute_mismatch"] == 2
    assert checks["attribute_mismatch_by_field"] == {"camera_la": 1, "drug_dir": 1, "light_color": 1}
    full = full_rows(manifest)
    assert (full["camera_la"] == 70).all() and (full["drug_dir"] == "앞면").all()  # file name: _0_2_0_2_70_000
    assert (full["light_color"] == "주백색").all() and (full["back_color"] == "연회색 배경").all()


def test_multi_valued_colours_become_lists(tmp_path):
    report, _ = scan(tmp_path, {"K-021026": {"image": {"color_class1": "노랑, 투명", "color_class2": "투명"}}})
    assert report["label_checks"]["multi_valued_colour"] == 1
    assert load_class_map(tmp_path / "out")["K-021026"]["colors"] == ["노랑", "투명"]


def test_check_photo_rules():
    def rec(code: str, bbox: tuple, n_boxes: int = 1) -> aihub.LabelRecord:
        return aihub.LabelRecord(f"{FULL}.png", code, 976, 1280, bbox, 1, "앞면", "", "", 70, 0, n_boxes=n_boxes)

    codes = ("K-000001", "K-000002", "K-000003")
    sound = check_photo(codes, [rec("K-000001", (0, 0, 10, 10)), rec("K-000002", (20, 0, 10, 10)),
                                rec("K-000003", (40, 0, 10, 10))])
    assert sound.issues == ["", "", ""] and sound.reasons == [] and not sound.incomplete
    twice = check_photo(codes, [rec("K-000001", (0, 0, 10, 10)), rec("K-000001", (50, 0, 10, 10)),
                                rec("K-000003", (40, 40, 10, 10))])
    assert twice.issues == ["extra_box", "extra_box", ""]
    assert twice.reasons == ["box_count_above_pills", "box_count_below_pills"] and twice.incomplete


@pytest.mark.parametrize(("a", "b", "share"), [((0, 0, 10, 10), (5, 0, 10, 10), 0.5),
                                               ((0, 0, 10, 10), (0, 0, 20, 20), 1.0),
                                               ((0, 0, 10, 10), (10, 0, 10, 10), 0.0)])
def test_overlap_share_is_of_the_smaller_box(a, b, share):
    assert overlap_share(a, b) == pytest.approx(share)
