"""A run's own training (the engine alone: no calibration, reports or evaluation after it) with the code at
`--baseline-ref` vs the working tree, the same config, arms alternating, each in a fresh interpreter: whether a
change made training slower, told apart from a shared machine that is slower today (a demo's time moves by a
quarter with the machine alone).

The baseline is `git archive`d into a temporary folder (nothing checked out here) and put first on PYTHONPATH.

    .venv/bin/python bench/training_time_ab.py --exp runs/demo/exp --baseline-ref HEAD~5 [--epochs 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
from pillsnap.config.run import load_run_config
from pillsnap.engine.run import run_training
cfg = load_run_config(sys.argv[1], [f"paths.exp_dir={sys.argv[2]}", f"train.epochs={sys.argv[3]}",
                                    "train.resume=null", "train.stage_evaluation=false"])
start = time.perf_counter()
code, _ = run_training(cfg)
print("ELAPSED", time.perf_counter() - start, code)
"""


def extract(ref: str, into: Path) -> Path:
    """The tree at `ref` under `into` (via `git archive`)."""
    archive = into / "tree.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "archive", ref], cwd=REPO, stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def train_once(code_root: Path, exp: str, out: Path, epochs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run([sys.executable, "-c", CHILD, exp, str(out), str(epochs)], cwd=out.parent, env=env,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ELAPSED")]
    if done.returncode or not lines or lines[-1].split()[2] != "0":
        raise SystemExit(f"training with {code_root} failed:\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment whose config.yaml is trained again")
    parser.add_argument("--baseline-ref", required=True, help="git revision of the code before")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (Path(args.exp) / "config.yaml").is_file():
        parser.error(f"--exp {args.exp}: no config.yaml (train a run first, e.g. pillsnap demo)")
    if args.epochs < 1 or args.rounds < 1:
        parser.error("--epochs and --rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="pillsnap_ab_") as tmp:
        arms = {f"before ({args.baseline_ref})": extract(args.baseline_ref, Path(tmp)), "now": REPO}
        times: dict[str, list[float]] = {name: [] for name in arms}
        for round_ in range(args.rounds):
            for name in (list(arms) if round_ % 2 == 0 else list(arms)[::-1]):
                times[name].append(train_once(arms[name], str(Path(args.exp).resolve()),
                                              Path(tmp) / f"exp_{round_}_{name.split()[0]}", args.epochs))
    before, now = (statistics.median(times[name]) for name in arms)
    shown = "; ".join(f"{name}: {', '.join(f'{t:.1f}' for t in ts)} s" for name, ts in times.items())
    print(f"{args.epochs} epochs of {args.exp}'s training, {args.rounds} rounds alternating: {shown}; "
          f"now/before {now / before:.3f}x (medians {now:.1f} vs {before:.1f} s)")


if __name__ == "__main__":
    main()
