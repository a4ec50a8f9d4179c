"""Do torchrun restarts reconnect? A two-rank gloo job whose rank 1 exits in the first attempt, restarted once by
`torchrun --max-restarts 1`, run --runs times as launched by default and as many with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (one rendezvous store per attempt instead of the agent's shared one, where a
restarted rank can read an address the previous attempt left: pytorch/pytorch#135712, #167288). Prints how many
jobs finished after their restart, each way, and the ratio.

    python bench/torchrun_restart.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One rank of the job: join (the default group and a second gloo group, as the trainer does), let rank 1 leave
# in the first attempt, then meet in both groups and leave cleanly.
RANK_SCRIPT = """
import datetime, os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
waits = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=2))
if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) == 0 and dist.get_rank() == 1:
    time.sleep(1)
    sys.exit(3)
dist.barrier()
dist.barrier(group=waits)
dist.destroy_process_group()
"""


def one_job(script: Path, separate_stores: bool, timeout: float) -> tuple[bool, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if separate_stores:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(script)]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        done = False
    return done, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="jobs each way (default 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a job may take (default 120)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "rank.py"
        script.write_text(RANK_SCRIPT, encoding="utf-8")
        results: dict[bool, list[tuple[bool, float]]] = {False: [], True: []}
        for _ in range(args.runs):  # alternated, so that both ways see the same machine load
            for separate in (False, True):
                results[separate].append(one_job(script, separate, args.timeout))
    print("| launch | jobs finished after their restart | median wall s |")
    print("|---|---|---|")
    for separate, label in ((False, "torchrun as it is (baseline)"),
                            (True, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")):
        done = [ok for ok, _ in results[separate]]
        walls = sorted(wall for _, wall in results[separate])
        print(f"| {label} | {sum(done)} of {len(done)} | {walls[len(walls) // 2]:.1f} |")
    base, fixed = (sum(ok for ok, _ in results[s]) for s in (False, True))
    print(f"finished with separate stores / as it is: {fixed} / {base}"
          + (f" = {fixed / base:.2f}x" if base else " (none finished as it is)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
