"""Shared fixtures: a tiny synthetic AI Hub data set, its scanned manifests, and a CPU-sized config.

`synth_root` / `manifest_dir` are generated once per session; tests must not modify them (copy first).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite never touches the network: pretrained weights come from the local cache or the models start from
# random init at once (set before huggingface_hub is imported, and inherited by the scripts the tests start).
# A data root exported for real runs must not leak into the tests' configs either.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("PILLSNAP_DATA_ROOT", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_LABELS = REPO_ROOT.parent / "shared" / "spec" / "aihub_real_labels"

SYNTH_CLASSES, SYNTH_PER_CLASS, SYNTH_COMBOS = 6, 6, 9


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 6 single photos + 9 combination photos (3 combinations x 3 camera angles), 122x160 px, extracted
    AI Hub layout."""
    from pillsnap.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, SYNTH_CLASSES, SYNTH_PER_CLASS, SYNTH_COMBOS, seed=0, image_scale=0.125, workers=1,
                     progress=False)
    return root


@pytest.fixture(scope="session")
def manifest_dir(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pillsnap data scan` of synth_root: manifest.{parquet,csv}, class_map.json, scan_report.json."""
    from pillsnap.data.scan import scan_dataset

    out = tmp_path_factory.mktemp("manifests")
    scan_dataset(synth_root, out, workers=1, progress=False)
    return out


@pytest.fixture
def synth_cfg(synth_root: Path, manifest_dir: Path, tmp_path: Path):
    """Config for CPU tests on the synthetic fixture: 32 px classifier, 64 px yolo11n, batch 4, no workers,
    stage 1 = every fixture class; exp_dir and cache_dir are fresh per test."""
    from pillsnap.config import load_config

    return load_config(None, overrides=[
        f"paths.data_root={synth_root}", f"paths.manifest_dir={manifest_dir}",
        f"paths.exp_dir={tmp_path / 'exp'}", f"paths.cache_dir={tmp_path / 'cache'}",
        "model.backbone=resnet18", "model.image_size=32", "model.detector=yolo11n", "model.det_image_size=64",
        "model.pretrained=false", "train.batch_size=4", "train.detection.batch_size=2", "train.epochs=1",
        "train.detection.epochs=1",
        "dataloader.num_workers=0", "dataloader.persistent_workers=false", "dataloader.pin_memory=false",
        "data.progressive_validation.stage_1.max_samples=1000", "train.stage_evaluation=false",
        f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}",
    ], dotenv_path=None)


@pytest.fixture
def one_thread():
    """Run a training test on one torch thread (steadier on a shared 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
