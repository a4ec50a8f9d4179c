"""The dashboard's first read of a long metrics stream: peak memory and time of one `LiveRun.refresh()` over a
metrics.jsonl of --mb MB (step records as the trainer writes them), read in bounded bites (stream.READ_LIMIT, now)
against the whole file at once (the reader before), each in its own process, same file, same run.

    .venv/bin/python bench/monitor_first_load.py [--mb 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import os, resource, sys, time
from pillsnap.monitor import stream
from pillsnap.monitor.live import LiveRun
if sys.argv[2] == "whole":  # the reader before: everything at once
    stream.READ_LIMIT = os.path.getsize(os.path.join(sys.argv[1], "reports", "metrics.jsonl")) + 1
start = time.perf_counter()
live = LiveRun(sys.argv[1])
live.refresh()
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, live.state.records)
"""


def write_stream(path: Path, megabytes: int) -> int:
    path.parent.mkdir(parents=True)
    lines, size, steps = 0, 0, 1000
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"type": "start", "time": 0.0, "tasks": ["classification", "detection"], "epochs": 30,
                             "stage": 3, "start_epoch": 0}) + "\n")
        while size < megabytes << 20:
            i = lines
            for task in ("classification", "detection"):
                line = json.dumps({"type": "step", "time": 1.0 + i, "task": task, "epoch": 1 + i // steps,
                                   "max_epochs": 30, "step": i % steps + 1, "steps": steps, "global_step": i,
                                   "loss": 1.0 / (1 + i), "lr": 1e-3, "n": 32, "data_time": 0.01,
                                   "compute_time": 0.2, "throughput": 150.0, "cuda_mem": 12000.0}) + "\n"
                fh.write(line)
                size += len(line)
            lines += 1
    return lines * 2 + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = write_stream(Path(tmp) / "reports" / "metrics.jsonl", args.mb)
        print(f"metrics.jsonl: {args.mb} MB, {records} records")
        out = {}
        for way in ("whole", "bites", "whole", "bites"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, tmp, way], capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(done.stderr)
            line = done.stdout.split()
            seconds, peak_mb, applied = float(line[0]), float(line[1]), int(line[2])
            assert applied == records, (applied, records)
            out.setdefault(way, []).append((seconds, peak_mb))
            print(f"  {way:5s}: refresh {seconds:.2f} s, peak RSS {peak_mb:.0f} MB "
                  f"(process {time.perf_counter() - started:.1f} s)")
        whole, bites = (min(p for _, p in out[w]) for w in ("whole", "bites"))
        t_whole, t_bites = (min(s for s, _ in out[w]) for w in ("whole", "bites"))
        print(f"peak RSS: whole file {whole:.0f} MB vs bites {bites:.0f} MB ({whole / bites:.2f}x); "
              f"time {t_whole:.2f} s vs {t_bites:.2f} s ({t_whole / t_bites:.2f}x)")


if __name__ == "__main__":
    main()
