"""trainer.main on the synthetic AI Hub fixture through the real loaders (classification, and interleaved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pillsnap.models import load_classifier_for_inference
from pillsnap.train import train as main
from pillsnap.utils import load_ckpt, read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def test_classification_run_on_synthetic_data(synth_cfg):
    cfg = synth_cfg
    cfg.train.strategy = "classification"
    cfg.model.backbone = "test_efficientnet"
    cfg.train.epochs = 2
    exp = cfg.paths.exp_dir
    assert main(cfg) == 0
    metrics = read_json(f"{exp}/reports/metrics.json")
    assert metrics["epoch"] == 2 and set(metrics["classification"]) == {"acc", "macro_f1", "top5", "val_loss"}
    classes = read_json(f"{exp}/checkpoints/classes.json")
    assert len(classes["class_names"]) == 6 and all(c.startswith("K-") for c in classes["class_names"])
    model, snapshot = load_classifier_for_inference(f"{exp}/checkpoints/best.pt")
    assert snapshot["model"]["num_classes"] == 6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 6)


def test_interleaved_run_trains_both_tasks(synth_cfg):
    cfg = synth_cfg
    cfg.train.strategy = "interleaved"
    cfg.model.backbone = "test_efficientnet"
    exp = cfg.paths.exp_dir
    assert main(cfg) == 0
    for task in ("classification", "detection"):
        assert load_ckpt(f"{exp}/checkpoints/{task}_last.pt")["epoch"] == 1
    metrics = read_json(f"{exp}/reports/metrics.json")
    assert "mAP@0.5" in metrics["detection"] and "macro_f1" in metrics["classification"]
    steps = [json.loads(line) for line in Path(f"{exp}/reports/metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["task"] for r in steps if r["type"] == "step"} == {"classification", "detection"}


@pytest.mark.slow
def test_cli_entry_point_recovers_from_an_injected_oom(synth_root, manifest_dir, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    exp = tmp_path / "exp"
    overrides = [f"paths.data_root={synth_root}", f"paths.manifest_dir={manifest_dir}", f"paths.exp_dir={exp}",
                 f"paths.cache_dir={tmp_path / 'cache'}", "model.backbone=test_efficientnet", "model.image_size=32",
                 "train.strategy=classification", "train.epochs=1", "train.batch_size=4", "dataloader.num_workers=0",
                 "train.oom.escalate_to_fp16=false", "train.oom.cooldown_sec=0",
                 "data.progressive_validation.stage_1.max_classes=6"]
    env = {**os.environ, "PILLSNAP_FAKE_OOM_STEPS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pillsnap.train", "--cfg", str(repo / "config.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OOM Recovery S2: Microbatching bs=2, accum=2 (global batch preserved: 4)" in proc.stderr
    ooms = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if '"oom"' in line]
    assert ooms[-1]["action"] == "applied" and ooms[-1]["state"]["batch_size"] == 2
    assert (exp / "checkpoints" / "best.pt").is_file()
