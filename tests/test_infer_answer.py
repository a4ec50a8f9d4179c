"""The answer policy (pillsnap/infer/answer.py) as a pure function: classifier output, imprint read, hints and the
unknown-pill rule in, one frozen answer out. No model, no OCR."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pillsnap.infer.answer import Classified, PillAnswer, UnknownRule, classifier_candidates, decide_answer
from pillsnap.infer.imprint import ImprintRead
from pillsnap.infer.matching import Hints, KnownImprints
from pillsnap.infer.thresholds import THRESHOLDS, WEIGHTS, AnswerThresholds

CLASS_MAP = {"K-000001": {"print_front": "BSP", "print_back": "5"}, "K-000002": {"print_front": "DGTH"},
             "K-000003": {"print_front": "PE"}}
OFF = UnknownRule("probability", None, 3)
# What every answer says, evidence or not: the keys serve/ and `pillsnap predict --json` give.
ANSWER_KEYS = {"mapping_code", "name", "edi_codes", "probability", "topk", "imprint_read", "imprint_unresolved",
               "ranking_changed", "hints_conflict", "conflicts", "unknown", "unknown_score", "unknown_reason",
               "prediction_set", "set_coverage", "sure", "narrow_by", "set_note", "unknown_by"}


def classified(*pairs: tuple[str, float], score: float | None = None) -> Classified:
    return Classified(tuple({"mapping_code": c, "name": c, "edi_codes": [], "probability": p} for c, p in pairs),
                      score)


def read(text: str, score: float = 0.9) -> ImprintRead:
    return ImprintRead(text, score, 0.0, 0.01, True)


TWINS = classified(("K-000002", 0.55), ("K-000001", 0.40), ("K-000003", 0.05))


def test_without_evidence_the_classifier_answers():
    answer = decide_answer(TWINS, CLASS_MAP, None, None, OFF)
    out = answer.to_dict()
    assert set(out) == ANSWER_KEYS and out["mapping_code"] == "K-000002" and out["probability"] == 0.55
    assert [c["mapping_code"] for c in out["topk"]] == ["K-000002", "K-000001", "K-000003"]
    assert (out["imprint_read"], out["imprint_unresolved"], out["ranking_changed"], out["unknown"]) == (
        None, False, False, False)
    assert decide_answer(TWINS, CLASS_MAP, None, Hints(), OFF) == answer  # empty hints are no evidence


def test_a_read_imprint_picks_the_twin_and_settles_the_question():
    answer = decide_answer(TWINS, CLASS_MAP, read("BSF"), None, OFF)
    out = answer.to_dict()
    assert out["mapping_code"] == "K-000001" and out["ranking_changed"] is True and out["imprint_read"] == "BSF"
    assert out["imprint"]["text"] == "BSF" and out["imprint_unresolved"] is False
    assert set(out) == ANSWER_KEYS | {"imprint", "classifier_probability", "classifier_rank", "imprint_similarity",
                                      "imprint_match"}
    assert out["classifier_probability"] == 0.40 and 0.9 < out["probability"] < 0.95


def test_imprint_unresolved_is_decided_once_from_the_read_the_hints_and_the_unknown_rule():
    nothing = read("")  # a plain side up
    assert decide_answer(TWINS, CLASS_MAP, nothing, None, OFF).imprint_unresolved is True
    assert decide_answer(TWINS, CLASS_MAP, None, None, OFF).imprint_unresolved is False  # not read: no claim
    typed = Hints.parse(imprint="dgth")
    assert decide_answer(TWINS, CLASS_MAP, nothing, typed, OFF).imprint_unresolved is False
    rejecting = UnknownRule("probability", 0.2, 3)  # 1 - 0.55 = 0.45 > 0.2: unknown
    unknown = decide_answer(classified(*((c["mapping_code"], c["probability"]) for c in TWINS.topk), score=0.45),
                            CLASS_MAP, read("HC078"), None, rejecting)
    assert unknown.unknown and unknown.imprint_unresolved is False  # an unknown pill is not a look-alike left open


def test_the_unknown_rule_withholds_the_name_unless_the_imprint_identifies_the_drug():
    rule = UnknownRule("feature_distance", 100.0, 3)
    far = classified(("K-000002", 0.55), ("K-000001", 0.40), score=250.0)
    out = decide_answer(far, CLASS_MAP, None, None, rule).to_dict()
    assert out["unknown"] is True and out["mapping_code"] is None and out["name"] == "" and out["edi_codes"] == []
    assert "farther from every one of the 3 known drugs (distance 250)" in out["unknown_reason"]
    assert out["topk"][0]["mapping_code"] == "K-000002" and out["unknown_score"] == 250.0  # nearest known kept
    exact = decide_answer(far, CLASS_MAP, read("DGTH"), None, rule)
    assert not exact.unknown and exact.to_dict()["mapping_code"] == "K-000002"
    near = decide_answer(far, CLASS_MAP, read("GTH"), None, rule)  # accepted as DGTH (0.6+), not enough to overrule
    assert near.candidates[0]["imprint_match"] and near.unknown
    strict = AnswerThresholds(unknown_override=1.01)  # the threshold is the dataclass's, not a literal elsewhere
    assert decide_answer(far, CLASS_MAP, read("DGTH"), None, rule, strict).unknown
    assert not decide_answer(far, CLASS_MAP, None, None, UnknownRule("feature_distance", 300.0, 3)).unknown


def test_probability_rule_reason_speaks_of_probability():
    low = classified(("K-000002", 0.4), ("K-000001", 0.35), score=0.6)
    reason = decide_answer(low, CLASS_MAP, None, None, UnknownRule("probability", 0.5, 3)).unknown_reason
    assert reason.startswith("top-1 probability 0.40 is below 0.50")


def test_the_answer_is_frozen_and_its_inputs_untouched():
    before = [dict(c) for c in TWINS.topk]
    answer = decide_answer(TWINS, CLASS_MAP, read("BSF"), Hints.parse(color="white"), OFF)
    assert [dict(c) for c in TWINS.topk] == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.unknown_reason = "x"
    assert isinstance(answer, PillAnswer) and isinstance(answer.candidates, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        THRESHOLDS.imprint_accept = 0.1


def test_hints_that_contradict_the_answer_are_named():
    white = {code: {"colors": ["하양"]} for code in CLASS_MAP}
    out = decide_answer(TWINS, white, None, Hints.parse(color="blue"), OFF).to_dict()
    assert out["hints_conflict"] is True and out["conflicts"] == ["color"] and out["imprint_read"] is None


def test_thresholds_sit_on_one_scale_in_order():
    t = AnswerThresholds()
    assert t.imprint_floor < t.imprint_accept < t.same_imprint < t.unknown_override <= 1.0
    assert 0 < t.read_min_probability < 1 and t.read_top_n >= 2


def test_classifier_candidates_is_the_one_top_k():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=np.float32)
    names = ["K-000001", "K-000002", "K-000003"]
    (first, first_reserve), (second, _) = classifier_candidates(probs, 2, names,
                                                                 {"K-000002": {"name": "two", "edi_codes": ["E1"]}})
    assert [c["mapping_code"] for c in first] == ["K-000002", "K-000003"]
    assert first[0] == {"mapping_code": "K-000002", "name": "two", "edi_codes": ["E1"],
                        "probability": pytest.approx(0.6)}
    assert [c["mapping_code"] for c in second] == ["K-000001", "K-000002"]  # a tie keeps the class order
    assert [c["mapping_code"] for c in first_reserve] == ["K-000001"]  # what a conclusive read may bring back
    top, reserve = classifier_candidates(probs, 10, names)[0]
    assert len(top) == 3 and reserve == ()  # k is clipped to the class count


def test_the_reserve_holds_the_drugs_after_the_top_k_the_classifier_has_not_ruled_out():
    probs = np.array([[0.5, 0.3, 0.15, 0.04, 0.0095, 0.0005]], dtype=np.float32)
    names = [f"K-00000{i}" for i in range(6)]
    _, reserve = classifier_candidates(probs, 2, names)[0]
    assert [c["mapping_code"] for c in reserve] == ["K-000002", "K-000003", "K-000004"]  # not 0.0005 < 0.001
    limited = AnswerThresholds(recall_max=2, recall_min_probability=0.01)
    assert [c["mapping_code"] for c in classifier_candidates(probs, 2, names, None, limited)[0][1]] == \
        ["K-000002", "K-000003"]


# ---- the imprint check: an imprint none of the candidates carries -----------------------------------------------

KNOWN = KnownImprints(CLASS_MAP)
SURE = classified(("K-000002", 0.97), ("K-000001", 0.02), ("K-000003", 0.01))


def test_a_legible_imprint_like_none_of_the_candidates_answers_unknown_with_its_reason():
    answer = decide_answer(SURE, CLASS_MAP, read("XWZ", 0.9), None, OFF, known=KNOWN)
    out = answer.to_dict()
    assert answer.unknown and answer.unknown_by == "imprint" and out["mapping_code"] is None
    assert out["probability"] is None
    assert "'XWZ'" in out["unknown_reason"] and "none of the imprints of the 3 drugs" in out["unknown_reason"]
    assert out["imprint_unresolved"] is False  # an unknown pill is never "unresolved between twins"
    assert out["unknown_by"] == "imprint" and out["unknown_reason"].endswith("nearest candidates in topk")
    # without the known imprints (the check off) the same read leaves the classifier's answer named
    assert decide_answer(SURE, CLASS_MAP, read("XWZ", 0.9), None, OFF).to_dict()["mapping_code"] == "K-000002"


@pytest.mark.parametrize("text,score", [("GTH", 0.9),   # a near miss of the top drug's imprint
                                        ("B5P", 0.9),   # another known drug's imprint, misread
                                        ("X", 0.99),    # one character: part of almost any imprint
                                        ("XWZ", 0.3),   # the recogniser itself is unsure
                                        ("", 0.0)])     # nothing read
def test_reads_that_are_no_evidence_against_the_known_drugs_leave_the_name(text, score):
    answer = decide_answer(SURE, CLASS_MAP, read(text, score), None, OFF, known=KNOWN)
    assert not answer.unknown and answer.unknown_by is None


def test_a_drug_without_its_imprint_on_record_is_never_rejected_by_its_imprint():
    class_map = {**CLASS_MAP, "K-000004": {"print_front": "", "print_back": ""}}  # e.g. enrolled without imprints
    top = classified(("K-000004", 0.9), ("K-000002", 0.1))
    assert not decide_answer(top, class_map, read("XWZ"), None, OFF, known=KnownImprints(class_map)).unknown


def test_a_typed_imprint_like_no_known_drugs_answers_unknown_and_outranks_the_read():
    typed = Hints(imprint="QQQ")
    answer = decide_answer(SURE, CLASS_MAP, read("DGTH"), typed, OFF, known=KNOWN)
    assert answer.unknown and "typed in, 'QQQ'" in answer.unknown_reason
    assert not decide_answer(SURE, CLASS_MAP, read("XWZ"), Hints(imprint="DGTH"), OFF, known=KNOWN).unknown


def test_the_foreign_imprint_thresholds_are_the_answer_policys():
    strict = AnswerThresholds(foreign_read_chars=4)
    both_sides = classified(("K-000001", 0.97), ("K-000003", 0.03))  # BSP / 5: no blank side
    assert not decide_answer(both_sides, CLASS_MAP, read("XWZ"), None, OFF, strict, known=KNOWN).unknown
    assert decide_answer(both_sides, CLASS_MAP, read("XWZQ"), None, OFF, strict, known=KNOWN).unknown


def test_an_imprint_of_a_known_drug_it_does_not_look_like_is_named_in_the_reason():
    class_map = {**CLASS_MAP, "K-000004": {"print_front": "QRX"}}
    top = classified(("K-000002", 0.9), ("K-000001", 0.1))  # K-000004 is not among the candidates
    answer = decide_answer(top, class_map, read("QRX"), None, OFF, known=KnownImprints(class_map))
    assert answer.unknown and "the imprint of K-000004, 'QRX'," in answer.unknown_reason
    near = {**class_map, "K-000005": {"print_front": "QRY"}}  # a near miss first in the map: the exact one named
    near = {"K-000005": near["K-000005"], **class_map}
    answer = decide_answer(top, near, read("QRX"), None, OFF, known=KnownImprints(near))
    assert "the imprint of K-000004" in answer.unknown_reason
    one = classified(("K-000002", 1.0))
    assert "imprints of the drug it looks like" in decide_answer(one, CLASS_MAP, read("XWZ"), None, OFF,
                                                                 known=KNOWN).unknown_reason


def test_a_conclusive_read_brings_back_a_look_alike_ranked_below_the_top_k():
    """The drug whose imprint is read, ranked 4th by a classifier that keeps 3, comes back and is named; one the
    classifier ruled out by its look (not in the reserve) is not, and neither a weak read nor a near miss recalls."""
    class_map = {**CLASS_MAP, "K-000004": {"print_front": "KEF"}}
    (top, reserve), = classifier_candidates(np.array([[0.6, 0.3, 0.0925, 0.0075]]), 3,
                                            ["K-000002", "K-000001", "K-000003", "K-000004"], class_map)
    pill = Classified(top, None, reserve)
    answer = decide_answer(pill, class_map, read("KEF", 0.99), None, OFF, known=KnownImprints(class_map))
    out = answer.to_dict()
    assert out["mapping_code"] == "K-000004" and not answer.unknown and out["ranking_changed"]
    assert out["topk"][0]["recalled_by_imprint"] is True and len(out["topk"]) == 4
    assert out["topk"][0]["classifier_probability"] == pytest.approx(0.0075)
    # unlike a conclusive read of a top-k drug, it never overrules the unknown-pill rule or the box check: the
    # pill's look argues against the drug brought back
    far = decide_answer(pill._replace(unknown_score=250.0), class_map, read("KEF", 0.99), None,
                        UnknownRule("feature_distance", 100.0, 3))
    assert far.unknown and far.unknown_by == "look" and far.candidates[0]["mapping_code"] == "K-000004"
    doubted = decide_answer(pill, class_map, read("KEF", 0.99), None, OFF, box_doubt="may hold no pill")
    assert doubted.unknown and doubted.unknown_by == "box"
    assert not decide_answer(pill._replace(unknown_score=250.0), class_map, read("DGTH", 0.99), None,
                             UnknownRule("feature_distance", 100.0, 3)).unknown  # a top-k drug's does
    # a near miss of a top-k drug's imprint is that drug, not another printed as it was read
    near = {**CLASS_MAP, "K-000004": {"print_front": "BSF"}}
    (near_top, near_reserve), = classifier_candidates(np.array([[0.7, 0.2, 0.097, 0.003]]), 3,
                                                      ["K-000001", "K-000002", "K-000003", "K-000004"], near)
    answer = decide_answer(Classified(near_top, None, near_reserve), near, read("BSF", 0.95), None, OFF)
    assert answer.to_dict()["mapping_code"] == "K-000001" and len(answer.candidates) == 3
    # not in the reserve (the classifier left it less than recall_min_probability): the read is foreign
    ruled_out = decide_answer(Classified(top, None), class_map, read("KEF", 0.99), None, OFF,
                              known=KnownImprints(class_map))
    assert ruled_out.unknown and "the imprint of K-000004" in ruled_out.unknown_reason
    # unsure (a held-out pill's "HC" at 0.57 would name a known "HC"), a near miss, one character
    for weak in (read("KEF", 0.57), read("KE", 0.99), read("K", 0.99)):
        assert decide_answer(pill, class_map, weak, None, OFF).to_dict()["mapping_code"] != "K-000004"
    assert decide_answer(pill, class_map, None, None, OFF).candidates == top  # no read: the top-k as it was


def test_known_imprints_find_the_closest_and_stop_at_enough():
    closest = KNOWN.closest("GTH")
    assert closest.code == "K-000002" and closest.imprint == "DGTH" and closest.similarity >= 0.6
    assert KNOWN.closest("").code is None and KNOWN.closest("XWZ").similarity < 0.5
    assert KNOWN.closest("PE", enough=0.1).similarity >= 0.1  # stops at the first enough-alike imprint
    assert len(KnownImprints({"K-1": {"print_front": "AB"}, "K-2": {"print_front": "AB"}})) == 1  # one per imprint


def test_the_unknown_report_ranks_a_foreign_imprint_above_any_distance():
    from pillsnap.eval.answer_calibration import ValAnswer, answers_unknown_report

    def answer(score, foreign=False):
        return PillAnswer(({"mapping_code": "K-000001", "probability": 0.9},), score,
                          "withheld" if foreign or score > 10 else None,
                          unknown_by="imprint" if foreign else ("look" if score > 10 else None))

    known = [answer(1.0), answer(2.0), answer(3.0), answer(20.0)]
    items = [ValAnswer(None, None, "K-000001", source) for source in ("single", "single", "single", "combination")]
    held = [answer(2.5, foreign=True), answer(0.5)]
    report = answers_unknown_report(known, items, held)
    assert (report["known"], report["unknown"]) == (3, 2)  # the combination crop is not a single-pill photo
    assert report["auroc"] == pytest.approx(0.5)  # the foreign one above all three known, the other below all
    assert report["unknown_rejected"] == 0.5 and report["unknown_rejected_by_imprint"] == 0.5
    assert report["known_rejected"] == 0.0
    # an infinite or missing score (a rule that could not run) ranks, and an imprint still outranks it
    odd = answers_unknown_report([answer(1.0), answer(float("inf"))], items[:2],
                                 [answer(2.0, foreign=True), PillAnswer(({"mapping_code": "K-000001"},), None)])
    assert odd["auroc"] == pytest.approx(0.5)


def test_a_typed_imprint_is_held_only_against_the_one_pill_of_a_photo():
    typed = Hints(imprint="QQQ")  # typed for another pill of a photo of several: this one's read is what counts
    assert not decide_answer(SURE, CLASS_MAP, read("DGTH"), typed, OFF, known=KNOWN, one_pill=False).unknown
    assert decide_answer(SURE, CLASS_MAP, read("XWZ"), typed, OFF, known=KNOWN, one_pill=False).unknown


def test_a_side_ocr_cannot_read_needs_a_stronger_read_to_count_against_the_drug():
    # a logo-only back, a score-line back, or one side not on record (an enrolled drug given its front only)
    for back in ("마크", "분할선", ""):
        class_map = {"K-000009": {"print_front": "AB12", "print_back": back}, **CLASS_MAP}
        top = classified(("K-000009", 0.95), ("K-000003", 0.05))
        known = KnownImprints(class_map)
        for stray in (read("OU", 0.9), read("11", 0.95), read("XWZ", 0.6)):  # what OCR makes of a logo or groove
            assert not decide_answer(top, class_map, stray, None, OFF, known=known).unknown, (back, stray)
        assert decide_answer(top, class_map, read("XWZ", 0.9), None, OFF, known=known).unknown_by == "imprint"


def test_a_read_made_only_for_the_check_leaves_nothing_unresolved():
    alone = classified(("K-000002", 0.999), ("K-000001", 0.0005), ("K-000003", 0.0005))  # no contender
    answer = decide_answer(alone, CLASS_MAP, read("Q", 0.9), None, OFF, known=KNOWN)
    assert not answer.unknown and answer.imprint_unresolved is False
    # where the contenders differ by imprint, a read that matches none of them still leaves the question open
    assert decide_answer(TWINS, CLASS_MAP, read("Q", 0.9), None, OFF, known=KNOWN).imprint_unresolved is True


TWIN_CLASSES = {"K-000011": {"print_front": "마크 F7", "print_back": "Y4A"},
                "K-000012": {"print_front": "마크76", "print_back": "HC"}}


def test_a_stray_read_with_likelihoods_neither_names_a_twin_nor_settles_it():
    """A one-letter stray read under which no twin's imprint is plausible (far below what the recogniser reads
    itself): the answer is the one without the likelihoods, not sure, and still unresolved."""
    from pillsnap.infer.answer import SetRule

    twins = classified(("K-000012", 0.48), ("K-000011", 0.48), ("K-000003", 0.04))
    class_map = {**CLASS_MAP, **TWIN_CLASSES}
    rule = SetRule("lac", 0.95, 0.9, fill=True)
    stray = ImprintRead("X", 0.3, 0.0, 0.01, True, likelihoods={"F7": -31.0, "Y4A": -35.0, "76": -40.0,
                                                                "HC": -38.0, "PE": -30.0}, read_likelihood=-1.0)
    bare = dataclasses.replace(stray, likelihoods=None, read_likelihood=None)
    out = decide_answer(twins, class_map, stray, None, OFF, set_rule=rule).to_dict()
    without = decide_answer(twins, class_map, bare, None, OFF, set_rule=rule).to_dict()
    assert [(c["mapping_code"], c["probability"]) for c in out["topk"]] == [
        (c["mapping_code"], pytest.approx(c["probability"])) for c in without["topk"]]
    assert [c.get("imprint_likelihood") for c in out["topk"]] == [-37.0, -30.0, None]  # measured, capped alike
    for key in ("prediction_set", "sure", "imprint_unresolved", "ranking_changed", "unknown"):
        assert out[key] == without[key], key
    assert not out["sure"] and out["imprint_unresolved"] and not out["ranking_changed"]


def test_a_garbled_read_tells_the_twins_apart_by_their_likelihoods():
    """"D F" read from the F7 twin (like neither imprint): F7 is 3 nats below the recogniser's own reading, the
    76 twin's sides beyond the nats counted (likelihood_cap), so the F7 twin is named."""
    twins = classified(("K-000012", 0.5), ("K-000011", 0.45), ("K-000003", 0.05))
    class_map = {**CLASS_MAP, **TWIN_CLASSES}
    read = ImprintRead("D F", 0.47, 0.0, 0.01, True, likelihoods={"F7": -4.0, "Y4A": -15.7, "76": -11.7,
                                                                  "HC": -12.6}, read_likelihood=-1.0)
    out = decide_answer(twins, class_map, read, None, OFF).to_dict()
    assert out["mapping_code"] == "K-000011" and out["ranking_changed"]
    without = decide_answer(twins, class_map, dataclasses.replace(read, likelihoods=None), None, OFF).to_dict()
    assert without["mapping_code"] == "K-000012"  # the text alone ("D F") is like neither imprint

    def odds(answer: dict) -> float:
        p = {c["mapping_code"]: c["probability"] for c in answer["topk"]}
        return p["K-000011"] / p["K-000012"]

    gained = WEIGHTS.likelihood * (WEIGHTS.likelihood_cap - 3.0)
    assert odds(out) / odds(without) == pytest.approx(math.exp(gained), rel=1e-3)


def test_likelihoods_say_nothing_where_the_classifier_ruled_the_look_alikes_out():
    """A read made only for the imprint check (the F7 twin at 0.985, its look-alike below read_min_probability):
    the likelihoods have nothing to choose between, and at weight 0 (a calibration made without them) they are
    not counted either."""
    read = ImprintRead("D F", 0.47, 0.0, 0.01, True, likelihoods={"F7": -11.7, "Y4A": -15.7, "76": -4.0,
                                                                  "HC": -12.6}, read_likelihood=-1.0)
    bare = dataclasses.replace(read, likelihoods=None, read_likelihood=None)
    class_map = {**CLASS_MAP, **TWIN_CLASSES}
    sure = classified(("K-000011", 0.985), ("K-000012", 0.005), ("K-000003", 0.005))
    known = KnownImprints(class_map)
    assert decide_answer(sure, class_map, read, None, OFF, known=known).to_dict()["topk"] == \
        decide_answer(sure, class_map, bare, None, OFF, known=known).to_dict()["topk"]
    twins = classified(("K-000011", 0.5), ("K-000012", 0.45), ("K-000003", 0.05))
    off = dataclasses.replace(WEIGHTS, likelihood=0.0)
    assert decide_answer(twins, class_map, read, None, OFF, weights=off).to_dict()["topk"] == \
        decide_answer(twins, class_map, bare, None, OFF, weights=off).to_dict()["topk"]
    assert decide_answer(twins, class_map, read, None, OFF).to_dict()["mapping_code"] == "K-000012"


def test_likelihoods_that_are_not_numbers_are_left_out():
    twins = classified(("K-000011", 0.5), ("K-000012", 0.45), ("K-000003", 0.05))
    class_map = {**CLASS_MAP, **TWIN_CLASSES}
    read = ImprintRead("D F", 0.47, 0.0, 0.01, True, likelihoods={"F7": -math.inf, "Y4A": math.nan, "76": -4.0,
                                                                  "HC": -5.0}, read_likelihood=math.nan)
    out = decide_answer(twins, class_map, read, None, OFF).to_dict()
    assert all(math.isfinite(c["probability"]) for c in out["topk"])
    assert [c.get("imprint_likelihood") for c in out["topk"]] == [None, None, None]  # only one twin measured


def test_an_imprint_the_recogniser_reads_surely_and_no_candidate_fits_is_foreign():
    """"8" read at 0.99 from a drug never trained ("C0"): one character is too little for the text to be held
    against anything, but the recogniser finds every candidate imprint 12 nats or more below what it reads."""
    class_map = {**CLASS_MAP, **TWIN_CLASSES}
    twins = classified(("K-000011", 0.6), ("K-000012", 0.35), ("K-000003", 0.05))
    values = {"F7": -18.9, "Y4A": -26.0, "76": -12.3, "HC": -16.3, "PE": -20.0}
    sure = ImprintRead("8", 0.99, 0.0, 0.01, True, likelihoods=values, read_likelihood=-0.03)
    known = KnownImprints(class_map)
    out = decide_answer(twins, class_map, sure, None, OFF, known=known).to_dict()
    assert out["unknown"] and out["unknown_by"] == "imprint" and out["probability"] is None
    assert "'8' (confidence 0.99)" in out["unknown_reason"] and "2,981x less likely" in out["unknown_reason"]
    far = dataclasses.replace(sure, likelihoods={k: -5000.0 for k in values})  # lines that spell nothing like them
    assert decide_answer(twins, class_map, far, None, OFF, known=known).unknown_by == "imprint"
    for unsure in (dataclasses.replace(sure, score=0.6),  # read without confidence
                   dataclasses.replace(sure, likelihoods={**values, "76": -6.0}),  # one candidate fits well enough
                   dataclasses.replace(sure, likelihoods={**values, "PE": -1.0}),  # a third one, not the top
                   dataclasses.replace(sure, likelihoods={**values, "76": -8.03}),  # exactly 8 nats: not more
                   dataclasses.replace(sure, likelihoods={k: v for k, v in values.items() if k != "PE"}),  # unmeasured
                   dataclasses.replace(sure, text="7G"),  # like the "76" twin as text: a near miss, not foreign
                   dataclasses.replace(sure, read_likelihood=None),
                   dataclasses.replace(sure, text="")):  # nothing legible read
        assert not decide_answer(twins, class_map, unsure, None, OFF, known=known).unknown, unsure
    # an imprint typed in outranks the read: "76" is the second twin's
    typed = decide_answer(twins, class_map, sure, Hints.parse(imprint="76"), OFF, known=known)
    assert not typed.unknown and typed.candidates[0]["mapping_code"] == "K-000012"
    # the top drug has a plain back: the lines may come from it, and the likelihoods cannot say
    plain = {**class_map, "K-000011": {"print_front": "마크 F7", "print_back": ""}}
    assert not decide_answer(twins, plain, sure, None, OFF, known=KnownImprints(plain)).unknown
    assert not decide_answer(twins, class_map, sure, None, OFF).unknown  # the imprint check off


def test_a_typed_imprint_brings_back_a_look_alike_ranked_below_the_top_k():
    """Among thousands of drugs a look-alike group outnumbers the top-k: the drug whose imprint a pharmacist types,
    ranked 4th by a classifier that keeps 3, comes back and is the answer. Before, only a read could bring it back,
    and the typed imprint, like none of the top-k's, answered "unknown pill", naming that very drug as one the pill
    does not look like. On a photo of several pills the typed imprint may describe another: it recalls nothing."""
    class_map = {**CLASS_MAP, "K-000004": {"print_front": "TYL500"}}
    (top, reserve), = classifier_candidates(np.array([[0.6, 0.3, 0.0925, 0.0075]]), 3,
                                            ["K-000002", "K-000001", "K-000003", "K-000004"], class_map)
    pill, known = Classified(top, None, reserve), KnownImprints(class_map)
    answer = decide_answer(pill, class_map, None, Hints(imprint="tyl 500"), OFF, known=known)
    out = answer.to_dict()
    assert out["mapping_code"] == "K-000004" and not answer.unknown and out["topk"][0]["recalled_by_imprint"]
    several = decide_answer(pill, class_map, None, Hints(imprint="TYL500"), OFF, known=known, one_pill=False)
    assert [c["mapping_code"] for c in several.candidates] == [c["mapping_code"] for c in top]
    ruled_out = decide_answer(Classified(top, None), class_map, None, Hints(imprint="TYL500"), OFF, known=known)
    assert ruled_out.unknown and "the imprint of K-000004" in ruled_out.unknown_reason  # not in the reserve


def test_the_top_k_from_a_partition_is_the_stable_sorts_ties_included():
    """A full stable sort of 5,000 classes for every crop cost more than the rest of the candidates' work; the
    partition keeps its order exactly, ties in class order (probabilities underflowed to 0 among them)."""
    from pillsnap.infer.answer import _best

    rng = np.random.default_rng(0)
    for _ in range(200):
        row = np.round(rng.random(int(rng.integers(1, 60))) ** 4, 1).astype(np.float32)  # many equal values, zeros
        for m in (1, 5, 25, 100):
            assert _best(row, m).tolist() == np.argsort(-row, kind="stable")[:m].tolist()
    for row in (np.full(8, np.nan, np.float32), np.array([0.2, np.nan, 0.7, np.nan, np.nan], np.float32)):
        assert _best(row, 3).tolist() == np.argsort(-row, kind="stable")[:3].tolist()  # NaN: the sort's order
