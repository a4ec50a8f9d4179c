"""The GPU check's shared pieces (sizes, the step context) and its non-training steps: environment, the CUDA tests,
the synthetic data set, latency against the design's targets, DDP. Run by bench/gpu_check.py, one step a process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DESIGN_WARMUP_STEPS = 100  # the design's torch.compile warm-up: steps before the step time counts as steady
TAIL = 2500  # characters of a failed step's log kept in the JSON

@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of a run: the design's on a GPU, tiny ones for the dry run."""

    backbone: str = "tf_efficientnetv2_s"
    image: int = 384
    detector: str = "yolo11m"
    det_image: int = 640
    batch: int = 32
    det_batch: int = 16
    classes: int = 40
    per_class: int = 50
    combos: int = 90
    photo_scale: float = 0.5  # of the 976x1280 AI Hub photo
    workers: int = 8
    warmup: int = DESIGN_WARMUP_STEPS
    max_steps: int | None = None  # per epoch; None: the engine's time cap ends the run
    reps: int = 50
    oom_batch: int = 256
    auto_batch_max: int = 512
    latency_classes: int = 5000  # the last stage's class count


DRY = Sizes(backbone="test_efficientnet", image=32, detector="yolo11n", det_image=64, batch=4, det_batch=2, classes=6,
            per_class=6, combos=9, photo_scale=0.125, workers=0, warmup=1, max_steps=2, reps=5, oom_batch=4,
            auto_batch_max=16, latency_classes=6)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Ctx:
    """What a step gets: its work dir, sizes, device, budget, and where it writes (partial) results."""

    def __init__(self, work: Path, dry: bool, budget: float, step: str) -> None:
        self.work, self.dry, self.budget, self.step = work, dry, budget, step
        self.size = DRY if dry else Sizes()
        self.device = "cpu" if dry else "cuda"
        self.data, self.manifests = work / "data", work / "manifests"

    def partial(self, figures: dict) -> None:
        """Figures so far: kept in the report if the step is killed at its budget."""
        write_json(self.work / "results" / f"{self.step}.partial.json", figures)

    def cfg(self, exp: Path, *overrides: str) -> Any:
        """The repo's config at this run's sizes, on the synthetic data, no stage evaluation or early stopping."""
        from pillsnap.config import load_config

        s = self.size
        base = [f"paths.data_root={self.data}", f"paths.manifest_dir={self.manifests}", f"paths.exp_dir={exp}",
                f"paths.cache_dir={self.work / 'cache'}", f"model.backbone={s.backbone}", f"model.image_size={s.image}",
                f"model.detector={s.detector}", f"model.det_image_size={s.det_image}", "model.pretrained=false",
                f"train.batch_size={s.batch}", f"train.detection.batch_size={s.det_batch}",
                f"dataloader.num_workers={s.workers}", f"dataloader.persistent_workers={str(s.workers > 0).lower()}",
                "dataloader.autotune_workers=false", "train.stage_evaluation=false",
                "train.early_stopping.enabled=false", "train.warmup_steps=10", "train.step_log_interval=1",
                "train.profile_interval=100000", "dataloader.prefetch_factor=2", "inference.imprint.enabled=false",
                "inference.hard_cases.enabled=false", "data.progressive_validation.stage_1.max_samples=1000000",
                f"data.progressive_validation.stage_1.max_classes={s.classes}",
                "data.progressive_validation.stage_1.allow_success_on_time_cap=true",
                "data.progressive_validation.stage_1.min_samples_required=0",
                "data.progressive_validation.stage_1.min_class_coverage=0"]
        return load_config(REPO / "config.yaml", [*base, *overrides], dotenv_path=None)


def step_environment(ctx: Ctx) -> dict:
    import importlib.metadata as md
    import platform
    import shutil

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(),
                           "c_compiler": shutil.which("gcc") or shutil.which("cc")}
    for pkg in ("timm", "ultralytics", "omegaconf", "triton", "onnxruntime", "rapidocr-onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if not torch.cuda.is_available():
        out.update(device="cpu", ok=ctx.dry, summary="no CUDA" + (" (dry run)" if ctx.dry else ""))
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(), tf32=p.major >= 8)
    out["ok"] = bool(out["bf16"])
    out["summary"] = (f"{p.name} x{out['gpus']}, {out['memory_gb']} GB, cc {out['capability']}, bf16 {out['bf16']}, "
                      f"torch {torch.__version__} CUDA {torch.version.cuda}")
    return out


def step_cuda_tests(ctx: Ctx) -> dict:
    import xml.etree.ElementTree as ET

    xml = ctx.work / "cuda_tests.xml"
    # Not the slow compile tests: the training steps compile the real models (max-autotune with accumulation).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "tests/test_engine_cuda.py", f"--junitxml={xml}"]
    xml.unlink(missing_ok=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(ctx.budget - 5, 5))
    if not xml.is_file():  # pytest stopped before running anything (collection, a missing package)
        return {"ok": False, "error": f"pytest exited {proc.returncode} without a report",
                "log_tail": (proc.stdout + proc.stderr)[-TAIL:]}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["tests_skipped"] = counts.pop("skipped")  # "skipped" says whether the step itself was skipped
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None
              or c.find("error") is not None]
    ran = counts["tests"] - counts["tests_skipped"]
    ok = proc.returncode == 0 and (ctx.dry or (ran > 0 and counts["tests_skipped"] == 0))
    out = {**counts, "passed": ran - counts["failures"] - counts["errors"], "failed_tests": failed, "ok": ok,
           "summary": f"{ran - len(failed)} passed, {len(failed)} failed, {counts['tests_skipped']} skipped"}
    if not ok:
        out["log_tail"] = (proc.stdout + proc.stderr)[-TAIL:]
    return out


def step_synthetic_data(ctx: Ctx) -> dict:
    import pandas as pd

    from pillsnap.data.scan import scan_dataset
    from pillsnap.data.synth import generate_dataset

    s, workers = ctx.size, (1 if ctx.dry else 0)
    made = generate_dataset(ctx.data, s.classes, s.per_class, s.combos, seed=0, image_scale=s.photo_scale,
                            workers=workers, progress=False)
    scan = scan_dataset(ctx.data, ctx.manifests, workers=workers, progress=False)
    rows = pd.read_parquet(ctx.manifests / "manifest.parquet")
    combo = rows[(rows.image_type == "combination") & (rows.split == "test")]
    photo = str((combo if len(combo) else rows).image_path.iloc[0])
    write_json(ctx.work / "photo.json", {"photo": photo, "scale": s.photo_scale})
    return {"ok": scan["records_kept"] > 0, "photos": made["single_images"] + made["combination_images"],
            "labels": scan["records_kept"], "classes": made["num_classes"], "pipeline_photo": photo,
            "summary": f"{made['single_images']} single + {made['combination_images']} combination photos, "
                       f"{scan['records_kept']} labels"}


def design_targets() -> dict[str, float]:
    """The design's latency/throughput targets, as pillsnap.eval.criteria keeps them."""
    defaults = {"classification.inference_time_ms": 10.0, "detection.inference_time_ms": 50.0,
                "production.inference_latency_ms": 30.0, "production.throughput_img_s": 200.0}
    try:
        from pillsnap.eval.criteria import STAGES

        kept = {t.path: t.threshold for stage in STAGES.values() for t in stage.targets}
    except ImportError:
        kept = {}
    return {path: float(kept.get(path, value)) for path, value in defaults.items()}


def median_ms(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    """Median wall time of `fn` over `reps` calls after a warm-up of a fifth as many (at least 3)."""
    for _ in range(max(reps // 5, 3)):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(times), 3)


def against(value: float, target: float, higher_is_better: bool = False) -> dict:
    met = value >= target if higher_is_better else value <= target
    return {"target": target, "meets_target": bool(met)}


def latency_models(ctx: Ctx, targets: dict, sync: Callable[[], None]) -> dict:
    """Classifier and detector alone, as built by pillsnap.models: fp32 in the contiguous (NCHW) layout, which is
    how the predictor runs them, and bf16; the classifier also in channels_last, the layout training uses, to say
    whether the predictor should switch."""
    import torch

    from pillsnap.models import build_classification_model, build_yolo_model
    from pillsnap.models.detector import postprocess_detections, raw_detector_output

    s, dev, out = ctx.size, ctx.device, {}
    classifier = build_classification_model(s.backbone, s.latency_classes, channels_last=False).to(dev).eval()
    bf16 = torch.autocast(ctx.device, dtype=torch.bfloat16)
    for batch in (1, 64):
        x = torch.randn(batch, 3, s.image, s.image, device=dev)
        reps = s.reps if batch == 1 else min(s.reps, 20)
        fp32 = median_ms(lambda x=x, m=classifier: m(x), reps, sync)
        with bf16:
            half = median_ms(lambda x=x, m=classifier: m(x), reps, sync)
        if batch == 1:
            out["classifier_b1"] = {"ms": fp32, "ms_bf16": half,
                                    **against(fp32, targets["classification.inference_time_ms"])}
        else:
            thr = round(64_000 / fp32, 1)
            out["classifier_b64"] = {"img_s": thr, "img_s_bf16": round(64_000 / half, 1),
                                     **against(thr, targets["production.throughput_img_s"], True)}
    classifier = classifier.to(memory_format=torch.channels_last)
    for batch, key in ((1, "classifier_b1"), (64, "classifier_b64")):
        x = torch.randn(batch, 3, s.image, s.image, device=dev).contiguous(memory_format=torch.channels_last)
        ms = median_ms(lambda x=x, m=classifier: m(x), s.reps if batch == 1 else min(s.reps, 20), sync)
        out[key].update({"ms_channels_last": ms} if batch == 1 else {"img_s_channels_last": round(64_000 / ms, 1)})
    del classifier
    det = build_yolo_model(s.detector, 1).to(dev).eval()
    x = torch.rand(1, 3, s.det_image, s.det_image, device=dev)
    fp32 = median_ms(lambda: postprocess_detections(raw_detector_output(det, x), 0.3, 0.5), s.reps, sync)
    with bf16:
        half = median_ms(lambda: postprocess_detections(raw_detector_output(det, x), 0.3, 0.5), s.reps, sync)
    out["detector_b1"] = {"ms": fp32, "ms_bf16": half, "includes": "NMS",
                          **against(fp32, targets["detection.inference_time_ms"])}
    return out


def latency_pipeline(ctx: Ctx, target: float, sync: Callable[[], None]) -> dict:
    """pillsnap.infer's Predictor in auto mode on a synthetic combination photo at the real photo size, with the
    checkpoints of the reduce-overhead run (the weights barely matter to the time; the route taken does)."""
    from PIL import Image

    from pillsnap.infer.pipeline import Predictor

    exp = ctx.work / "exp_reduce_overhead"
    photo_info = ctx.work / "photo.json"
    if not (exp / "checkpoints" / "classes.json").is_file() or not photo_info.is_file():
        return {"ok": False, "error": "no trained experiment (train_reduce_overhead did not finish)"}
    photo = json.loads(photo_info.read_text(encoding="utf-8"))
    image = Image.open(photo["photo"]).convert("RGB")
    image = image.resize((round(image.width / photo["scale"]), round(image.height / photo["scale"])))
    out = {"photo_size": list(image.size)}
    for label, imprint in (("pipeline_b1", False), ("pipeline_imprint_b1", True)):
        if imprint and (ctx.dry or not module_available("rapidocr_onnxruntime")):
            out[label] = {"skipped": "dry run" if ctx.dry else "rapidocr-onnxruntime not installed"}
            continue
        cfg = ctx.cfg(exp, f"inference.imprint.enabled={str(imprint).lower()}", "inference.calibration=true")
        predictor = Predictor(exp, cfg, ctx.device)
        predictor.warm_up()
        last: dict = {}
        ms = median_ms(lambda p=predictor, r=last: r.update(p.predict(image, mode="auto")), ctx.size.reps, sync)
        out[label] = {"ms": ms, "mode_used": last.get("mode_used"), "num_pills": last.get("num_pills"),
                      **against(ms, target)}
    return out


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def step_latency(ctx: Ctx) -> dict:
    import torch

    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if ctx.device == "cuda" else (lambda: None)
    targets = design_targets()
    with torch.inference_mode():
        out = latency_models(ctx, targets, sync)
        ctx.partial(out)
        try:
            out.update(latency_pipeline(ctx, targets["production.inference_latency_ms"], sync))
        except Exception as err:  # the model figures above still count
            out["pipeline_b1"] = {"error": f"{type(err).__name__}: {err}"}
    measured = [v for v in out.values() if isinstance(v, dict) and "meets_target" in v]
    out["ok"] = "ms" in out.get("pipeline_b1", {}) and len(measured) >= 4
    out["summary"] = ", ".join(f"{k} {v.get('ms', v.get('img_s'))}{'' if v['meets_target'] else ' (misses)'}"
                               for k, v in out.items() if isinstance(v, dict) and "meets_target" in v)
    return out


# The OOM drill of the DDP step: rank 1 runs out of memory (a fake OOM) at its 6th classifier step, in epoch 2 of
# 4-step epochs, in the first attempt only; torchrun --max-restarts 1 must bring the run to its end.
OOM_DRILL_ENV = "PILLSNAP_GPU_CHECK_OOM_DRILL"
OOM_DRILL_STEP = "5"


def ddp_rank(ctx: Ctx) -> None:
    """One torchrun rank of the DDP check; rank 0 writes what it saw."""
    from pillsnap.engine import run_training
    from pillsnap.engine.oom import FAKE_OOM_ENV

    drill = bool(os.environ.get(OOM_DRILL_ENV))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if drill and os.environ.get("LOCAL_RANK") == "1" and restarts == 0:
        os.environ[FAKE_OOM_ENV] = OOM_DRILL_STEP
    exp = ctx.work / ("exp_ddp_oom" if drill else "exp_ddp")
    overrides = ["train.strategy=interleaved", "optimization.torch_compile=none", "train.oom.cooldown_sec=0"]
    overrides += ["train.epochs=2", "train.max_steps_per_epoch=4"] if drill else ["train.epochs=1",
                                                                                    "train.max_steps_per_epoch=10"]
    code, trainer = run_training(ctx.cfg(exp, *overrides))
    if drill:  # every rank's exit, per attempt (a rank stopped by torchrun writes nothing)
        write_json(ctx.work / "results" / f"ddp_oom_attempt{restarts}_rank{os.environ.get('RANK')}.json",
                   {"exit_code": code})
    if trainer is not None and trainer.info.is_main:
        write_json(ctx.work / "results" / ("ddp_oom_rank0.json" if drill else "ddp_rank0.json"), {
            "exit_code": code, "world_size": trainer.info.world_size, "global_steps": trainer.state.global_step,
            "samples": {n: trainer.samples_seen(n) for n in trainer.tasks}, "restarts": restarts,
            "start_epoch": trainer.start_epoch, "knobs": {n: t.oom_state() for n, t in trainer.tasks.items()}})


def _torchrun(ctx: Ctx, procs: int, budget: float, drill: bool) -> tuple[dict, int | None, str, float]:
    """Run the DDP check's torchrun job; (rank 0's report, torchrun's exit code or None on a time-out, its log,
    wall seconds). On a time-out torchrun gets SIGTERM, which it passes to its ranks (they run in sessions of their
    own, out of reach of the step's process-group kill), then SIGKILL."""
    import shutil

    name = "ddp_oom_rank0.json" if drill else "ddp_rank0.json"
    for old in [ctx.work / "results" / name, *(ctx.work / "results").glob("ddp_oom_attempt*.json")]:
        old.unlink(missing_ok=True)
    if drill:
        shutil.rmtree(ctx.work / "exp_ddp_oom", ignore_errors=True)  # a fresh job, not the resume of an old one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           *(["--max-restarts=1"] if drill else []),
           str(Path(__file__).with_name("gpu_check.py")), "--ddp-rank", "--step", "ddp", "--work", str(ctx.work),
           "--budget-s", str(ctx.budget), *(["--dry-run"] if ctx.dry else [])]
    # one rendezvous store per attempt: with torchrun's shared one, restarted ranks may never reconnect
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **({OOM_DRILL_ENV: "1"} if drill else {})}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        log, code = proc.communicate(timeout=max(budget, 5))[0], proc.returncode
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            log = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0]
        code = None
    wall = round(time.monotonic() - t0, 1)
    rank0 = ctx.work / "results" / name
    return (json.loads(rank0.read_text(encoding="utf-8")) if rank0.is_file() else {}), code, log or "", wall


def step_ddp(ctx: Ctx) -> dict:
    """An interleaved run on every GPU under torchrun; then the OOM drill: rank 1 runs out of memory, the run stops
    with the recovery saved, torchrun restarts it once, and every rank resumes with the recovery applied. The drill
    must end within its share of the budget: a stopped rank that waited for NCCL's watchdog (10 minutes) before
    torchrun could restart the job would time out and fail it."""
    import torch

    procs = torch.cuda.device_count() if ctx.device == "cuda" else 2
    out, code, log, wall = _torchrun(ctx, procs, ctx.budget * 0.45, drill=False)
    out.update(processes=procs, torchrun_exit_code=code, wall_s=wall)
    out["ok"] = code == 0 and out.get("exit_code") == 0 and out.get("world_size") == procs
    if not out["ok"]:
        out["log_tail"] = log[-TAIL:]
    ctx.partial(out)
    drill, code, log, wall = _torchrun(ctx, procs, ctx.budget * 0.5 - 5, drill=True)
    first = [json.loads(f.read_text(encoding="utf-8"))["exit_code"]
             for f in sorted((ctx.work / "results").glob("ddp_oom_attempt0_rank*.json"))]
    start = {"batch_size": ctx.size.batch, "grad_accum": 1, "did_amp_escalate": False}
    drill.update(torchrun_exit_code=code, wall_s=wall, timed_out=code is None, stopped_with_3=3 in first,
                 recovered=drill.get("knobs", {}).get("classification") not in (None, start))
    drill["ok"] = (code == 0 and drill.get("exit_code") == 0 and drill.get("restarts") == 1
                   and drill.get("start_epoch") == 1 and drill["stopped_with_3"] and drill["recovered"])
    if not drill["ok"]:
        drill["log_tail"] = log[-TAIL:]
    out["oom_restart"] = drill
    out["summary"] = (f"{procs} ranks, {out.get('global_steps')} steps, exit {out.get('exit_code')}; OOM drill: "
                      f"restarts {drill.get('restarts')}, exit {drill.get('exit_code')}, {wall} s")
    out["ok"] = out["ok"] and drill["ok"]
    return out


if __name__ == "__main__":  # a part of bench/gpu_check.py, not a command of its own
    print(__doc__.strip() + "\n\nRun the GPU check with: bash bench/gpu_check.sh [--dry-run] (--help for more)")
    sys.exit(0 if sys.argv[1:] in ([], ["-h"], ["--help"]) else 2)
