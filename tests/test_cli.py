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


def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(tmp_path, caplog, monkeypatch):
    """Every command with --device refuses a device this machine does not have in one line, exit 2, before any
    model, config or experiment is read (the experiment here does not even exist)."""
    import torch

    from pillsnap.utils import DeviceError, resolve_device

    for command in (["predict", "--exp", str(tmp_path), "x.png"], ["calibrate", "--exp", str(tmp_path)],
                    ["evaluate", "--exp", str(tmp_path)], ["serve", "--exp", str(tmp_path)]):
        caplog.clear()
        assert main([*command, "--device", "gpu0"]) == 2
        assert "device 'gpu0': not a device (cpu, cuda, cuda:N)" in caplog.text and "Traceback" not in caplog.text
    assert main(["predict", "--exp", str(tmp_path), "x.png", "--device", "meta"]) == 2
    assert "PillSnap runs on cpu or cuda" in caplog.text
    # a machine with one CUDA device: cuda and cuda:0 are it, cuda:1 is not there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert str(resolve_device("cuda:0")) == "cuda:0" and str(resolve_device("cuda")) == "cuda"
    with pytest.raises(DeviceError, match=r"has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match="no CUDA device on this machine"):
        resolve_device("cuda")
    # a CPU-only torch cannot see a GPU that may well be there: the message says which it is
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(DeviceError, match=r"is a CPU-only build; install a CUDA build of torch"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build drives an AMD GPU as "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(resolve_device("cuda:0")) == "cuda:0"
    assert str(resolve_device("cpu")) == "cpu"
