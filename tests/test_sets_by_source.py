"""Prediction sets with a threshold per crop source (single-pill photos, pills cut from combination photos): each
source keeps the coverage on its own answers where one threshold over both would under-cover the harder one; a
source with too few calibration answers takes the threshold over all of them; the predictor answers each pill with
its own source's threshold."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_infer_pipeline import _calibration, _cfg, make_exp_dir, pill_photo

from pillsnap.eval.answer_calibration import own_thresholds_text, set_summary
from pillsnap.eval.pipeline_eval import set_figures, with_sets
from pillsnap.infer.answer import SetRule
from pillsnap.infer.artefacts import (
    MIN_SOURCE_SET_ANSWERS,
    configured_set_rule,
    configured_unknown_rule,
    load_set_rule,
)
from pillsnap.infer.pipeline import Predictor
from pillsnap.metrics.conformal import conformal_threshold, group_thresholds, nonconformity, set_size
from pillsnap.utils import save_json


def _answers(n: int, alpha: float, seed: int, classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Answers whose probabilities are right by construction, best first: sharp for a small Dirichlet `alpha`,
    spread for a large one. Returns (probabilities [n, classes], the right class's place in each row)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, alpha), size=n)
    labels = np.array([rng.choice(classes, p=row) for row in probs])
    order = np.argsort(-probs, axis=1, kind="stable")
    place = np.argmax(order == labels[:, None], axis=1)
    return np.take_along_axis(probs, order, axis=1), place


def _coverage(probs: np.ndarray, place: np.ndarray, threshold: float) -> float:
    return float(np.mean([k < set_size("lac", row, threshold) for row, k in zip(probs, place, strict=True)]))


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_each_source_keeps_the_coverage_where_one_threshold_under_covers_the_harder(coverage: float) -> None:
    """Easy single photos (sharp answers) and hard detector crops (spread answers), 1,500 calibration answers
    each and 2,000 new ones each: one threshold over both covers the hard source well below the level asked; a
    threshold per source covers each at the level (within three binomial standard errors)."""
    easy, hard = _answers(3500, 0.05, seed=1), _answers(3500, 1.5, seed=2)
    scores = [nonconformity("lac", row, int(k)) for probs, place in (easy, hard)
              for row, k in zip(probs[:1500], place[:1500], strict=True)]
    sources = ["single"] * 1500 + ["combination"] * 1500
    pooled = conformal_threshold(scores, coverage)
    own = group_thresholds(scores, sources, coverage, MIN_SOURCE_SET_ANSWERS)
    assert set(own) == {"single", "combination"} and own["single"] < pooled < own["combination"]
    tolerance = 3 * math.sqrt(coverage * (1 - coverage) / 2000)
    assert _coverage(hard[0][1500:], hard[1][1500:], pooled) < coverage - tolerance  # what one threshold does
    for source, (probs, place) in (("single", easy), ("combination", hard)):
        assert _coverage(probs[1500:], place[1500:], own[source]) >= coverage - tolerance, source


def test_a_source_with_too_few_answers_takes_the_threshold_over_all() -> None:
    scores = [0.01] * 60 + [0.9] * 30 + [0.5] * 5
    sources = ["single"] * 60 + ["combination"] * 30 + [None] * 5
    own = group_thresholds(scores, sources, 0.9, MIN_SOURCE_SET_ANSWERS)
    assert own == {"single": 0.01}  # 30 combination answers are fewer than MIN_SOURCE_SET_ANSWERS
    assert group_thresholds(scores, sources, 0.9, 20) == {"single": 0.01, "combination": 0.9}
    assert group_thresholds(scores[:60], sources[:60], 0.99, 50) == {}  # 60 answers cannot certify 0.99
    with pytest.raises(ValueError, match="95 scores but 3 groups"):
        group_thresholds(scores, sources[:3], 0.9, 50)


def _stored(single: float, combination: float, n_single: int = 60, n_combination: int = 60) -> dict:
    n = n_single + n_combination
    return {"prediction_sets": {"scores": {"lac": [single] * n_single + [combination] * n_combination,
                                           "aps": [0.5] * n},
                                "sources": ["single"] * n_single + ["combination"] * n_combination,
                                "n": n, "withheld_unknown": 0, "imprint_reading": False, "imprint_check": False}}


def test_the_stored_sources_give_each_source_its_threshold_at_any_coverage() -> None:
    calibration = _stored(0.05, 0.9)
    rule, problem = load_set_rule(calibration, "lac", 0.95, imprint_reading=False)
    assert problem is None and rule.threshold == 0.9 and dict(rule.by_source) == {"single": 0.05, "combination": 0.9}
    assert rule.for_source("single").threshold == 0.05 and rule.for_source("single").by_source is None
    assert rule.for_source("combination").threshold == 0.9 and rule.for_source(None) is rule
    one, _ = load_set_rule(calibration, "lac", 0.95, False, by_source=False)
    assert one.by_source is None and one.for_source("single").threshold == 0.9
    few, _ = load_set_rule(_stored(0.05, 0.9, n_combination=20), "lac", 0.95, False)
    assert dict(few.by_source) == {"single": 0.05} and few.for_source("combination").threshold == 0.9
    older = {"prediction_sets": {k: v for k, v in calibration["prediction_sets"].items() if k != "sources"}}
    assert load_set_rule(older, "lac", 0.95, False)[0].by_source is None  # calibrated before sources were kept
    for broken in ("single", ["single"] * 3, [1] * 120):  # a damaged file: no sets, said why (not a crash)
        bad = {"prediction_sets": {**calibration["prediction_sets"], "sources": broken}}
        rule, problem = load_set_rule(bad, "lac", 0.95, False)
        assert rule is None and "prediction_sets.sources does not name the crop source of each of the 120" in problem
    summary = set_summary(calibration["prediction_sets"], "lac", 0.95)
    assert summary["threshold_by_source"] == {"combination": 0.9, "single": 0.05}
    assert summary["n_by_source"] == {"combination": 60, "single": 60}
    assert "single 0.0500 (60 answers)" in own_thresholds_text(summary)
    assert set_summary(calibration["prediction_sets"], "lac", 0.95, by_source=False)["threshold_by_source"] is None
    few_summary = set_summary(_stored(0.05, 0.9, n_combination=20)["prediction_sets"], "lac", 0.95)
    assert "combination: the one above (20 answers)" in own_thresholds_text(few_summary)


def test_the_predictor_answers_each_pill_with_its_source_threshold(tmp_path: Path) -> None:
    """A single photo's set is drawn at the single photos' own threshold (LAC 0.05: only a candidate at 0.95 or
    more besides the top one), not at the one over all answers (0.9: every candidate at 0.1 or more: all three of
    this untrained classifier's)."""
    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), **_stored(0.05, 0.9)})
    photo = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)])
    plain = ("inference.imprint.enabled=false", "inference.prediction_set.fill_to_coverage=false")
    predictor = Predictor(root, _cfg(root, *plain), device="cpu")
    assert predictor.set_rules["single"].threshold == 0.05 and predictor.set_rules["combination"].threshold == 0.9
    pill = predictor.predict(photo, mode="single")["pills"][0]
    assert len(pill["prediction_set"]) == 1 and pill["sure"] is True
    one = Predictor(root, _cfg(root, *plain, "inference.prediction_set.by_source=false"), device="cpu")
    assert one.set_rules["single"].threshold == 0.9
    assert len(one.predict(photo, mode="single")["pills"][0]["prediction_set"]) == 3
    with pytest.raises(ValueError, match="'inference.prediction_set.by_source' must be bool"):
        _cfg(root, *plain, "inference.prediction_set.by_source=sometimes")


def test_the_evaluation_redraws_and_reports_sets_per_source() -> None:
    topk = [("K-1", 0.7), ("K-2", 0.25), ("K-3", 0.05)]
    pills = [{"code": "K-2", "known": True, "answered": True, "named": True, "right": False, "set": ["K-1"],
              "covered": False, "topk": topk, "source": source} for source in ("single", "combination")]
    rule = SetRule("lac", 0.9, 0.5, by_source={"combination": 0.8})
    figures = set_figures(with_sets([{"pills": pills}], rule))
    # single at 0.5: K-1 alone, K-2 missed; combination at 0.8: K-1 and K-2 (0.25 >= 0.2), covered
    assert figures["coverage"] == 0.5 and figures["mean_set_size"] == 1.5
    assert figures["by_source"]["single"] == {"named": 1, "coverage": 0.0, "mean_set_size": 1.0, "sure_share": 1.0,
                                              "sure_accuracy": 0.0}
    assert figures["by_source"]["combination"]["coverage"] == 1.0
    assert figures["by_source"]["combination"]["mean_set_size"] == 2.0


def test_the_headline_names_the_sources_the_predictor_gave_their_own_threshold() -> None:
    """The test coverage per source, each marked by the rule the predictor applied (not by what calibration would
    have given at its own settings)."""
    from pillsnap.eval.pipeline_report import _set_lines

    figures = {"coverage": 0.99, "mean_set_size": 1.5, "sure_share": 0.6, "sure_accuracy": 1.0}
    auto = {"prediction_sets": {**figures, "named": 100, "coverage_all": 0.98, "known_pills": 102,
                                "withheld_known": 0.02, "unknown_empty": 1.0, "unknown_pills": 3,
                                "by_source": {"single": {**figures, "named": 60}, "combination": {**figures,
                                                                                                  "named": 40}}},
            "sources_with_own_threshold": ["single"]}
    line = _set_lines(auto, {"method": "lac", "coverage": 0.95, "n": 120, "threshold_by_source": {
        "single": 0.1, "combination": 0.2}})[0]
    assert "single photos 0.990 of 60, combination pills 0.990 of 40 (threshold over all answers)" in line
    # no sets on the test photos: the headline says the calibration's own reason, not "recalibrate"
    why = "the candidates (inference.topk) miss the right drug in 8.5% of the 400 calibration answers, ..."
    assert _set_lines({"prediction_sets": {}}, {"method": "lac", "no_threshold": why}) == [
        f"test        prediction sets: none ({why})"]
    assert "pillsnap calibrate" in _set_lines({"prediction_sets": {}}, {})[0]  # no scores at all


def test_sets_answered_otherwise_than_calibrated_are_dropped_and_a_changed_keep_share_is_said(caplog) -> None:
    """The set scores were measured on answers with inference.topk candidates, withheld by the unknown-pill rule in
    force: `--set inference.topk=1` cut every set to one candidate while each still said 95 % coverage."""
    calibration = _stored(0.05, 0.9)
    calibration["prediction_sets"].update(topk=5, unknown_rule="feature_distance")
    settings = OmegaConf.create({"method": "lac", "coverage": 0.95})
    with caplog.at_level(logging.WARNING):
        assert configured_set_rule(calibration, settings, False, False, 5, "feature_distance") is not None
        assert not caplog.records
        assert configured_set_rule(calibration, settings, False, False, 1, "feature_distance") is None
        assert configured_set_rule(calibration, settings, False, False, 5, None) is None
    said = [r.getMessage() for r in caplog.records]
    assert "calibrated with inference.topk 5 and it is now 1" in said[0]
    assert "calibrated with the unknown-pill rule in force feature_distance and it is now off" in said[1]
    older = {"prediction_sets": {k: v for k, v in calibration["prediction_sets"].items()
                                 if k not in ("topk", "unknown_rule")}}
    assert configured_set_rule(older, settings, False, False, 1, None) is not None  # not recorded: not checked
    caplog.clear()
    inference = OmegaConf.create({"unknown_rule": "probability", "unknown_keep_correct": 0.99})
    stored = {"unknown_keep_correct": 0.95, "unknown_thresholds": {"probability": 0.4}}
    with caplog.at_level(logging.WARNING):
        assert configured_unknown_rule(stored, Path("."), inference).threshold == 0.4
        configured_unknown_rule(stored, Path("."), OmegaConf.merge(inference, {"unknown_keep_correct": 0.95}))
    [warned] = [r.getMessage() for r in caplog.records]
    assert "calibrated to keep 0.95 of the right answers and inference.unknown_keep_correct is now 0.99" in warned


def test_version_names_the_sources_whose_pills_carry_no_set() -> None:
    """Where a source's candidates miss the right drug too often for the coverage (or only its own threshold
    would do and it has none) its pills carry no set: GET /version says which, besides the sources with their own."""
    from pillsnap.infer.answer import SetRule
    from pillsnap.serve.service import _set_rule

    rule = SetRule("lac", 0.95, float("inf"), by_source={"single": 0.05}, refused={"combination": "misses"})
    shown = _set_rule(rule)
    assert shown["sources_with_own_threshold"] == ["single"] and shown["sources_without_set"] == ["combination"]
    assert _set_rule(SetRule("lac", 0.95, 0.2))["sources_without_set"] == []
