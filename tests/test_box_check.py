"""The box check: a detector box the detector is less sure of than of nearly every labelled validation pill may
hold no pill. The conformal bound's guarantee, the answer it gives, how the evaluation and the hard-case log count
it, its calibration and how a predictor loads it."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_infer_answer import CLASS_MAP, OFF, TWINS, classified, read
from test_infer_pipeline import _calibration, _cfg, make_exp_dir, pill_photo

from pillsnap.eval.box_calibration import box_confidences, box_line, box_summary
from pillsnap.eval.pipeline_eval import _photo_outcome, set_figures, with_sets
from pillsnap.infer.answer import SetRule, UnknownRule, decide_answer
from pillsnap.infer.box_check import BoxCheck, check_box_settings, describe, load_box_check
from pillsnap.infer.cli import answer_text
from pillsnap.infer.gating import decide_route, hard_case_reasons
from pillsnap.infer.pipeline import Predictor
from pillsnap.metrics.conformal import lower_bound
from pillsnap.utils import save_json
from pillsnap.utils.io import file_sha256


@pytest.mark.parametrize("miss_rate", [0.02, 0.05, 0.2])
def test_the_bound_doubts_a_real_pill_at_most_the_miss_rate_of_the_time(miss_rate):
    """Calibration and new confidences drawn alike (a skewed law, like a detector's): over many draws, the share of
    new pills below the bound stays within the miss rate (the guarantee is on average over calibration draws)."""
    rng = np.random.default_rng(0)
    below = []
    for _ in range(400):
        calibration, new = rng.beta(8, 2, 150), rng.beta(8, 2, 200)
        below.append(np.mean(new < lower_bound(calibration, miss_rate)))
    assert np.mean(below) <= miss_rate + 0.005
    assert np.mean(below) >= miss_rate / 2  # and it is not a bound so low that it never doubts anything


def test_the_bound_is_the_rank_the_miss_rate_allows_and_none_when_too_few():
    scores = np.arange(1, 100) / 100  # 99 scores: 0.01 ... 0.99
    assert lower_bound(scores, 0.02) == pytest.approx(0.02)  # floor(100 * 0.02) = the 2nd smallest
    assert lower_bound(scores[:40], 0.02) == -math.inf  # floor(41 * 0.02) = 0: too few to doubt any box
    with pytest.raises(ValueError, match="between 0 and 1"):
        lower_bound(scores, 0.0)


PILLS = tuple(np.round(np.linspace(0.5, 0.99, 99), 4))  # the detector's confidences in 99 validation pills


def test_the_bound_is_drawn_from_the_pills_the_detection_threshold_keeps():
    check = BoxCheck(PILLS, 0.02)
    bound, pills = check.bound(0.3)
    assert (bound, pills) == (PILLS[1], 99)
    higher, kept = check.bound(0.75)  # fewer pills pass a higher threshold: the bound is drawn from those
    assert kept == sum(c >= 0.75 for c in PILLS) and higher > bound
    assert check.doubt(0.502, 0.3).startswith("the detector is less sure of this box (confidence 0.502) than it was "
                                              "of 98 of the 99 pills")  # the bound is the 2nd lowest
    assert "of every one of the 99 pills" in check.doubt(0.4, 0.3) and "at most 2.0% of real pills" in check.doubt(
        0.4, 0.3)
    assert check.doubt(0.9, 0.3) is None and check.doubt(None, 0.3) is None  # None: a whole-photo answer
    assert BoxCheck(PILLS[:20], 0.02).doubt(0.01, 0.0) is None  # too few pills: nothing is doubted
    # a detection threshold below the calibration's floor: the bound stays the floor's (nothing below was counted)
    floored = BoxCheck(PILLS, 0.02, conf_floor=0.6)
    assert floored.bound(0.0) == floored.bound(0.6) and floored.doubt(0.55, 0.0) is not None


def test_settings_are_checked_and_a_stale_or_missing_calibration_is_named():
    assert check_box_settings({}) == (True, 0.02)
    assert check_box_settings({"enabled": False, "miss_rate": 0.1}) == (False, 0.1)
    for bad in ({"miss_rate": 0}, {"miss_rate": 1.5}, {"miss_rate": "often"}, {"enabled": "maybe"}):
        with pytest.raises(ValueError, match="inference.box_check"):
            check_box_settings(bad)
    stored = {"box_check": {"detector_sha256": "abc", "pill_confidences": [0.9, 0.6, 0.7]}}
    check, problem = load_box_check(stored, "abc", 0.05)
    assert problem is None and check.pill_confidences == (0.6, 0.7, 0.9)  # kept sorted
    assert "other detector weights" in load_box_check(stored, "other", 0.05)[1]
    assert "recalibrate" in load_box_check({"temperature": 1.0}, "abc", 0.05)[1]


DOUBT = "the detector is less sure of this box (confidence 0.350) than it was of every one of the 66 pills"


def test_a_doubted_box_names_no_drug_unless_its_imprint_proves_it_a_pill():
    rule = SetRule("lac", 0.95, 0.5)
    answer = decide_answer(TWINS, CLASS_MAP, None, None, OFF, set_rule=rule, box_doubt=DOUBT).to_dict()
    assert answer["unknown"] is True and answer["unknown_by"] == "box" and answer["unknown_reason"] == DOUBT
    assert answer["mapping_code"] is None and answer["probability"] is None and answer["prediction_set"] == []
    assert answer["topk"][0]["mapping_code"] == "K-000002"  # the nearest drugs are still given
    assert answer_text(answer).startswith("maybe no pill (nearest known: K-000002")
    # an imprint read as the top candidate's is a pill's imprint: the box holds a pill, and it is named
    proven = decide_answer(TWINS, CLASS_MAP, read("DGTH", 0.95), None, OFF, set_rule=rule, box_doubt=DOUBT)
    assert proven.unknown is False and proven.candidates[0]["mapping_code"] == "K-000002"
    # the box check comes before the unknown-pill rule: what is doubted is the pill, not the drug
    looks_unknown, rule_on = classified(("K-000002", 0.55), ("K-000001", 0.40), score=0.9), UnknownRule(
        "probability", 0.1, 3)
    assert decide_answer(looks_unknown, CLASS_MAP, None, None, rule_on, box_doubt=DOUBT).unknown_by == "box"
    assert decide_answer(looks_unknown, CLASS_MAP, None, None, rule_on).unknown_by == "look"


def _result(pills: list[dict]) -> dict:
    return {"mode_used": "combo", "fallback_reason": "multi_object_hint", "pills": pills}


def _pill(code: str | None, bbox: list[int], unknown_by: str | None = None) -> dict:
    return {"mapping_code": code, "bbox": bbox, "unknown": code is None, "unknown_by": unknown_by, "topk": [],
            "prediction_set": None}


def test_the_evaluation_leaves_out_a_doubted_box_that_holds_no_labelled_pill():
    photo = {"image_path": "p.png", "image_type": "combination", "codes": ["K-1", "K-2"],
             "boxes": np.array([[0, 0, 10, 10], [50, 50, 10, 10]], float), "incomplete_gt": False}
    rim = _pill(None, [100, 100, 20, 5], "box")
    outcome = _photo_outcome(photo, _result([_pill("K-1", [0, 0, 10, 10]), _pill("K-2", [50, 50, 10, 10]), rim]),
                             None)
    assert outcome["all_right"] is True and outcome["doubted_boxes"] == {"pill": 0, "no_pill": 1}
    # named as a drug, the same box is a wrong extra pill; doubted on a labelled pill, that pill was not named
    named_rim = _photo_outcome(photo, _result([_pill("K-1", [0, 0, 10, 10]), _pill("K-2", [50, 50, 10, 10]),
                                               _pill("K-3", [100, 100, 20, 5])]), None)
    assert named_rim["all_right"] is False
    on_a_pill = _photo_outcome(photo, _result([_pill("K-1", [0, 0, 10, 10]), _pill(None, [50, 50, 10, 10], "box")]),
                               None)
    assert on_a_pill["all_right"] is False and on_a_pill["doubted_boxes"] == {"pill": 1, "no_pill": 0}
    assert on_a_pill["pills"][1]["answered"] and not on_a_pill["pills"][1]["right"]
    # a drug the classifier never learnt is right only as "unknown pill", never as "maybe no pill"
    held_out = _photo_outcome(photo, _result([_pill("K-1", [0, 0, 10, 10]), _pill(None, [50, 50, 10, 10], "box")]),
                              {"K-1"})
    assert held_out["all_right"] is False and not held_out["pills"][1]["right"]
    said_unknown = _photo_outcome(photo, _result([_pill("K-1", [0, 0, 10, 10]),
                                                  _pill(None, [50, 50, 10, 10], "look")]), {"K-1"})
    assert said_unknown["all_right"] is True and said_unknown["pills"][1]["right"]


def test_a_doubted_box_is_its_own_hard_case():
    decision = decide_route("combo", None, 2, threshold=0.5)
    pills = [_pill("K-1", [0, 0, 1, 1]), _pill(None, [0, 0, 1, 1], "box")]
    assert hard_case_reasons(decision, pills) == ["maybe_no_pill"]  # not "a pill unlike every known drug"
    assert hard_case_reasons(decision, [*pills, _pill(None, [0, 0, 1, 1], "look")]) == ["maybe_no_pill",
                                                                                       "unknown_pill"]


def test_calibration_keeps_the_confidences_of_the_boxes_on_labelled_pills(tmp_path: Path):
    image = tmp_path / "combo.png"
    Image.new("RGB", (100, 100)).save(image)
    photos = [{"image_path": str(image), "image_type": "combination", "codes": ["K-1", "K-2"],
               "boxes": np.array([[0, 0, 20, 20], [50, 50, 20, 20]], float), "incomplete_gt": False},
              {"image_path": str(image), "image_type": "single", "codes": ["K-1"],
               "boxes": np.array([[0, 0, 20, 20]], float), "incomplete_gt": False},
              {"image_path": str(image), "image_type": "combination", "codes": ["K-1"],
               "boxes": np.array([[0, 0, 20, 20]], float), "incomplete_gt": True}]  # a pill without a label
    # the labelled pill at (50, 50) has two boxes: the one inference would keep (0.7) and a fainter one that
    # overlaps it a little more (0.05); matched most confident first, the 0.7 is the pill's and the 0.05 another
    found = np.array([[1, 1, 20, 20, 0.9], [53, 50, 20, 20, 0.7], [50, 50, 20, 21, 0.05], [80, 0, 15, 5, 0.2]],
                     float)
    calls = []

    def detect(img, floor):
        calls.append(floor)
        return found

    stored = box_confidences(detect, photos)
    assert calls == [0.01] and stored["photos"] == 1  # single photos and incompletely labelled ones are skipped
    assert stored["pill_confidences"] == [0.7, 0.9] and stored["other_confidences"] == [0.05, 0.2]
    summary = box_summary({**stored, "detector_sha256": "abc"},
                          _cfg(tmp_path, "inference.box_check.miss_rate=0.4").inference)
    assert summary["bound"] == 0.7 and summary["pills"] == 2 and summary["other_boxes"] == 0  # 0.2 < threshold 0.3
    assert "below detector confidence 0.700" in box_line(summary)
    assert describe(BoxCheck((0.7, 0.9), 0.02), 0.3)["bound"] is None  # too few pills: JSON gets null, not -inf
    assert "too few" in box_line({**summary, "bound": None})


def test_a_predictor_doubts_a_box_under_the_bound_calibrated_for_its_detector(tmp_path: Path, monkeypatch, caplog):
    root = make_exp_dir(tmp_path / "exp")
    ckpts = root / "checkpoints"
    box_check = {"detector_sha256": file_sha256(ckpts / "detection_best.pt"), "pill_confidences": list(PILLS)}
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "box_check": box_check})
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    boxes = np.array([[10, 10, 30, 24, 0.9], [70, 100, 30, 24, 0.4], [40, 60, 30, 24, 0.55]], dtype=float)

    def answers(*overrides: str, conf_threshold: float | None = None) -> dict:
        predictor = Predictor(root, _cfg(root, *overrides), device="cpu")
        monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: boxes)
        return predictor.predict(photo, mode="combo", conf_threshold=conf_threshold)

    def doubted(result: dict) -> list[bool]:
        return [p["unknown_by"] == "box" for p in result["pills"]]

    result = answers()
    from pillsnap.serve.service import describe_models

    served = describe_models(Predictor(root, _cfg(root), device="cpu"))  # what /version says of the check
    assert served["box_check"] == {"active": True, "miss_rate": 0.02, "bound": PILLS[1], "pills": 99}
    assert doubted(result) == [False, True, False]  # the bound: 0.505 (2nd lowest of 99 pills from 0.50 to 0.99)
    assert "(confidence 0.400)" in result["pills"][1]["unknown_reason"] and result["hard_case"] == ["maybe_no_pill"]
    assert result["pills"][1]["mapping_code"] is None and result["pills"][1]["topk"]
    assert doubted(answers("inference.box_check.enabled=false")) == [False, False, False]
    assert doubted(answers("inference.box_check.miss_rate=0.5")) == [False, True, True]  # the bound: the median
    # a higher detection threshold in the request: the bound is drawn from the pills that threshold keeps
    assert doubted(answers(conf_threshold=0.75)) == [False, True, True]
    with pytest.raises(ValueError, match="miss_rate"):
        Predictor(root, _cfg(root, "inference.box_check.miss_rate=2"), device="cpu")
    # measured for other detector weights: no box is doubted, and the log says why and what to do
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "box_check": {**box_check, "detector_sha256": "x"}})
    with caplog.at_level(logging.WARNING, logger="pillsnap"):
        assert answers()["pills"][1]["unknown"] is False
    assert "other detector weights" in caplog.text and "pillsnap calibrate" in caplog.text


def test_a_detector_that_cannot_be_run_leaves_the_box_check_off_and_the_rest_calibrated(tmp_path: Path, caplog):
    import pandas as pd

    from pillsnap.eval.box_calibration import calibrate_boxes

    root = make_exp_dir(tmp_path / "exp")
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    manifest = pd.DataFrame({"image_path": [str(photo)] * 2, "image_type": ["combination"] * 2, "split": ["val"] * 2,
                             "mapping_code": ["K-000001", "K-000002"], "bbox_x": [10, 70], "bbox_y": [10, 100],
                             "bbox_w": [30, 30], "bbox_h": [24, 24]})
    cfg = _cfg(root)
    stored = calibrate_boxes(cfg, root, manifest, "cpu")  # an untrained detector: it runs, whatever it finds
    detector = root / "checkpoints" / "detection_best.pt"
    assert stored["photos"] == 1 and stored["detector_sha256"] == file_sha256(detector)
    assert calibrate_boxes(cfg, root, manifest[manifest["split"] == "test"], "cpu") is None  # no validation photos
    detector.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="pillsnap"):
        assert calibrate_boxes(cfg, root, manifest, "cpu") is None
    assert "box check is not calibrated" in caplog.text and "detection_best.pt" in caplog.text


def test_the_validation_photos_are_a_bounded_draw_of_fully_labelled_combinations():
    import pandas as pd

    from pillsnap.eval.box_calibration import validation_combinations

    rows = []
    for i in range(30):  # 30 validation combinations of 2 pills; photo 0 has a pill without a usable label
        rows += [{"image_path": f"c{i}.png", "image_type": "combination", "split": "val", "mapping_code": f"K-{j}",
                  "bbox_x": 0, "bbox_y": 0, "bbox_w": 5, "bbox_h": 5, "incomplete_gt": i == 0 and j == 1}
                 for j in range(2)]
    rows += [{"image_path": "s.png", "image_type": "single", "split": "val", "mapping_code": "K-0", "bbox_x": 0,
              "bbox_y": 0, "bbox_w": 5, "bbox_h": 5, "incomplete_gt": False},
             {"image_path": "t.png", "image_type": "combination", "split": "test", "mapping_code": "K-0",
              "bbox_x": 0, "bbox_y": 0, "bbox_w": 5, "bbox_h": 5, "incomplete_gt": False}]
    manifest = pd.DataFrame(rows)
    every = validation_combinations(manifest, 100)
    assert sorted(p["image_path"] for p in every) == sorted(f"c{i}.png" for i in range(1, 30))
    assert all(len(p["codes"]) == 2 for p in every)
    drawn = validation_combinations(manifest, 10, seed=3)
    again = validation_combinations(manifest, 10, seed=3)
    assert len(drawn) == 10 and [p["image_path"] for p in drawn] == [p["image_path"] for p in again]
    assert validation_combinations(manifest[manifest["split"] == "test"], 10) == []


def test_a_detector_newer_than_the_calibration_gets_its_box_check_and_the_rest_is_kept(tmp_path: Path, monkeypatch):
    import json

    import pandas as pd

    from pillsnap.demo import ensure_calibrated
    from pillsnap.eval.box_calibration import refresh_box_check

    root = make_exp_dir(tmp_path / "exp")
    ckpts = root / "checkpoints"
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    manifest = pd.DataFrame({"image_path": [str(photo)] * 2, "image_type": ["combination"] * 2, "split": ["val"] * 2,
                             "mapping_code": ["K-000001", "K-000002"], "bbox_x": [10, 70], "bbox_y": [10, 100],
                             "bbox_w": [30, 30], "bbox_h": [24, 24]})
    cfg = _cfg(root)
    assert refresh_box_check(cfg, root, manifest, "cpu") is False  # no calibration to add it to
    calibration = {**_calibration(ckpts), "box_check": {"detector_sha256": "an older detector"}}
    save_json(ckpts / "calibration.json", calibration)
    monkeypatch.setattr("pillsnap.eval.calibration.load_manifest_if_any", lambda cfg: manifest)
    ensure_calibrated(cfg)  # the demo's re-run: the classifier's calibration stands, the box check is redone
    stored = json.loads((ckpts / "calibration.json").read_text(encoding="utf-8"))
    assert stored["box_check"]["detector_sha256"] == file_sha256(ckpts / "detection_best.pt")
    assert {k: v for k, v in stored.items() if k != "box_check"} == {k: v for k, v in calibration.items()
                                                                    if k != "box_check"}
    before = (ckpts / "calibration.json").stat().st_mtime_ns
    ensure_calibrated(cfg)  # measured for this very detector: nothing to do
    assert (ckpts / "calibration.json").stat().st_mtime_ns == before


def test_auto_counts_distinct_pills_and_never_folds_faint_ones_into_one_answer(tmp_path: Path, monkeypatch):
    root = make_exp_dir(tmp_path / "exp")
    ckpts = root / "checkpoints"
    box_check = {"detector_sha256": file_sha256(ckpts / "detection_best.pt"), "pill_confidences": list(PILLS)}
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "box_check": box_check})
    photo = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)])
    predictor = Predictor(root, _cfg(root), device="cpu")
    predictor.settings.single_confidence_threshold = 0.0
    located = predictor.predict(photo, mode="single")["pills"][0]["bbox"]
    on_pill, faint_on_pill, elsewhere = [*located, 0.9], [located[0] + 2, located[1] + 2, 12, 10, 0.45], \
        [90, 130, 20, 20, 0.4]

    def answer(*boxes: list) -> dict:
        monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: np.array(boxes, float))
        return predictor.predict(photo, mode="auto")

    # one sure box on the pill and a faint second box of it: one pill, answered whole
    result = answer(on_pill, faint_on_pill)
    assert (result["mode_used"], result["num_detections"], result["num_doubted"]) == ("single", 2, 1)
    assert len(result["pills"]) == 1 and result["hard_case"] == []
    # ... and a faint box elsewhere: maybe a second pill, so several, every box answered, the faint ones doubted
    several = answer(on_pill, faint_on_pill, elsewhere)
    assert several["mode_used"] == "combo" and [p["unknown_by"] for p in several["pills"]] == [None, "box", "box"]
    # two faint boxes apart (a weak detector's two real pills): several, both shown, never one whole-photo answer
    two_faint = answer([5, 5, 20, 20, 0.45], elsewhere)
    assert two_faint["mode_used"] == "combo" and [p["unknown_by"] for p in two_faint["pills"]] == ["box", "box"]
    # a big sure box and a small faint pill touching it: two pills
    touching = answer(on_pill, [located[0] + located[2] - 4, located[1], 14, 12, 0.4])
    assert touching["mode_used"] == "combo" and len(touching["pills"]) == 2
    # only a faint box away from the pill (a dish's rim; the detector missed the pill): the whole-photo answer
    # stands, flagged, and the box is answered beside it
    faint = answer(elsewhere)
    assert faint["mode_used"] == "single" and faint["flags"] == ["no_sure_pill_detected"]
    assert faint["pills"][0]["det_confidence"] is None and faint["pills"][1]["unknown_by"] == "box"
    assert faint["hard_case"][:2] == ["no_sure_pill_detected", "maybe_no_pill"]
    # a faint box on the pill itself confirms the whole-photo answer
    confirmed = answer([*located, 0.45])
    assert confirmed["mode_used"] == "single" and len(confirmed["pills"]) == 1 and confirmed["flags"] == []
    two_sure = answer(on_pill, [5, 5, 20, 20, 0.8], elsewhere)
    assert two_sure["mode_used"] == "combo" and [p["unknown_by"] for p in two_sure["pills"]] == [None, None, "box"]
    assert two_sure["num_doubted"] == 1
    combo = predictor.predict(photo, mode="combo")  # combo mode answers every box, doubted or not
    assert combo["num_doubted"] == 1 and combo["num_detections"] == 3


def test_sets_are_filled_as_configured_and_the_evaluation_redraws_them_alike(tmp_path: Path):
    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    sets = {"scores": {"lac": [0.1] * 50, "aps": [0.5] * 50}, "n": 50, "withheld_unknown": 0,
            "imprint_reading": False, "imprint_check": False}
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "prediction_sets": sets})
    overrides = ("inference.imprint.enabled=false",)
    filled = Predictor(root, _cfg(root, *overrides), device="cpu").set_rule
    plain = Predictor(root, _cfg(root, *overrides, "inference.prediction_set.fill_to_coverage=false"),
                      device="cpu").set_rule
    assert filled.fill is True and plain.fill is False and filled.threshold == plain.threshold
    lone = [{"mapping_code": c, "probability": p} for c, p in (("K-1", 0.7), ("K-2", 0.2), ("K-3", 0.1))]
    assert (plain.size(lone), filled.size(lone)) == (1, 3)  # LAC keeps 0.7 alone; 0.95 needs all three
    outcome = [{"pills": [{"code": "K-2", "known": True, "answered": True, "named": True, "right": False,
                           "set": ["K-1"], "covered": False, "topk": [(c["mapping_code"], c["probability"])
                                                                      for c in lone]}]}]
    assert set_figures(with_sets(outcome, SetRule("lac", 0.95, 0.1)))["coverage"] == 0.0
    redrawn = set_figures(with_sets(outcome, SetRule("lac", 0.95, 0.1, fill=True)))
    assert redrawn["coverage"] == 1.0 and redrawn["mean_set_size"] == 3.0 and redrawn["sure_share"] == 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_the_detector_boxes_of_validation_combination_pills_are_matched_to_their_labels(tmp_path: Path, caplog,
                                                                                        workers: int):
    """Calibration cuts a combination photo's pills where the detector finds them: each labelled pill takes the box
    that overlaps it (IoU 0.5, most confident first); a pill the detector misses, or on a photo that cannot be read,
    keeps its labelled box (not in the map), and is counted. Single-pill photos are not asked about. The photos are
    decoded by threads ahead of the detector (at Stage 4, tens of thousands of full-size photos) or as needed: the
    same."""
    import pandas as pd

    from pillsnap.data.datasets import CropTable
    from pillsnap.eval.box_calibration import detector_boxes

    photo = pill_photo(tmp_path / "three.png", [(10, 10, 30, 24), (70, 20, 30, 24), (40, 100, 30, 24)])
    labelled = [(10, 10, 30, 24), (70, 20, 30, 24), (40, 100, 30, 24), (5, 5, 20, 20), (30, 40, 50, 50)]
    paths = [str(photo)] * 3 + [str(tmp_path / "gone.png"), str(photo)]
    rows = pd.DataFrame({"image_path": paths, "label_path": [f"l{i}.json" for i in range(5)],
                         "mapping_code": ["K-000001"] * 5, **{k: [b[i] for b in labelled] for i, k in
                                                                enumerate(("bbox_x", "bbox_y", "bbox_w", "bbox_h"))}})
    dataset = type("Set", (), {"rows": CropTable.from_frame(rows)})()
    sources = np.array(["combination"] * 4 + ["single"])
    seen = []

    def detect(image, conf):
        seen.append((image.size, conf))
        return np.array([[12, 11, 30, 24, 0.9],    # pill 0, moved a little
                         [40, 102, 32, 22, 0.8],   # pill 2
                         [72, 60, 30, 24, 0.7],    # below pill 1, overlapping it too little
                         [11, 10, 30, 25, 0.3]])   # a second box on pill 0: taken by the surer one

    with caplog.at_level(logging.WARNING, logger="pillsnap"):
        boxes, counts = detector_boxes(detect, dataset, sources, 0.25, workers)
    assert seen == [((120, 160), 0.25)]  # one photo, at the inference threshold; the single photo not asked
    assert sorted(boxes) == [0, 2]
    assert boxes[0].tolist() == [12, 11, 30, 24] and boxes[2].tolist() == [40, 102, 32, 22]
    assert counts == {"pills": 4, "at_detector_boxes": 2, "missed": 1, "unreadable": 1, "match_iou": 0.5,
                      "conf_threshold": 0.25}
    assert "gone.png" in caplog.text

    def broken(image, conf):
        raise RuntimeError("Error(s) in loading state_dict")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pillsnap"):
        assert detector_boxes(broken, dataset, sources, 0.25, workers) == ({}, None)
    assert "cut at their labelled boxes" in caplog.text and "state_dict" in caplog.text
    assert detector_boxes(None, dataset, sources, 0.25) == ({}, None)  # no detector
    assert detector_boxes(detect, dataset, np.array(["single"] * 5), 0.25) == ({}, None)  # no combination pill
