"""AI Hub format: file names, label parsing (real and synthetic labels give the same record shape), writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pillsnap.data import aihub

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "aihub_real_labels"
needs_real = pytest.mark.skipif(not REAL_LABELS.is_dir(), reason="shared/spec/aihub_real_labels not present")


def real_label(folder: str, code: str) -> Path:
    return next((REAL_LABELS / folder / code).glob("*.json"))


def test_parse_single_file_name():
    info = aihub.parse_file_name("K-000030_0_2_0_1_90_300_200.png")
    assert info.codes == ("K-000030",)
    assert (info.back_color, info.drug_dir, info.light_color) == ("2", "0", "1")
    assert (info.camera_la, info.camera_lo, info.size) == (90, 300, 200)
    assert info.folder == "K-000030" and not info.is_combination


def test_parse_combination_file_name():
    info = aihub.parse_file_name("some/dir/K-001900-016548-018110-021026_0_2_0_2_70_000_200.json")
    assert info.codes == ("K-001900", "K-016548", "K-018110", "K-021026")
    assert info.folder == "K-001900-016548-018110-021026" and info.is_combination
    assert info.camera_lo == 0


@pytest.mark.parametrize("name", ["K-00003_0_2_0_1_90_300_200.png", "X-000030_0_2_0_1_90_300_200.png",
                                  "K-000030_0_2_0_1_90_300.png", "K-000030-index.png"])
def test_bad_file_names_rejected(name):
    with pytest.raises(ValueError, match="AI Hub file name"):
        aihub.parse_file_name(name)


def test_clean_text_strips_invisible_whitespace():
    assert aihub.clean_text("타이레놀\u00a0") == "타이레놀"
    assert aihub.clean_text("Acetaminophen\u3000 ") == "Acetaminophen"
    assert aihub.clean_text(None) == ""


def synthetic_label(**overrides) -> dict:
    fields = {k: "" for k in aihub.IMAGE_KEYS if k != "id"}
    fields.update(file_name="K-000030_0_2_0_1_90_300_200.png", width=976, height=1280, drug_N="K-000030",
                  dl_mapping_code="K-000030", dl_idx="29", dl_name="테스트정\u00a0", di_edi_code="643303740,A01200351",
                  camera_la=90, camera_lo=300, color_class1="하양", drug_shape="장방형")
    fields.update(overrides)
    return aihub.build_label(fields, (356, 540, 200, 200), image_id=1, ann_id=1)


def test_build_label_round_trip():
    label = synthetic_label()
    assert tuple(label["images"][0]) == aihub.IMAGE_KEYS
    raw = aihub.dump_label(label)
    assert "테스트정".encode() in raw and b'\n    "images"' in raw  # unescaped UTF-8, 4-space indent
    rec = aihub.load_label(raw)
    assert rec.mapping_code == "K-000030" and rec.bbox == (356, 540, 200, 200)
    assert rec.info["name"] == "테스트정" and rec.info["edi_codes"] == ["643303740", "A01200351"]
    assert rec.info["colors"] == ["하양"]


def test_build_label_requires_every_field():
    fields = {k: "" for k in aihub.IMAGE_KEYS if k not in ("id", "dl_name")}
    with pytest.raises(KeyError, match="dl_name"):
        aihub.build_label(fields, (0, 0, 1, 1), 1, 1)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d["annotations"][0].update(bbox=[6567, 625, 311, 315]), "bbox_outside_image"),
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 30]), "bbox_zero_size"),
    (lambda d: d["images"][0].update(dl_mapping_code="A-12", drug_N="A-12"), "bad_code"),
    (lambda d: d.update(annotations=[]), "bad_schema"),
    (lambda d: d["images"][0].update(width="wide"), "bad_field"),
])
def test_bad_records_raise_with_reason(mutate, reason):
    label = synthetic_label()
    mutate(label)
    with pytest.raises(aihub.LabelError) as err:
        aihub.parse_label(label)
    assert err.value.reason == reason


def test_truncated_json_is_bad_json():
    raw = aihub.dump_label(synthetic_label())
    with pytest.raises(aihub.LabelError) as err:
        aihub.load_label(raw[: len(raw) // 2])
    assert err.value.reason == "bad_json"


def test_categories_are_not_trusted():
    label = synthetic_label()
    label["categories"] = [{"supercategory": "pill", "id": 999, "name": "Other drug"}]
    label["annotations"][0]["category_id"] = 999
    assert aihub.parse_label(label).mapping_code == "K-000030"


@needs_real
def test_real_labels_have_the_fixed_key_order():
    files = sorted(REAL_LABELS.rglob("*.json"))
    assert len(files) == 8
    for path in files:
        assert tuple(json.loads(path.read_text(encoding="utf-8"))["images"][0]) == aihub.IMAGE_KEYS


@needs_real
def test_real_and_synthetic_labels_parse_to_the_same_shape():
    real = aihub.load_label(real_label("K-001900-016548-018110-021026_json", "K-018110").read_bytes())
    synth = aihub.load_label(aihub.dump_label(synthetic_label()))
    assert real.to_dict().keys() == synth.to_dict().keys()
    assert real.info.keys() == synth.info.keys()
    assert {k: type(v) for k, v in real.to_dict().items()} == {k: type(v) for k, v in synth.to_dict().items()}
    assert real.mapping_code == "K-018110" and real.info["edi_codes"] == [
        "621500020", "645400170", "696300130", "E00210421"]


@needs_real
def test_real_null_fields_become_empty_strings():
    rec = aihub.load_label(real_label("K-001900-016548-018110-021026_json", "K-016548").read_bytes())
    assert rec.info["shape"] == "" and rec.info["colors"] == [] and rec.info["print_front"] == ""
    assert rec.bbox == (140, 866, 240, 240) and rec.width == 976 and rec.height == 1280


@needs_real
def test_real_published_errors_are_caught():
    raw = real_label("K-003351-016262-018357_json", "K-018357").read_bytes()
    with pytest.raises(aihub.LabelError) as err:
        aihub.load_label(raw)
    assert err.value.reason == "bbox_outside_image"
    # area != w*h in this file: area is never trusted, the bbox itself is valid
    rec = aihub.load_label(real_label("K-002483-003743-005886-019552_json", "K-005886").read_bytes())
    assert rec.bbox == (99, 67, 242, 478)


@needs_real
def test_real_trailing_ideographic_space_is_stripped():
    path = real_label("K-003483-016232-022347-027733_json", "K-027733")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["images"][0]["dl_material_en"].endswith("\u3000")
    rec = aihub.load_label(path.read_bytes())
    assert rec.camera_la == 90 and not rec.info["name"].endswith(("\u00a0", "\u3000", " "))
