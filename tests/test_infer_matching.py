"""Imprint matching, hints and re-ranking (pillsnap/infer/matching.py): pure functions, no OCR."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import REAL_LABELS

from pillsnap.data.aihub import COLORS, SHAPES
from pillsnap.infer.matching import (
    _COLOR_WORDS,
    _SHAPE_WORDS,
    COLOR_SYNONYMS,
    SHAPE_SYNONYMS,
    Hints,
    candidate_imprints,
    class_imprint_similarity,
    imprint_similarity,
    normalize_imprint,
    parse_colors,
    parse_shape,
)
from pillsnap.infer.ranking import likelihood_gaps, rerank, should_read_imprint
from pillsnap.infer.thresholds import THRESHOLDS, WEIGHTS

FLOOR, IMPRINT_ACCEPT = THRESHOLDS.imprint_floor, THRESHOLDS.imprint_accept
CLASS_MAP = {  # two look-alike twins (same shape and colour, different imprint) and a third pill
    "K-000001": {"print_front": "BSP", "print_back": "5", "colors": ["하양"], "shape": "장방형"},
    "K-000002": {"print_front": "DGTH", "print_back": "", "colors": ["하양"], "shape": "장방형"},
    "K-000003": {"print_front": "마크", "print_back": "PE", "colors": ["노랑"], "shape": "원형"},
}


def _cands(*pairs: tuple[str, float]) -> list[dict]:
    return [{"mapping_code": code, "name": code, "probability": p} for code, p in pairs]


@pytest.mark.parametrize(("label", "expected"), [
    ("CKD 250", "CKD250"), ("마크213", "213"), ("I분할선Y", "IY"), ("마크", ""), ("bs-p.", "BSP"),
    (None, ""), ("上ab网", "AB"),
])
def test_normalize_imprint(label, expected):
    assert normalize_imprint(label) == expected


@pytest.mark.parametrize(("read", "imprint"), [
    ("BSF", "BSP"), ("GTH", "DGTH"), ("B5P", "BSP"), ("O6JR", "06JR"), ("17S34", "T7S34"), ("OUU", "마크 UU"),
    ("ckd 250", "CKD250"), ("TYLENOLER", "TYLENOL ER"),
    ("70", "마크76"), ("YO", "Y9"), ("DSP", "BSP"), ("1B0", "1B8"), ("95", "55"),  # loops and curves, B for D
])
def test_near_misses_are_accepted(read, imprint):
    assert imprint_similarity(read, imprint) >= IMPRINT_ACCEPT


def test_confusable_characters_cost_less_than_others():
    assert imprint_similarity("B5P", "BSP") > imprint_similarity("BXP", "BSP")
    assert imprint_similarity("0I", "O1") > imprint_similarity("QX", "O1")
    # a character in two groups is cheap with both ("6" with "G" and with "0"), not with what neither group holds
    assert imprint_similarity("G6", "66") == imprint_similarity("06", "66") > imprint_similarity("X6", "66")
    assert imprint_similarity("7X", "76") < IMPRINT_ACCEPT <= imprint_similarity("70", "76")


@pytest.mark.parametrize(("read", "imprint"), [("XYZ", "BSP"), ("1", "T1A3"), ("", "BSP"), ("BSP", "마크"),
                                               ("NLW", "MN"), ("CO", "HC")])  # not "inside" one as long
def test_unrelated_or_empty_reads_stay_below_the_floor(read, imprint):
    assert imprint_similarity(read, imprint) <= FLOOR


def test_random_imprints_rarely_pass_the_floor():
    # The floor is what keeps a garbage read from reordering the classifier: measured 2 % of random 2-5
    # character pairs above 0.5, 0.5 % above the accept threshold.
    rng = random.Random(0)
    alphabet = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"

    def word() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))

    scores = [imprint_similarity(word(), word()) for _ in range(3000)]
    assert sum(s > FLOOR for s in scores) / len(scores) < 0.04
    assert sum(s >= IMPRINT_ACCEPT for s in scores) / len(scores) < 0.01


def test_either_side_of_a_class_matches():
    assert class_imprint_similarity("5", CLASS_MAP["K-000001"]) == 1.0
    assert class_imprint_similarity("PE", CLASS_MAP["K-000003"]) == 1.0
    assert class_imprint_similarity("ABC", {}) == 0.0


@pytest.mark.parametrize(("text", "expected"), [
    ("white", ("하양",)), ("흰색", ("하양",)), ("White, Blue", ("하양", "파랑")), ("노란색/투명", ("노랑", "투명")),
    ("light green", ("연두",)), (["빨강", "red"], ("빨강",)), ("", ()), (None, ()),
])
def test_parse_colors(text, expected):
    assert parse_colors(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("round", "원형"), ("원", "원형"), ("Oval", "타원형"),
                                                ("caplet", "장방형"), ("마름모", "마름모형"), ("", None)])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


def test_unknown_hint_words_name_the_vocabulary():
    with pytest.raises(ValueError, match="unknown colour 'plaid'.*하양"):
        parse_colors("plaid")
    with pytest.raises(ValueError, match="unknown shape 'star'.*원형"):
        parse_shape("star")


def test_the_hint_vocabulary_is_the_label_vocabulary():
    """One home for the label words (pillsnap.data.aihub): the hint tables add people's words, never a value."""
    assert tuple(COLOR_SYNONYMS) == COLORS and tuple(SHAPE_SYNONYMS) == SHAPES
    assert set(_COLOR_WORDS) <= set(COLORS) and set(_SHAPE_WORDS) <= set(SHAPES)


def test_label_vocabulary_parses_to_itself():
    for name in COLOR_SYNONYMS:
        assert parse_colors(name) == (name,)
    for name in SHAPE_SYNONYMS:
        assert parse_shape(name) == name


def test_real_label_values_parse():
    """The colour and shape words of the real AI Hub labels we hold are in the vocabulary."""
    files = sorted(REAL_LABELS.rglob("*.json"))
    if not files:
        pytest.skip("no real label files")
    for path in files:
        image = json.loads(path.read_text(encoding="utf-8"))["images"][0]
        for key in ("color_class1", "color_class2"):
            for color in parse_colors((image.get(key) or "").split(",")):
                assert color in COLOR_SYNONYMS
        if image.get("drug_shape"):
            assert parse_shape(image["drug_shape"]) == image["drug_shape"].strip()


def test_hints_parse_and_empty():
    hints = Hints.parse(imprint=" bsp ", color="white", shape="oblong")
    assert hints == Hints("bsp", ("하양",), "장방형")
    assert not hints.empty()
    assert Hints.parse(imprint="마크").empty() and Hints().empty()


def test_imprint_read_fixes_the_twin_the_classifier_got_wrong():
    cands = _cands(("K-000002", 0.55), ("K-000001", 0.40), ("K-000003", 0.05))
    out = rerank(cands, CLASS_MAP, read="BSF", read_score=0.9)
    assert out.changed and out.candidates[0]["mapping_code"] == "K-000001"
    assert out.candidates[0]["imprint_match"] and out.candidates[0]["classifier_rank"] == 1
    assert out.imprint_read == "BSF" and not out.hints_conflict
    assert sum(c["probability"] for c in out.candidates) == pytest.approx(1.0, abs=1e-6)  # nothing left outside
    assert [c["classifier_probability"] for c in out.candidates] == [0.40, 0.55, 0.05]
    assert 0.9 < out.candidates[0]["probability"] < 0.95  # a near miss (BSF for BSP): fairly, not fully, sure


def test_the_posterior_keeps_what_the_classifier_left_outside_the_candidates():
    cands = _cands(("K-000002", 0.5), ("K-000001", 0.3))  # 0.2 on classes not listed
    plain = rerank(cands, CLASS_MAP)
    assert [c["probability"] for c in plain.candidates] == pytest.approx([0.5, 0.3])  # no evidence: unchanged
    typed = rerank(cands, CLASS_MAP, hints=Hints.parse(imprint="ZZ9"))  # matches neither: both lose to the rest
    assert sum(c["probability"] for c in typed.candidates) < 0.01 and typed.hints_conflict


def test_garbage_or_unsure_reads_leave_the_ranking_alone():
    cands = _cands(("K-000002", 0.55), ("K-000001", 0.40))
    for read, score in (("XQ", 0.99), ("BSP", 0.0), ("", 1.0), (None, 1.0)):
        out = rerank(cands, CLASS_MAP, read=read, read_score=score)
        assert not out.changed and [c["mapping_code"] for c in out.candidates] == ["K-000002", "K-000001"]


def test_a_confident_classifier_outweighs_a_near_miss():
    cands = _cands(("K-000002", 0.97), ("K-000001", 0.02))
    assert not rerank(cands, CLASS_MAP, read="BSF", read_score=0.6).changed


def test_hints_rerank_and_flag_contradictions():
    cands = _cands(("K-000001", 0.7), ("K-000003", 0.3))
    out = rerank(cands, CLASS_MAP, hints=Hints.parse(color="yellow", shape="round"))
    assert out.changed and out.candidates[0]["mapping_code"] == "K-000003"
    assert out.candidates[0]["hint_match"] == {"imprint": None, "color": "match", "shape": "match"}
    assert not out.hints_conflict

    out = rerank(cands, CLASS_MAP, hints=Hints.parse(color="blue"))  # no candidate is blue
    assert not out.changed and out.conflicts == ("color",) and out.hints_conflict


def test_typed_imprint_picks_the_twin_and_neighbour_colours_are_no_contradiction():
    cands = _cands(("K-000002", 0.8), ("K-000001", 0.2))
    out = rerank(cands, CLASS_MAP, hints=Hints.parse(imprint="bsp", color="투명"))
    assert out.changed and out.candidates[0]["mapping_code"] == "K-000001"
    assert out.candidates[0]["hint_match"]["color"] == "near" and not out.hints_conflict
    assert out.candidates[1]["hint_match"]["imprint"] == "mismatch"


def test_rerank_of_nothing():
    assert rerank([], CLASS_MAP, read="BSP").candidates == []


def test_should_read_when_the_contenders_imprints_differ():
    twins = _cands(("K-000001", 0.6), ("K-000002", 0.35))
    assert should_read_imprint(twins, CLASS_MAP)
    assert not should_read_imprint(_cands(("K-000001", 0.995), ("K-000002", 0.005)), CLASS_MAP)  # one contender
    same = {"A": {"print_front": "BSP"}, "B": {"print_front": "bsp"}}
    assert not should_read_imprint(_cands(("A", 0.5), ("B", 0.5)), same)
    plain = {"A": {"print_front": ""}, "B": {"print_front": "마크"}}
    assert not should_read_imprint(_cands(("A", 0.5), ("B", 0.5)), plain)  # neither has letters to read
    text_vs_none = {"A": {"print_front": "AB"}, "B": {"print_front": ""}}
    assert should_read_imprint(_cands(("A", 0.5), ("B", 0.5)), text_vs_none)
    shared_back = {"A": {"print_front": "AB", "print_back": "5"}, "B": {"print_front": "XY", "print_back": "5"}}
    assert should_read_imprint(_cands(("A", 0.5), ("B", 0.5)), shared_back)


def test_candidate_imprints_and_flags():
    cands = _cands(("K-000001", 0.6), ("K-000003", 0.3), ("K-404040", 0.1))
    assert candidate_imprints(cands, CLASS_MAP) == ["BSP", "5", "PE"]
    flags = rerank(cands, CLASS_MAP, read="PE", hints=Hints.parse(shape="round")).flags()
    assert flags == {"imprint_read": "PE", "ranking_changed": True, "hints_conflict": False, "conflicts": []}


# ---- the candidates' likelihoods as evidence ------------------------------------------------------------------

TWIN_MAP = {"K-000011": {"print_front": "마크 F7", "print_back": "Y4A"},
            "K-000012": {"print_front": "마크76", "print_back": "HC"},
            "K-000013": {"print_front": "KEF", "print_back": ""},  # a plain back
            "K-000014": {"print_front": "가나", "print_back": "AB"},  # Hangul: the recogniser cannot spell it
            "K-000015": {"print_front": "PE", "print_back": "마크"},  # a logo alone on the back
            "K-000016": {"print_front": "PE", "print_back": "", "enrolled": True}}  # back not on record
# "F" read from an "F7" side: the recogniser's probabilities of each candidate imprint on its lines (ln)
F7_LINES = {"F7": -4.0, "Y4A": -17.9, "76": -11.7, "HC": -8.7, "KEF": -9.0, "AB": -12.0, "PE": -7.0}


def test_likelihood_gaps_count_the_likelier_side_and_say_nothing_for_a_side_ocr_cannot_read():
    gaps = likelihood_gaps(list(TWIN_MAP.values()), F7_LINES)
    # the 76 twin's likelier side is HC (-8.7)
    assert gaps[:2] == [pytest.approx(0.0), pytest.approx(-4.7)]
    # a plain side, Hangul, a logo alone, an enrolled drug's side not on record: the lines cannot say
    assert gaps[2:] == [None, None, None, None]
    assert likelihood_gaps(list(TWIN_MAP.values()), None) == [None] * 6
    assert likelihood_gaps(list(TWIN_MAP.values()), {}) == [None] * 6


def test_likelihoods_tell_twins_apart_where_the_read_is_garbled():
    cands = _cands(("K-000012", 0.6), ("K-000011", 0.4))
    # "F" is like neither imprint (below the similarity floor): the text alone leaves the classifier's order
    by_text = rerank(cands, TWIN_MAP, read="F", read_score=0.5)
    assert not by_text.changed and by_text.candidates[0]["mapping_code"] == "K-000012"
    out = rerank(cands, TWIN_MAP, read="F", read_score=0.5, likelihoods=F7_LINES)
    assert out.changed and out.candidates[0]["mapping_code"] == "K-000011"
    assert [c["imprint_likelihood"] for c in out.candidates] == [0.0, -4.7]
    odds = out.candidates[0]["probability"] / out.candidates[1]["probability"]
    assert odds == pytest.approx(0.4 / 0.6 * math.exp(WEIGHTS.likelihood * 4.7), rel=1e-3)
    # an empty read's likelihoods are no evidence: lines with nothing legible favour the shorter imprint
    assert rerank(cands, TWIN_MAP, read="", likelihoods=F7_LINES).candidates == rerank(cands, TWIN_MAP).candidates


def test_a_likelihood_counts_up_to_its_cap():
    cands = _cands(("K-000012", 0.6), ("K-000011", 0.4))
    far = rerank(cands, TWIN_MAP, read="F", read_score=0.5, likelihoods={**F7_LINES, "HC": -300.0, "76": -400.0})
    odds = far.candidates[0]["probability"] / far.candidates[1]["probability"]
    assert odds == pytest.approx(0.4 / 0.6 * math.exp(WEIGHTS.likelihood * WEIGHTS.likelihood_cap), rel=1e-3)


def test_likelihoods_far_below_the_recognisers_own_reading_say_nothing():
    """A stray read ("X") under which every candidate imprint is impossible: without a reference the less
    impossible twin would take every counted nat of evidence and be sure; measured against the recogniser's own
    reading both are as far off as the cap allows, and nothing moves."""
    cands = _cands(("K-000012", 0.48), ("K-000011", 0.48))
    stray = {"F7": -31.0, "Y4A": -35.0, "76": -40.0, "HC": -38.0}
    plain = rerank(cands, TWIN_MAP, read="X", read_score=0.3)
    out = rerank(cands, TWIN_MAP, read="X", read_score=0.3, likelihoods=stray, read_likelihood=-1.0)
    assert [c["probability"] for c in out.candidates] == pytest.approx([c["probability"] for c in plain.candidates])
    assert [c["imprint_likelihood"] for c in out.candidates] == [-37.0, -30.0] and not out.changed


def test_likelihoods_move_probability_only_among_the_candidates_they_measure():
    cands = _cands(("K-000011", 0.5), ("K-000013", 0.3), ("K-000012", 0.15))  # K-000013 has a plain back
    values = {"F7": -10.0, "Y4A": -12.0, "76": -9.0, "HC": -4.0, "KEF": -25.0}
    out = rerank(cands, TWIN_MAP, read="X", read_score=0.3, likelihoods=values, read_likelihood=-1.0)
    p = {c["mapping_code"]: c["probability"] for c in out.candidates}
    plain = {c["mapping_code"]: c["probability"] for c in rerank(cands, TWIN_MAP, read="X", read_score=0.3).candidates}
    assert p["K-000013"] == pytest.approx(plain["K-000013"])  # its plain side may be up: untouched
    assert p["K-000011"] + p["K-000012"] == pytest.approx(plain["K-000011"] + plain["K-000012"])
    # HC is 3 nats below the own reading, F7's side 9 (counted down to likelihood_cap, 8)
    gained = WEIGHTS.likelihood * (min(9.0, WEIGHTS.likelihood_cap) - 3.0)
    assert p["K-000012"] / p["K-000011"] == pytest.approx(0.15 / 0.5 * math.exp(gained), rel=1e-3)
    assert "imprint_likelihood" not in out.candidates[[c["mapping_code"] for c in out.candidates].index("K-000013")]


def test_a_read_that_matched_a_candidate_decides_without_the_likelihoods():
    cands = _cands(("K-000012", 0.6), ("K-000011", 0.4))
    # "F7" matches the F7 twin; likelihoods favouring the other twin are not counted on top
    out = rerank(cands, TWIN_MAP, read="F7", read_score=0.9, likelihoods={**F7_LINES, "76": -1.0, "F7": -6.0},
                 read_likelihood=-0.5)
    assert out.candidates[0]["mapping_code"] == "K-000011" and "imprint_likelihood" not in out.candidates[0]
    assert out.candidates == rerank(cands, TWIN_MAP, read="F7", read_score=0.9).candidates
