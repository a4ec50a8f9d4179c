"""The end-of-stage evaluation: gather what the run measured, measure what the stage criteria need and the run
does not record (latencies, per-class floors, model loading, ONNX export), decide (eval/gates.py), let the user
choose only where someone can answer, and report to reports/stage_{N}_evaluation.json, the log, TensorBoard and
the metrics stream the dashboard follows."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.criteria import stage_criteria
from pillsnap.eval.gates import stage_decision
from pillsnap.metrics.names import DETECTION_KEYS
from pillsnap.utils import append_jsonl, read_json, save_json

LOGGER = logging.getLogger(__name__)
LATENCY_SAMPLES = 40  # photos/crops timed per latency figure (after a few warm-up calls)
MEMORY_GROWTH_LIMIT = 1.10  # RSS at the last epoch over RSS at epoch 2: above this, memory is not stable


def evaluation_path(exp_dir: str | Path, stage: int) -> Path:
    return Path(exp_dir) / "reports" / f"stage_{stage}_evaluation.json"


def _read_stream(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest still counts
    return records


def p95_ms(seconds: list[float]) -> float | None:
    return round(float(np.percentile(seconds, 95)) * 1000, 2) if seconds else None


def _time_calls(fn: Callable[[Any], Any], inputs: list[Any], warmup: int = 3) -> list[float]:
    for item in inputs[:warmup]:
        fn(item)
    times = []
    for item in inputs[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return times


# ---- what the run recorded ------------------------------------------------------------------------------------------
def run_figures(summary: dict, stream: list[dict]) -> dict:
    """Figures from reports/metrics.json and metrics.jsonl: training throughput, data time, OOM, NaN, memory."""
    steps = [r for r in stream if r.get("type") == "step"]
    cls_thr = [r["throughput"] for r in steps if r.get("task") == "classification" and r.get("throughput")]
    losses = [r.get("loss") for r in steps] + [(summary.get("classification") or {}).get("val_loss")]
    rss = [h.get("rss_mb") for h in summary.get("history", []) if h.get("rss_mb")]
    growth = rss[-1] / rss[1] if len(rss) >= 3 else None  # epoch 2 on: the first epoch still allocates
    system = summary.get("system") or {}
    batch = (summary.get("batch") or {}).get("classification") or {}
    batch_size = batch.get("batch_size") or 0
    return {
        "throughput_img_s": float(np.median(cls_thr)) if cls_thr else None,
        "data_loading_s": float(np.mean([r["data_time"] for r in steps])) if steps else None,
        "repeated_oom": sum(1 for r in stream if r.get("type") == "oom" and r.get("action") != "applied"),
        "nan_loss": any(isinstance(v, float) and math.isnan(v) for v in losses if v is not None),
        "memory_growth": growth, "memory_stable": growth is None or growth <= MEMORY_GROWTH_LIMIT,
        "peak_rss_mb": system.get("peak_rss_mb"),
        "gpu_memory_gb": (system.get("peak_cuda_mem_mb") or 0) / 1024 if "cuda" in str(system.get("device")) else None,
        "batch_size": batch.get("batch_size"), "global_batch": batch_size * (batch.get("grad_accum") or 1),
        "samples_seen": batch.get("samples_seen"),
    }


# ---- what the stage needs measured now ----------------------------------------------------------------------------
def _load_models(cls_ckpt: Path, det_ckpt: Path | None) -> dict:
    """Both best checkpoints, loaded once for every measurement; a failure here is the loading check failing."""
    from pillsnap.models.classifier import load_classifier_for_inference
    from pillsnap.models.detector import load_detector_for_inference

    models = {"classifier": _safely("classifier loading", lambda: load_classifier_for_inference(cls_ckpt), None)}
    if det_ckpt is not None:
        models["detector"] = _safely("detector loading", lambda: load_detector_for_inference(det_ckpt), None)
    return models


def _classifier_figures(model: Any, loaders: Any) -> dict:
    import torch
    from sklearn.metrics import f1_score, recall_score

    from pillsnap.engine.classification import predict_classification

    out: dict[str, Any] = {}
    if loaders.cls_val is None:
        return out
    y_true, y_prob, _ = predict_classification(model, loaders.cls_val, torch.nn.CrossEntropyLoss(),
                                               torch.device("cpu"))
    y_pred = y_prob.argmax(axis=1)
    present = np.unique(y_true)
    out["per_class_min_f1"] = float(f1_score(y_true, y_pred, labels=present, average=None, zero_division=0).min())
    out["per_class_min_acc"] = float(recall_score(y_true, y_pred, labels=present, average=None,
                                                  zero_division=0).min())
    out["n_eval_samples"] = len(y_true)
    out["class_coverage"] = len(present) / max(int(loaders.meta["num_classes"]), 1)
    crops = [x[None] for batch in loaders.cls_val for x in batch[0]]
    with torch.no_grad():
        out["inference_time_ms"] = p95_ms(_time_calls(model, crops))
    return out


def _detector_figures(cfg: DictConfig, model: Any, loaders: Any) -> dict:
    import torch

    from pillsnap.engine.detection import prepare_batch
    from pillsnap.models.detector import postprocess_detections

    if loaders.det_val is None:
        return {}
    det = cfg.train.detection
    images = [img[None] for batch in loaders.det_val for img in prepare_batch(batch, torch.device("cpu"))["img"]]

    def detect(x: torch.Tensor) -> list:
        return postprocess_detections(model(x), float(det.conf_threshold), float(det.iou_threshold))

    with torch.no_grad():
        return {"inference_time_ms": p95_ms(_time_calls(detect, images))}


def _stage_rows(cfg: DictConfig) -> Any:
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage

    return select_stage(load_manifest(cfg.paths.manifest_dir), cfg)


def _pipeline_latency(cfg: DictConfig, exp_dir: Path, rows: Any) -> float | None:
    """p95 of the whole auto-mode pipeline (decode, classify, detect when routed) on the stage's val photos."""
    from pillsnap.data import read_image
    from pillsnap.infer.pipeline import Predictor

    photos = rows[rows["split"] == "val"].drop_duplicates("photo_id")["image_path"].tolist()
    if not photos:
        return None
    predictor = Predictor(exp_dir, cfg, device="cpu")
    images = [read_image(p) for p in photos[:LATENCY_SAMPLES + 3]]
    return p95_ms(_time_calls(lambda image: predictor.predict(image, "auto"), images))


def _onnx_exports(models: dict) -> bool:
    """Every loaded model exports to ONNX (into a temporary folder: this is a check, not the export command)."""
    from pillsnap.models.detector import detector_settings
    from pillsnap.models.export import export_classifier_onnx, export_detector_onnx

    if any(loaded is None for loaded in models.values()):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        model, snapshot = models["classifier"]
        export_classifier_onnx(model, Path(tmp) / "classifier.onnx", int(snapshot["model"]["image_size"]))
        if "detector" in models:
            model, snapshot = models["detector"]
            export_detector_onnx(model, Path(tmp) / "detector.onnx", detector_settings(snapshot)[1])
    return True


def _safely(name: str, fn: Callable[[], Any], default: Any) -> Any:
    """Run one measurement; a failure is a finding of the evaluation (logged with its cause), not a crash."""
    try:
        return fn()
    except Exception as err:  # any failure here is reported as the check failing, with its traceback at debug
        LOGGER.warning("stage evaluation: %s failed: %s: %s", name, type(err).__name__, err)
        LOGGER.debug("traceback of the failed %s", name, exc_info=True)
        return default


def _tensorboard_logged(exp_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in (exp_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            return True
    return False


def _class_balance(rows: Any) -> bool:
    """The stage's training classes are within 10:1 of each other (largest over smallest class)."""
    counts = rows[rows["split"] == "train"]["mapping_code"].value_counts()
    return bool(len(counts)) and bool(counts.max() / counts.min() <= 10)


def _corruption_rate(cfg: DictConfig) -> float:
    path = Path(cfg.paths.manifest_dir) / "scan_report.json"
    if not path.is_file():
        return 0.0
    report = read_json(path)
    skipped = report.get("skipped") or {}
    bad = sum(int(skipped.get(k, 0)) for k in ("bad_json", "unreadable", "missing_image"))
    return bad / max(int(report.get("label_files", 0)), 1)


# ---- the results the decision reads ---------------------------------------------------------------------------------
def _mandatory_checks(cfg: DictConfig, exp_dir: Path, summary: dict, run: dict, models: dict,
                      onnx_ok: Callable[[], bool], rows: Any) -> dict[str, bool | None]:
    """The current stage's mandatory checks (None: not something a training run can check). Each design check is
    a function, so only the stage's own run: parsing TensorBoard files or re-reading the manifest costs time."""
    import psutil

    status = summary.get("status")
    time_cap = (summary.get("stage") or {}).get("time_cap") or {}
    stage = int(cfg.data.progressive_validation.current_stage)
    enough_samples = (run["samples_seen"] or 0) >= int(cfg.data.progressive_validation[f"stage_{stage}"]
                                                       .min_samples_required)
    finished = status in ("completed", "early_stopped")
    checks: dict[str, Callable[[], bool | None]] = {
        "pipeline_complete": lambda: finished or bool(time_cap.get("success")),
        "classification_model_loading": lambda: models["classifier"] is not None,
        "detection_model_loading": lambda: models.get("detector") is not None,
        "onnx_conversion_success": onnx_ok,
        "auto_batch_tuning_success": lambda: bool(summary.get("auto_batch")),
        "tensorboard_logging": lambda: _safely("tensorboard check", lambda: _tensorboard_logged(exp_dir), False),
        "class_balance_verification": lambda: _safely("class balance", lambda: _class_balance(rows), False),
        "memory_optimization_working": lambda: (run["peak_rss_mb"] or 0) < 0.9 * psutil.virtual_memory().total / 2**20,
        "scalability_test_pass": lambda: enough_samples,
        "multi_batch_processing": lambda: run["global_batch"] >= 32,
        "memory_leak_test": lambda: run["memory_growth"] is not None and run["memory_stable"],
        "stability_test_pass": lambda: finished and not run["nan_loss"],
        "full_dataset_processing": lambda: enough_samples,
        "production_api_deployment": lambda: None, "cloudflare_tunnel_setup": lambda: None,
        "automated_monitoring": lambda: None,
    }
    return {name: checks[name]() for name in stage_criteria(stage).mandatory_checks}


def collect_results(cfg: DictConfig, exp_dir: str | Path, build_loaders: Callable[[DictConfig], Any] | None = None
                    ) -> dict:
    """The decision's input from a finished (or stopped) run of cfg's current stage."""
    from pillsnap.data import build_dataloaders_twostage

    exp_dir = Path(exp_dir)
    ckpts = exp_dir / "checkpoints"
    summary_path = exp_dir / "reports" / "metrics.json"
    if not summary_path.is_file() or not (ckpts / "classification_best.pt").is_file():
        raise FileNotFoundError(f"{exp_dir} holds no finished training run (reports/metrics.json and "
                                "checkpoints/classification_best.pt): train the stage first")
    summary = read_json(summary_path)
    run = run_figures(summary, _read_stream(exp_dir / "reports" / "metrics.jsonl"))
    loaders = (build_loaders or build_dataloaders_twostage)(cfg)
    det_ckpt = ckpts / "detection_best.pt" if (ckpts / "detection_best.pt").is_file() else None
    models = _load_models(ckpts / "classification_best.pt", det_ckpt)
    cls = _safely("classifier measurement", lambda: _classifier_figures(models["classifier"][0], loaders),
                  {}) if models["classifier"] else {}
    det = _safely("detector measurement", lambda: _detector_figures(cfg, models["detector"][0], loaders),
                  {}) if models.get("detector") else {}
    rows = _safely("stage rows", lambda: _stage_rows(cfg), None)
    latency = _safely("pipeline latency", lambda: _pipeline_latency(cfg, exp_dir, rows), None) if rows is not None \
        else None
    checks = _mandatory_checks(cfg, exp_dir, summary, run, models,
                               lambda: _safely("ONNX export", lambda: _onnx_exports(models), False), rows)
    detection = {k: (summary.get("detection") or {}).get(k) for k in DETECTION_KEYS} if det_ckpt else {}
    return {
        "classification": {**(summary.get("classification") or {}),
                           **{k: cls.get(k) for k in ("per_class_min_f1", "per_class_min_acc", "inference_time_ms")}},
        "detection": {**detection, "inference_time_ms": det.get("inference_time_ms")},
        "system": {"gpu_memory_gb": run["gpu_memory_gb"], "data_loading_s": run["data_loading_s"],
                   "peak_rss_mb": run["peak_rss_mb"]},
        "optimization": {"batch_size_achieved": run["batch_size"], "throughput_img_s": run["throughput_img_s"]},
        "scalability": {"multi_batch_size": run["batch_size"]},
        "production": {"inference_latency_ms": latency},
        "mandatory_checks": checks,
        "latency_p95_ms": latency if latency is not None else math.inf,
        "n_eval_samples": cls.get("n_eval_samples", 0), "class_coverage": cls.get("class_coverage", 0.0),
        "no_crashes": summary.get("status") != "oom_emergency_exit" and not run["nan_loss"],
        "memory_stable": run["memory_stable"], "repeated_oom": run["repeated_oom"], "nan_loss": run["nan_loss"],
        "data_corruption_rate": _corruption_rate(cfg), "time_cap": (summary.get("stage") or {}).get("time_cap"),
        "run_status": summary.get("status"),
    }


# ---- the user's choice ----------------------------------------------------------------------------------------------
def choose(decision: dict, choice: int | None = None, assume_yes: bool = False,
           ask: Callable[[str], str] | None = None) -> dict:
    """The user's option: `choice` (--choice N), 1 with `assume_yes` (--yes), asked only on an interactive terminal
    outside CI; otherwise option 1 is recorded as chosen by default. Never blocks a job without a person."""
    options = decision["advisor"]["user_options"]
    if choice is not None:
        if not 1 <= choice <= len(options):
            raise ValueError(f"--choice must be between 1 and {len(options)}, got {choice}")
        return {"option": choice, "text": options[choice - 1], "how": "--choice"}
    if assume_yes:
        return {"option": 1, "text": options[0], "how": "--yes"}
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not os.environ.get("CI")
    if not interactive and ask is None:
        how = "default (CI)" if os.environ.get("CI") else "default (no terminal to ask)"
        return {"option": 1, "text": options[0], "how": how}
    ask = ask or input
    for _ in range(3):
        answer = ask(f"Choose [1-{len(options)}] (Enter = 1): ").strip() or "1"
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return {"option": int(answer), "text": options[int(answer) - 1], "how": "asked"}
    return {"option": 1, "text": options[0], "how": "default (no valid answer)"}


def format_decision(decision: dict) -> str:
    """The block printed to the terminal and the log."""
    advisor = decision["advisor"]
    lines = [f"Stage {decision['stage']} evaluation: {decision['status']} ({decision['recommendation']}, "
             f"performance score {advisor['performance_score']:.3f})"]
    lines += [f"  reason: {r}" for r in decision["reasons"]] or ["  all checks and targets met"]
    lines += [f"  suggestion: {s}" for s in advisor["suggestions"][:3]]
    lines += [f"  {o}" for o in advisor["user_options"]]
    return "\n".join(lines)


# ---- the whole evaluation -------------------------------------------------------------------------------------------
def evaluate_stage(cfg: DictConfig, exp_dir: str | Path | None = None, choice: int | None = None,
                   assume_yes: bool = False, ask: Callable[[str], str] | None = None,
                   build_loaders: Callable[[DictConfig], Any] | None = None) -> dict:
    """Evaluate the run of cfg's current stage and write reports/stage_{N}_evaluation.json; returns the report."""
    from pillsnap.utils import TBWriter

    exp_dir = Path(exp_dir or cfg.paths.exp_dir)
    stage = int(cfg.data.progressive_validation.current_stage)
    path = evaluation_path(exp_dir, stage)
    previous = read_json(path) if path.is_file() else None
    baseline = (previous or {}).get("results")
    results = collect_results(cfg, exp_dir, build_loaders)
    decision = stage_decision(stage, results, baseline)
    LOGGER.info("%s", format_decision(decision))
    criteria = stage_criteria(stage)
    report = {**decision, "choice": choose(decision, choice, assume_yes, ask), "results": results,
              "baseline": None if baseline is None else {"classification.acc": (baseline.get("classification") or
                                                                                 {}).get("acc")},
              "criteria": {"mandatory_checks": list(criteria.mandatory_checks),
                           "targets": {t.path: t.threshold for t in criteria.targets}},
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(path, report)
    append_jsonl(exp_dir / "reports" / "metrics.jsonl", {
        "type": "stage_evaluation", "time": round(time.time(), 3), "stage": stage, "status": decision["status"],
        "recommendation": decision["recommendation"], "reasons": decision["reasons"],
        "performance_score": decision["advisor"]["performance_score"]})
    tb = TBWriter(exp_dir)
    tb.add_scalars({"stage/performance_score": decision["advisor"]["performance_score"],
                    "stage/go": float(decision["status"] == "GO")}, stage)
    tb.close()
    LOGGER.info("stage %d evaluation: %s -> %s (choice %d, %s)", stage, decision["status"], path,
                report["choice"]["option"], report["choice"]["how"])
    return report
