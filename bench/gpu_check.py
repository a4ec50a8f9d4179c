"""The GPU check: every CUDA claim of the design measured once, each step time-boxed in its own process, into one
JSON (device, torch, and per check: ok, seconds, figures, error).

    Device run (one GPU, <= 8 min):   bash bench/gpu_check.sh          (see its --help: wheels, $OUT)
    CPU rehearsal at tiny shapes:     bash bench/gpu_check.sh --dry-run
    The steps and their budgets:      python bench/gpu_check.py --list

Steps run in the order below (latency before max-autotune, whose compile may use up whatever time is left). A step
that fails or overruns its budget is recorded and the next one still runs; once the overall budget is spent the rest
are recorded as "skipped: budget".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from gpu_check_steps import REPO, TAIL, write_json


class Step(NamedTuple):
    name: str
    budget_s: float  # on the GPU; the dry run's are in DRY_BUDGETS
    needs: tuple[str, ...]
    about: str


STEPS = (
    Step("environment", 20, (), "GPU name, memory, capability, torch/CUDA/cuDNN versions, bf16 support, toolchain"),
    Step("cuda_tests", 60, (), "pytest tests/test_engine_cuda.py (all skipped without CUDA)"),
    Step("synthetic_data", 40, (), "synthetic AI Hub photos (pillsnap.data.synth) scanned into manifests"),
    Step("train_reduce_overhead", 170, ("synthetic_data",),
         "run_training: EfficientNetV2-S@384 + YOLO11m@640 interleaved, bf16, TF32, channels_last, "
         "torch.compile reduce-overhead; compile time, steady step time after the design's 100-step warm-up"),
    Step("latency", 60, (), "classifier / detector / auto pipeline at batch 1 (median of 50 after warm-up), "
                            "classifier throughput at batch 64, each against the design's target"),
    Step("auto_batch", 40, (), "train.classification.auto_batch_tune against real GPU memory, then a step at "
                               "the chosen batch"),
    Step("oom_recovery", 40, (), "a real CUDA OOM (huge batch, memory capped at 16 GB) recovered by the step loop"),
    Step("ddp", 150, ("synthetic_data",), "torchrun --nproc_per_node=N interleaved run, then an OOM on rank 1 "
                                          "brought back by a torchrun restart (skipped with one GPU)"),
    Step("train_max_autotune", 200, ("synthetic_data",), "as train_reduce_overhead with torch.compile max-autotune "
                                                          "and gradients accumulated over 2 chunks (gets what is "
                                                          "left of the budget)"),
)
DRY_BUDGETS = {"environment": 30, "cuda_tests": 60, "synthetic_data": 30, "train_reduce_overhead": 60,
               "latency": 60, "auto_batch": 45, "oom_recovery": 45, "ddp": 150, "train_max_autotune": 60}
GPU_BUDGET_S = 440  # of the device run's 8 minutes; the rest is the shell script's set-up
MIN_START_S = 15  # a step is not started with less than this left
# ...and a training step not with less than this (its compile alone takes longer)
MIN_START_TRAIN_S = {"train_reduce_overhead": 60, "train_max_autotune": 90}


# ---- the orchestrator (imports nothing heavy) -------------------------------------------------------------------
def output_path(out: str | None) -> Path:
    """$OUT/gpu_check.json on the device machine, else --out, else runs/gpu_check.json."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return Path(out) if out else REPO / "runs" / "gpu_check.json"


def child_env(dry: bool) -> dict[str, str]:
    # No network on the device machine: nothing may wait on a download or a hub's time-out.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if dry:  # the rehearsal runs on the CPU even on a GPU machine, one thread per process on shared cores
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def run_child(step: Step, work: Path, dry: bool, timeout: float) -> dict:
    """One step in its own process group, killed at `timeout`; its result file, or what went wrong."""
    result, partial = work / "results" / f"{step.name}.json", work / "results" / f"{step.name}.partial.json"
    log = work / "logs" / f"{step.name}.log"
    for path in (result, partial):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--work", str(work),
           "--budget-s", f"{timeout:.0f}", *(["--dry-run"] if dry else [])]
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(dry),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out = {"ok": False, "error": f"timeout: still running after {timeout:.0f} s (its budget)",
                   "log_tail": tail(log), "log_key_lines": key_lines(log)}
            if partial.is_file():
                out["partial"] = json.loads(partial.read_text(encoding="utf-8"))
            return out
    if result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))
    return {"ok": False, "error": f"the step's process exited with code {rc} and no result", "log_tail": tail(log),
            "log_key_lines": key_lines(log)}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the step's whole process group (loader workers, compile workers, torchrun)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-TAIL:] if path.is_file() else ""


def key_lines(path: Path, limit: int = 30) -> list[str]:
    """The log lines that say where a killed step was (compile, OOM, errors), which a long tail of autotune output
    would otherwise push out of the tail."""
    if not path.is_file():
        return []
    words = ("compil", "oom", "error", "tasks:", "precision", "warm-up")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line[:300] for line in lines if any(w in line.lower() for w in words)][:limit]


def why_skip(step: Step, checks: dict, left: float, dry: bool) -> str | None:
    if not dry and checks.get("environment", {}).get("gpus") == 0:
        return "skipped: no GPU (on a CPU, run --dry-run)"
    for need in step.needs:
        if checks.get(need, {}).get("ok") is not True:
            return f"skipped: needs {need}"
    gpus = checks.get("environment", {}).get("gpus", 0)
    if step.name == "ddp" and gpus < 2:
        return "skipped: no GPU (dry run)" if dry else f"skipped: {gpus} GPU"
    least = MIN_START_S if dry else MIN_START_TRAIN_S.get(step.name, MIN_START_S)
    return "skipped: budget" if left < least else None


def run_all(args: argparse.Namespace) -> int:
    work = Path(args.work or REPO / "runs" / "gpu_check_work").resolve()
    for sub in ("results", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (sum(DRY_BUDGETS.values()) if args.dry_run
                                                                 else GPU_BUDGET_S)
    start, checks = time.monotonic(), {}
    print(f"gpu_check: {'DRY RUN on the CPU, tiny shapes' if args.dry_run else 'GPU run'}, budget {budget:.0f} s, "
          f"work dir {work}", flush=True)
    for i, step in enumerate(STEPS, 1):
        left = budget - (time.monotonic() - start)
        own = DRY_BUDGETS[step.name] if args.dry_run else step.budget_s
        if step.name == "train_max_autotune" and not args.dry_run:
            own = max(own, left)  # the last step takes what is left
        skip = why_skip(step, checks, left, args.dry_run)
        print(f"[{i}/{len(STEPS)}] {step.name}: " + (skip or f"running (budget {min(own, left):.0f} s)"), flush=True)
        t0 = time.monotonic()
        res = {"ok": None, "skipped": skip} if skip else run_child(step, work, args.dry_run, min(own, left))
        res["seconds"] = round(time.monotonic() - t0, 1)
        checks[step.name] = res
        if not skip:
            print(f"[{i}/{len(STEPS)}] {step.name}: {status(res)} in {res['seconds']} s  {res.get('summary', '')}"
                  + (f"  error: {res['error']}" if res.get("error") else ""), flush=True)
    report = make_report(checks, args.dry_run, budget, time.monotonic() - start)
    path = output_path(args.out)
    write_json(path, report)
    print_table(checks)
    print(f"gpu_check: {report['summary']} -> {path}", flush=True)
    return 0 if report["summary"]["failed"] == 0 else 1


def status(res: dict) -> str:
    return "skip" if res.get("skipped") else ("pass" if res.get("ok") else "FAIL")


def make_report(checks: dict, dry: bool, budget: float, seconds: float) -> dict:
    env = checks.get("environment", {})
    counts = {s: sum(status(c) == s for c in checks.values()) for s in ("pass", "FAIL", "skip")}
    return {"device": env.get("device", "unknown"), "torch": env.get("torch", "unknown"), "dry_run": dry,
            "budget_s": budget, "seconds": round(seconds, 1),
            "summary": {"passed": counts["pass"], "failed": counts["FAIL"], "skipped": counts["skip"]},
            "checks": checks}


def print_table(checks: dict) -> None:
    print(f"\n{'check':<22} {'status':<6} {'seconds':>8}  figures", flush=True)
    for name, res in checks.items():
        note = res.get("skipped") or res.get("summary") or res.get("error") or ""
        print(f"{name:<22} {status(res):<6} {res.get('seconds', 0):>8}  {str(note)[:110]}", flush=True)


def print_list(dry: bool) -> None:
    for i, step in enumerate(STEPS, 1):
        budget = DRY_BUDGETS[step.name] if dry else step.budget_s
        needs = f" (needs {', '.join(step.needs)})" if step.needs else ""
        print(f"{i}. {step.name:<22} {budget:>4.0f} s  {step.about}{needs}")


def step_functions() -> dict[str, Callable[[Any], dict]]:
    """Step name -> function(ctx) -> figures; imported only in a step's own process."""
    import gpu_check_steps as steps
    import gpu_check_train as train

    return {"environment": steps.step_environment, "cuda_tests": steps.step_cuda_tests,
            "synthetic_data": steps.step_synthetic_data,
            "train_reduce_overhead": lambda ctx: train.train_run(ctx, "reduce-overhead"),
            "latency": steps.step_latency, "auto_batch": train.step_auto_batch,
            "oom_recovery": train.step_oom_recovery, "ddp": steps.step_ddp,
            "train_max_autotune": lambda ctx: train.train_run(ctx, "max-autotune")}


def run_step(args: argparse.Namespace) -> int:
    """Child mode: run one step, write results/<step>.json; an exception is the step's failure, not the check's."""
    import logging
    import traceback

    from gpu_check_steps import Ctx, ddp_rank

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = Ctx(Path(args.work), args.dry_run, float(args.budget_s or 60), args.step)
    if args.ddp_rank:
        ddp_rank(ctx)
        return 0
    t0 = time.monotonic()
    try:
        out = step_functions()[args.step](ctx)
    except Exception as err:  # process boundary: the report names the error, the log keeps the traceback
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    out["step_s"] = round(time.monotonic() - t0, 1)
    write_json(ctx.work / "results" / f"{args.step}.json", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 steps, no compile")
    parser.add_argument("--out", default=None, help="JSON path when $OUT is unset (default runs/gpu_check.json)")
    parser.add_argument("--list", action="store_true", help="print the steps and their budgets, then exit")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"overall seconds (default {GPU_BUDGET_S} on a GPU; in a dry run the steps' sum)")
    parser.add_argument("--work", default=None, help="scratch dir (default runs/gpu_check_work)")
    parser.add_argument("--step", choices=[s.name for s in STEPS], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        print_list(args.dry_run)
        return 0
    if args.step:
        return run_step(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
