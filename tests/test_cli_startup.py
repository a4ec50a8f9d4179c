"""The command line starts fast: building the parser, every `--help`, and a real `pillsnap data scan` import
none of the heavy libraries (torch, ultralytics, FastAPI, timm).

Each check runs in a fresh interpreter, since this test process has long imported torch through other tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ultralytics", "fastapi", "timm")



def run_fresh(body: str, cwd: Path) -> dict:
    """Run `body` in a new interpreter (cwd `cwd`, this checkout first on the path) and return `result`, a dict
    that `body` may fill, with "heavy": the HEAVY modules loaded at the end (printed as the last stdout line)."""
    code = "\n".join(["import json, sys", "result = {}", textwrap.dedent(body),
                      f"result['heavy'] = [m for m in {HEAVY!r} if m in sys.modules]", "print(json.dumps(result))"])
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command the parser offers, e.g. ("data",), ("data", "scan"), ("train",)."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += command_paths(sub, prefix + (name,))
    return paths


def test_building_the_parser_imports_nothing_heavy(tmp_path):
    report = run_fresh("""
        import pillsnap.cli
        pillsnap.cli.build_parser()
    """, tmp_path)
    assert report["heavy"] == [], f"`import pillsnap.cli; build_parser()` imported {report['heavy']}"


def test_every_help_imports_nothing_heavy(tmp_path):
    from pillsnap.cli import build_parser

    paths = [(), *command_paths(build_parser())]
    assert ("data", "scan") in paths and ("serve",) in paths  # the walk found the nested commands
    report = run_fresh(f"""
        import contextlib, io, sys
        import pillsnap.cli
        result["per_command"] = {{}}
        for path in {paths!r}:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    code = pillsnap.cli.main([*path, "--help"])
                except SystemExit as exit_:
                    code = exit_.code
            loaded = [m for m in {HEAVY!r} if m in sys.modules]
            usage = "usage:" in out.getvalue()
            result["per_command"][" ".join(["pillsnap", *path, "--help"])] = {{"code": code, "heavy": loaded,
                                                                               "usage": usage}}
    """, tmp_path)
    for command, outcome in report["per_command"].items():
        assert outcome["code"] == 0 and outcome["usage"], f"`{command}` did not print help: {outcome}"
        assert outcome["heavy"] == [], f"`{command}` imported {outcome['heavy']}"
    assert report["heavy"] == []


def test_data_scan_imports_nothing_heavy(synth_root, tmp_path):
    out = tmp_path / "manifests"
    report = run_fresh(f"""
        import contextlib, io
        import pillsnap.cli
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            result["code"] = pillsnap.cli.main(["data", "scan", "--data-root", {str(synth_root)!r},
                                                "--out", {str(out)!r}, "--workers", "1"])
        result["report"] = json.loads(printed.getvalue())
    """, tmp_path)  # no config.yaml in tmp_path: built-in defaults
    assert report["code"] == 0 and report["report"]["records_kept"] > 0
    assert (out / "manifest.parquet").is_file()
    assert report["heavy"] == [], f"`pillsnap data scan` imported {report['heavy']}"
