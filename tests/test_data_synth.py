"""Synthetic generator: real layout and schema, determinism, label/image agreement, hard classes, combos."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_COMBOS
from PIL import Image

from pillsnap.data import aihub
from pillsnap.data.synth import generate_dataset, make_classes


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_real_tree(synth_root):
    base = synth_root / "166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터" / "01.데이터" / "1.Training"
    single_imgs = sorted((base / "원천데이터" / "단일경구약제 5000종" / "TS_1_단일").glob("K-*/*.png"))
    single_labels = sorted((base / "라벨링데이터" / "단일경구약제 5000종" / "TL_1_단일").glob("K-*_json/*.json"))
    combo_labels = sorted((base / "라벨링데이터" / "경구약제조합 5000종" / "TL_1_조합").glob("K-*_json/K-*/*.json"))
    assert len(single_imgs) == 36 and len(single_labels) == 36
    assert {p.parent.name for p in single_imgs} == {p.parent.name[:-5] for p in single_labels}
    for label in combo_labels:  # one JSON per pill, in a folder named after that pill's code
        info = aihub.parse_file_name(label.name)
        assert label.parent.name in info.codes and label.parent.parent.name == f"{info.folder}_json"
    index_pngs = list((base / "원천데이터" / "경구약제조합 5000종").rglob("*index.png"))
    assert index_pngs, "combination folders carry index.png files like the real ones"


def test_labels_describe_the_written_image(synth_root):
    labels = sorted(synth_root.rglob("*.json"))
    assert labels
    for path in labels[:: max(1, len(labels) // 10)]:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert tuple(data["images"][0]) == aihub.IMAGE_KEYS
        rec = aihub.parse_label(data)
        image_path = next(synth_root.rglob(rec.file_name))
        image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32)
        assert (image.shape[1], image.shape[0]) == (rec.width, rec.height) == (122, 160)
        x, y, w, h = rec.bbox
        inside = image[y:y + h, x:x + w]
        border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3)])
        # the pill differs from the plain background it sits on
        assert np.abs(inside.mean((0, 1)) - border.mean(0)).max() > 4 or inside.std() > border.std() + 4


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    args = dict(num_classes=3, per_class=2, combo=2, image_scale=0.06, workers=1, progress=False)
    generate_dataset(tmp_path / "a", seed=5, **args)
    generate_dataset(tmp_path / "b", seed=5, **args)
    generate_dataset(tmp_path / "c", seed=6, **args)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_parallel_rendering_gives_the_same_bytes(tmp_path):
    args = dict(num_classes=4, per_class=5, combo=2, seed=1, image_scale=0.05, progress=False)
    generate_dataset(tmp_path / "one", workers=1, **args)
    generate_dataset(tmp_path / "two", workers=2, **args)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_zip_output_has_real_member_layout(tmp_path):
    summary = generate_dataset(tmp_path, 2, 2, 1, seed=0, zip_output=True, image_scale=0.05, workers=1,
                               progress=False)
    zips = {p.name: p for p in tmp_path.rglob("*.zip")}
    assert set(zips) == {"TS_1_단일.zip", "TL_1_단일.zip", "TS_1_조합.zip", "TL_1_조합.zip"}
    with zipfile.ZipFile(zips["TL_1_단일.zip"]) as zf:
        names = zf.namelist()
    code = summary["classes"][0]
    assert any(n.startswith(f"{code}_json/{code}_0_") and n.endswith(".json") for n in names)
    with zipfile.ZipFile(zips["TL_1_조합.zip"]) as zf:
        assert all(n.count("/") == 2 for n in zf.namelist())  # <combo>_json/K-<pill>/<stem>.json


def test_classes_are_stable_and_some_are_hard_twins():
    classes = make_classes(40, seed=3)
    assert [c.code for c in classes] == [c.code for c in make_classes(40, seed=3)]
    assert [c.code for c in classes] == sorted(c.code for c in classes)
    for c in classes:
        assert aihub.CODE_RE.match(c.code) and c.fields["dl_idx"] == str(int(c.code[2:]) - 1)
    twins = [(a, b) for a, b in zip(classes, classes[1:], strict=False)
             if (a.look.shape, a.look.colors) == (b.look.shape, b.look.colors)]
    assert twins, "some neighbouring classes share shape and colour"
    assert all(a.look.print_front != b.look.print_front for a, b in twins)


def test_combination_pills_are_distinct_classes_without_heavy_overlap(synth_root):
    by_photo: dict[str, list] = {}
    for path in synth_root.rglob("K-*-*_json/K-*/*.json"):
        rec = aihub.load_label(path.read_bytes())
        by_photo.setdefault(rec.file_name, []).append(rec)
    assert len(by_photo) == SYNTH_COMBOS
    for recs in by_photo.values():
        codes = [r.mapping_code for r in recs]
        assert 2 <= len(codes) <= 4 and len(set(codes)) == len(codes)
        assert len({r.image_id for r in recs}) == 1
        for i, a in enumerate(recs):
            for b in recs[i + 1:]:
                ax, ay, aw, ah = a.bbox
                bx, by, bw, bh = b.bbox
                inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
                assert inter <= 0.35 * min(aw * ah, bw * bh)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_classes=0, per_class=1, combo=0), "num_classes"),
    (dict(num_classes=2, per_class=5000, combo=0), "per_class"),
    (dict(num_classes=1, per_class=1, combo=3), "combo"),
    (dict(num_classes=2, per_class=1, combo=0, image_scale=3.0), "image_scale"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)


def test_synthetic_boxes_match_the_real_box_sizes(tmp_path):
    """Box width/height percentiles of combination pills near the real ones (shared/spec/real_photo_stats.md)."""
    from pillsnap.data.synth_render import box_stats

    scale = 0.1
    generate_dataset(tmp_path, 60, 1, 90, seed=11, image_scale=scale, workers=1, progress=False)
    boxes = [aihub.load_label(p.read_bytes()).bbox for p in tmp_path.rglob("K-*-*_json/K-*/*.json")]
    stats = box_stats(boxes, scale)
    real = {"width": [180, 209, 242, 295, 408], "height": [167, 199, 231, 403, 497]}
    for name in ("width", "height"):
        for got, want in zip(stats[name], real[name], strict=True):
            assert abs(got - want) <= 0.3 * want, (name, stats[name], real[name])


def test_combination_shots_keep_their_arrangement(synth_root):
    shots: dict[str, dict[int, dict[str, tuple]]] = {}
    for path in synth_root.rglob("K-*-*_json/K-*/*.json"):
        rec = aihub.load_label(path.read_bytes())
        info = aihub.parse_file_name(rec.file_name)
        shots.setdefault(info.folder, {}).setdefault(info.camera_la, {})[rec.mapping_code] = rec.bbox
    assert all(len(angles) >= 2 for angles in shots.values())  # every combination at several elevations
    for angles in shots.values():
        first, *others = angles.values()
        for other in others:
            for code, (x, _, w, _) in other.items():
                assert abs((x + w / 2) - (first[code][0] + first[code][2] / 2)) <= 0.05 * 122  # same place


def test_class_looks_follow_the_real_distributions():
    looks = [c.look for c in make_classes(400, seed=5)]
    tests = {"white": lambda lk: lk.colors[0] == "하양",
             "round_oval_oblong": lambda lk: lk.shape in ("원형", "타원형", "장방형"),
             "imprint": lambda lk: bool(lk.print_front), "score_line": lambda lk: lk.line_front == "-",
             "two_tone_capsule": lambda lk: lk.capsule == "hard" and len(lk.colors) == 2}
    share = {key: np.mean([fn(look) for look in looks]) for key, fn in tests.items()}
    assert 0.25 <= share["white"] <= 0.42 and share["round_oval_oblong"] >= 0.9 and share["imprint"] >= 0.9
    assert 0.04 <= share["score_line"] <= 0.2 and share["two_tone_capsule"] > 0
    pale = np.mean([np.mean(look.rgb[0]) > 150 for look in looks])
    assert pale >= 0.75  # most real pills are white or pale


def test_debossed_imprints_are_relief_not_ink():
    from dataclasses import replace

    from pillsnap.data.synth_pill import draw_pill

    look = next(c.look for c in make_classes(60, seed=2) if not c.look.ink and not c.look.capsule)
    plain, marked = replace(look, print_front="", line_front=""), replace(look, print_front="AB8", line_front="-")
    albedo_plain, height_plain = draw_pill(plain, False, 0.5)
    albedo_marked, height_marked = draw_pill(marked, False, 0.5)
    assert np.array_equal(np.asarray(albedo_plain), np.asarray(albedo_marked))  # no ink
    engraved = np.asarray(height_plain) - np.asarray(height_marked)
    assert engraved.max() > 0.5 and engraved.min() >= -1e-3  # cut into the surface, never raised


def test_synthetic_photos_pass_the_label_checks_and_sit_on_the_real_backdrop(manifest_dir, synth_root):
    report = json.loads((manifest_dir / "scan_report.json").read_text(encoding="utf-8"))
    checks = report["label_checks"]
    assert checks["overlapping_boxes"] == checks["box_count_above_pills"] == checks["attribute_mismatch"] == 0
    assert report["incomplete_gt_photos"] == 0
    borders = []
    for path in sorted(synth_root.rglob("K-*-*/*_0_2_*_200.png")):
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        borders.append(np.median(np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3)]), axis=0))
    median = np.median(borders, axis=0)
    assert np.abs(median - np.array([90, 100, 140])).max() < 25, median  # the real blue-grey backdrop


def test_placeholder_photos_keep_the_layout_and_labels_of_rendered_ones(tmp_path):
    """Scale rehearsals write hundreds of thousands of rows without drawing pills: the same members and label JSON
    as a rendered set (only the photo, its size and the boxes differ), boxes inside the photo and never
    overlapping, so the scan keeps every label and flags nothing."""
    from pillsnap.data.scan import scan_dataset

    args = {"num_classes": 5, "per_class": 4, "combo": 6, "seed": 3, "zip_output": True, "workers": 1,
            "progress": False}
    generate_dataset(tmp_path / "drawn", image_scale=0.05, **args)
    summary = generate_dataset(tmp_path / "flat", image_scale=0.04, placeholder_images=True, **args)
    drawn, flat = (sorted((tmp_path / kind).rglob("*.zip")) for kind in ("drawn", "flat"))
    assert [p.relative_to(tmp_path / "drawn") for p in drawn] == [p.relative_to(tmp_path / "flat") for p in flat]
    for a, b in zip(drawn, flat, strict=True):
        with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
            assert za.namelist() == zb.namelist()
            for name in (n for n in za.namelist() if n.endswith(".json")):
                la, lb = json.loads(za.read(name)), json.loads(zb.read(name))
                image = lb["images"][0]
                assert list(la["images"][0]) == list(image)  # the same keys in the same order
                assert {k: v for k, v in la["images"][0].items() if k not in ("width", "height")} == \
                    {k: v for k, v in image.items() if k not in ("width", "height")}
                x, y, w, h = lb["annotations"][0]["bbox"]
                assert w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
    report = scan_dataset(tmp_path / "flat", tmp_path / "manifests", workers=1, progress=False)
    assert report["records_kept"] == summary["label_files"] and report["records_skipped"] == 0
    assert report["incomplete_gt_photos"] == 0
