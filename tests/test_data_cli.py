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


@pytest.mark.parametrize("sub", [[], ["synth"], ["scan"], ["cache"]])
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
    assert json.loads(capsys.readouterr().out)["crops"] == 12


def test_cache_rejects_unknown_override(tmp_path, monkeypatch):
    from pillsnap.config import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="model.image_sise"):
        run(["data", "cache", "model.image_sise=16"])
