"""The GPU check's training steps, all through pillsnap.engine's run_training: short interleaved runs with
torch.compile (reduce-overhead, max-autotune), the auto batch search, and a real OOM recovered."""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from gpu_check_steps import DESIGN_WARMUP_STEPS, Ctx, against

TRAIN_RESERVE_S = 35  # of a training step's budget: start-up, the last validation and checkpoint, exit
OOM_CAP_GB = 16  # the forced OOM caps this process's GPU memory at the design's 16 GB card


def recorder(ctx: Ctx) -> Any:
    """A training callback that keeps every step's times and every OOM event (the files keep only logged ones)."""
    from pillsnap.engine.callbacks import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.started, self.steps, self.ooms = None, [], []

        def on_train_start(self, info: dict) -> None:
            self.started = time.monotonic()

        def on_step_end(self, record: dict) -> None:
            self.steps.append({k: record[k] for k in ("task", "compute_time", "data_time", "n")})
            if len(self.steps) % 20 == 0:
                ctx.partial({"steps": len(self.steps), "task_figures": task_figures(self.steps, ctx.size.warmup)})

        def on_oom(self, event: dict) -> None:
            self.ooms.append({"action": event["action"], **event["state"]})

    return Recorder()


class LogTap:
    """Keeps (time, message) of the pillsnap logger's records while a run lasts."""

    def __init__(self) -> None:
        import logging

        self.records: list[tuple[float, str]] = []
        self.logger = logging.getLogger("pillsnap")
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda r: self.records.append((time.monotonic(), r.getMessage()))
        self.handler = handler
        self.logger.addHandler(handler)
        if self.logger.level in (logging.NOTSET,) or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)

    def find(self, *words: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.records if all(w in m.lower() for w in words)]


def task_figures(steps: list[dict], warmup: int) -> dict:
    """Per task: steps, first step, and the steady step time after the warm-up (or after half the steps when the run
    was shorter than the warm-up)."""
    out = {}
    for task in sorted({s["task"] for s in steps}):
        times = [s["compute_time"] for s in steps if s["task"] == task]
        skip = min(warmup, len(times) // 2) if len(times) > 1 else 0
        steady = statistics.median(times[skip:])
        n = statistics.median([s["n"] for s in steps if s["task"] == task])
        data = statistics.median([s["data_time"] for s in steps if s["task"] == task][skip:])
        out[task] = {"steps": len(times), "first_step_s": round(times[0], 3), "warmup_steps": skip,
                     "steady_step_ms": round(1000 * steady, 2), "steady_img_s": round(n / max(steady, 1e-9), 1),
                     "data_wait_ms": round(1000 * data, 2)}
    return out


def run_figures(trainer: Any) -> dict:
    """What the trained tasks ended up with: precision, compile, channels_last, TF32, fused AdamW, batch knobs."""
    import torch

    out: dict[str, Any] = {"tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                    "cudnn": torch.backends.cudnn.allow_tf32}}
    for name, task in trainer.tasks.items():
        convs = [p for p in task.raw_model.parameters() if p.ndim == 4]
        out[name] = {"precision": str(task.precision), "scaler": task.scaler.is_enabled(),
                     "compiled": hasattr(task.model, "_orig_mod"),
                     "channels_last": bool(convs) and convs[0].is_contiguous(memory_format=torch.channels_last),
                     "fused_adamw": bool(task.optimizer.defaults.get("fused")),
                     "batch_size": task.knobs.batch_size, "grad_accum": task.knobs.grad_accum}
    if torch.cuda.is_available():
        from pillsnap.utils import CUDA_PEAKS

        out["peak_cuda_gb"] = round(CUDA_PEAKS.peak_mb() * 2**20 / 1e9, 2)  # the training's, not the batch search's
    return out


def train_problems(ctx: Ctx, code: int, figures: dict, mode: str) -> list[str]:
    """What the run should show on a GPU and did not."""
    cls, det = figures.get("classification", {}), figures.get("detection", {})
    problems = [] if code in (0, 4) else [f"exit code {code}"]
    problems += [f"no {t} step trained" for t in ("classification", "detection")
                 if not figures.get("task_figures", {}).get(t, {}).get("steps")]
    if ctx.dry:
        return problems
    problems += [f"{t} precision is {f.get('precision')}, not autocast bfloat16" for t, f in (("classification", cls),
                 ("detection", det)) if f and f.get("precision") != "autocast bfloat16"]
    problems += [p for p, bad in (("classifier not in channels_last", not cls.get("channels_last")),
                                  ("TF32 off", not all(figures["tf32"].values())),
                                  (f"classifier not compiled ({mode})", not cls.get("compiled")),
                                  ("no 'compiling' message in the log", not figures.get("compiling_message")),
                                  ("compile fell back to eager", figures.get("compile_fell_back"))) if bad]
    return problems


def compile_figures(tap: LogTap, train_started: float | None, cls: dict) -> dict:
    """The engine's compile messages, and the compile time: from the "compiling" line to the first step (the
    compile and its warm-up happen while the task is built), plus what the first step took beyond a steady one."""
    compiling = tap.find("compiling")
    out: dict[str, Any] = {"compiling_message": compiling[0][1] if compiling else None,
                           "compile_fell_back": bool(tap.find("torch.compile", "failed")
                                                     or tap.find("falling back to eager"))}
    done = tap.find("torch.compile warm-up done in")
    if done:  # the engine's own figure for the compile and its warm-up step
        found = re.search(r"done in ([\d.]+) s", done[0][1])
        out["compile_warmup_s"] = float(found.group(1)) if found else None
    if compiling and train_started and cls:
        extra = cls["first_step_s"] - cls["steady_step_ms"] / 1000
        out["compile_s"] = round(train_started - compiling[0][0] + max(extra, 0.0), 1)
    return out


def train_run(ctx: Ctx, mode: str) -> dict:
    """A short interleaved run through run_training, stopped by the engine's own stage time cap."""
    import shutil

    from pillsnap.engine import run_training

    exp = ctx.work / f"exp_{mode.replace('-', '_')}"
    shutil.rmtree(exp, ignore_errors=True)
    cap_s = max(ctx.budget - TRAIN_RESERVE_S, 20)
    compile_mode = "none" if ctx.dry else mode  # the rehearsal runs the same plumbing, eager
    # The dry run stops after max_steps; on a GPU the engine's stage time cap ends the run (the epochs are a bound).
    steps = [f"train.max_steps_per_epoch={ctx.size.max_steps}", "train.epochs=1"] if ctx.size.max_steps else \
        ["train.epochs=100"]
    if mode == "max-autotune":  # Stage 3-4's mode, with gradients accumulated over two chunks (as after an OOM
        steps.append("train.grad_accum_steps=2")  # recovery), which CUDA graphs could not train
    cfg = ctx.cfg(exp, "train.strategy=interleaved", f"optimization.torch_compile={compile_mode}",
                  "optimization.channels_last=true", "train.classification.amp_dtype=bf16",
                  "train.detection.amp_dtype=bf16", "train.classification.tf32=true", "train.detection.tf32=true",
                  f"data.progressive_validation.stage_1.time_limit_hours={cap_s / 3600:.6f}", *steps)
    rec, tap = recorder(ctx), LogTap()
    t0 = time.monotonic()
    code, trainer = run_training(cfg, callbacks=[rec])
    if trainer is None:
        return {"ok": False, "exit_code": code, "error": "run_training could not start (see the log)"}
    figures = {"mode": compile_mode, "exit_code": code, "status": trainer.status, "time_cap_s": round(cap_s),
               "run_s": round(time.monotonic() - t0, 1), "setup_s": round((rec.started or t0) - t0, 1),
               "task_figures": task_figures(rec.steps, ctx.size.warmup), **run_figures(trainer),
               "exp_dir": str(exp)}
    cls = figures["task_figures"].get("classification", {})
    figures.update(compile_figures(tap, rec.started, cls))
    figures["problems"] = train_problems(ctx, code, figures, mode)
    if not ctx.dry and cls.get("steps", 0) <= DESIGN_WARMUP_STEPS:
        figures["note"] = (f"{cls.get('steps', 0)} classifier steps within the time cap, not more than the design's "
                           f"{DESIGN_WARMUP_STEPS}-step warm-up: the steady time is the median of the last half")
    figures["ok"] = not figures["problems"]
    det = figures["task_figures"].get("detection", {})
    figures["summary"] = (f"cls {cls.get('steady_step_ms')} ms/step ({cls.get('steady_img_s')} img/s, "
                          f"{cls.get('steps')} steps), det {det.get('steady_step_ms')} ms/step, "
                          f"compile {figures.get('compile_s', 'n/a')} s")
    return figures


def step_auto_batch(ctx: Ctx) -> dict:
    from pillsnap.engine import run_training

    exp = ctx.work / "exp_auto_batch"
    if ctx.dry:  # the CPU analogue: trials above 2x the configured batch raise the engine's fake OOM
        from pillsnap.engine.oom import FAKE_OOM_BATCH_ENV

        os.environ[FAKE_OOM_BATCH_ENV] = str(2 * ctx.size.batch)
    cfg = ctx.cfg(exp, "train.strategy=classification", "train.epochs=1", "optimization.torch_compile=none",
                  "train.classification.auto_batch_tune=true",
                  f"train.classification.auto_batch_max={ctx.size.auto_batch_max}")
    rec, tap = recorder(ctx), LogTap()
    code, trainer = run_training(cfg, memory_loaders(batches=1), callbacks=[rec])
    chosen = (trainer.auto_batch if trainer else {}).get("classification")
    trials = [m for _, m in tap.find("auto batch: bs=")]
    trained = [s["n"] for s in rec.steps]
    out = {"exit_code": code, "chosen": chosen, "trials": trials, "configured_batch": ctx.size.batch,
           "trained_batches": trained, "ooms_after_search": len(rec.ooms)}
    # The choice must hold: one step at the chosen batch right after the search, with no OOM.
    out["ok"] = (code == 0 and bool(chosen) and chosen["batch_size"] >= ctx.size.batch and not rec.ooms
                 and trained == [chosen["batch_size"]])
    if chosen:
        out["summary"] = (f"chose bs={chosen['batch_size']} accum={chosen['grad_accum']} after {chosen['trials']} "
                          f"trials (max {ctx.size.auto_batch_max}); a step at it: {bool(trained)}")
        out.update(against(chosen["batch_size"], 8, True))  # the design's batch_size_achieved >= 8
    return out


def memory_loaders(batches: int) -> Callable[[Any], Any]:
    """build_loaders for memory checks: one random batch of train.batch_size images at model.image_size, served
    `batches` times from host memory (no decoding: the step's time goes to the GPU), no validation split."""
    import torch
    from torch.utils.data import DataLoader

    from pillsnap.data.loaders import Loaders

    names = [f"K-{i:06d}" for i in range(8)]
    meta = {"num_classes": len(names), "class_names": names, "class_weights": None, "stage": 1,
            "class_map": {c: {"index": i, "mapping_code": c, "name": f"drug {i}"} for i, c in enumerate(names)}}

    def build(cfg: Any) -> Any:
        n, size = int(cfg.train.batch_size), int(cfg.model.image_size)
        batch = (torch.randn(n, 3, size, size), torch.randint(0, len(names), (n,)), {"image_path": [""] * n})
        return Loaders(DataLoader([batch] * batches, batch_size=None), None, None, None, None, None, meta)

    return build


def step_oom_recovery(ctx: Ctx) -> dict:
    import torch

    from pillsnap.engine import run_training

    if ctx.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(OOM_CAP_GB * 1e9 / total, 1.0))
    else:  # the CPU analogue: the engine's fake OOM at the first micro-step
        from pillsnap.engine.oom import FAKE_OOM_ENV

        os.environ[FAKE_OOM_ENV] = "0"
    exp = ctx.work / "exp_oom"
    cfg = ctx.cfg(exp, "train.strategy=classification", "train.epochs=1", f"train.batch_size={ctx.size.oom_batch}",
                  "optimization.torch_compile=none", "train.classification.auto_batch_tune=false",
                  "train.oom.max_retries=8", "train.oom.max_grad_accum=64", "train.oom.cooldown_sec=0",
                  f"train.oom.escalate_to_fp16={str(not ctx.dry).lower()}", "train.ema.enabled=false")
    rec, tap = recorder(ctx), LogTap()
    code, trainer = run_training(cfg, memory_loaders(batches=3), callbacks=[rec])
    applied = [e for e in rec.ooms if e["action"] == "applied"]
    errors = [m for _, m in tap.find("oom recovery")]
    final = applied[-1] if applied else {}
    out = {"exit_code": code, "batch": ctx.size.oom_batch, "memory_cap_gb": None if ctx.dry else OOM_CAP_GB,
           "events": rec.ooms, "log": errors[:6], "steps_trained": len(rec.steps),
           "real_oom": bool(errors) and not any("fake" in m for m in errors)}
    out["ok"] = (code == 0 and len(rec.steps) == 3 and final.get("batch_size", ctx.size.oom_batch) < ctx.size.oom_batch
                 and (ctx.dry or out["real_oom"]))
    out["summary"] = (f"{len(applied)} recoveries, bs {ctx.size.oom_batch} -> {final.get('batch_size')} x accum "
                      f"{final.get('grad_accum')}, {len(rec.steps)}/3 steps trained")
    return out


if __name__ == "__main__":  # a part of bench/gpu_check.py, not a command of its own
    print(__doc__.strip() + "\n\nRun the GPU check with: bash bench/gpu_check.sh [--dry-run] (--help for more)")
    sys.exit(0 if sys.argv[1:] in ([], ["-h"], ["--help"]) else 2)
