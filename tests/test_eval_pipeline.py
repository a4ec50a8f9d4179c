"""End-to-end pipeline figures (pillsnap/eval/pipeline_eval.py) with a stand-in predictor: routing, single accuracy
and all-pills-right on combinations, an unknown pill right only for a class the classifier never learnt."""

from __future__ import annotations

import pandas as pd
import pytest

from pillsnap.eval.pipeline_eval import evaluate_pipeline, photo_groups


def _manifest() -> pd.DataFrame:
    rows = [("a.png", "single", "K-000001"), ("b.png", "single", "K-000009"),
            ("c.png", "combination", "K-000001"), ("c.png", "combination", "K-000002"),
            ("d.png", "single", "K-000002")]
    return pd.DataFrame([{"image_path": p, "image_type": t, "mapping_code": c, "split": "test" if p != "d.png"
                          else "val", "bbox_x": 0, "bbox_y": 0, "bbox_w": 10, "bbox_h": 10} for p, t, c in rows])


class FakePredictor:
    answers = {"a.png": ("single", ["K-000001"]), "b.png": ("single", [None]),
               "c.png": ("combo", ["K-000002", "K-000001"])}

    def predict(self, path, mode="auto"):
        mode_used, codes = self.answers[path]
        return {"mode_used": mode_used, "fallback_reason": None, "pills": [{"mapping_code": c} for c in codes]}


def test_photo_groups_keep_one_entry_per_photo_of_the_split():
    photos = photo_groups(_manifest(), "test")
    assert [p["image_path"] for p in photos] == ["a.png", "b.png", "c.png"]
    assert photos[2]["codes"] == ["K-000001", "K-000002"] and photos[2]["boxes"].shape == (2, 4)


def test_figures_count_an_unknown_answer_right_only_for_an_unlearnt_class():
    photos = photo_groups(_manifest(), "test")
    known = {"K-000001", "K-000002"}
    figures = evaluate_pipeline(FakePredictor(), photos, "auto", known=known)
    assert figures["routing_accuracy"] == 1.0 and figures["combo_all_right_rate"] == 1.0
    assert figures["single_accuracy"] == 1.0  # b.png's K-000009 was never learnt: "unknown" is right
    assert evaluate_pipeline(FakePredictor(), photos, "auto", known=known | {"K-000009"})[
        "single_accuracy"] == pytest.approx(0.5)
