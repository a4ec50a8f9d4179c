"""Data with only combination photos (the competition subset, or only the *_조합 zips): the pills of combination
photos train the classifier, and a training run trains both models instead of stopping."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pillsnap.config import load_config
from pillsnap.data import build_dataloaders_twostage
from pillsnap.data.scan import load_manifest, scan_dataset
from pillsnap.data.stages import select_stage
from pillsnap.data.synth import SINGLE_DIR, generate_dataset


@pytest.fixture(scope="module")
def combo_only(tmp_path_factory) -> tuple[Path, Path]:
    """6 classes in 18 combination photos (6 combinations x 3 angles), the single-pill folders removed."""
    base = tmp_path_factory.mktemp("combo_only")
    generate_dataset(base / "data", 6, 1, 18, seed=4, image_scale=0.1, workers=1, progress=False)
    for folder in list((base / "data").rglob(SINGLE_DIR)):
        shutil.rmtree(folder)
    scan_dataset(base / "data", base / "manifests", workers=1, progress=False)
    return base / "data", base / "manifests"


def cfg_for(manifests: Path, tmp_path: Path, *extra: str):
    return load_config(None, overrides=[
        f"paths.manifest_dir={manifests}", f"paths.exp_dir={tmp_path / 'exp'}", f"paths.cache_dir={tmp_path / 'c'}",
        "model.backbone=test_efficientnet", "model.image_size=32", "model.detector=yolo11n",
        "model.det_image_size=64", "train.batch_size=4", "train.detection.batch_size=2", "train.epochs=1",
        "train.max_steps_per_epoch=3", "dataloader.num_workers=0", "dataloader.persistent_workers=false",
        "dataloader.pin_memory=false", "data.progressive_validation.stage_1.max_classes=6", *extra,
    ], dotenv_path=None)


def test_combination_pills_fill_the_classifier_loaders(combo_only, tmp_path):
    _, manifests = combo_only
    manifest = load_manifest(manifests)
    assert set(manifest["image_type"]) == {"combination"}
    loaders = build_dataloaders_twostage(cfg_for(manifests, tmp_path))
    meta = loaders.meta
    assert meta["num_classes"] == manifest["mapping_code"].nunique() == 6
    assert all(meta["class_map"][c]["index"] == i for i, c in enumerate(meta["class_names"]))
    assert meta["sizes"]["cls_train"] == meta["sizes"]["cls_train_from_combinations"] > 0
    assert loaders.det_train is not None and loaders.cls_val is not None
    x, y, info = next(iter(loaders.cls_train))
    assert x.shape[1:] == (3, 32, 32) and [meta["class_names"][i] for i in y.tolist()] == info["mapping_code"]


def test_without_combo_crops_the_error_names_the_key(combo_only, tmp_path):
    _, manifests = combo_only
    cfg = cfg_for(manifests, tmp_path, "data.combo_crops=false")
    with pytest.raises(ValueError, match="data.combo_crops=true"):
        build_dataloaders_twostage(cfg)


@pytest.mark.usefixtures("one_thread")
def test_a_combination_only_stage_trains_both_models(combo_only, tmp_path):
    from pillsnap.train import train
    from pillsnap.utils import read_json

    _, manifests = combo_only
    cfg = cfg_for(manifests, tmp_path, "train.strategy=interleaved")
    assert train(cfg) == 0
    metrics = read_json(tmp_path / "exp" / "reports" / "metrics.json")
    assert "macro_f1" in metrics["classification"] and "mAP@0.5" in metrics["detection"]
    classes = read_json(tmp_path / "exp" / "checkpoints" / "classes.json")
    assert len(classes["class_names"]) == 6


def test_classes_seen_only_in_combinations_get_an_index(manifest_dir, tmp_path):
    manifest = load_manifest(manifest_dir)
    only_combo = sorted(set(manifest["mapping_code"]))[0]
    manifest = manifest[(manifest["image_type"] == "combination") | (manifest["mapping_code"] != only_combo)]
    assert only_combo in set(manifest["mapping_code"])  # still in the combination photos
    cfg = load_config(None, ["data.progressive_validation.stage_1.max_classes=6"], dotenv_path=None)
    rows = select_stage(manifest, cfg, 1)
    assert only_combo in set(rows.loc[rows["stage_class"], "mapping_code"])
    off = select_stage(manifest, OmegaConf.merge(cfg, {"data": {"combo_crops": False}}), 1)
    assert only_combo not in set(off.loc[off["stage_class"], "mapping_code"])
