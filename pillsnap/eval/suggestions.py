"""What to change, for each thing a stage evaluation can find: an unmet target, a failed gate check, a failed
mandatory check or a critical failure maps to the config keys or commands that address it, and the verdict to one
next step. Plain text in, plain text out."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pillsnap.eval.criteria import ADVISOR
from pillsnap.utils.offline import RANDOM_UNWANTED

_DETECTOR = "Tune the detector: train.detection.lr, more detection steps (train.interleave_ratio), more " \
            "train.detection.epochs"
_AUGMENT = "Strengthen data augmentation or add combination photos"
_CLASSIFIER = "Regularise the classifier (loss.label_smoothing, train.ema.enabled) and train longer (train.epochs)"
_IMBALANCE = "Counter class imbalance (loss.use_class_weights=true)"
_LATENCY = "Speed up inference: serve the ONNX export (pillsnap export) in fp16, or a smaller model.backbone / " \
           "model.image_size"
_READS = "Imprint reading takes most of the pipeline's time (reports' latency.pipeline_without_imprint): serve " \
         "on more CPU cores (inference.imprint.parallel_reads reads a photo's pills at once), or read only where " \
         "the contenders' imprints differ (inference.imprint.unknown_check=false, which gives up the imprint check " \
         "of unknown pills)"
_BATCH = "Raise train.batch_size (or train.classification.auto_batch_tune=true on a GPU)"
_THROUGHPUT = "Raise throughput: train.classification.amp, optimization.channels_last, optimization.torch_compile, " \
              "dataloader.num_workers"
_LOADER = "Tune dataloader.num_workers (dataloader.autotune_workers=true)"
_CACHE = "Enable the preprocessed cache (data.cache.enabled=true)"
_CACHED_LOADER = "The crops already come from the crop cache: the loader's own work is what waits (its colour " \
                 "jitter, the tensors); raise dataloader.num_workers, or give the run more CPU cores"
_MEMORY = "Memory grew across epochs: lower dataloader.num_workers and dataloader.prefetch_factor"
_MEMORY_UNMEASURED = ("Memory growth is measured from epoch 2 to the last, and fewer than 3 epochs were trained: "
                      "train 3 or more (train.epochs; a time_limit_hours or early stopping that ends the run sooner "
                      "stops it too)")
_CRASH = "The run crashed or hit a NaN loss: read logs/train.err, lower train.lr, prefer bf16 " \
         "(train.classification.amp_dtype=bf16)"

_GPU_MEMORY = "Reduce train.batch_size or model.image_size (GPU memory use is high)"
_MIN_SAMPLES = "Train on the stage's min_samples_required samples of min_class_coverage classes: more " \
               "train.epochs or a longer time_limit_hours (data.progressive_validation.stage_N)"

# By the start of a target's path: the first match names the knobs.
_BY_TARGET = (
    ("detection.inference_time_ms", (_LATENCY,)), ("classification.inference_time_ms", (_LATENCY,)),
    ("production.inference_latency_ms", (_LATENCY,)), ("scalability.api_response_time_ms", (_LATENCY,)),
    ("detection.", (_DETECTOR,)), ("classification.", (_CLASSIFIER, _IMBALANCE)),
    ("system.gpu_memory_gb", (_GPU_MEMORY,)),
    ("system.data_loading_s", (_LOADER, _CACHE)),
    ("optimization.batch_size_achieved", (_BATCH,)), ("scalability.multi_batch_size", (_BATCH,)),
    ("optimization.throughput_img_s", (_THROUGHPUT,)), ("production.throughput_img_s", (_THROUGHPUT,)),
    ("advanced.class_imbalance_ratio", (_IMBALANCE,)),
    ("advanced.loss_variance", ("Steady the training loss: lower train.lr or lengthen train.warmup_steps",)),
    ("advanced.memory_peak_over_avg", ("Even out memory use: a train.batch_size that needs no OOM fallback, "
                                       "and data.cache.enabled=true for decoding",)),
    ("scalability.memory_stable_hours", ("Run the stage long enough to show memory stays flat",)),
    ("production.api_uptime", ("Keep the API up: run pillsnap serve under a supervisor that restarts it",)),
)
# When nothing more specific applies, a verdict short of GO still names what to change.
FALLBACK = "Train longer (train.epochs) and compare each target in the report's reasons"

_BY_CODE = {
    "LATENCY_P95_TOO_HIGH": (_LATENCY,),
    "NOT_ENOUGH_SAMPLES": ("Evaluate more validation crops: raise data.val_ratio or the stage's "
                           "data.progressive_validation.stage_N.max_samples",),
    "COVERAGE_TOO_LOW": ("Give every class of the stage validation photos: raise data.val_ratio",),
    "REGRESSION_TOO_LARGE": ("Accuracy fell against the stage's previous evaluation: retrain from its best "
                             "checkpoint (bash scripts/train.sh --checkpoint PATH) or lower train.lr",),
    "ACC_BELOW_TARGET": (_CLASSIFIER, _IMBALANCE),
    "RUN_NOT_FINISHED": ("Let the run finish: resume it (bash scripts/train.sh --resume), then evaluate",),
    "CRASH_DETECTED": (_CRASH,), "MEMORY_UNSTABLE": (_MEMORY,), "NAN_LOSS": (_CRASH,),
    "REPEATED_OOM": ("Lower train.batch_size or model.image_size so training needs no OOM recovery",),
    "DATA_CORRUPTION": ("Fix or remove the unreadable label files listed by pillsnap data scan "
                        "(scan_report.json), then rescan",),
    "pipeline_complete": ("Let the run finish: read logs/train.err for what stopped it",),
    "classification_model_loading": ("checkpoints/classification_best.pt does not load: retrain the stage",),
    "detection_model_loading": ("checkpoints/detection_best.pt does not load or is missing: train the detector "
                                "(train.strategy=interleaved)",),
    "onnx_conversion_success": ("ONNX export failed: run pillsnap export -v to see why",),
    "auto_batch_tuning_success": ("Set train.classification.auto_batch_tune=true on a GPU, or a train.batch_size "
                                  "that trains without OOM fallbacks",),
    "tensorboard_logging": ("No train/loss in EXP/tb: install tensorboard and rerun",),
    "class_balance_verification": (_IMBALANCE,),
    "memory_optimization_working": ("Peak RSS came close to the machine's RAM: lower dataloader.num_workers or "
                                    "disable data.cache",),
    "scalability_test_pass": (_MIN_SAMPLES,),
    "full_dataset_processing": ("Train at least one whole epoch over the stage's training photos (more "
                                "train.epochs or a longer time_limit_hours), with min_class_coverage classes",),
    "multi_batch_processing": (f"Train with a global batch of at least {ADVISOR.multi_batch_size} "
                               "(train.batch_size x gradient accumulation)",),
    "memory_leak_test": (_MEMORY,), "stability_test_pass": (_CRASH,),
}


def _time_cap_tip(time_cap: dict) -> str:
    """A run stopped by the stage's wall-clock cap before the minimums that make a capped run count were met."""
    unmet = ", ".join(time_cap.get("reasons") or []) or "the stage's minimums"
    return (f"The stage's time cap stopped training ({unmet} when it did): raise "
            "data.progressive_validation.stage_N.time_limit_hours, or train where steps are faster (a GPU, a "
            "machine not shared with other jobs)")


def _random_start_tip(task: str, origin: str) -> str:
    """A model that trained from random weights where pretrained ones were asked for: whatever else falls short
    follows from it, and training longer would not make it up."""
    key = "model.detector_weights" if task == "detection" else "model.weights_path"
    return (f"The {task} model trained from random weights ({origin[len(RANDOM_UNWANTED):]}): get the pretrained "
            f"weights (run once with network access, they are cached; or download them and set {key}), then "
            "retrain the stage")


def _code(reason: str) -> str:
    """"MANDATORY_CHECK_FAILED: onnx_conversion_success" -> the check; "REPEATED_OOM: 6 ..." -> REPEATED_OOM."""
    head, _, rest = reason.partition(":")
    return rest.strip() if head == "MANDATORY_CHECK_FAILED" else head.strip()


def _pipeline_tips(results: dict, target_ms: float | None) -> tuple[str, ...]:
    """What speeds up the pipeline's p95: where imprint reading makes more than half of it (the same photos timed
    without it), the reads first, and the models' own speed only where the pipeline without reading would still
    miss `target_ms` (None: not known, the reads alone); else the models' speed."""
    latency = results.get("latency") or {}
    reading, unread = (latency.get(k) or {} for k in ("pipeline", "pipeline_without_imprint"))
    if not (reading.get("p95_ms") and unread.get("p95_ms") is not None
            and unread["p95_ms"] < 0.5 * reading["p95_ms"]):
        return (_LATENCY,)
    return (_READS, _LATENCY) if target_ms is not None and unread["p95_ms"] > target_ms else (_READS,)


def suggestions_for(results: dict, unmet: list[str], ratios: dict[str, float], reasons: list[str],
                    latency_targets: dict[str, float] | None = None) -> list[str]:
    """The knobs for every reason code and unmet target path, without repeats, in the order found.
    `latency_targets`: the pipeline's p95 targets by reason code or path (LATENCY_P95_TOO_HIGH,
    production.inference_latency_ms), which decide whether faster models would still be needed without the
    imprint reads."""
    targets = latency_targets or {}
    out = [_random_start_tip(task, origin) for task, origin in (results.get("init_weights") or {}).items()
           if str(origin or "").startswith(RANDOM_UNWANTED)]
    for reason in reasons:
        code = _code(reason)
        if code in ("pipeline_complete", "TIME_CAP_REACHED") and results.get("run_status") == "time_capped":
            out.append(_time_cap_tip(results.get("time_cap") or {}))
            continue
        if code == "LATENCY_P95_TOO_HIGH":
            out += _pipeline_tips(results, targets.get(code))
            continue
        if code == "memory_leak_test" and results.get("memory_growth") is None:
            out.append(_MEMORY_UNMEASURED)  # too few epochs to measure: it did not grow, it was not measured
            continue
        out += _BY_CODE.get(code, ())
    for path in unmet:
        found = next((tips for prefix, tips in _BY_TARGET if path.startswith(prefix)), ())
        if path == "production.inference_latency_ms":  # the pipeline's p95, too
            found = _pipeline_tips(results, targets.get(path))
        out += found
        if path.startswith("detection.") and ratios.get(path, 1.0) < ADVISOR.suggest_share and found == (_DETECTOR,):
            out.append(_AUGMENT)
    ratio = (results.get("advanced") or {}).get("class_imbalance_ratio")
    if ratio is not None and ratio < ADVISOR.imbalance_worth_weighting:  # balanced classes: weights change nothing
        out = [tip for tip in out if tip != _IMBALANCE]
    gpu = ((results.get("system") or {}).get("gpu_memory_gb")) or 0
    if gpu > ADVISOR.gpu_memory_high_gb:
        out.append(_GPU_MEMORY)
    if ((results.get("system") or {}).get("data_loading_s") or 0) > ADVISOR.data_loading_slow_s:
        out += [_LOADER, _CACHE]
    if (results.get("system") or {}).get("crop_cache"):  # the run read its crops from a cache already
        out = [_CACHED_LOADER if tip == _CACHE else tip for tip in out]
    return list(dict.fromkeys(out))


def next_stage_command(stage: int, exp_dir: str | Path | None) -> str:
    """The command that trains the stage after `stage` from the run in `exp_dir`: its saved config (absolute paths),
    into a folder of its own (training there would replace this stage's checkpoints and reports), run from any
    folder. Without the run's folder, the plain form."""
    nxt = stage + 1
    if exp_dir is None:
        return f"bash scripts/train.sh --stage {nxt}"
    exp = Path(exp_dir).absolute()
    # runs/stage1/exp -> runs/stage2/exp, runs/stage_1 -> runs/stage_2 (the folder or its parent, named so whole),
    # else exp -> exp_stage2
    parts = list(exp.parts)
    named = next((i for i in (len(parts) - 1, len(parts) - 2)
                  if i > 0 and re.fullmatch(rf"stage_?{stage}", parts[i])), None)
    if named is not None:
        parts[named] = parts[named][:-len(str(stage))] + str(nxt)
    target = str(Path(*parts)) if named is not None else f"{exp}_stage{nxt}"
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.sh"
    head = f"bash {shlex.quote(str(script))}" if script.is_file() else "pillsnap train"
    stage_arg = f"--stage {nxt}" if script.is_file() else f"data.progressive_validation.current_stage={nxt}"
    return (f"{head} --cfg {shlex.quote(str(exp / 'config.yaml'))} {stage_arg} "
            f"{shlex.quote(f'paths.exp_dir={target}')} train.resume=null")


def action_for(status: str, recommendation: str, stage: int, suggestions: list[str],
               exp_dir: str | Path | None = None) -> str:
    """The one next step of a verdict (`exp_dir`: the run's folder, which the next stage's command starts from)."""
    if status == "GO":
        return (f"proceed to stage {stage + 1} ({next_stage_command(stage, exp_dir)})" if stage < 4
                else "stage 4 passed: read reports/final_test_results.json, the final test evaluation")
    first = suggestions[0] if suggestions else FALLBACK
    if recommendation == "CRITICAL_FAILURE":
        return f"fix the failure, then retrain stage {stage}: {first}"
    if recommendation == "WARN_STOP":
        return f"stop and fix what the reasons name before retraining stage {stage}: {first}"
    return f"optimise and retrain stage {stage}: {first}"
