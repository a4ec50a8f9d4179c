"""Command line: every subcommand has --help; config errors are one clear line and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from pillsnap.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["data", "train", "predict", "demo", "serve", "monitor"]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in COMMANDS)


@pytest.mark.parametrize("command", [*COMMANDS, "data synth", "data scan", "data cache"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_config_error_exit_code_and_message(caplog):
    assert main(["train", "--cfg", str(ROOT / "config.yaml"), "train.batchsize=1"]) == 2
    assert "Did you mean 'train.batch_size'" in caplog.text


def test_python_m_train_checks_config():
    bad = subprocess.run([sys.executable, "-m", "pillsnap.train", "--cfg", "missing.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Config file not found: missing.yaml" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "pillsnap.train", "--cfg", "config.yaml", "--check",
                         "train.batch_size=128"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "batch_size: 128" in ok.stdout


def test_missing_experiment_is_a_clear_exit_code_2(tmp_path, caplog):
    code = main(["serve", "--cfg", str(ROOT / "config.yaml"), "--exp", str(tmp_path / "no_exp")])
    assert code == 2
    assert "No classifier checkpoint" in caplog.text
