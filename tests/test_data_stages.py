"""Progressive stages: nested, class-stratified, deterministic; split shares kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pillsnap.config import load_config
from pillsnap.data.stages import select_stage, stable_hash, stage_classes


def fake_manifest(n_classes: int = 30, per_class: int = 20) -> pd.DataFrame:
    rows = []
    for c in range(n_classes):
        for i in range(per_class):
            split = "test" if i < 3 else "val" if i < 6 else "train"
            rows.append({"mapping_code": f"K-{c + 1:06d}", "photo_id": f"K-{c + 1:06d}_{i}", "split": split,
                         "image_type": "single"})
    for p in range(10):  # combination photos of 2 pills each
        for c in (p, p + 10):
            rows.append({"mapping_code": f"K-{c + 1:06d}", "photo_id": f"combo_{p}", "split": "train",
                         "image_type": "combination"})
    return pd.DataFrame(rows)


def cfg_for(stage_sizes: dict[int, tuple[int, int]], seed: int = 42):
    overrides = [f"data.split_seed={seed}"]
    for stage, (samples, classes) in stage_sizes.items():
        overrides += [f"data.progressive_validation.stage_{stage}.max_samples={samples}",
                      f"data.progressive_validation.stage_{stage}.max_classes={classes}"]
    return load_config(None, overrides, dotenv_path=None)


def test_stable_hash_is_deterministic_and_seeded():
    a = stable_hash(1, ["x", "y"])
    assert a.dtype == np.int64 and (a >= 0).all()
    assert (a == stable_hash(1, ["x", "y"])).all() and not (a == stable_hash(2, ["x", "y"])).all()


def test_stage_classes_are_nested():
    codes = [f"K-{i:06d}" for i in range(1, 200)]
    small, big = stage_classes(codes, 10, 42), stage_classes(codes, 50, 42)
    assert len(small) == 10 and len(big) == 50 and set(small) <= set(big)
    assert small == sorted(small) and stage_classes(codes, 10, 7) != small
    with pytest.raises(ValueError, match="max_classes"):
        stage_classes(codes, 0, 42)


def test_stages_are_nested_stratified_and_deterministic():
    manifest = fake_manifest()
    cfg = cfg_for({1: (50, 5), 2: (200, 20)})
    s1, s2 = select_stage(manifest, cfg, 1), select_stage(manifest, cfg, 2)
    s1_single, s2_single = s1[s1.image_type == "single"], s2[s2.image_type == "single"]
    assert s1_single["mapping_code"].nunique() == 5 and s2_single["mapping_code"].nunique() == 20
    assert set(s1_single["photo_id"]) <= set(s2_single["photo_id"])
    counts = s1_single.groupby("mapping_code").size()
    assert (counts == counts.iloc[0]).all() and counts.iloc[0] >= 10  # stratified: same quota per class
    assert set(s1_single["split"]) == {"train", "val", "test"}
    assert select_stage(manifest, cfg, 1).equals(s1)


def test_split_shares_survive_sampling():
    manifest = fake_manifest(per_class=40)
    s = select_stage(manifest, cfg_for({1: (100, 5)}), 1)
    shares = s[s.image_type == "single"]["split"].value_counts(normalize=True)
    full = manifest[manifest.image_type == "single"]["split"].value_counts(normalize=True)
    assert abs(shares["train"] - full["train"]) < 0.1


def test_combinations_follow_stage_classes():
    manifest = fake_manifest()
    s = select_stage(manifest, cfg_for({1: (100, 5)}), 1)
    stage = set(s.loc[s.image_type == "single", "mapping_code"])
    combos = s[s.image_type == "combination"]
    for _, photo in combos.groupby("photo_id"):
        assert stage & set(photo["mapping_code"]) and len(photo) == 2  # whole photos, never half
    capped = select_stage(manifest, cfg_for({1: (2, 30)}), 1)
    assert capped[capped.image_type == "combination"]["photo_id"].nunique() == 2


def test_disabled_progressive_validation_uses_everything():
    manifest = fake_manifest()
    cfg = load_config(None, ["data.progressive_validation.enabled=false"], dotenv_path=None)
    assert len(select_stage(manifest, cfg)) == len(manifest)


def test_a_class_with_no_training_row_is_never_a_classifier_output(caplog):
    """A drug seen only in combination photos, all of them held out (val/test): it was drawn as a stage class, an
    output the classifier never trained and a test class always wrong."""
    manifest = fake_manifest()
    held_out = pd.DataFrame([{"mapping_code": "K-099999", "photo_id": "combo_x", "split": split,
                              "image_type": "combination"} for split in ("test", "test")]
                            + [{"mapping_code": "K-000001", "photo_id": "combo_x", "split": "test",
                                "image_type": "combination"}])
    manifest = pd.concat([manifest, held_out], ignore_index=True)
    drawn = select_stage(manifest, cfg_for({1: (10_000, 31)}), 1)  # room for every class
    classes = set(drawn.loc[drawn["stage_class"], "mapping_code"])
    assert len(classes) == 30 and "K-099999" not in classes
    assert "combo_x" in set(drawn["photo_id"])  # the photo still serves the detector
    cfg = load_config(None, ["data.progressive_validation.enabled=false"], dotenv_path=None)
    with caplog.at_level("WARNING"):
        everything = select_stage(manifest, cfg)
    assert "K-099999" not in set(everything.loc[everything["stage_class"], "mapping_code"])
    assert len(everything) == len(manifest) and "1 class(es) have no training row" in caplog.text


def test_stage_size_counts_the_photos_trained_and_validated_on(caplog):
    """The design's stage sizes are train + val (Stage 3: 81,475 + 18,525 = 100,000); the test split is held back
    until the end and comes on top, in its own proportion. Taken out of `max_samples`, it left Stage 3 85,000."""
    split = ["test"] * 3 + ["val"] * 3 + ["train"] * 14
    manifest = pd.DataFrame([{"mapping_code": f"K-{c + 1:06d}", "photo_id": f"K-{c + 1:06d}_{i}",
                              "image_type": "single", "split": split[i % 20]}
                             for c in range(10) for i in range(200)])  # 15 % test, 15 % val, 70 % train
    chosen = select_stage(manifest, cfg_for({1: (1000, 10)}), 1)
    splits = chosen[chosen.image_type == "single"]["split"].value_counts()
    assert 1000 <= splits["train"] + splits["val"] <= 1000 + 2 * 10  # per class, each split's share rounded up
    assert abs(splits["test"] / (splits["train"] + splits["val"]) - 15 / 85) < 0.02
    assert "asks for" not in caplog.text
    fewer = select_stage(manifest, cfg_for({1: (1000, 40)}), 1)  # only 10 drugs: each takes a larger share
    assert "stage 1 asks for 40 classes; the data has 10" in caplog.text
    assert fewer[fewer.split != "test"].shape[0] >= 1000


def test_rows_come_in_the_index_order_whatever_the_frame_order():
    """The stage is a set of rows, given in the manifest's index order: a frame whose rows are out of order (its
    index labels kept) gives the same rows, in the same order, as the ordered one."""
    manifest = fake_manifest(per_class=40)
    cfg = cfg_for({1: (100, 5)})
    expected = select_stage(manifest, cfg, 1)
    assert len(expected) < len(manifest)  # a draw, not every row
    shuffled = manifest.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(select_stage(shuffled, cfg, 1), expected)


def test_nullable_string_columns_with_missing_values_select_as_the_manifest_would():
    """A frame of pandas' nullable strings (pd.NA, not NaN), e.g. built by hand or read by another tool: a row with
    no kind or no split is simply not drawn as one, as with the manifest's own string columns."""
    manifest = fake_manifest(per_class=40)
    manifest.loc[[3, 50], "image_type"] = None
    manifest.loc[[7, 90], "split"] = None
    cfg = cfg_for({1: (100, 5)})
    expected = select_stage(manifest, cfg, 1)
    nullable = manifest.astype({c: "string[pyarrow]" for c in ("mapping_code", "photo_id", "split", "image_type")})
    assert nullable["image_type"].isna().sum() == 2 and nullable["image_type"].dtype != manifest["image_type"].dtype
    drawn = select_stage(nullable, cfg, 1)
    assert drawn["photo_id"].tolist() == expected["photo_id"].tolist()
    assert drawn["stage_class"].tolist() == expected["stage_class"].tolist()
