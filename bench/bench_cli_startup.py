"""CLI start-up: `pillsnap --help` and `pillsnap data scan --help` vs a bare `python -c pass`, wall time and peak
memory per process. Goals: each pillsnap command under 0.5 s and under 150 MB.

The baseline is measured in the same run: commands alternate round by round (after one unmeasured warm-up
round that fills the page cache) and medians are compared. Peak memory is each child's own max RSS, read with
os.wait4 when the platform has it, else from /usr/bin/time -f %M, else the RUSAGE_CHILDREN high-water mark
(an upper bound: it only rises). `import torch` is timed as a reference for what the lazy imports avoid.

    .venv/bin/python bench/bench_cli_startup.py [--runs 5] [--no-torch-reference]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 0.5
GOAL_MB = 150.0


def _pillsnap() -> list[str]:
    """The installed `pillsnap` script next to this interpreter (what users run), else `python -m pillsnap`."""
    script = Path(sys.executable).with_name("pillsnap")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pillsnap"]


def _maxrss_mb(kilobytes_or_bytes: int) -> float:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return kilobytes_or_bytes / 2**20 if sys.platform == "darwin" else kilobytes_or_bytes / 1024


def run_wait4(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, child's max RSS in MB) for one run, reaping the child with os.wait4 for its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return wall, _maxrss_mb(usage.ru_maxrss)


def run_gnu_time(argv: list[str]) -> tuple[float, float]:
    """Same, with /usr/bin/time reporting the peak (its own small start-up counts in the wall time)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        return wall, int(report.read().split()[-1]) / 1024


def run_children_rusage(argv: list[str]) -> tuple[float, float]:
    """Same, with the RUSAGE_CHILDREN high-water mark (the largest child so far: an upper bound)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, _maxrss_mb(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def pick_runner() -> tuple[str, object]:
    if hasattr(os, "wait4") and hasattr(os, "waitstatus_to_exitcode"):
        return "os.wait4 (per child)", run_wait4
    if shutil.which("/usr/bin/time"):
        return "/usr/bin/time -f %M", run_gnu_time
    return "RUSAGE_CHILDREN high-water mark (upper bound)", run_children_rusage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per command (after one warm-up)")
    parser.add_argument("--no-torch-reference", action="store_true", help="skip the `import torch` reference row")
    args = parser.parse_args()

    pillsnap = _pillsnap()
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "pillsnap --help": [*pillsnap, "--help"],
        "pillsnap data scan --help": [*pillsnap, "data", "scan", "--help"],
    }
    if not args.no_torch_reference:
        commands["python -c 'import torch' (reference)"] = [sys.executable, "-c", "import torch"]
    method, run = pick_runner()
    print(f"python {sys.version.split()[0]} at {sys.executable}; pillsnap = {' '.join(pillsnap)}")
    print(f"{args.runs} alternating runs per command after one warm-up round; peak memory via {method}; "
          f"cores: {os.cpu_count()}, load: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    for argv in commands.values():  # warm-up: page cache, .pyc files
        run(argv)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            wall, peak = run(argv)
            walls[name].append(wall)
            peaks[name].append(peak)

    base = statistics.median(walls["python -c pass (baseline)"])
    print()
    print(f"{'command':<38} {'median s':>9} {'min s':>7} {'x base':>7} {'max RSS MB':>11}  goal (<{GOAL_SECONDS} s, "
          f"<{GOAL_MB:.0f} MB)")
    for name in commands:
        median, peak = statistics.median(walls[name]), max(peaks[name])
        if name.startswith("pillsnap"):
            met = median < GOAL_SECONDS and peak < GOAL_MB
            goal = "met" if met else "NOT MET"
        else:
            goal = "-"
        print(f"{name:<38} {median:>9.3f} {min(walls[name]):>7.3f} {median / base:>7.2f} {peak:>11.1f}  {goal}")


if __name__ == "__main__":
    main()
