"""The Stage 3 scripts on demo-sized data: --help everywhere, the manifest validator, pre-flight failures that
say how to fix them, a short run through run_stage3_with_logs.sh with its logs and stage evaluation, and a crash
whose traceback reaches logs/train.err."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES

REPO = Path(__file__).resolve().parents[1]
STAGE3 = REPO / "scripts" / "stage3"
pytestmark = pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").is_file(),
                                reason="the scripts run the project's .venv (bash scripts/setup_venv.sh)")


def tiny(synth_root: Path, manifest_dir: Path, exp: Path) -> list[str]:
    return [f"paths.data_root={synth_root}", f"paths.manifest_dir={manifest_dir}", f"paths.exp_dir={exp}",
            f"paths.cache_dir={exp.parent / 'cache'}", "model.backbone=test_efficientnet", "model.image_size=32",
            "model.detector=yolo11n", "model.det_image_size=64", "model.pretrained=false", "train.batch_size=4",
            "train.detection.batch_size=2", "train.max_steps_per_epoch=2", "dataloader.num_workers=0",
            "dataloader.persistent_workers=false", "dataloader.pin_memory=false",
            f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}",
            "data.progressive_validation.stage_1.max_samples=1000"]


def run(*cmd: str, timeout: int = 600, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path is not None:  # a folder of stand-in commands first on the PATH
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    env.pop("PILLSNAP_LOG_LEVEL", None)
    return subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("script", "words"), [
    ("train_stage3_two_stage.sh", ("--epochs", "default 18", "--det-batch-size", "--checkpoint", "--resume")),
    ("run_stage3_with_logs.sh", ("--log-level",)),
    ("validate_stage3_manifest.py", ("--stage", "fix")),
])
def test_every_script_has_help(script, words):
    cmd = ("bash", str(STAGE3 / script)) if script.endswith(".sh") else (sys.executable, str(STAGE3 / script))
    proc = run(*cmd, "--help")
    assert proc.returncode == 0 and all(w in proc.stdout for w in words), proc.stdout


def test_the_validator_passes_a_good_manifest_and_explains_a_missing_one(manifest_dir, tmp_path):
    ok = run(sys.executable, str(STAGE3 / "validate_stage3_manifest.py"), "--stage", "1",
             f"paths.manifest_dir={manifest_dir}", f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}")
    assert ok.returncode == 0 and "FAIL" not in ok.stdout and "OK   splits: train" in ok.stdout
    missing = run(sys.executable, str(STAGE3 / "validate_stage3_manifest.py"), "--stage", "3", "--json",
                  f"paths.manifest_dir={tmp_path / 'none'}")
    findings = json.loads(missing.stdout)
    assert missing.returncode == 1 and findings[0]["ok"] is False and "pillsnap data scan" in findings[0]["fix"]


def test_pre_flight_stops_with_the_fix(synth_root, tmp_path):
    proc = run("bash", str(STAGE3 / "train_stage3_two_stage.sh"), "--stage", "1",
               *tiny(synth_root, tmp_path / "no_manifest", tmp_path / "exp"))
    assert proc.returncode == 2
    assert "PRE-FLIGHT FAILED" in proc.stderr and "fix: pillsnap data scan" in proc.stderr
    proc = run("bash", str(STAGE3 / "train_stage3_two_stage.sh"), "--min-free-gb", "100000000",
               *tiny(synth_root, tmp_path / "no_manifest", tmp_path / "exp"), "--skip-checks", "--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr


def fake_nvidia_smi(folder: Path, gpus: dict[str, str]) -> Path:
    """A stand-in nvidia-smi answering the pre-flight's memory query: one line per GPU of `gpus` (index -> "used,
    total"), or only those `-i` names."""
    folder.mkdir(exist_ok=True)
    lines = {index: f"{index}, {figures}" for index, figures in gpus.items()}
    every = "\\n".join(lines.values())
    picked = "".join(f"  *'-i {index} '*) printf '{line}\\n' ;;\n" for index, line in lines.items())
    fake = folder / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncase \"$* \" in\n{picked}  *index,memory.used,memory.total*) printf '{every}\\n' ;;"
                    "\n  *) exit 1 ;;\nesac\n", encoding="utf-8")
    fake.chmod(0o755)
    return folder


@pytest.mark.parametrize(("gpus", "visible", "said"), [
    ({"0": "512, 81559", "1": "20000, 81559"}, None,
     ("OK   GPU 0: 512 of 81559 MB used",
      "GPU 1 is already 24 % used (20000 of 81559 MB; the stage needs it under 20 %)")),
    ({"0": "[N/A], [N/A]"}, None, ("nvidia-smi gave no memory figures for GPU 0",)),
    ({"0": "70000, 81559", "1": "100, 81559"}, "1", ("OK   GPU 1: 100 of 81559 MB used",)),  # only the run's GPUs
    ({"0": "70000, 81559", "1": "100, 81559"}, "1,-1,0", ("OK   GPU 1: 100 of 81559 MB used",)),  # CUDA stops at -1
    ({"0": "70000, 81559"}, "MIG-4f6c2a1e-aaaa-bbbb-cccc-0123456789ab", ("NOTE GPU: MIG slices",)),
])
def test_pre_flight_wants_the_runs_gpus_under_a_fifth_used(manifest_dir, tmp_path, monkeypatch, gpus, visible, said):
    """The design's check before a stage: each GPU the run uses under 20 % used (another job on one would starve
    the run); the other GPUs of a shared machine are none of its business."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    # the run itself stops at once after the checks (TF32 set two ways), so that no training starts here
    proc = run("bash", str(STAGE3 / "train_stage3_two_stage.sh"), "--stage", "1", "--min-free-gb", "0",
               *tiny(tmp_path, manifest_dir, tmp_path / "exp"), "train.detection.tf32=false",
               path=fake_nvidia_smi(tmp_path / "bin", gpus))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    for words in said:
        assert words in out
    passed = "PRE-FLIGHT FAILED" not in out
    assert passed == (visible is not None), out
    assert ("GPU 0" in out) == (visible is None), out  # a GPU the run does not use is not checked
    if passed:
        assert "train.detection.tf32 (false) differ" in out  # the run started, and stopped on its config


@pytest.mark.slow
def test_a_short_stage_run_with_logs_and_its_evaluation(synth_root, manifest_dir, tmp_path):
    exp = tmp_path / "exp"
    proc = run("bash", str(STAGE3 / "run_stage3_with_logs.sh"), "--log-level", "DEBUG", "--stage", "1",
               "--epochs", "1", "--yes", "--min-free-gb", "0", *tiny(synth_root, manifest_dir, exp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = (exp / "logs" / "train.out").read_text(encoding="utf-8")
    assert "[train] e=1/1" in out and "Stage 1 evaluation:" in out
    assert "built yolo11n" in out  # a DEBUG line of pillsnap.models: the level reached every logger
    assert (exp / "logs" / "train.err").is_file()
    sessions = list((exp / "logs").glob("stage3_*.log"))
    assert len(sessions) == 1 and "pre-flight checks (stage 1)" in sessions[0].read_text(encoding="utf-8")
    report = json.loads((exp / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    assert report["status"] in ("GO", "NO_GO") and report["reasons"] and report["choice"]["how"] == "--yes"
    assert "train.sh: latest metrics: " + str(exp / "reports" / "metrics.json") in proc.stdout
    assert f"train.sh: training finished; stage 1 decision {report['status']} ({report['recommendation']}); " \
           f"next step: {report['action']}" in proc.stdout
    # --resume without --epochs keeps the run's own plan (1 epoch), not the script's default for a new run (18):
    # nothing is left to train, and the finished run stays as it was
    before = (exp / "reports" / "metrics.json").read_bytes()
    again = run("bash", str(STAGE3 / "train_stage3_two_stage.sh"), "--stage", "1", "--resume", "--yes",
                "--skip-checks", *tiny(synth_root, manifest_dir, exp))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "epochs=1 " in again.stderr and (exp / "reports" / "metrics.json").read_bytes() == before
    as_key = run("bash", str(STAGE3 / "train_stage3_two_stage.sh"), "--stage", "1", "--yes", "--skip-checks",
                 *tiny(synth_root, manifest_dir, exp), "train.resume=last")  # the resume as a config key
    assert as_key.returncode == 0 and "epochs=1 " in as_key.stderr


@pytest.mark.slow
def test_a_crash_traceback_reaches_train_err(synth_root, manifest_dir, tmp_path):
    exp = tmp_path / "exp"
    proc = run("bash", str(REPO / "scripts" / "train.sh"), *tiny(synth_root, manifest_dir, exp),
               "train.epochs=1", "train.strategy=classification", "train.interleave_ratio=[0,0]")
    assert proc.returncode == 1 and "see " + str(exp / "logs" / "train.err") in proc.stderr
    err = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in err and "interleave_ratio" in err


def test_train_sh_on_a_held_folder_stops_before_writing_to_its_logs(synth_root, manifest_dir, tmp_path):
    """train.sh appends the run's output to logs/train.out and train.err: a run refused by the engine would already
    have written its refusal into the other run's log; the script asks first."""
    from test_run_lock import hold_in_another_process

    exp = tmp_path / "exp"
    (exp / "logs").mkdir(parents=True)
    (exp / "logs" / "train.err").write_text("the running run's warnings\n", encoding="utf-8")
    holder = hold_in_another_process(exp / "run.lock")
    try:
        proc = run("bash", str(REPO / "scripts" / "train.sh"), *tiny(synth_root, manifest_dir, exp), "train.epochs=1")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"train.sh: {exp / 'run.lock'} is held by pid {holder.pid}" in proc.stderr
    assert (exp / "logs" / "train.err").read_text(encoding="utf-8") == "the running run's warnings\n"
    assert not (exp / "logs" / "train.out").exists()


@pytest.mark.parametrize(("status", "said"), [
    ("completed", "train.sh: interrupted after training; finish with the commands above"),
    ("interrupted", "train.sh: interrupted; resume with: bash {root}/scripts/train.sh --cfg {cfg} --epochs 3 "
                    "paths.exp_dir={exp} --resume"),
])
def test_train_sh_after_an_interrupt_says_resume_or_finish_as_the_run_did(tmp_path, status, said):
    """Exit 130 both ways: interrupted in training (resume), or in the work after it, where the checkpoints are
    whole and the run printed the commands that finish the steps left. The run is
    a stand-in for `python -m pillsnap.train` that writes its metrics.json and exits 130; the rest is the real
    script."""
    exp = tmp_path / "exp"
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "train.sh").write_text((REPO / "scripts" / "train.sh").read_text())
    fake = root / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ]; then\n'
                    f'  echo \'{{"status": "{status}"}}\' > {exp}/reports/metrics.json; exit 130\nfi\n'
                    f'exec {REPO / ".venv" / "bin" / "python"} "$@"\n')
    fake.chmod(0o755)
    # from another folder, with the config named relative to it: the resume line works from anywhere
    (tmp_path / "work").mkdir()
    shutil.copy(REPO / "config.yaml", tmp_path / "work" / "my.yaml")
    proc = subprocess.run(["bash", str(root / "scripts" / "train.sh"), "--cfg", "my.yaml", "--epochs", "3",
                           f"paths.exp_dir={exp}"], cwd=tmp_path / "work", capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == said.format(root=root, cfg=tmp_path / "work" / "my.yaml", exp=exp)


def test_the_python_scripts_run_under_the_projects_venv_when_started_with_another_python(tmp_path):
    """`python scripts/stage3/validate_stage3_manifest.py` (the docs' form) with a python outside the venv ended in
    a ModuleNotFoundError traceback; the script now starts again under .venv/bin/python."""
    import shutil

    other = shutil.which("python3", path="/usr/bin:/bin")
    if other is None or subprocess.run([other, "-c", "import pillsnap"], cwd=tmp_path,
                                       capture_output=True).returncode == 0:
        pytest.skip("no python without pillsnap on this machine")
    proc = subprocess.run([other, str(STAGE3 / "validate_stage3_manifest.py"), "--stage", "3", "--json",
                           f"paths.manifest_dir={tmp_path / 'none'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1 and json.loads(proc.stdout)[0]["check"] == "manifest"
