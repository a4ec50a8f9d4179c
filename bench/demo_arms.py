"""Shared by the benches that train the demo profile's classifier alone on a demo work directory's data
(demo_crop_cache.py, demo_classifier_recipe.py): the profile's config with an arm's changes, trained in a scratch
folder."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def classifier_config(workdir: Path, scratch: Path, overrides: Sequence[str] = (),
                      settings: Mapping[str, Any] | None = None) -> Any:
    """The demo profile's config on `workdir`'s data with the user-style `overrides`, training the classifier alone
    into `scratch` (no work after training), then `settings` ({dotted key: value}) set on top."""
    from omegaconf import OmegaConf

    from pillsnap.demo import demo_config

    args = argparse.Namespace(workdir=str(workdir), tiny=False, data_root=None, cfg="config.yaml",
                              overrides=list(overrides))
    cfg = demo_config(args)
    for key, value in {"paths.exp_dir": str(scratch / "exp"), "train.strategy": "classification",
                       "train.stage_evaluation": False, **(settings or {})}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def train_in_scratch(workdir: Path, overrides: Sequence[str] = (),
                     settings: Mapping[str, Any] | None = None) -> tuple[float, list[dict]]:
    """Seconds from building the loaders to the last epoch's end, and each epoch's classification record. A
    setting whose value holds "{scratch}" is given the scratch folder (a cache of the arm's own)."""
    from pillsnap.engine.run import run_training

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        own = {key: value.replace("{scratch}", tmp) if isinstance(value, str) else value
               for key, value in (settings or {}).items()}
        cfg = classifier_config(workdir, Path(tmp), overrides, own)
        start = time.perf_counter()
        code, trainer = run_training(cfg)
        seconds = time.perf_counter() - start
        if code != 0 or trainer is None:
            raise SystemExit(f"training ended with exit code {code}")
        return seconds, [record["classification"] for record in trainer.history]
