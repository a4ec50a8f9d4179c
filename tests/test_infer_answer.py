"""The answer policy (pillsnap/infer/answer.py) as a pure function: classifier output, imprint read, hints and the
unknown-pill rule in, one frozen answer out. No model, no OCR."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pillsnap.infer.answer import (
    THRESHOLDS,
    AnswerThresholds,
    Classified,
    PillAnswer,
    UnknownRule,
    classifier_candidates,
    decide_answer,
)
from pillsnap.infer.imprint import ImprintRead
from pillsnap.infer.matching import Hints

CLASS_MAP = {"K-000001": {"print_front": "BSP", "print_back": "5"}, "K-000002": {"print_front": "DGTH"},
             "K-000003": {"print_front": "PE"}}
OFF = UnknownRule("probability", None, 3)
# What every answer says, evidence or not: the keys serve/ and `pillsnap predict --json` give.
ANSWER_KEYS = {"mapping_code", "name", "edi_codes", "probability", "topk", "imprint_read", "imprint_unresolved",
               "ranking_changed", "hints_conflict", "conflicts", "unknown", "unknown_score", "unknown_reason",
               "prediction_set", "set_coverage", "sure", "narrow_by", "set_note"}


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
    first, second = classifier_candidates(probs, 2, names, {"K-000002": {"name": "two", "edi_codes": ["E1"]}})
    assert [c["mapping_code"] for c in first] == ["K-000002", "K-000003"]
    assert first[0] == {"mapping_code": "K-000002", "name": "two", "edi_codes": ["E1"],
                        "probability": pytest.approx(0.6)}
    assert [c["mapping_code"] for c in second] == ["K-000001", "K-000002"]  # a tie keeps the class order
    assert len(classifier_candidates(probs, 10, names)[0]) == 3  # k is clipped to the class count
