"""bench/gpu_check: the orchestrator's rules (output path, skips, budget, time-out) and the whole check as a CPU
dry run through bench/gpu_check.sh, whose JSON must hold every step with sane figures."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture
def gc(monkeypatch):
    """bench/gpu_check.py as a module (bench/ is a folder of scripts, not a package)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_check")


def test_the_json_goes_to_out_then_the_flag_then_runs(gc, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    assert gc.output_path(None) == REPO / "runs" / "gpu_check.json"
    assert gc.output_path(str(tmp_path / "x.json")) == tmp_path / "x.json"
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gc.output_path(str(tmp_path / "x.json")) == tmp_path / "out" / "gpu_check.json"


def test_skip_rules(gc):
    steps = {s.name: s for s in gc.STEPS}
    env_1gpu = {"environment": {"ok": True, "gpus": 1}, "synthetic_data": {"ok": True}}
    assert gc.why_skip(steps["train_reduce_overhead"], {"synthetic_data": {"ok": False}}, 400, False) == \
        "skipped: needs synthetic_data"
    assert gc.why_skip(steps["ddp"], env_1gpu, 400, False) == "skipped: 1 GPU"
    assert gc.why_skip(steps["ddp"], {**env_1gpu, "environment": {"gpus": 2}}, 400, False) is None
    assert gc.why_skip(steps["latency"], env_1gpu, 10, False) == "skipped: budget"
    # A compile run is not started on a budget its compile alone would overrun; the dry run has no compile.
    assert gc.why_skip(steps["train_max_autotune"], env_1gpu, 60, False) == "skipped: budget"
    assert gc.why_skip(steps["train_max_autotune"], env_1gpu, 60, True) is None
    # The GPU run on a machine without one stops after the environment step, saying what to run instead.
    no_gpu = {"environment": {"ok": False, "gpus": 0}}
    assert gc.why_skip(steps["cuda_tests"], no_gpu, 400, False) == "skipped: no GPU (on a CPU, run --dry-run)"


def test_list_names_every_step_in_order(gc, capsys):
    assert gc.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [s.name for s in gc.STEPS]


def test_a_spent_budget_skips_every_step_and_still_writes_the_report(gc, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "report.json"
    assert gc.main(["--dry-run", "--budget-s", "0", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["checks"]) == {s.name for s in gc.STEPS}
    assert all(c["ok"] is None and c["skipped"].startswith("skipped: ") for c in report["checks"].values())
    assert {n for n, c in report["checks"].items() if c["skipped"] == "skipped: budget"} == \
        {"environment", "cuda_tests", "synthetic_data", "latency", "auto_batch", "oom_recovery"}
    assert report["summary"] == {"passed": 0, "failed": 0, "skipped": len(gc.STEPS)}
    assert "check" in capsys.readouterr().out  # the summary table


def test_a_step_over_its_budget_is_killed_and_reported(gc, tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "logs").mkdir()
    step = next(s for s in gc.STEPS if s.name == "environment")
    res = gc.run_child(step, tmp_path, dry=True, timeout=0.2)  # importing torch alone takes longer
    assert res["ok"] is False and res["error"].startswith("timeout")


def test_steady_step_time_leaves_out_the_warm_up(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    train = importlib.import_module("gpu_check_train")
    steps = [{"task": "classification", "compute_time": t, "data_time": 0.01, "n": 32}
             for t in (30.0, 1.0, 0.1, 0.1, 0.1, 0.1)]
    figures = train.task_figures(steps, warmup=2)["classification"]
    assert figures["steps"] == 6 and figures["warmup_steps"] == 2 and figures["first_step_s"] == 30.0
    assert figures["steady_step_ms"] == 100.0 and figures["steady_img_s"] == 320.0
    # Fewer steps than the warm-up: the second half counts.
    assert train.task_figures(steps[:4], warmup=100)["classification"]["warmup_steps"] == 2


def _dry_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "PYTHON": sys.executable}


@pytest.mark.slow
def test_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work")], cwd=tmp_path, env=_dry_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    checks = report["checks"]
    assert report["device"] == "cpu" and report["dry_run"] is True and report["torch"]
    assert list(checks) == ["environment", "cuda_tests", "synthetic_data", "train_reduce_overhead", "latency",
                            "auto_batch", "oom_recovery", "ddp", "train_max_autotune"]
    for name, check in checks.items():
        assert check["ok"] is True or (check["ok"] is None and check["skipped"]), (name, check)
        assert check["seconds"] >= 0
    assert checks["ddp"]["skipped"] == "skipped: no GPU (dry run)"
    assert checks["cuda_tests"]["tests"] >= 1 and checks["cuda_tests"]["tests_skipped"] == checks["cuda_tests"]["tests"]
    for name in ("train_reduce_overhead", "train_max_autotune"):
        figures = checks[name]["task_figures"]
        assert figures["classification"]["steps"] == 2 and figures["detection"]["steps"] == 2
        assert figures["classification"]["steady_step_ms"] > 0 and checks[name]["exit_code"] == 0
    latency = checks["latency"]
    assert latency["classifier_b1"]["target"] == 10 and latency["detector_b1"]["target"] == 50
    assert latency["pipeline_b1"]["target"] == 30 and latency["classifier_b64"]["target"] == 200
    assert all(isinstance(latency[k]["meets_target"], bool) and (latency[k].get("ms") or latency[k].get("img_s")) > 0
               for k in ("classifier_b1", "classifier_b64", "detector_b1", "pipeline_b1"))
    assert checks["auto_batch"]["chosen"]["batch_size"] == 8 and checks["auto_batch"]["trained_batches"] == [8]
    oom = checks["oom_recovery"]
    assert oom["steps_trained"] == 3 and [e["batch_size"] for e in oom["events"] if e["action"] == "applied"] == [2]
    assert "status" in proc.stdout and f"-> {out}" in proc.stdout  # the summary table and where the JSON went


@pytest.mark.slow
def test_ddp_step_runs_two_cpu_ranks_under_torchrun(tmp_path):
    env = {**_dry_env(), "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    script = str(BENCH / "gpu_check.py")
    for step in ("synthetic_data", "ddp"):
        subprocess.run([sys.executable, script, "--step", step, "--work", str(tmp_path), "--dry-run",
                        "--budget-s", "300"], cwd=REPO, env=env, check=True, capture_output=True, timeout=400)
    res = json.loads((tmp_path / "results" / "ddp.json").read_text(encoding="utf-8"))
    assert res["ok"] is True, res
    assert res["world_size"] == 2 and res["processes"] == 2 and res["exit_code"] == 0
    # the OOM drill: rank 1 stopped the run (exit 3), torchrun restarted it once, both ranks resumed epoch 1 with
    # the recovery applied (S2, half the micro-batch and twice the accumulation: the state machine's first step
    # where fp16 would save nothing, as on a CPU without autocast or a GPU already in bf16) and finished
    drill = res["oom_restart"]
    assert drill["stopped_with_3"] and drill["restarts"] == 1 and drill["start_epoch"] == 1
    assert drill["exit_code"] == 0 and drill["torchrun_exit_code"] == 0
    knobs = drill["knobs"]["classification"]
    assert (knobs["grad_accum"], knobs["did_amp_escalate"]) == (2, False) and drill["recovered"]
