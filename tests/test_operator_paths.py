"""What an operator runs, from wherever they run it: commands on `--exp /abs/path` from another directory, old
runs whose saved config holds relative paths, the scripts' file arguments, the stage manifests, the set-up script,
$PILLSNAP_DATA_ROOT, the demo's profiles and a readable DEBUG log."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SYNTH_CLASSES

from pillsnap.cli import main
from pillsnap.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def saved_run(project: Path, paths: dict, **sections) -> Path:
    """An experiment folder under `project` whose config.yaml holds `paths` (as a run saves it)."""
    exp = project / "runs" / "x" / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    oom = {"max_retries": 4, "max_grad_accum": 8, "min_batch": 1, "cooldown_sec": 0, "escalate_to_fp16": True}
    data = {"paths": paths, "train": {"oom": oom}, **sections}
    (exp / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return exp


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory with no config.yaml in it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_loaded_paths_are_absolute_from_the_working_directory(elsewhere):
    cfg = load_config(None, ["paths.exp_dir=runs/e"], dotenv_path=None)
    assert cfg.paths.exp_dir == str(elsewhere / "runs" / "e")
    assert all(Path(v).is_absolute() for v in cfg.paths.values())


def test_predict_reads_the_runs_own_config_from_another_directory(tmp_path, elsewhere, monkeypatch):
    exp = saved_run(tmp_path / "project", {"exp_dir": "runs/x/exp"}, inference={"topk": 3})
    seen = {}

    class Recorder:
        def __init__(self, exp_dir, cfg, device=None):
            seen.update(exp_dir=exp_dir, topk=cfg.inference.topk)
            raise FileNotFoundError("stop here")

    monkeypatch.setattr("pillsnap.infer.pipeline.Predictor", Recorder)
    assert main(["predict", "photo.png", "--exp", str(exp)]) == 2
    assert seen == {"exp_dir": str(exp), "topk": 3}


def test_serve_reads_the_runs_own_config_from_another_directory(tmp_path, elsewhere, monkeypatch):
    import uvicorn

    exp = saved_run(tmp_path / "project", {"exp_dir": "runs/x/exp"}, serving={"port": 8123})
    seen = {}
    monkeypatch.setattr("pillsnap.infer.artefacts.find_checkpoints", lambda exp_dir: seen.update(exp=exp_dir))
    monkeypatch.setattr("pillsnap.serve.cli.build_service", lambda exp_dir, cfg, device=None: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(port=port))
    monkeypatch.delenv("PILLSNAP_API_KEY", raising=False)
    assert main(["serve", "--exp", str(exp)]) == 0
    assert seen == {"exp": exp, "port": 8123}


def test_evaluate_an_old_run_with_relative_paths_from_another_directory(tmp_path, elsewhere, monkeypatch,
                                                                        manifest_dir):
    project = tmp_path / "project"
    exp = saved_run(project, {"exp_dir": "runs/x/exp", "manifest_dir": "runs/x/manifests"})
    shutil.copytree(manifest_dir, project / "runs" / "x" / "manifests")
    seen = {}

    class Evaluated(Exception):
        pass

    def evaluate_stage(cfg, exp_dir, **kwargs):  # the config it was given is all this test is about
        seen.update(manifests=cfg.paths.manifest_dir, exp=cfg.paths.exp_dir,
                    stage=cfg.data.progressive_validation.current_stage)
        raise Evaluated

    monkeypatch.setattr("pillsnap.eval.stage_eval.evaluate_stage", evaluate_stage)
    with pytest.raises(Evaluated):
        main(["evaluate", "--exp", str(exp), "--stage", "2"])
    assert seen == {"manifests": str(project / "runs" / "x" / "manifests"), "exp": str(exp), "stage": 2}


def test_an_old_run_whose_data_is_gone_names_the_missing_path(tmp_path, elsewhere, caplog):
    from pillsnap.config import load_run_config

    exp = saved_run(tmp_path / "project", {"exp_dir": "runs/x/exp", "manifest_dir": "runs/x/manifests"})
    with pytest.raises(ConfigError, match=r"paths.manifest_dir .*runs/x/manifests does not exist .*'runs/x/manif"):
        load_run_config(exp, required=("manifest_dir",))
    assert main(["evaluate", "--exp", str(exp)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "paths.manifest_dir" in errors[0] and "\n" not in errors[0]


def test_command_line_settings_beat_stage_overrides(caplog):
    from pillsnap.config import apply_stage_overrides

    with caplog.at_level(logging.INFO, logger="pillsnap.config"):
        cfg = load_config(REPO / "config.yaml", ["data.progressive_validation.current_stage=3",
                                                 "optimization.torch_compile=none"], dotenv_path=None)
    staged = apply_stage_overrides(cfg, 3)
    assert staged.optimization.torch_compile == "none"  # the stage's max-autotune was skipped
    assert staged.optimization.channels_last is True  # the stage's other override still applies
    assert "stage_3.compile_mode -> optimization.torch_compile" in caplog.text
    plain = apply_stage_overrides(load_config(REPO / "config.yaml", dotenv_path=None), 3)
    assert plain.optimization.torch_compile == "max-autotune"  # nothing explicit: the stage decides


def test_data_root_from_the_environment_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("PILLSNAP_DATA_ROOT", str(tmp_path / "aihub"))
    assert load_config(None, dotenv_path=None).paths.data_root == str(tmp_path / "aihub")
    cli = load_config(None, [f"paths.data_root={tmp_path / 'other'}"], dotenv_path=None)
    assert cli.paths.data_root == str(tmp_path / "other")


def test_a_stage_manifest_leaves_the_other_stages_pre_flight_intact(manifest_dir, tmp_path, capsys):
    from pillsnap.data.manifest_check import check_stage_manifest

    manifests = tmp_path / "manifests"
    shutil.copytree(manifest_dir, manifests)
    overrides = [f"paths.manifest_dir={manifests}", "data.progressive_validation.stage_1.max_classes=4",
                 f"data.progressive_validation.stage_3.max_classes={SYNTH_CLASSES}"]
    for stage in ("1", "3"):
        assert main(["data", "manifest", "--stage", stage, *overrides]) == 0
    assert (manifests / "stage3" / "manifest_train.csv").is_file() and not (manifests / "manifest_train.csv").exists()
    cfg = load_config(None, overrides, dotenv_path=None)
    for stage in (1, 3):
        failed = [f.line() for f in check_stage_manifest(cfg, stage) if not f.ok]
        assert not failed, failed


def test_pre_flight_stops_a_stage_whose_gate_needs_more_classes_than_the_data_holds(manifest_dir, capsys):
    """Stage 3's gate fails a run that trained fewer than min_class_coverage (800) classes: the pre-flight says so
    before hours of training, and at stage 1, where only a time-capped run needs them, it only notes it."""
    from pillsnap.eval.criteria import needs_class_minimum

    assert [needs_class_minimum(stage) for stage in (1, 2, 3, 4)] == [False, False, True, True]
    script = REPO / "scripts" / "stage3" / "validate_stage3_manifest.py"
    sized = [f"paths.manifest_dir={manifest_dir}", f"data.progressive_validation.stage_3.max_classes={SYNTH_CLASSES}"]
    proc = subprocess.run([sys.executable, str(script), "--stage", "3", *sized], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (f"FAIL stage classes: {SYNTH_CLASSES} classes to train, the stage's gate needs 800 (min_class_coverage"
            in proc.stdout), proc.stdout
    assert "stage_3.min_class_coverage" in proc.stdout
    rehearsal = subprocess.run([sys.executable, str(script), "--stage", "3", *sized,
                                f"data.progressive_validation.stage_3.min_class_coverage={SYNTH_CLASSES}"],
                               capture_output=True, text=True, timeout=120)
    assert rehearsal.returncode == 0 and "OK   stage classes" in rehearsal.stdout, rehearsal.stdout
    stage1 = subprocess.run([sys.executable, str(script), "--stage", "1", f"paths.manifest_dir={manifest_dir}",
                             f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}"],
                            capture_output=True, text=True, timeout=120)
    assert stage1.returncode == 0, stage1.stdout
    assert "a run the time cap stops needs 30 (min_class_coverage)" in stage1.stdout


def test_setup_venv_from_the_design_path_builds_the_root_venv(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts" / "core").mkdir(parents=True)
    for rel in ("scripts/setup_venv.sh", "scripts/core/setup_venv.sh"):
        shutil.copy2(REPO / rel, repo / rel, follow_symlinks=False)
    fake = tmp_path / "python3"  # stands in for the interpreter: records the venv it is asked to create
    fake.write_text('#!/usr/bin/env bash\nif [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python";'
                    f' echo "$3" >> "{tmp_path / "venvs"}"; fi\nexit 0\n', encoding="utf-8")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(repo / "scripts" / "core" / "setup_venv.sh")], cwd=tmp_path,
                          env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "venvs").read_text().split() == [str(repo / ".venv")]
    assert not (repo / "scripts" / ".venv").exists()


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").is_file(), reason="the scripts run the project's .venv")
def test_stage3_script_takes_a_relative_checkpoint_from_where_it_runs(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "c.pt").write_bytes(b"x")
    script = REPO / "scripts" / "stage3" / "train_stage3_two_stage.sh"
    # a bad key stops train.sh at its config check, after it has accepted the checkpoint
    proc = subprocess.run(["bash", str(script), "--skip-checks", "--checkpoint", "ckpt/c.pt", "train.nokey=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "no such file" not in proc.stderr and "Unknown config key 'train.nokey'" in proc.stderr, proc.stderr
    missing = subprocess.run(["bash", str(script), "--skip-checks", "--checkpoint", "ckpt/none.pt"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--checkpoint ckpt/none.pt: no such file" in missing.stderr


def test_demo_tiny_on_a_real_tree_keeps_the_tiny_models(tmp_path):
    from pillsnap.demo import demo_config

    args = argparse.Namespace(tiny=True, workdir=str(tmp_path), data_root=str(tmp_path / "aihub"), cfg="none.yaml",
                              overrides=[])
    cfg = demo_config(args)
    assert cfg.model.backbone == "test_efficientnet" and cfg.model.detector == "yolo11n"
    assert cfg.paths.data_root == str(tmp_path / "aihub") and cfg.model.pretrained is False
    default = demo_config(argparse.Namespace(**{**vars(args), "tiny": False, "data_root": None}))
    assert default.model.pretrained is False  # the demo never waits on the network


def test_debug_logging_leaves_out_pil_chunks(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from pillsnap.cli import configure_logging

    monkeypatch.setenv("PILLSNAP_LOG_LEVEL", "INFO")  # restored afterwards
    levels = {n: logging.getLogger(n).level for n in ("", "pillsnap", "PIL")}
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    try:
        configure_logging(level="DEBUG")
        with caplog.at_level(logging.DEBUG):
            Image.open(tmp_path / "a.png").load()
            logging.getLogger("pillsnap.x").debug("ours")
        assert "ours" in caplog.text and not [r for r in caplog.records if r.name.startswith("PIL")]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_the_readme_test_command_prints_the_summary_line():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = re.search(r"^\.venv/bin/python -m pytest[^\n#]*", readme, re.M)
    assert command, "README names no test command"
    args = command.group(0).split()[1:]
    proc = subprocess.run([sys.executable, *args, "tests/test_config.py", "-k", "precedence", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and re.search(r"\b1 passed", proc.stdout), proc.stdout[-2000:]
