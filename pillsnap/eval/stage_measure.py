"""The figures a stage evaluation needs that training does not record: what the run's files say (throughput, data
time, OOM, NaN, memory, loss variance), and what is measured now on the best checkpoints (per-class floors over the
validation split, streamed; latencies on a bounded sample, on the evaluation's device; ONNX export) and the
mandatory checks built from them. eval/stage_eval.py assembles them into the decision's input."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.criteria import ADVISOR, GPU, stage_criteria
from pillsnap.eval.latency import SAMPLES, loader_items, measure, passes, take
from pillsnap.utils import read_json
from pillsnap.utils.run_status import COMPLETED_STATUSES, FINISHED_STATUSES, is_fresh_start

LOGGER = logging.getLogger(__name__)
PIPELINE_SAMPLES = 10  # photos timed through the whole pipeline (each one a detector and several classifier calls)


def read_stream(path: Path) -> list[dict]:
    """The records of metrics.jsonl that are this run's: from its last fresh start on (resumes included). Earlier
    runs in the same folder append to the same file, and their NaN losses, OOMs and throughput are not this run's."""
    if not path.is_file():
        return []
    records: list[dict] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest still counts
            if not isinstance(record, dict):
                continue
            if is_fresh_start(record):
                records.clear()
            records.append(record)
    return records


def safely(name: str, fn: Callable[[], Any], default: Any) -> Any:
    """Run one measurement; a failure is a finding of the evaluation (logged with its cause), not a crash."""
    try:
        return fn()
    except Exception as err:  # any failure here is reported as the check failing, with its traceback at debug
        LOGGER.warning("stage evaluation: %s failed: %s: %s", name, type(err).__name__, err)
        LOGGER.debug("traceback of the failed %s", name, exc_info=True)
        return default


# ---- what the run recorded ------------------------------------------------------------------------------------------
BEST_CHECKPOINTS = {"classification": "classification_best.pt", "detection": "detection_best.pt"}


def best_checkpoint_metrics(summary: dict, ckpt_dir: Path) -> dict:
    """metrics.json (`summary`) with each task's validation metrics taken from the epoch its best checkpoint holds
    (its history record), not from the last epoch: everything after training (calibration, the stage measurements,
    the final test, the export) uses the best checkpoints, and after an early stop the last epoch is not the best.
    `validated_epochs` names the epoch of each. A task whose checkpoint cannot be read or whose epoch is not in the
    history keeps the last epoch's metrics (said in the log)."""
    from pillsnap.engine.checkpointing import CUT_SHORT_METRICS
    from pillsnap.utils import load_ckpt

    out, epochs = dict(summary), {}
    for task, name in BEST_CHECKPOINTS.items():
        last, path = summary.get(task), Path(ckpt_dir) / name
        if not isinstance(last, dict) or not path.is_file():
            continue
        try:
            ckpt = load_ckpt(path, map_location="cpu", mmap=True)  # the weights are not read
            epoch = int(ckpt["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            LOGGER.warning("%s: cannot tell its epoch (%s); the last epoch's validation metrics stand for it", name,
                           err)
            continue
        # weights of an epoch the time cap cut short carry their own metrics: a resume that finished the epoch
        # recorded the whole epoch's under the same number
        record = (ckpt.get("task_state") or {}).get(CUT_SHORT_METRICS) or next(
            (h[task] for h in summary.get("history") or [] if h.get("epoch") == epoch and task in h), None)
        if record is None:
            LOGGER.warning("%s holds epoch %d, which metrics.json does not record; the last epoch's validation "
                           "metrics stand for it", name, epoch)
            continue
        out[task], epochs[task] = {k: record.get(k) for k in last}, epoch
        if epoch != summary.get("epoch"):
            LOGGER.info("%s validation metrics of epoch %d, the best checkpoint's (the last epoch was %s)", task,
                        epoch, summary.get("epoch"))
    out["validated_epochs"] = epochs
    return out


def loss_variance(steps: list[dict]) -> float | None:
    """Variance of the classifier's logged training loss over its last epoch (the design's convergence figure)."""
    cls = [r for r in steps if r.get("task", "classification") == "classification"]
    last = max((r.get("epoch", 0) for r in cls), default=None)
    losses = [r["loss"] for r in cls if r.get("epoch", 0) == last and isinstance(r.get("loss"), (int, float))
              and math.isfinite(r["loss"])]
    return float(np.var(losses)) if len(losses) >= 2 else None


def memory_peak_over_avg(steps: list[dict], history: list[dict]) -> float | None:
    """Peak over average memory. On a GPU, each step's peak CUDA memory, per task (the interleaved classifier and
    detector steps need different amounts, as they should; a spike is a step far above its own task's mean), the
    largest task's ratio; RSS per epoch otherwise."""
    by_task: dict[str, list[float]] = {}
    for r in steps:
        if (r.get("cuda_mem") or 0) > 0:
            by_task.setdefault(str(r.get("task")), []).append(float(r["cuda_mem"]))
    if by_task:
        return max(float(max(usage) / np.mean(usage)) for usage in by_task.values())
    usage = [h["rss_mb"] for h in history if h.get("rss_mb")]
    return float(max(usage) / np.mean(usage)) if usage else None


def run_figures(summary: dict, stream: list[dict]) -> dict:
    """Figures from reports/metrics.json and metrics.jsonl: training throughput, data time, OOM, NaN, memory."""
    steps = [r for r in stream if r.get("type") == "step"]
    cls_thr = [r["throughput"] for r in steps if r.get("task") == "classification" and r.get("throughput")]
    history = summary.get("history", [])
    # the logged steps, the validation loss, and each epoch's mean training loss, which a NaN step anywhere in the
    # epoch makes NaN (such a step is skipped, so the weights, and the later logged losses, stay finite)
    losses = ([r.get("loss") for r in steps] + [(summary.get("classification") or {}).get("val_loss")]
              + [h[t].get("train_loss") for h in history for t in ("classification", "detection")
                 if isinstance(h.get(t), dict)])
    rss = [h.get("rss_mb") for h in history if h.get("rss_mb")]
    growth = rss[-1] / rss[1] if len(rss) >= 3 else None  # epoch 2 on: the first epoch still allocates
    system = summary.get("system") or {}
    batch = (summary.get("batch") or {}).get("classification") or {}
    batch_size = batch.get("batch_size") or 0
    return {
        "throughput_img_s": float(np.median(cls_thr)) if cls_thr else None,
        "data_loading_s": float(np.mean([r["data_time"] for r in steps])) if steps else None,
        "repeated_oom": sum(1 for r in stream if r.get("type") == "oom" and r.get("action") != "applied"),
        "nan_loss": any(isinstance(v, float) and not math.isfinite(v) for v in losses if v is not None),
        # steps skipped for non-finite gradients without a loss scaler: each task's count in the last epoch it
        # trained (a task that stopped early is not in the last record)
        "skipped_steps": sum(next((int(h[t].get("skipped_steps") or 0) for h in reversed(history)
                                   if isinstance(h.get(t), dict)), 0) for t in ("classification", "detection")),
        "memory_growth": growth, "memory_stable": growth is None or growth <= ADVISOR.memory_growth_limit,
        "peak_rss_mb": system.get("peak_rss_mb"),
        "gpu_memory_gb": (system.get("peak_cuda_mem_mb") or 0) / 1024 if "cuda" in str(system.get("device")) else None,
        # per rank and over the job (a torchrun run's global batch is every rank's)
        "batch_size": batch.get("batch_size"), "rank_batch": batch_size * (batch.get("grad_accum") or 1),
        "global_batch": batch_size * (batch.get("grad_accum") or 1) * int(batch.get("world_size") or 1),
        "samples_seen": batch.get("samples_seen"), "classes_seen": batch.get("classes_seen"),
        "loss_variance": loss_variance(steps), "memory_peak_over_avg": memory_peak_over_avg(steps, history),
    }


# ---- what the stage needs measured now ----------------------------------------------------------------------------
def load_models(cls_ckpt: Path, det_ckpt: Path | None, device: Any) -> dict:
    """Both best checkpoints on `device`, loaded once for every measurement; a failure is the loading check
    failing."""
    from pillsnap.models.classifier import load_classifier_for_inference
    from pillsnap.models.detector import load_detector_for_inference

    models = {"classifier": safely("classifier loading", lambda: load_classifier_for_inference(cls_ckpt, str(device)),
                                   None)}
    if det_ckpt is not None:
        models["detector"] = safely("detector loading", lambda: load_detector_for_inference(det_ckpt, str(device)),
                                    None)
    return models


def _predictions(model: Any, loader: Any, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted classes over the whole loader, one batch in memory at a time; a batch whose every crop
    failed to decode (None: data.datasets.safe_collate said which) is skipped, as validation skips it."""
    import torch

    y_true: list[int] = []
    y_pred: list[int] = []
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            logits = model(batch[0].to(device))
            y_pred += logits.argmax(dim=1).tolist()  # lists: small arrays kept between batches fragment the heap
            y_true += np.asarray(batch[1]).tolist()
    return np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)


MIN_F1_CROPS = 5  # validation crops a class needs for its F1 to count in the lowest one


def per_class_floors(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """The lowest class F1 and accuracy of a validation pass, as the stage holds them to a floor.

    F1: the lowest over classes with at least MIN_F1_CROPS crops. Drugs seen mostly in combination photos have one
    or two validation crops, and one wrong answer gives such a class F1 0: the observed lowest over every class
    (`per_class_min_f1_observed`) is then 0 for nearly any classifier at 1,000 classes of uneven counts.
    Accuracy (a class's recall): with ~15 crops a class the lowest observed one measures the noise (a classifier
    right on 97 % of every class shows ~0.72 at 5,000 classes, bench/per_class_floor.py), so the floor is the lowest
    after empirical-Bayes shrinkage; the observed one is beside it."""
    from pillsnap.metrics.classification import per_class_rates, shrunken_rates

    present = np.unique(y_true)
    if not len(present):
        return {}
    size = max(int(y_true.max()), int(y_pred.max(initial=0))) + 1
    counts = np.bincount(y_true, minlength=size)
    right = np.bincount(y_true[y_true == y_pred], minlength=size)[present]
    f1 = per_class_rates(right, counts[present], np.bincount(y_pred, minlength=size)[present])[2]
    judged = counts[present] >= MIN_F1_CROPS
    return {"per_class_min_f1": float((f1[judged] if judged.any() else f1).min()),
            "per_class_min_f1_observed": float(f1.min()), "per_class_f1_classes": int(judged.sum()),
            "per_class_min_acc": float(shrunken_rates(right, counts[present]).min()),
            "per_class_min_acc_observed": float((right / counts[present]).min())}


def classifier_figures(model: Any, loaders: Any, device: Any) -> dict:
    """Per-class floors, samples and coverage over the validation split; latency per crop on a bounded sample."""
    import torch

    if loaders.cls_val is None:
        return {}
    y_true, y_pred = _predictions(model, loaders.cls_val, device)
    present = np.unique(y_true)
    available = len(loaders.cls_val.dataset)
    out: dict[str, Any] = {"n_eval_samples": len(y_true), "n_eval_available": available,
                           # the whole split is measured: what it lacks could not be decoded
                           "n_eval_undecodable": available - len(y_true),
                           "class_coverage": len(present) / max(int(loaders.meta["num_classes"]), 1)}
    if len(y_true) < available:
        LOGGER.warning("stage evaluation: %d of %d validation crops could not be decoded and are left out",
                       available - len(y_true), available)
    out.update(per_class_floors(y_true, y_pred))
    crops = take(loader_items(loaders.cls_val, lambda batch: (x[None].to(device) for x in batch[0])), SAMPLES)
    with torch.no_grad():
        out["latency"] = measure(model, crops, device, passes(device, GPU))
    return out


def detector_figures(cfg: DictConfig, model: Any, loaders: Any, device: Any) -> dict:
    """Latency per photo, NMS included, on a bounded sample of the validation photos."""
    import torch

    from pillsnap.engine.detection import prepare_batch
    from pillsnap.models.detector import postprocess_detections

    if loaders.det_val is None:
        return {}
    det = cfg.train.detection

    def photos(batch: dict) -> Any:
        return (img[None] for img in prepare_batch(batch, torch.device(device))["img"])

    def detect(x: torch.Tensor) -> list:
        return postprocess_detections(model(x), float(det.conf_threshold), float(det.iou_threshold))

    images = take(loader_items(loaders.det_val, photos), SAMPLES)
    with torch.no_grad():
        return {"latency": measure(detect, images, device, passes(device, GPU))}


def stage_rows(cfg: DictConfig) -> Any:
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage

    return select_stage(load_manifest(cfg.paths.manifest_dir), cfg)


def pipeline_latency(cfg: DictConfig, exp_dir: Path, rows: Any, device: Any) -> dict[str, Any] | None:
    """The whole auto-mode pipeline (decode, classify, detect when routed, read imprints) on a few of the stage's
    val photos: {"pipeline": its Latency, "pipeline_without_imprint": the same photos with imprint reading off
    (None where it is off anyway)}. The reads are ~130 ms of CPU each; the second figure says whether they are what
    misses the stage's target, so that the advice names them rather than the models."""
    from pillsnap.data import read_image
    from pillsnap.eval.pipeline_eval import without_hard_cases, without_imprint_reading
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.utils.images import DECODE_ERRORS

    photos, weights, kinds = _pipeline_photos(rows, int(cfg.train.seed))
    share, left = defaultdict(float), defaultdict(float)  # each kind's weight in the sample, and once read
    images, kept = [], []
    for path, weight, kind in zip(photos, weights, kinds, strict=True):
        share[kind] += weight
        try:
            images.append(read_image(path))
        except DECODE_ERRORS as err:  # a damaged photo is left out of the sample, not timed as a failure
            LOGGER.warning("stage evaluation: pipeline latency: skipped %s (%s)", path, err)
            continue
        kept.append((weight, kind))
        left[kind] += weight
    if not images:
        return None
    for kind in sorted(set(share) - set(left)):
        LOGGER.warning("stage evaluation: pipeline latency: no %s photo of the sample could be read; the p95 "
                       "leaves them out", kind or "unlabelled")
    # each kind keeps its share of the split: a skipped photo's weight goes to the others of its kind
    kept = [weight * share[kind] / left[kind] for weight, kind in kept]
    # hard cases not logged: a measurement's photos are not a user's (logging one costs a few ms, on hard cases only)
    cfg = without_hard_cases(cfg)

    def timed(settings: DictConfig, sets: bool = True) -> Any:
        predictor = Predictor(exp_dir, settings, device=str(device), sets=sets)
        return measure(lambda image: predictor.predict(image, "auto"), images, device, passes(device, GPU),
                       weights=kept)

    # without imprint reading the sets, calibrated with it, would be refused with a warning to recalibrate that is
    # about this measurement, not the run: that predictor has none
    return {"pipeline": timed(cfg), "pipeline_without_imprint": timed(without_imprint_reading(cfg), sets=False)
            if cfg.inference.imprint.enabled else None}


def _pipeline_photos(rows: Any, seed: int) -> tuple[list[str], list[float], list[str]]:
    """PIPELINE_SAMPLES validation photos, as many of each kind (single, combination) drawn at random, each
    weighted by its kind's share of the split (data.stages.sample_by_kind): the p95 is then the split's. Returns
    their paths, weights and kinds."""
    from pillsnap.data.stages import sample_by_kind

    val = rows[rows["split"] == "val"].drop_duplicates("photo_id")
    drawn, weights = sample_by_kind(val, PIPELINE_SAMPLES, seed)
    return (drawn["image_path"].astype(str).tolist(), weights.tolist(),
            drawn["image_type"].fillna("").astype(str).tolist())


def onnx_exports(models: dict) -> bool:
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


def tensorboard_logged(exp_dir: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in (exp_dir / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            return True
    return False


def class_imbalance(rows: Any) -> float | None:
    """Largest over smallest training class of the stage, counted over the rows the classifier trains on: the
    stage's rows also hold every pill of its combination photos, drugs outside the stage among them, one or two
    pills each, which would make any real stage look wildly unbalanced."""
    from pillsnap.data.stages import classification_rows

    rows = classification_rows(rows)
    counts = rows[rows["split"] == "train"]["mapping_code"].value_counts()
    return float(counts.max() / counts.min()) if len(counts) else None


def corruption_rate(cfg: DictConfig) -> float:
    path = Path(cfg.paths.manifest_dir) / "scan_report.json"
    if not path.is_file():
        return 0.0
    report = read_json(path)
    skipped = report.get("skipped") or {}
    bad = sum(int(skipped.get(k, 0)) for k in ("bad_json", "unreadable", "missing_image"))
    return bad / max(int(report.get("label_files", 0)), 1)


def auto_batch_ok(cfg: DictConfig, summary: dict, run: dict) -> bool:
    """The search found a batch when it ran; with it off (the default) the configured batch trained whole: the
    global batch was not cut by OOM fallbacks (micro-batching keeps it). See docs/DESIGN_MAP.md."""
    if summary.get("auto_batch"):
        return all((found or {}).get("batch_size") for found in summary["auto_batch"].values())
    return bool(run["rank_batch"]) and run["rank_batch"] >= int(cfg.train.batch_size)  # train.batch_size is a rank's


def mandatory_checks(cfg: DictConfig, exp_dir: Path, summary: dict, run: dict, models: dict,
                     onnx_ok: Callable[[], bool], imbalance: float | None,
                     train_rows: int | None = None) -> dict[str, bool | None]:
    """The current stage's mandatory checks (None: not something a training run can check). Each design check is
    a function, so only the stage's own run: parsing TensorBoard files costs time.

    The scale checks read what the run trained on. Scalability (stage 3): the stage's minimums, both of them, the
    samples (`min_samples_required`) and the classes (`min_class_coverage`, which only the time-cap rule read
    before, so a run that saw a tenth of the stage's drugs passed). The whole data set processed (stage 4): a
    whole epoch's samples over the stage's `train_rows` (one batch short: the last one may be dropped), and the
    classes; counting only the minimum passed it after 0.6 of an epoch."""
    import psutil

    status = summary.get("status")
    time_cap = (summary.get("stage") or {}).get("time_cap") or {}
    stage = int(cfg.data.progressive_validation.current_stage)
    sizes = cfg.data.progressive_validation[f"stage_{stage}"]
    samples = run["samples_seen"] or 0
    # a metrics.json from before classes_seen was kept: the time cap's count where there is one, else the classes go
    # unjudged (a finished run would otherwise fail for a count that was never written)
    classes = run.get("classes_seen") if run.get("classes_seen") is not None else time_cap.get("classes_seen")
    enough_classes = classes is None or classes >= int(sizes.min_class_coverage)
    enough_samples = samples >= int(sizes.min_samples_required) and enough_classes
    whole_epoch = train_rows is not None and samples >= train_rows - run["global_batch"] and enough_classes
    finished = status in COMPLETED_STATUSES
    ram_mb = psutil.virtual_memory().total / 2**20
    checks: dict[str, Callable[[], bool | None]] = {
        "pipeline_complete": lambda: finished or bool(time_cap.get("success")),
        "classification_model_loading": lambda: models["classifier"] is not None,
        "detection_model_loading": lambda: models.get("detector") is not None,
        "onnx_conversion_success": onnx_ok,
        "auto_batch_tuning_success": lambda: auto_batch_ok(cfg, summary, run),
        "tensorboard_logging": lambda: safely("tensorboard check", lambda: tensorboard_logged(exp_dir), False),
        "class_balance_verification": lambda: imbalance is not None and imbalance <= ADVISOR.max_class_imbalance,
        "memory_optimization_working": lambda: (run["peak_rss_mb"] or 0) < ADVISOR.max_ram_share * ram_mb,
        "scalability_test_pass": lambda: enough_samples,
        "multi_batch_processing": lambda: run["global_batch"] >= ADVISOR.multi_batch_size,
        "memory_leak_test": lambda: run["memory_growth"] is not None and run["memory_stable"],
        # stable: ended on its own, the stage's time cap included (that a run ran out of time is the gate's
        # TIME_CAP_REACHED), with no NaN loss
        "stability_test_pass": lambda: status in FINISHED_STATUSES and not run["nan_loss"],
        "full_dataset_processing": lambda: whole_epoch,
        "production_api_deployment": lambda: None, "cloudflare_tunnel_setup": lambda: None,
        "automated_monitoring": lambda: None,
    }
    return {name: checks[name]() for name in stage_criteria(stage).mandatory_checks}
