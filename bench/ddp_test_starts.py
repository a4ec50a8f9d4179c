"""How the DDP tests start their ranks: each rank a new interpreter ("spawn": torch, timm and the trainer imported
again, about 5 s of CPU per rank, two ranks per start) against forked from multiprocessing's fork server, which
imported them once (tests/fakes.run_ranks, the default). The same test files are run by pytest with
PILLSNAP_TEST_RANK_START set each way, the two alternating in the same run; each run must pass.

    .venv/bin/python bench/ddp_test_starts.py [--rounds 1] [--files tests/test_engine_ddp.py ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/test_engine_ddp.py", "tests/test_engine_ddp_start.py", "tests/test_engine_mid_epoch.py"]


def timed_run(method: str, files: list[str]) -> float:
    env = {**os.environ, "PILLSNAP_TEST_RANK_START": method}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"  {method:10s} {seconds:7.1f} s  {summary}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"ddp_test_starts: the {method} run failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, alternating (default 1)")
    parser.add_argument("--files", nargs="+", default=FILES, help="test files to run (default: the DDP tests)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"spawn": [], "forkserver": []}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}: {' '.join(args.files)}", flush=True)
        for method in ("spawn", "forkserver") if round_ % 2 == 0 else ("forkserver", "spawn"):
            times[method].append(timed_run(method, args.files))
    spawn, forked = sum(times["spawn"]), sum(times["forkserver"])
    print(f"spawn {spawn:.1f} s, fork server {forked:.1f} s: {spawn / forked:.2f}x faster, "
          f"{spawn - forked:.0f} s saved per run of these files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
