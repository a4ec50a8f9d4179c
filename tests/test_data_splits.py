"""The grouped split: a combination (every camera angle and shot) or a single-pill sweep never straddles
train/val/test; AI Hub's own Validation partition is the test split where the data has one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from aihub_trees import move_combinations, split_partitions

from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.splits import TEST, TRAIN, VAL, _draw, assign_splits
from pillsnap.data.synth import generate_dataset


@pytest.fixture(scope="module")
def shots_root(tmp_path_factory) -> object:
    """8 classes, 30 combination photos (10 combinations x 3 camera elevations), 6 single photos per class."""
    root = tmp_path_factory.mktemp("shots") / "data"
    generate_dataset(root, 8, 6, 30, seed=3, image_scale=0.05, workers=1, progress=False)
    return root


def test_no_combination_and_no_sweep_straddles_splits(shots_root, tmp_path):
    report = scan_dataset(shots_root, tmp_path / "m", workers=1, progress=False)
    manifest = load_manifest(tmp_path / "m")
    combos = manifest[manifest["image_type"] == "combination"]
    assert (combos.groupby("split_group")["camera_la"].nunique() == 3).all()  # every combination at 3 angles
    assert (combos.groupby("split_group")["split"].nunique() == 1).all()  # ... and all of them in one split
    assert set(combos["split"]) == {"train", "val", "test"}
    singles = manifest[manifest["image_type"] == "single"]
    assert (singles.groupby("split_group")["split"].nunique() == 1).all()
    sweep = singles["split_group"].str.split("_")
    assert (sweep.str[0] == singles["mapping_code"]).all() and (sweep.str[-1].astype(int) == singles["camera_la"]).all()
    assert report["split"]["aihub_validation_is_test"] == {"single": False, "combination": False}
    per_split = report["photos_per_split"]["combination"]
    assert sum(per_split.values()) == 30 and per_split["test"] % 3 == 0 and per_split["val"] % 3 == 0


def test_aihub_validation_partition_is_the_test_split(shots_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shots_root, root)
    folders = sorted({p.parent.name for p in root.rglob("K-*-*/K-*_0_*.png")})
    held = folders[:3]
    move_combinations(root, held, "2.Validation")
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    manifest = load_manifest(tmp_path / "m")
    combos = manifest[manifest["image_type"] == "combination"]
    assert set(combos.loc[combos["aihub_part"] == "Validation", "split_group"]) == set(held)
    assert (combos.loc[combos["aihub_part"] == "Validation", "split"] == "test").all()
    assert (combos.loc[combos["aihub_part"] == "Training", "split"] != "test").all()
    assert set(combos.loc[combos["aihub_part"] == "Training", "split"]) == {"train", "val"}
    assert report["split"]["aihub_validation_is_test"] == {"single": False, "combination": True}
    singles = manifest[manifest["image_type"] == "single"]  # no single-pill Validation photos: drawn as usual
    assert set(singles["split"]) == {"train", "val", "test"}


def test_a_drug_with_photos_in_both_aihub_partitions_pairs_each_label_with_its_own_partition(shots_root, tmp_path):
    """AI Hub ships a drug's Training and Validation photos in separate zips under the same code folder, each
    partition with its own labels. Each label folder looks for its photos in its own partition: none of them is
    then an 'image without label' (before, every photo of the other partition was counted as one: about all 2.6 M
    of the real set), and each row's photo lies in its label's partition."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shots_root, root)
    moved = split_partitions(root)
    assert moved >= 8
    report = scan_dataset(root, tmp_path / "m", workers=1, progress=False)
    manifest = load_manifest(tmp_path / "m")
    singles = manifest[manifest["image_type"] == "single"]
    assert report["image_without_label"] == 0 and len(singles) == 8 * 6
    assert (singles["aihub_part"] == "Validation").sum() == moved
    in_validation = singles["image_path"].str.contains("2.Validation")
    assert (in_validation == (singles["aihub_part"] == "Validation")).all()
    # a photo of the Validation partition whose label is lost is still counted, in its own partition
    sorted(root.rglob("VL_1_단일/*_json/*.json"))[0].unlink()
    again = scan_dataset(root, tmp_path / "m2", workers=1, progress=False)
    assert again["image_without_label"] == 1
    # ... and so are the Validation photos of a drug whose Validation labels are all missing (its Training labels
    # look in the Training partition only)
    lost = sorted(root.rglob("VL_1_단일/*_json"))[-1]  # not the folder of the label deleted above
    photos = len(list((root / "2.Validation" / "원천데이터" / "단일경구약제 5000종" / "VS_1_단일" /
                       lost.name[:-5]).glob("*.png")))
    shutil.rmtree(lost)
    assert scan_dataset(root, tmp_path / "m3", workers=1, progress=False)["image_without_label"] == 1 + photos


@pytest.mark.parametrize(("path", "part"), [
    ("/d/2.Validation/원천데이터/단일경구약제 5000종/VS_1_단일/K-000001/a.png", "Validation"),
    ("/d/라벨링데이터/VL_10_조합.zip", "Validation"), ("/d/TS_3_단일/K-000001", "Training"),
    ("/d/training/TL_81_단일/K-000001_json", "Training"), ("/d/TL_2.zip", "Training"),
    ("/d/1.Training/VS_1_단일/K-000001", "Validation"),  # the nearest name that says wins
    ("/d/tl_backup/K-000001", ""), ("/d/ts_old/K-000001", ""), ("/d/vs_code/K-000001", ""),
    ("/d/my_training_set/K-000001", ""),
])
def test_the_aihub_partition_is_read_from_its_own_folder_and_zip_names(path, part):
    from pillsnap.data.scan_walk import aihub_part

    assert aihub_part(path) == part


def groups(rows: list[tuple[int, str, int, int]]) -> pd.DataFrame:
    """(hash, stratum, photos, AI Hub Validation photos) -> the frame assign_splits takes."""
    frame = pd.DataFrame(rows, columns=["key", "stratum", "photos", "aihub_val"]).set_index("key")
    return frame.assign(image_type="combination")


def test_a_group_follows_most_of_its_photos_across_the_aihub_partition():
    frame = groups([(1, "c", 3, 1), (2, "c", 3, 2), (3, "c", 3, 0), (4, "c", 3, 0), (5, "c", 3, 0)])
    splits, summary = assign_splits(frame, 0.2, 0.2)
    assert splits[2] == TEST and splits[1] != TEST  # 2 of 3 in Validation -> test; 1 of 3 -> stays out
    assert summary["aihub_validation_photos_not_in_test"] == 1


def test_aihub_validation_that_cannot_be_a_test_split_falls_back_to_drawing_it(caplog):
    """How AI Hub assigned photos to its Validation partition is not known. Scattered through sweeps (one photo of
    18), every group followed its Training photos and test came out empty; whole other drugs, test held classes
    with no training photo. Either way test is now drawn, with a warning and the reason in the report."""
    scattered = groups([(i, "c", 18, 1) for i in range(1, 21)])
    with caplog.at_level("WARNING"):
        splits, summary = assign_splits(scattered, 0.15, 0.15)
    assert (splits == TEST).sum() >= 3 and (splits == TRAIN).sum() >= 10
    assert "under the 5.0% a test split needs" in summary["aihub_validation_not_usable"]["combination"]
    assert "cannot be its test" in caplog.text
    whole = groups([(i, "c", 9, 9 if i % 12 == 0 else 0) for i in range(1, 121)])  # 8 % whole groups
    assert assign_splits(whole, 0.15, 0.25)[1]["aihub_validation_is_test"] == {"combination": True}
    assert summary["aihub_validation_is_test"] == {"combination": False}
    other_drugs = pd.concat([groups([(i * 10 + j, f"K-00000{i}", 6, 6 if i >= 4 else 0) for j in range(4)])
                             for i in range(1, 6)]).assign(image_type="single")
    splits, summary = assign_splits(other_drugs, 0.15, 0.15)
    assert "drugs with no Training photo" in summary["aihub_validation_not_usable"]["single"]
    by_drug = pd.DataFrame({"code": splits, "drug": other_drugs.loc[splits.index, "stratum"]})
    assert (by_drug.groupby("drug")["code"].apply(lambda c: (c == TRAIN).any())).all()  # every drug trains
    sweeps = pd.concat([groups([(i * 10 + j, f"K-00000{i}", 6, 6 if j == 0 else 0) for j in range(4)])
                        for i in range(1, 6)]).assign(image_type="single")
    splits, summary = assign_splits(sweeps, 0.15, 0.15)  # whole sweeps held out, as we expect of AI Hub
    assert summary["aihub_validation_not_usable"] == {} and summary["aihub_validation_is_test"] == {"single": True}
    assert set(splits.index[splits == TEST]) == {i * 10 for i in range(1, 6)}


def test_draw_gives_exact_shares_for_single_photo_groups_and_keeps_train():
    codes = _draw(np.ones(20, dtype=int), (0.15, 0.15))
    assert (codes == TEST).sum() == 3 and (codes == VAL).sum() == 3 and (codes == TRAIN).sum() == 14
    assert list(codes[:3]) == [TEST] * 3  # lowest hashes first
    small = _draw(np.array([5, 5, 5]), (0.15, 0.15))
    assert sorted(small.tolist()) == [TRAIN, VAL, TEST]  # at least one group each, train keeps one
    assert _draw(np.array([4, 4]), (0.15, 0.15)).tolist().count(TRAIN) >= 1


def test_photo_locations_leave_out_only_the_other_named_partition():
    from pillsnap.data.scan_walk import Location, photo_locations

    training = Location("/d/1.Training/라벨링데이터/TL_1_단일.zip", True)
    ts = Location("/d/1.Training/원천데이터/TS_1_단일.zip", True)
    vs = Location("/d/2.Validation/원천데이터/VS_1_단일.zip", True)
    extracted = Location("/d/photos_extracted", False)  # no partition in its name: always looked in
    assert (training.part, ts.part, vs.part, extracted.part) == ("Training", "Training", "Validation", "")
    assert photo_locations(training, [ts, vs, extracted]) == (ts, extracted)
    assert photo_locations(training, [vs, extracted]) == (vs, extracted)  # none of its own: every location
    assert photo_locations(Location("/d/labels", False), [ts, vs]) == (ts, vs)  # a label of no named partition
