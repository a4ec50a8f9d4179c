"""Prediction sets: the coverage guarantee on synthetic splits at several levels, the set rule of an answer (sure,
open between look-alikes, empty for an unknown pill) and what the set tells a person."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pillsnap.infer.answer import Classified, SetRule, UnknownRule, decide_answer, narrow_by
from pillsnap.infer.artefacts import load_set_rule
from pillsnap.infer.imprint import ImprintRead
from pillsnap.infer.matching import Hints
from pillsnap.metrics.conformal import (
    SET_METHODS,
    conformal_threshold,
    coverage_report,
    no_threshold_reason,
    nonconformity,
    set_size,
)


def _split(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Answers whose probabilities are right by construction (each label drawn from its own row), from sharp to
    spread, sorted best first; returns (probabilities [n, classes], the right class's place in each row)."""
    rng = np.random.default_rng(seed)
    sharpness = rng.choice([0.05, 0.3, 2.0], size=n)
    probs = np.stack([rng.dirichlet(np.full(classes, a)) for a in sharpness])
    labels = np.array([rng.choice(classes, p=row) for row in probs])
    order = np.argsort(-probs, axis=1, kind="stable")
    place = np.argmax(order == labels[:, None], axis=1)
    return np.take_along_axis(probs, order, axis=1), place


@pytest.mark.parametrize("method", sorted(SET_METHODS))
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_cover_the_right_class_at_the_level_asked(method: str, coverage: float) -> None:
    probs, place = _split(4000, 8, seed=int(coverage * 100))
    scores = [nonconformity(method, row, int(k)) for row, k in zip(probs[:2000], place[:2000], strict=True)]
    threshold = conformal_threshold(scores, coverage)
    sizes = [set_size(method, row, threshold) for row in probs[2000:]]
    covered = [int(k) < size for k, size in zip(place[2000:], sizes, strict=True)]
    report = coverage_report(covered, sizes)
    # 2,000 held-out answers: the binomial standard error at 0.9 is 0.0067, so 0.02 is three of them
    assert report["coverage"] >= coverage - 0.02, report
    # not by putting everything in every set (the top candidate, always in, adds some coverage on sharp answers)
    assert report["coverage"] <= coverage + 0.12 and 1.0 <= report["mean_set_size"] < 6, report


def test_filled_sets_keep_the_guarantee_and_a_sure_answer_is_right_as_often_as_its_probability_says() -> None:
    """LAC's lone drugs include answers at probability 0.5-0.9, right only that often; filled to the coverage, a
    one-drug set carries at least the coverage in probability, and, the probabilities being right by construction,
    is right at least that often. The sets only grow, so the coverage holds."""
    probs, place = _split(6000, 8, seed=7)
    scores = [nonconformity("lac", row, int(k)) for row, k in zip(probs[:2000], place[:2000], strict=True)]
    threshold = conformal_threshold(scores, 0.9)
    plain = np.array([set_size("lac", row, threshold) for row in probs[2000:]])
    filled = np.array([set_size("lac", row, threshold, fill_to=0.9) for row in probs[2000:]])
    right = place[2000:] == 0
    assert (filled >= plain).all() and np.mean(place[2000:] < filled) >= 0.9 - 0.02
    assert probs[2000:][filled == 1, 0].min() >= 0.9 and right[filled == 1].mean() >= 0.9 - 0.02
    # what it fixes: LAC's lone drugs below the level (94 of them here) are right only as often as they say
    low = (plain == 1) & (probs[2000:, 0] < 0.9)
    assert low.sum() > 50 and right[low].mean() < 0.9 - 0.03 and not ((filled == 1) & (probs[2000:, 0] < 0.9)).any()
    assert set_size("lac", [0.6, 0.3, 0.1], 0.5, fill_to=0.95) == 3  # 0.6 + 0.3 < 0.95: the third is needed
    assert set_size("lac", [0.6, 0.35, 0.05], 0.5, fill_to=0.95) == 2
    assert set_size("lac", [0.5, 0.2], 0.5, fill_to=0.95) == 2  # never reached: every candidate


def test_aps_sets_grow_where_the_answer_is_spread() -> None:
    probs, place = _split(4000, 8, seed=3)
    scores = [nonconformity("aps", row, int(k)) for row, k in zip(probs, place, strict=True)]
    threshold = conformal_threshold(scores, 0.9)
    sharp = probs[:, 0] > 0.9
    sizes = np.array([set_size("aps", row, threshold) for row in probs])
    assert sizes[sharp].mean() + 1 < sizes[~sharp].mean()


def test_threshold_rank_and_too_few_answers() -> None:
    scores = [0.1, 0.4, 0.2, 0.3]
    assert conformal_threshold(scores, 0.7) == 0.4  # ceil(5 * 0.7) = 4th smallest
    assert conformal_threshold(scores, 0.5) == 0.3  # ceil(5 * 0.5) = 3rd smallest
    assert math.isinf(conformal_threshold(scores, 0.9))  # 4 answers cannot certify 0.9: every candidate
    assert math.isinf(nonconformity("aps", [0.7, 0.2], None))  # the right class was not among the candidates
    assert set_size("aps", [0.99, 0.01], 0.5) == 1  # the top candidate is always in the set
    assert set_size("lac", [0.5, 0.3, 0.2], math.inf) == 3
    with pytest.raises(ValueError, match="coverage"):
        conformal_threshold(scores, 1.0)
    with pytest.raises(ValueError, match="aps"):
        set_size("raps", [1.0], 0.5)


CLASS_MAP = {
    "K-000001": {"name": "Twin A", "print_front": "AB", "print_back": "5", "colors": ["하양"], "shape": "원형"},
    "K-000002": {"name": "Twin B", "print_front": "XY", "print_back": "5", "colors": ["하양"], "shape": "원형"},
    "K-000003": {"name": "Other", "print_front": "QQ", "print_back": "", "colors": ["분홍"], "shape": "타원형"},
}


def _classified(*probabilities: float, score: float | None = None) -> Classified:
    codes = list(CLASS_MAP)
    return Classified(tuple({"mapping_code": codes[i], "name": CLASS_MAP[codes[i]]["name"], "edi_codes": [],
                             "probability": p} for i, p in enumerate(probabilities)), score)


RULE = UnknownRule("feature_distance", 100.0, 3)
SETS = SetRule("lac", 0.95, 0.6)  # candidates holding at least 0.4 are in the set


def test_a_confident_answer_is_sure_and_look_alikes_stay_open() -> None:
    """A two-way split between twins is kept open (LAC: each holds more than 1 - threshold); APS at a threshold
    below the pair's mass would keep only the first, which is why LAC is the default for answers this peaked."""
    sure = decide_answer(_classified(0.9996, 0.0003, 0.0001), CLASS_MAP, None, None, RULE, set_rule=SETS).to_dict()
    assert sure["sure"] is True and [m["mapping_code"] for m in sure["prediction_set"]] == ["K-000001"]
    assert sure["set_note"] is None and sure["set_coverage"] == 0.95
    # the back side "5" was read: both twins carry it, so the set keeps both and says what would settle it
    read = ImprintRead("5", 0.9, 0.0, 0.1, True)
    twins = decide_answer(_classified(0.55, 0.44, 0.01), CLASS_MAP, read, None, RULE, set_rule=SETS).to_dict()
    assert [m["mapping_code"] for m in twins["prediction_set"]] == ["K-000001", "K-000002"]
    assert twins["sure"] is False and twins["narrow_by"] == ["other_side", "imprint"]
    assert "K-000001 Twin A or K-000002 Twin B" in twins["set_note"] and "other side" in twins["set_note"]
    aps = decide_answer(_classified(0.55, 0.44, 0.01), CLASS_MAP, read, None, RULE,
                        set_rule=SetRule("aps", 0.95, 0.9995)).to_dict()
    assert len(aps["prediction_set"]) == 1  # the pair holds 0.99999 > 0.9995
    # a typed imprint is not asked for again; a different colour is something the user can give
    typed = narrow_by(twins["prediction_set"], CLASS_MAP, Hints(imprint="5"))
    assert typed == ("other_side",)
    assert narrow_by([{"mapping_code": "K-000001"}, {"mapping_code": "K-000003"}], CLASS_MAP, None) == (
        "other_side", "imprint", "color", "shape")


def test_a_lone_drug_below_the_coverage_is_not_sure_when_sets_are_filled() -> None:
    lone = _classified(0.62, 0.25, 0.13)  # LAC keeps only the first (0.25 < 0.4)
    plain = decide_answer(lone, CLASS_MAP, None, None, RULE, set_rule=SETS).to_dict()
    assert plain["sure"] is True  # sure at 95 % with a probability of 0.62: what filling prevents
    filled = decide_answer(lone, CLASS_MAP, None, None, RULE, set_rule=SetRule("lac", 0.95, 0.6, fill=True)).to_dict()
    assert filled["sure"] is False and [m["mapping_code"] for m in filled["prediction_set"]] == list(CLASS_MAP)[:3]
    sharp = decide_answer(_classified(0.97, 0.02, 0.01), CLASS_MAP, None, None, RULE,
                          set_rule=SetRule("lac", 0.95, 0.6, fill=True)).to_dict()
    assert sharp["sure"] is True
    # one candidate only (inference.topk=1): filling cannot reach the coverage, so one drug left is still not sure
    only = decide_answer(_classified(0.7), CLASS_MAP, None, None, RULE,
                         set_rule=SetRule("lac", 0.95, 0.6, fill=True)).to_dict()
    assert only["sure"] is False and len(only["prediction_set"]) == 1 and "not 95% probable" in only["set_note"]
    from pillsnap.infer.cli import answer_text

    assert answer_text(only).endswith("p=0.700 [not sure at 95%]")


def test_an_unknown_pill_has_an_empty_set_and_no_probability() -> None:
    answer = decide_answer(_classified(0.68, 0.2, 0.12, score=500.0), CLASS_MAP, None, None, RULE, set_rule=SETS)
    pill = answer.to_dict()
    assert pill["unknown"] is True and pill["mapping_code"] is None
    assert pill["probability"] is None and pill["classifier_probability"] is None
    assert pill["prediction_set"] == [] and pill["sure"] is False
    assert pill["topk"][0]["probability"] == 0.68  # the nearest known drugs keep theirs
    # without a calibrated set rule the answer says so with null, not an empty set
    plain = decide_answer(_classified(0.9, 0.05, 0.05), CLASS_MAP, None, None, RULE).to_dict()
    assert plain["prediction_set"] is None and plain["sure"] is None


def test_set_rule_from_a_calibration_is_refused_when_reading_differs() -> None:
    calibration = {"prediction_sets": {"scores": {"aps": [0.5, 0.9, None, 0.7], "lac": [0.1, 0.2, None, 0.3]},
                                       "imprint_reading": True, "n": 4}}
    rule, problem = load_set_rule(calibration, "aps", 0.5, imprint_reading=True)
    assert problem is None and rule.threshold == 0.9 and rule.by_source is None  # 3rd smallest of 4
    rule, problem = load_set_rule(calibration, "aps", 0.5, imprint_reading=False)
    assert rule is None and "imprint reading on" in problem
    assert load_set_rule({}, "aps", 0.9, True)[1].startswith("the calibration has no prediction-set scores")
    # the imprint check withholds answers and reads every pill: sets calibrated without it (older files: no key)
    # are refused with it on, and the other way round; with reading off the check cannot run and is not asked
    rule, problem = load_set_rule(calibration, "aps", 0.5, True, imprint_check=True)
    assert rule is None and "imprint check (inference.imprint.unknown_check) off and it is now on" in problem
    checked = {"prediction_sets": {**calibration["prediction_sets"], "imprint_check": True}}
    rule, problem = load_set_rule(checked, "aps", 0.5, True, imprint_check=True)
    assert problem is None and rule.threshold == 0.9
    assert load_set_rule(checked, "aps", 0.5, True, imprint_check=False)[0] is None


def test_no_set_claims_a_coverage_its_candidates_cannot_give() -> None:
    """Sets hold only the top-k candidates: where the right drug is outside them in more answers than the coverage
    may leave out (1 in 12 at 5,000 drugs, top-5), or where there are too few answers, no set is at that coverage,
    so answers carry none and the reason names the cause (before, every candidate went in, 'at 95 %')."""
    missing = [None if i % 12 == 0 else 0.1 + 0.001 * i for i in range(400)]  # 34 of 400 outside the top-k
    calibration = {"prediction_sets": {"scores": {"lac": missing}, "imprint_reading": True, "n": 400}}
    rule, problem = load_set_rule(calibration, "lac", 0.95, imprint_reading=True)
    assert rule is None and problem == ("no set at 95% coverage: the candidates (inference.topk) hold the right drug "
                                        "in 366 of the 400 calibration answers (8.5% missed), and 95% coverage needs "
                                        "it in at least 381: raise inference.topk or lower inference.prediction_set."
                                        "coverage")
    rule, problem = load_set_rule(calibration, "lac", 0.9, imprint_reading=True)  # 10 % may be left out: fine
    assert problem is None and math.isfinite(rule.threshold)
    few = {"prediction_sets": {"scores": {"lac": [0.1, 0.2, 0.3, 0.4]}, "imprint_reading": True, "n": 4}}
    assert load_set_rule(few, "lac", 0.9, imprint_reading=True)[1] == (
        "no set at 90% coverage: 4 calibration answers are too few for 90% coverage (at least 9 are needed)")
    assert no_threshold_reason([0.1] * 9, 0.9) is None  # ceil(10 * 0.9) = 9: the 9th smallest
    # a crop source with answers enough of its own whose candidates miss too often gets no set, even where the
    # threshold over every answer is finite: that one would give its sets a coverage its own answers lack
    sharp = [0.05] * 300  # single photos: always found
    spread = [None if i % 10 == 0 else 0.2 for i in range(100)]  # combination pills: 10 % outside the top-k
    mixed = {"prediction_sets": {"scores": {"lac": sharp + spread}, "imprint_reading": True, "n": 400,
                                 "sources": ["single"] * 300 + ["combination"] * 100}}
    rule, problem = load_set_rule(mixed, "lac", 0.95, imprint_reading=True)
    assert problem is None and math.isfinite(rule.threshold)  # 10 of 400 missed over all: within the 5 %
    assert rule.for_source("combination") is None and "hold the right drug in 90 of the 100" in rule.refused[
        "combination"]
    assert rule.for_source("single").threshold == 0.05
    plain, _ = load_set_rule(mixed, "lac", 0.95, imprint_reading=True, by_source=False)
    assert plain.refused is None and plain.for_source("combination") is plain  # one threshold for every pill
    # The draw gives combination crops a larger share than they have (a third, against a tenth at Stage 4): when
    # their misses put the answers over all sources past the coverage, single photos keep their own sets
    worse = [None if i % 16 < 3 else 0.2 for i in range(160)]  # 30 of 160 outside the top-k: 30 of 460 in all
    pooled = {"prediction_sets": {"scores": {"lac": sharp + worse}, "imprint_reading": True, "n": 460,
                                  "sources": ["single"] * 300 + ["combination"] * 160}}
    rule, problem = load_set_rule(pooled, "lac", 0.95, imprint_reading=True)
    assert problem is None and rule.for_source("single").threshold == 0.05
    assert rule.for_source("combination") is None and rule.for_source(None) is None  # no finite threshold for them
    assert "hold the right drug in 130 of the 160" in rule.refused["combination"]
    alone = {"prediction_sets": {**pooled["prediction_sets"], "sources": ["single"] * 300 + [None] * 160}}
    rule, _ = load_set_rule(alone, "lac", 0.95, imprint_reading=True)  # the combination crops' source unknown
    assert rule.for_source("combination") is None and "over every calibration answer" in rule.refused["combination"]
    assert load_set_rule(pooled, "lac", 0.95, imprint_reading=True, by_source=False)[0] is None


def test_the_imprint_weight_is_fit_to_how_often_reads_are_right() -> None:
    """Twins told apart only by the front imprint: where the read always names the right twin the fit trusts it
    more than where it names the wrong twin a third of the time."""
    from pillsnap.eval.answer_calibration import ValAnswer, fit_evidence_scale

    def items(wrong_every: int) -> list[ValAnswer]:
        out = []
        for i in range(30):
            truth = "K-000001" if i % 2 else "K-000002"
            other = "K-000002" if truth == "K-000001" else "K-000001"
            said = other if wrong_every and i % wrong_every == 0 else truth
            out.append(ValAnswer(_classified(0.5, 0.49, 0.01), ImprintRead(CLASS_MAP[said]["print_front"], 0.9, 0.0,
                                                                            0.1, True), truth))
        return out

    trusting, doubting = fit_evidence_scale(items(0), CLASS_MAP), fit_evidence_scale(items(3), CLASS_MAP)
    assert trusting == 2.0 and doubting < 1.0, (trusting, doubting)
    assert fit_evidence_scale([ValAnswer(_classified(0.9, 0.1), None, "K-000001")], CLASS_MAP) == 1.0


def _twin_reads(wrong_every: int, source: str | None, n: int = 40) -> list:
    """Validation answers between twins told apart by the front imprint, read wrong every `wrong_every`-th time (0:
    never), from crop source `source`."""
    from pillsnap.eval.answer_calibration import ValAnswer

    out = []
    for i in range(n):
        truth = "K-000001" if i % 2 else "K-000002"
        other = "K-000002" if truth == "K-000001" else "K-000001"
        said = other if wrong_every and i % wrong_every == 0 else truth
        read = ImprintRead(CLASS_MAP[said]["print_front"], 0.9, 0.0, 0.1, True)
        out.append(ValAnswer(_classified(0.5, 0.49, 0.01), read, truth, source))
    return out


def test_each_crop_source_gets_the_evidence_scale_its_own_reads_call_for() -> None:
    """Reads always right on single photos and wrong a third of the time on detector crops: each source's scale is
    fit on its own reads (the overall one between them), a source with too few reads takes the overall one, and
    items of unknown source give no per-source scales. Inference weighs a crop's read by its source's scale, an
    older calibration's by the one; a malformed or negative scale is a ValueError naming it."""
    from pillsnap.eval.answer_calibration import MIN_SOURCE_READS, fit_evidence_scale, fit_evidence_scales
    from pillsnap.infer.thresholds import WEIGHTS, calibrated_evidence

    single, combination = _twin_reads(0, "single"), _twin_reads(3, "combination")
    overall, by_source = fit_evidence_scales(single + combination, CLASS_MAP)
    assert overall == fit_evidence_scale(single + combination, CLASS_MAP)
    assert by_source == {"single": fit_evidence_scale(single, CLASS_MAP),
                         "combination": fit_evidence_scale(combination, CLASS_MAP)}
    assert by_source["combination"] <= overall < by_source["single"]
    # too few reads of a source: the overall scale, not the one its own few reads would give
    doubted, few = _twin_reads(3, "single"), _twin_reads(0, "combination", MIN_SOURCE_READS - 1)
    own, pooled = fit_evidence_scale(few, CLASS_MAP), fit_evidence_scale(doubted + few, CLASS_MAP)
    assert own != pooled and fit_evidence_scales(doubted + few, CLASS_MAP)[1]["combination"] == pooled
    assert fit_evidence_scales(_twin_reads(0, None), CLASS_MAP)[1] is None
    stored = {"evidence_scale": 1.0, "evidence_scale_by_source": {"single": 2.0, "combination": 0.5}}
    assert calibrated_evidence(stored, "single")[0].imprint == pytest.approx(WEIGHTS.imprint * 2.0)
    assert calibrated_evidence(stored, "combination")[0].imprint == pytest.approx(WEIGHTS.imprint * 0.5)
    assert calibrated_evidence(stored)[0].imprint == pytest.approx(WEIGHTS.imprint)
    assert calibrated_evidence({"evidence_scale": 0.5}, "single")[0].imprint == pytest.approx(WEIGHTS.imprint * 0.5)
    assert calibrated_evidence({"evidence_scale": 0.5, "evidence_scale_by_source": {"single": None}},
                               "single")[0].imprint == pytest.approx(WEIGHTS.imprint * 0.5)
    for broken, said in (({"single": "big"}, "evidence_scale_by_source.single must be a number"),
                         ({"single": -10.0}, "must not be negative"), ([2.0, 0.5], "must map crop sources")):
        with pytest.raises(ValueError, match=said):
            calibrated_evidence({"evidence_scale_by_source": broken}, "single")


def test_calibration_answers_each_crop_with_its_source_evidence_scale(monkeypatch) -> None:
    """The answers calibration fits the sets on are made as inference makes them: each crop's read weighed by its
    source's evidence scale."""
    import pillsnap.eval.answer_calibration as calibration
    import pillsnap.infer.answer
    from pillsnap.infer.thresholds import WEIGHTS

    items = _twin_reads(0, "single") + _twin_reads(3, "combination")
    monkeypatch.setattr(calibration, "val_answers", lambda *args, **kwargs: items)
    weighed: list[float] = []
    decide = pillsnap.infer.answer.decide_answer
    monkeypatch.setattr(pillsnap.infer.answer, "decide_answer",
                        lambda *args, **kwargs: (weighed.append(kwargs["weights"].imprint), decide(*args, **kwargs))[1])
    out = calibration.answer_calibration(_SaysDrugA(), list(range(len(items))), 1.0, ["K-000001", "K-000002"],
                                         CLASS_MAP, topk=2, limit=len(items), read_imprints=False,
                                         sources=np.array([item.source for item in items]))
    scales = out["evidence_scale_by_source"]
    assert scales["single"] != scales["combination"]
    assert weighed[:len(items)] == [pytest.approx(WEIGHTS.imprint * scales[item.source]) for item in items]
    # each scored answer keeps its source, so that inference can give each source its own set threshold
    sets = out["prediction_sets"]
    assert sets["sources"] == [item.source for item in items] and len(sets["scores"]["lac"]) == len(items)
    # a withheld answer is not scored, and its source is left out with it: the two lists stay aligned
    from pillsnap.infer.unknown import UnknownAnswer

    unsure = [item._replace(classified=item.classified._replace(unknown_score=0.9), read=None) if i % 4 == 0
              else item for i, item in enumerate(items)]  # unread: a read of the top drug would overrule the rule
    monkeypatch.setattr(calibration, "val_answers", lambda *args, **kwargs: unsure)
    withheld = calibration.answer_calibration(
        _SaysDrugA(), list(range(len(items))), 1.0, ["K-000001", "K-000002"], CLASS_MAP, topk=2, limit=len(items),
        read_imprints=False, unknown=UnknownAnswer("probability", 0.5),
        sources=np.array([item.source for item in items]))["prediction_sets"]
    kept = [item.source for i, item in enumerate(items) if i % 4]
    assert withheld["withheld_unknown"] == len(items) - len(kept) > 0
    assert withheld["sources"] == kept and len(withheld["scores"]["lac"]) == len(kept)


def test_the_evidence_scale_weighs_the_candidates_likelihoods_too() -> None:
    """Reads too garbled to match either twin's imprint ("Q"), whose likelihoods always favour the right twin by
    2 nats: the fit trusts them fully; without the likelihoods the reads say nothing, every scale fits alike and
    the smallest is kept."""
    from pillsnap.eval.answer_calibration import EVIDENCE_SCALES, ValAnswer, fit_evidence_scale

    def items(likelihoods: bool) -> list[ValAnswer]:
        out = []
        for i in range(30):
            truth = "K-000001" if i % 2 else "K-000002"
            other = "K-000002" if truth == "K-000001" else "K-000001"
            values = {CLASS_MAP[truth]["print_front"]: -3.0, CLASS_MAP[other]["print_front"]: -5.0, "5": -9.0}
            read = ImprintRead("Q", 0.9, 0.0, 0.1, True, likelihoods=values if likelihoods else None)
            out.append(ValAnswer(_classified(0.5, 0.49, 0.01), read, truth))
        return out

    assert fit_evidence_scale(items(True), CLASS_MAP) == EVIDENCE_SCALES[-1]
    assert fit_evidence_scale(items(False), CLASS_MAP) == EVIDENCE_SCALES[0]


def test_the_evidence_scale_is_fit_on_the_candidates_the_answer_weighs() -> None:
    """A drug below the top-k that a sure read brings back is among the candidates the fit scores (as the answer
    weighs it): read right every time, the fit trusts the read fully; kept out of the reserve, the right drug sits
    in the mass the candidates leave, which no scale changes, and the smallest scale is kept."""
    from pillsnap.eval.answer_calibration import EVIDENCE_SCALES, ValAnswer, fit_evidence_scale

    reserve = ({"mapping_code": "K-000003", "name": "Other", "edi_codes": [], "probability": 0.01},)
    items = [ValAnswer(_classified(0.6, 0.39)._replace(reserve=reserve), ImprintRead("QQ", 0.95, 0.0, 0.1, True),
                       "K-000003") for _ in range(10)]
    assert fit_evidence_scale(items, CLASS_MAP) == EVIDENCE_SCALES[-1]
    bare = [item._replace(classified=item.classified._replace(reserve=())) for item in items]
    assert fit_evidence_scale(bare, CLASS_MAP) == EVIDENCE_SCALES[0]


def test_each_crop_source_answers_under_its_own_unknown_threshold() -> None:
    """A detector's crop of a combination photo lies farther from the class means than a single-pill crop: the
    same distance is unknown on a single-pill photo and named on a combination photo when the calibration fit a
    threshold per source; without per-source thresholds both use the one."""
    from pillsnap.infer.unknown import UnknownAnswer

    unknown = UnknownAnswer("probability", 0.5, None, {"single": 0.2, "combination": 0.6})
    classified = _classified(0.6, 0.3, 0.1, score=0.4)
    single = decide_answer(classified, CLASS_MAP, None, None, unknown.for_answer(3, "single"))
    combo = decide_answer(classified, CLASS_MAP, None, None, unknown.for_answer(3, "combination"))
    assert single.unknown and not combo.unknown
    assert unknown.for_answer(3).threshold == 0.5  # no source: the threshold over all crops
    assert UnknownAnswer("probability", 0.5).for_answer(3, "single").threshold == 0.5


class _OrderedCrops:
    """A validation data set listed as the manifest lists one: every crop of drug A, then every crop of drug B."""

    def __init__(self, per_class: int) -> None:
        self.labels = np.repeat([0, 1], per_class)

    def __len__(self) -> int:
        return len(self.labels)

    def load_crop(self, index: int):
        from PIL import Image

        return Image.new("RGB", (8, 8), (200, 200, 200))

    def transform(self, crop):
        import torch

        return torch.zeros(3, 8, 8)


class _SaysDrugA:
    """A classifier that names drug A for every crop, at 0.99."""

    def __init__(self) -> None:
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def __call__(self, x):
        import torch

        logits = torch.tensor([[math.log(0.99), math.log(0.01)]]).repeat(len(x), 1)
        return logits, torch.zeros(len(x), 4)


def test_sets_are_calibrated_on_crops_drawn_from_the_whole_validation_set() -> None:
    """Calibration answers a bounded number of validation crops. Drawn from the head of a data set in the
    manifest's order they would all be drug A's, which this classifier names right: every score would be low,
    and the sets would claim a coverage they do not have on drug B."""
    from pillsnap.eval.answer_calibration import answer_calibration, spread_sample

    crops = _OrderedCrops(per_class=50)
    out = answer_calibration(_SaysDrugA(), crops, 1.0, ["K-000001", "K-000002"], {}, topk=2, limit=20,
                             read_imprints=False, seed=3)
    scores = out["prediction_sets"]["scores"]["lac"]
    assert out["prediction_sets"]["n"] == len(scores) == 20
    assert out["prediction_sets"]["sources"] is None  # the crops' sources were not given
    wrong = sum(score > 0.5 for score in scores)  # drug B's crops: the right drug holds 0.01
    assert 5 <= wrong <= 15, scores  # about half, as in the whole set (a hypergeometric draw)
    again = answer_calibration(_SaysDrugA(), crops, 1.0, ["K-000001", "K-000002"], {}, topk=2, limit=20,
                               read_imprints=False, seed=3)
    assert again["prediction_sets"]["scores"] == out["prediction_sets"]["scores"]  # the seed fixes the draw
    chosen = spread_sample(100, 20, seed=3)
    assert len(set(chosen.tolist())) == 20 and list(chosen) == sorted(chosen) and chosen.max() < 100
    assert list(spread_sample(7, 20, seed=3)) == list(range(7))  # fewer than the limit: every crop, in order


def test_each_crop_source_gets_enough_of_the_draw_for_its_own_threshold() -> None:
    """At Stage 4 the combination pills are ~9 % of the validation crops: a plain draw of 500 names about 45 of
    them, fewer than the 50 their own set threshold needs. Drawn by source, each gets at least SOURCE_FLOOR (all of
    it when it has fewer), at random within it, and the rest goes by share."""
    from pillsnap.eval.answer_calibration import SOURCE_FLOOR, spread_sample

    sources = np.where(np.random.default_rng(0).random(85_000) < 0.09, "combination", "single")
    plain = [int((sources[spread_sample(len(sources), 500, seed)] == "combination").sum()) for seed in range(20)]
    assert np.median(plain) < 50
    for seed in range(5):
        chosen = spread_sample(len(sources), 500, seed, sources)
        assert len(np.unique(chosen)) == 500 and list(chosen) == sorted(chosen)
        assert (sources[chosen] == "combination").sum() >= SOURCE_FLOOR
    few = np.array(["combination"] * 40 + ["single"] * 2000)
    chosen = spread_sample(len(few), 500, 0, few)
    assert len(chosen) == 500 and (few[chosen] == "combination").sum() == 40  # all of a small source
    assert set(spread_sample(len(few), 500, 1, few)) != set(chosen)  # the singles drawn at random


def test_an_undecodable_validation_crop_is_skipped_not_fatal(caplog) -> None:
    from pillsnap.eval.answer_calibration import answer_calibration

    class WithABrokenPhoto(_OrderedCrops):
        def load_crop(self, index: int):
            if index == 3:
                raise OSError("image file is truncated")
            return super().load_crop(index)

    out = answer_calibration(_SaysDrugA(), WithABrokenPhoto(per_class=5), 1.0, ["K-000001", "K-000002"], {},
                             topk=2, limit=20, read_imprints=False, seed=0)
    assert out["prediction_sets"]["n"] == 9  # 10 crops, one left out
    assert "undecodable validation crop" in caplog.text and "truncated" in caplog.text


def test_answers_in_batches_with_reads_side_by_side_are_the_answers_one_crop_at_a_time(monkeypatch) -> None:
    """At Stage 4 the 3,000 calibration answers went one crop a forward pass, each read waiting for the one before:
    half an hour on one read's threads. Batched, with the reads side by side, each crop keeps its own output, its
    own source's temperature, its own read, and the order of the draw (a broken photo left out)."""
    import threading

    import torch

    import pillsnap.eval.answer_calibration as calibration
    from pillsnap.infer.artefacts import Temperatures
    from pillsnap.infer.evidence import Evidence
    from pillsnap.infer.unknown import UnknownAnswer

    class Shades(_OrderedCrops):
        def load_crop(self, index: int):
            from PIL import Image

            if index == 5:
                raise OSError("image file is truncated")
            return Image.new("RGB", (8, 8), (index * 3, 0, 0))

        def transform(self, crop):
            return torch.full((3, 8, 8), crop.getpixel((0, 0))[0] / 255.0)

    class ByShade(_SaysDrugA):
        def __call__(self, x):
            shade = x.mean(dim=(1, 2, 3))
            return torch.stack([shade * 4, 1 - shade * 4], dim=1), x.flatten(1)[:, :4]

    threads: set[str] = set()

    def read(self, crop, topk):  # a read that names its crop, and where it ran
        threads.add(threading.current_thread().name)
        return f"shade {crop.getpixel((0, 0))[0]} of {topk[0]['mapping_code']}"

    monkeypatch.setattr(Evidence, "read", read)
    data, names = Shades(per_class=20), ["K-000001", "K-000002"]
    sources = np.array(["single", "combination"] * 20)
    temperatures = Temperatures(1.0, {"single": 0.5, "combination": 2.0})
    indices = np.array([30, 2, 5, 17, 9, 33, 0])

    def answers(batch: int, parallel: int):
        monkeypatch.setattr(calibration, "ANSWER_BATCH", batch)
        out = calibration.val_answers(ByShade(), data, temperatures, names, {}, 2, 1, indices, True,
                                      UnknownAnswer("probability", None), sources, parallel=parallel)
        return [([(c["mapping_code"], round(c["probability"], 6)) for c in a.classified.topk], a.read, a.truth,
                 a.source) for a in out]

    alone = answers(1, 1)
    assert [a[1] for a in alone] == [f"shade {i * 3} of {a[0][0][0]}" for i, a in zip([30, 2, 17, 9, 33, 0], alone,
                                                                                       strict=True)]
    assert not any(name.startswith("pillsnap-read") for name in threads)
    threads.clear()
    assert answers(4, 2) == alone
    assert any(name.startswith("pillsnap-read") for name in threads)  # read side by side


def test_the_draw_grows_with_the_split_and_the_report_says_how_far_its_coverage_may_fall() -> None:
    """500 answers at any stage: at Stage 4 about 150 detector crops set their own threshold, whose coverage fell
    below 93 % in one calibration of eleven. The draw now grows with the split, each source's floor with it, and the
    summary gives the coverage the threshold keeps in 19 calibrations of 20 (Beta(k, n + 1 - k))."""
    from scipy.stats import beta

    from pillsnap.eval.answer_calibration import answer_crops, set_summary, spread_sample
    from pillsnap.metrics.conformal import coverage_low

    assert [answer_crops(n) for n in (300, 5_000, 25_000, 75_000, 500_000)] == [500, 500, 1000, 3000, 3000]
    sources = np.array(["single"] * 68_250 + ["combination"] * 6_750)  # Stage 4's 9 % combination crops
    drawn = sources[spread_sample(len(sources), answer_crops(len(sources)), 0, sources)]
    assert 750 <= (drawn == "combination").sum() < 1000 and len(drawn) == 3000  # 150 in a draw of 500
    rank = math.ceil(151 * 0.95)
    assert coverage_low(150, 0.95) == pytest.approx(beta.ppf(0.05, rank, 151 - rank))
    assert coverage_low(150, 0.95) < 0.93 < coverage_low(2000, 0.95) < 0.95  # the spread shrinks with the draw
    assert coverage_low(10, 0.95) is None  # too few for a threshold at all
    rng = np.random.default_rng(0)
    sets = {"scores": {"lac": list(rng.uniform(0, 1, 400))}, "n": 400, "withheld_unknown": 0, "imprint_reading": True,
            "sources": ["single"] * 300 + ["combination"] * 100}
    summary = set_summary(sets, "lac", 0.95)
    assert summary["coverage_5th_percentile"] == coverage_low(400, 0.95)
    assert summary["coverage_5th_percentile_by_source"] == {"combination": coverage_low(100, 0.95),
                                                            "single": coverage_low(300, 0.95)}
