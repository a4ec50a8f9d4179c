"""`pillsnap data synth | scan | cache` through the registered parser."""

from __future__ import annotations

import argparse
import json

import pytest

from pillsnap.data import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pillsnap")
    cli.register(p.add_subparsers(dest="command"))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("sub", [[], ["synth"], ["scan"], ["manifest"], ["cache"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["data", *sub, "--help"])
    assert exc.value.code == 0 and "usage: pillsnap data" in capsys.readouterr().out


def test_data_without_subcommand_prints_help(capsys):
    assert run(["data"]) == 2 and "synth" in capsys.readouterr().out


def test_synth_then_scan_then_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml here: built-in defaults
    assert run(["data", "synth", "--out", "d", "--classes", "3", "--per-class", "4", "--combo", "2",
                "--image-scale", "0.05", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["single_images"] == 12
    assert run(["data", "scan", "--data-root", "d", "--out", "m", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_kept"] >= 12 + 4 and report["classes"] == 3
    assert run(["data", "cache", "--workers", "1", "paths.manifest_dir=m", "paths.cache_dir=c",
                "model.image_size=16"]) == 0
    # single-pill photos and, with data.combo_crops (the default), the soundly boxed pills of combinations
    printed = json.loads(capsys.readouterr().out)
    assert printed["crops"] == report["records_kept"] > 12 and printed["unreadable"] == 0
    assert printed["format"] == "npy"
    # at stage 3 the command builds what training there reads: the JPEG cache
    assert run(["data", "cache", "--workers", "1", "paths.manifest_dir=m", "paths.cache_dir=c",
                "model.image_size=16", "data.progressive_validation.current_stage=3"]) == 0
    staged = json.loads(capsys.readouterr().out)
    assert staged["format"] == "jpeg" and staged["crops"] == printed["crops"]
    assert staged["cache_dir"] != printed["cache_dir"]
    # --stage, as `data manifest`, `evaluate` and the scripts take it: the same stage's cache (already built)
    assert run(["data", "cache", "--stage", "3", "--workers", "1", "paths.manifest_dir=m", "paths.cache_dir=c",
                "model.image_size=16"]) == 0
    assert json.loads(capsys.readouterr().out) == staged


def test_a_cache_that_would_fill_the_disk_is_refused_before_a_byte_is_written(manifest_dir, tmp_path, monkeypatch,
                                                                                caplog):
    """At Stage 4, 500,000 crops of 384 px are 221 GB: a disk that fills mid-run fails the checkpoints beside it."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    monkeypatch.chdir(tmp_path)
    assert run(["data", "cache", "--workers", "1", f"paths.manifest_dir={manifest_dir}", "paths.cache_dir=c",
                "model.image_size=32"]) == 2
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "crop cache (" in line and "needs 0.2 MB" in line and "0.1 MB are free" in line
    assert "data.cache.enabled=false" in line
    assert "\n" not in line and not list((tmp_path / "c").rglob("shard_*.npy"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    assert run(["data", "cache", "--workers", "1", f"paths.manifest_dir={manifest_dir}", "paths.cache_dir=c",
                "model.image_size=32"]) == 0 and list((tmp_path / "c").rglob("shard_*.npy"))


def test_cache_rejects_unknown_override(tmp_path, monkeypatch):
    from pillsnap.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model.image_sise"):
        run(["data", "cache", "model.image_sise=16"])


def test_manifest_writes_the_stage_train_and_val_rows(manifest_dir, tmp_path, capsys):
    import pandas as pd

    from pillsnap.data.scan import load_manifest

    assert run(["data", "manifest", "--stage", "2", "--out", str(tmp_path / "stage"),
                f"paths.manifest_dir={manifest_dir}", "data.progressive_validation.stage_2.max_classes=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["manifest_train.csv", "manifest_val.csv"]
    full = pd.read_csv(manifest_dir / "manifest.csv", nrows=1)
    for split, line in zip(("train", "val"), lines, strict=True):
        rows = pd.read_csv(tmp_path / "stage" / f"manifest_{split}.csv")
        assert list(rows.columns) == list(full.columns) and (rows["split"] == split).all()
        assert f"{len(rows)} rows" in line and str(tmp_path / "stage" / f"manifest_{split}.csv") in line
    stage_codes = set(pd.read_csv(tmp_path / "stage" / "manifest_train.csv").query("image_type == 'single'")
                      ["mapping_code"])
    assert len(stage_codes) == 3 < load_manifest(manifest_dir)["mapping_code"].nunique()
    # the line counts the classes the stage classifies, not every drug its combination photos show
    assert "3 classes to classify" in lines[0] and "other drugs' pills in its combination photos" in lines[0]


def test_manifest_without_a_scan_is_one_line_exit_2(tmp_path, monkeypatch, caplog):
    from pillsnap.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "manifest", f"paths.manifest_dir={tmp_path / 'none'}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= 40]
    assert len(errors) == 1 and "pillsnap data scan" in errors[0] and "\n" not in errors[0]


def test_synth_with_a_count_out_of_range_is_one_line_and_exit_2(tmp_path, caplog):
    assert run(["data", "synth", "--out", str(tmp_path / "d"), "--classes", "0"]) == 2
    assert "synth: num_classes must be >= 1, got 0" in caplog.text and "Traceback" not in caplog.text
