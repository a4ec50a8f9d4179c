"""The scale rehearsal (bench/scale_rehearsal.py): every phase in its own process, a table with ratios against the
baseline shape measured in the same run, and JSON that parses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale_rehearsal.py"


def bench():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake(module, rows: int, seconds: float) -> list[dict]:
    return [{"phase": p, "rows": rows, "classes": rows // 100, "items": rows, "seconds": seconds, "cpu_s": seconds,
             "peak_rss_mib": 100.0, "tree_rss_mib": 120.0, "us_per_item": 1e6 * seconds / rows,
             "cpu_us_per_item": 1e6 * seconds / rows} for p in module.PHASES]


def test_table_has_a_row_per_phase_and_shape_with_the_ratio_against_the_baseline():
    module = bench()
    baseline = module.with_ratios(fake(module, 5000, 1.0), [])
    shape = module.with_ratios(fake(module, 500000, 150.0), baseline)  # 1.5x the baseline's time per item
    text = module.table(baseline + shape)
    for phase in module.PHASES:
        assert f"| 5000/50 | {phase} |" in text and f"| 500000/5000 | {phase} |" in text
    assert text.count("| baseline |") == len(module.PHASES)
    assert text.count("1.50x / 1.50x") == len(module.PHASES)
    failed = module.with_ratios([{"phase": "scan", "rows": 9, "classes": 3, "error": "phase scan failed"}], baseline)
    assert failed[0]["ratio"] is None and "failed: phase scan failed" in module.table(failed)


@pytest.mark.parametrize("argv", [["--rows", "10", "--classes", "20"], ["--rows", "10", "20", "--classes", "5"],
                                  ["--rows", "50000", "--classes", "10"]])
def test_impossible_shapes_are_refused_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench().parse_args(argv)
    assert exc.value.code == 2 and "--rows" in capsys.readouterr().err


def rehearse(tmp_path: Path, phases: tuple[str, ...]) -> tuple[str, dict]:
    work, out = tmp_path / "work", tmp_path / "scale.json"
    argv = [sys.executable, str(BENCH), "--rows", "120", "--classes", "6", "--baseline-rows", "120",
            "--baseline-classes", "6", "--backbone", "test_efficientnet", "--image-size", "32", "--batch-size", "4",
            "--steps", "1", "--batches", "2", "--val-cap", "8", "--workers", "1", "--work-dir", str(work),
            "--json", str(out), "--phases", *phases]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (work / "r120_c6").exists()  # data are deleted without --keep
    return done.stdout, json.loads(out.read_text())


def check(stdout: str, data: dict, phases: tuple[str, ...]) -> dict:
    for phase in phases:
        assert f"| 120/6 | {phase} | " in stdout
    assert "failed" not in stdout
    rows = {r["phase"]: r for r in data["baseline"]}
    assert set(rows) == set(phases)
    assert all(r["items"] > 0 and r["peak_rss_mib"] > 0 and r["seconds"] > 0 for r in rows.values())
    return rows


def test_the_data_phases_run_each_in_a_process_and_write_json(tmp_path):
    phases = ("synth", "scan", "manifest", "calibration")
    rows = check(*rehearse(tmp_path, phases), phases)
    assert rows["scan"]["items"] == rows["synth"]["items"]  # every written label was scanned
    assert rows["calibration"]["classes"] == 6


@pytest.mark.slow
def test_a_tiny_rehearsal_runs_every_phase(tmp_path):
    module = bench()
    rows = check(*rehearse(tmp_path, module.PHASES), module.PHASES)
    assert rows["export"]["head_classes"] == 6
