"""Logos ("마크") and score lines ("분할선") as the real labels write them: the generator draws and labels them, the
matcher treats a logo-only side as unreadable and a score line as a separator, the reader finds score lines."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pillsnap.data.synth import make_classes
from pillsnap.data.synth_pill import LOGO_STYLES, draw_pill, imprint_parts
from pillsnap.infer.matching import (
    Hints,
    candidate_imprints,
    class_imprint_similarity,
    class_imprints,
    has_unreadable_side,
    imprint_key,
    imprint_similarity,
    logo_only,
)
from pillsnap.infer.ranking import rerank, should_read_imprint
from pillsnap.infer.thresholds import THRESHOLDS

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "aihub_real_labels"


def _real_label_images() -> list[dict]:
    if not REAL_LABELS.is_dir():
        pytest.skip(f"real labels not found at {REAL_LABELS}")
    images = [json.loads(p.read_text(encoding="utf-8"))["images"][0] for p in sorted(REAL_LABELS.rglob("*.json"))]
    return [im for im in images if im.get("print_front") is not None]


# ---- the generator ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def looks():
    return [c.look for c in make_classes(400, seed=11)]


def test_generator_writes_logos_and_score_lines_as_the_real_labels_do(looks):
    fronts = [lk.print_front for lk in looks]
    logo_alone = [lk for lk in looks if lk.print_front == "마크"]
    logo_text = [f for f in fronts if f.startswith("마크") and f != "마크"]
    scored = [lk for lk in looks if "분할선" in lk.print_front]
    # real: a logo on 13 of 73 classes, a score line on the front of 7 of 73
    assert 0.1 <= (len(logo_alone) + len(logo_text)) / len(looks) <= 0.3
    assert 0.04 <= len(scored) / len(looks) <= 0.16
    assert logo_alone and all(lk.print_back for lk in logo_alone)  # the text is then on the other side
    assert any(f.startswith("마크 ") for f in logo_text) and any(f[2] != " " for f in logo_text)  # "마크 A1", "마크213"
    for lk in scored:  # "I분할선Y": characters on both sides of the line, and line_front says so
        left, _, right = lk.print_front.partition("분할선")
        assert left and right and lk.line_front == "-"
    assert not any(lk.capsule and "마크" in lk.print_front for lk in looks)  # capsules are printed, not engraved


def test_class_label_fields_carry_the_marks():
    classes = make_classes(400, seed=11)
    fields = [c.fields for c in classes]
    assert any(f["print_front"] == "마크" and f["print_back"] for f in fields)
    assert any("분할선" in f["print_front"] and f["line_front"] == "-" for f in fields)


def test_generator_is_deterministic_with_logos(looks):
    again = [c.look for c in make_classes(400, seed=11)]
    assert again == looks
    marked = next(lk for lk in looks if lk.print_front == "마크" and not lk.ink)
    draw_pill.cache_clear()
    first = np.asarray(draw_pill(marked, False, 0.5)[1])
    draw_pill.cache_clear()
    assert np.array_equal(first, np.asarray(draw_pill(marked, False, 0.5)[1]))


def test_twins_keep_the_kind_and_the_logo(looks):
    for a, b in zip(looks, looks[1:], strict=False):
        if (a.shape, a.colors, a.rgb, a.long_mm) != (b.shape, b.colors, b.rgb, b.long_mm):
            continue
        assert a.logo == b.logo and (a.print_front == "마크") == (b.print_front == "마크")
        assert ("분할선" in a.print_front) == ("분할선" in b.print_front)
        assert (a.print_front, a.print_back) != (b.print_front, b.print_back)  # only the imprints differ


def test_imprint_parts():
    assert imprint_parts("마크 A1") == (True, ("A1",)) and imprint_parts("마크213") == (True, ("213",))
    assert imprint_parts("I분할선Y") == (False, ("I", "Y")) and imprint_parts("마크") == (True, ())
    assert imprint_parts("") == (False, ()) and imprint_parts("TYLENOL ER") == (False, ("TYLENOL ER",))


def _engraved(look, back: bool = False) -> np.ndarray:
    plain = replace(look, print_front="", print_back="", line_front="")
    return np.asarray(draw_pill(plain, back, 0.5)[1]) - np.asarray(draw_pill(look, back, 0.5)[1])


def test_logo_sides_are_engraved_emblems_not_ink(looks):
    base = next(lk for lk in looks if not lk.ink and not lk.capsule and lk.shape == "원형")
    logo = replace(base, print_front="마크", print_back="PE", line_front="")
    albedo_plain = np.asarray(draw_pill(replace(logo, print_front=""), False, 0.5)[0])
    assert np.array_equal(albedo_plain, np.asarray(draw_pill(logo, False, 0.5)[0]))  # no ink
    cuts = [_engraved(replace(logo, logo=i)) for i in range(len(LOGO_STYLES))]
    assert all(c.max() > 0.5 and c.min() >= -1e-3 for c in cuts)  # cut into the face
    distinct = {c.round(1).tobytes() for c in cuts}
    assert len(distinct) == len(LOGO_STYLES)  # each style its own emblem
    with_text = _engraved(replace(logo, print_front="마크213"))
    assert (with_text > 0.3).sum() > (cuts[logo.logo] > 0.3).sum()  # the logo and the letters


def test_score_line_is_cut_between_the_characters(looks):
    base = next(lk for lk in looks if not lk.ink and not lk.capsule and lk.shape == "원형")
    cut = _engraved(replace(base, print_front="I분할선Y", line_front="-"))
    h, w = cut.shape
    middle = cut[h // 8: h - h // 8, w // 2 - 2: w // 2 + 3].max(axis=1)
    assert (middle > 0.3).mean() > 0.8  # a groove across the face at the middle
    assert cut[:, : w // 2 - 4].max() > 0.5 and cut[:, w // 2 + 4:].max() > 0.5  # a character on each side


def test_every_real_label_can_be_drawn():
    for image in _real_label_images():
        for key in ("print_front", "print_back"):
            label = image.get(key) or ""
            logo, pieces = imprint_parts(label)
            assert ("마크" not in label.replace(" ", "")) or logo
            assert "분할선" not in "".join(pieces) and "마크" not in "".join(pieces)


# ---- matching --------------------------------------------------------------------------------------------------

def test_imprint_keys_of_the_real_label_words():
    assert imprint_key("마크213") == "*213" and imprint_key("마크 A1") == "*A1" and imprint_key("I분할선Y") == "I|Y"
    assert imprint_key("마크") == "" and imprint_key("") == "" and imprint_key(None) == ""
    assert logo_only("마크") and not logo_only("마크213") and not logo_only("")
    for image in _real_label_images():
        for key in ("print_front", "print_back"):
            label = image.get(key) or ""
            assert bool(imprint_key(label)) == bool(label) and not logo_only(label) or "마크" in label


@pytest.mark.parametrize("read", ["IY", "I Y", "I-Y", "I|Y", "I1Y", "IIY", "ILY"])
def test_a_score_line_is_a_separator_not_a_letter(read):
    assert imprint_similarity(read, "I분할선Y") >= 0.9


def test_a_score_line_does_not_make_other_reads_match():
    # a letter that no groove looks like, where the line is, costs what any inserted letter costs
    assert imprint_similarity("IXY", "I분할선Y") == pytest.approx(imprint_similarity("IXY", "IY"))
    assert imprint_similarity("I1Y", "I분할선Y") > imprint_similarity("I1Y", "IY")
    assert imprint_similarity("YI", "I분할선Y") < THRESHOLDS.imprint_accept
    assert imprint_similarity("Y", "I분할선Y") <= THRESHOLDS.imprint_floor


def test_a_logo_read_as_a_letter_costs_little():
    assert imprint_similarity("O213", "마크213") > imprint_similarity("O213", "213") - 1e-9
    assert imprint_similarity("O213", "마크213") >= 0.9 and imprint_similarity("213", "마크213") == 1.0
    assert imprint_similarity("O", "마크") == 0.0  # a logo alone is nothing to match


def test_a_logo_only_side_is_unreadable():
    logo_pe = {"print_front": "마크", "print_back": "PE"}
    assert class_imprints(logo_pe) == ("PE",) and has_unreadable_side(logo_pe)
    assert not has_unreadable_side({"print_front": "I분할선Y", "print_back": "HT"})
    # a read of the logo side ("O", "XYZ") is judged against the readable side only: no better, no worse
    for read in ("O", "XYZ", "PE"):
        assert class_imprint_similarity(read, logo_pe) == imprint_similarity(read, "PE")


def test_a_logo_is_never_a_read_target():
    class_map = {"A": {"print_front": "마크", "print_back": "PE"}, "B": {"print_front": "마크 A1", "print_back": ""},
                 "C": {"print_front": "", "print_back": ""}}
    targets = candidate_imprints([{"mapping_code": c} for c in "ABC"], class_map)
    assert targets == ["PE", "*A1"]


def test_no_read_between_a_logo_side_and_a_plain_side():
    """OCR cannot tell a logo from a plain face: two classes that differ only by that have nothing to read."""
    class_map = {"A": {"print_front": "마크", "print_back": "PE"}, "B": {"print_front": "PE", "print_back": ""},
                 "C": {"print_front": "마크", "print_back": "PF7"}}
    top = [{"mapping_code": "A", "probability": 0.6}, {"mapping_code": "B", "probability": 0.4}]
    assert not should_read_imprint(top, class_map)
    top[1]["mapping_code"] = "C"
    assert should_read_imprint(top, class_map)


def test_a_typed_imprint_is_compared_with_the_readable_sides():
    class_map = {"A": {"print_front": "마크", "print_back": "PE"}, "B": {"print_front": "마크", "print_back": "HT"},
                 "C": {"print_front": "마크 A1", "print_back": ""}}
    cands = [{"mapping_code": c, "probability": p} for c, p in (("B", 0.5), ("A", 0.3), ("C", 0.2))]
    for typed, winner in (("PE", "A"), ("마크 A1", "C"), ("A1", "C"), ("HT", "B")):
        ranked = rerank(cands, class_map, hints=Hints.parse(imprint=typed))
        assert ranked.candidates[0]["mapping_code"] == winner, typed
        assert ranked.candidates[0]["hint_match"]["imprint"] == "match" and not ranked.conflicts
    assert Hints.parse(imprint="마크").empty()  # "logo" alone says nothing an OCR or a class side can match


# ---- the reader's score-line finder ----------------------------------------------------------------------------

def _rendered(look) -> np.ndarray:
    from pillsnap.data.synth_render import PhotoConditions, render_photo
    from pillsnap.infer.imprint import _work_image

    png, boxes, _ = render_photo([look], PhotoConditions("0", "2", "1", 90, 30), 1.0, seed=3)
    x, y, w, h = boxes[0]
    return _work_image(Image.open(io.BytesIO(png)).convert("RGB").crop((x, y, x + w, y + h)), 480)


def test_reader_finds_a_score_line_across_the_text_and_none_on_letters(looks):
    from pillsnap.infer.imprint_geometry import find_score_line, relief_strokes
    from pillsnap.infer.preprocess import pill_mask

    base = next(lk for lk in looks if not lk.ink and not lk.capsule and lk.shape == "원형")
    base = replace(base, rgb=((240, 238, 230),), long_mm=9.0, short_mm=9.0, base_angle=0.0)
    scored = _rendered(replace(base, print_front="I분할선Y", line_front="-"))
    found = find_score_line(relief_strokes(scored, pill_mask(scored)), pill_mask(scored))
    assert found is not None
    # drawn across the pill's width (its long axis, turned 30 degrees by camera_lo) -> about 30 + 90 degrees
    assert abs((found[0] - 120.0 + 90) % 180 - 90) < 15
    plain = _rendered(replace(base, print_front="BSP"))
    assert find_score_line(relief_strokes(plain, pill_mask(plain)), pill_mask(plain)) is None
