"""End-to-end pipeline figures (pillsnap/eval/pipeline_eval.py) with a stand-in predictor: routing, single accuracy
and all-pills-right on combinations, an unknown pill right only for a class the classifier never learnt."""

from __future__ import annotations

import pandas as pd
import pytest

from pillsnap.eval.pipeline_eval import drawn_test_photos, evaluate_pipeline, photo_groups, set_figures, with_sets
from pillsnap.infer.answer import SetRule


def _manifest() -> pd.DataFrame:
    rows = [("a.png", "single", "K-000001"), ("b.png", "single", "K-000009"),
            ("c.png", "combination", "K-000001"), ("c.png", "combination", "K-000002"),
            ("d.png", "single", "K-000002")]
    return pd.DataFrame([{"image_path": p, "image_type": t, "mapping_code": c, "split": "test" if p != "d.png"
                          else "val", "bbox_x": 40 * (c == "K-000002"), "bbox_y": 0, "bbox_w": 10, "bbox_h": 10}
                         for p, t, c in rows])


def _pill(code: str | None, box_x: int, members: list[str] | None = None) -> dict:
    members = [code] if members is None and code else members or []
    return {"mapping_code": code, "unknown": code is None, "bbox": [box_x, 1, 10, 10],
            "prediction_set": [{"mapping_code": m} for m in members],
            "topk": [(c, p) for c, p in zip(["K-000001", "K-000002"], [0.6, 0.4], strict=True)]}


class FakePredictor:
    """Answers in the pipeline's shape; c.png's pills come right to left (the boxes say which is which)."""

    answers = {"a.png": ("single", [_pill("K-000001", 0, ["K-000001", "K-000002"])]),
               "b.png": ("single", [_pill(None, 0)]),
               "c.png": ("combo", [_pill("K-000002", 41), _pill("K-000001", 1)])}

    def predict(self, path, mode="auto"):
        mode_used, pills = self.answers[path]
        return {"mode_used": mode_used, "fallback_reason": None,
                "pills": [{**p, "topk": [{"mapping_code": c, "probability": q} for c, q in p["topk"]]} for p in pills]}


def test_photo_groups_keep_one_entry_per_photo_of_the_split():
    photos = photo_groups(_manifest(), "test")
    assert [p["image_path"] for p in photos] == ["a.png", "b.png", "c.png"]
    assert photos[2]["codes"] == ["K-000001", "K-000002"] and photos[2]["boxes"].shape == (2, 4)


def test_the_demo_measures_at_most_a_draw_of_the_test_photos_the_same_for_every_measure():
    """A demo on a real tree at Stage 4 answered its 45,000-90,000 test photos five times over (8-22 h)."""
    rows = [{"image_path": f"{i:03d}.png", "image_type": "combination" if i % 10 == 0 else "single",
             "mapping_code": "K-000001", "split": "test" if i % 7 else "val", "bbox_x": 0, "bbox_y": 0, "bbox_w": 9,
             "bbox_h": 9} for i in range(400)]
    manifest = pd.DataFrame(rows)
    whole = photo_groups(manifest, "test")
    assert [p["image_path"] for p in drawn_test_photos(manifest, seed=3, limit=1000)] == [
        p["image_path"] for p in whole]  # a split within the limit: all of it
    drawn = drawn_test_photos(manifest, seed=3, limit=100)
    paths = [p["image_path"] for p in drawn]
    assert len(drawn) == 100 and paths == sorted(paths) and set(paths) < {p["image_path"] for p in whole}
    assert [p["image_path"] for p in drawn_test_photos(manifest, seed=3, limit=100)] == paths  # the same draw
    assert 3 <= sum(p["image_type"] == "combination" for p in drawn) <= 20  # in their own proportion (~10 %)


def test_figures_count_an_unknown_answer_right_only_for_an_unlearnt_class():
    photos = photo_groups(_manifest(), "test")
    known = {"K-000001", "K-000002"}
    figures = evaluate_pipeline(FakePredictor(), photos, "auto", known=known)
    assert figures["routing_accuracy"] == 1.0 and figures["combo_all_right_rate"] == 1.0
    assert figures["single_accuracy"] == 1.0  # b.png's K-000009 was never learnt: "unknown" is right
    assert evaluate_pipeline(FakePredictor(), photos, "auto", known=known | {"K-000009"})[
        "single_accuracy"] == pytest.approx(0.5)


class MissingPredictor(FakePredictor):
    answers = {**FakePredictor.answers, "c.png": ("combo", [_pill("K-000002", 41), _pill("K-000002", 1)])}


def test_set_figures_match_pills_by_box_and_count_an_empty_set_right_for_an_unlearnt_drug():
    photos = photo_groups(_manifest(), "test")
    sets = evaluate_pipeline(MissingPredictor(), photos, "auto", known={"K-000001", "K-000002"})["prediction_sets"]
    # a.png: {K-000001, K-000002} holds K-000001; c.png: K-000002 at x=41 matches its own box (covered), the pill at
    # x=1 is K-000001 answered {K-000002} (missed); b.png: an unlearnt drug given an empty set
    assert (sets["known_pills"], sets["named"], sets["coverage"]) == (3, 3, pytest.approx(2 / 3))
    assert sets["mean_set_size"] == pytest.approx(4 / 3) and sets["sure_share"] == pytest.approx(2 / 3)
    assert sets["sure_accuracy"] == 0.5 and sets["unknown_empty"] == 1.0 and sets["unknown_pills"] == 1
    figures = evaluate_pipeline(MissingPredictor(), photos, "auto", known={"K-000001", "K-000002"})
    # c.png pill by pill: K-000002 right, K-000001 answered K-000002; the photo as a whole is wrong
    assert figures["combo_pill_accuracy"] == 0.5 and figures["combo_all_right_rate"] == 0.0
    outcomes = evaluate_pipeline(MissingPredictor(), photos, "auto", known={"K-000001", "K-000002"})["outcomes"]
    redrawn = set_figures(with_sets(outcomes, SetRule("lac", 0.95, 0.7)))  # 1 - 0.4 <= 0.7: both in every set
    assert redrawn["coverage"] == 1.0 and redrawn["mean_set_size"] == 2.0
    # a crop source refused its sets: its pills carry none, the other source's keep theirs
    refused = set_figures(with_sets(outcomes, SetRule("lac", 0.95, 0.7, refused={"combination": "misses"})))
    assert set(refused["by_source"]) == {"single"} and refused["named"] == redrawn["by_source"]["single"]["named"]


def test_the_headline_says_what_the_imprint_check_adds_and_what_it_costs():
    from pillsnap.eval.pipeline_report import _calibration_lines

    cal = {"temperature": 0.7, "ece_before": 0.09, "ece_after": 0.06, "n_val": 127, "ece_sampling_floor": 0.08,
           "unknown_rule": "feature_distance",
           "unknown_eval_answers": {"auroc": 0.9, "known": 76, "unknown": 120, "known_rejected": 0.0,
                                    "unknown_rejected": 0.792, "unknown_rejected_by_imprint": 0.283,
                                    "without_imprint_check": {"auroc": 0.757, "unknown_rejected": 0.508,
                                                              "known_rejected": 0.026}}}
    line = [x for x in _calibration_lines(cal) if "final answers" in x][0]
    assert "AUROC=0.900 unknowns rejected=0.792 (by the imprint 0.283) known pills rejected=0.000" in line
    assert "without the imprint check: AUROC=0.757 rejected=0.508 known rejected=0.026" in line
    cal["unknown_eval_answers"]["auroc"] = None  # one class of photos missing: said, not a crash
    assert "AUROC=n/a" in [x for x in _calibration_lines(cal) if "final answers" in x][0]
    del cal["unknown_eval_answers"]  # the check off: no line
    assert not [x for x in _calibration_lines(cal) if "final answers" in x]
