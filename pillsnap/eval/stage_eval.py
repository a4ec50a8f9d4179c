"""The end-of-stage evaluation: gather what the run measured, measure what the stage criteria need and the run
does not record (eval/stage_measure.py), decide once (eval/gates.py), let the user choose only where someone can
answer, and report the one verdict to reports/stage_{N}_evaluation.json, logs/pillsnap.log, TensorBoard and the
metrics stream the dashboard follows.

Figures are measured on the device the run trained on (or `device`): a latency target set for a GPU and measured on
a CPU is reported as not comparable, with its value and device, instead of failing the stage."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pillsnap.eval import stage_measure as sm
from pillsnap.eval.after_training import mark_done
from pillsnap.eval.criteria import stage_criteria
from pillsnap.eval.gates import stage_decision, verdict_line
from pillsnap.eval.latency import device_name
from pillsnap.metrics.names import DETECTION_KEYS
from pillsnap.utils import append_jsonl, read_json, save_json

LOGGER = logging.getLogger(__name__)
# the per-class floors: the lowest F1, the lowest accuracy after shrinkage (the one gated) and the lowest observed
PER_CLASS_KEYS = ("per_class_min_f1", "per_class_min_f1_observed", "per_class_f1_classes", "per_class_min_acc",
                  "per_class_min_acc_observed")


class StageMismatchError(ValueError):
    """The experiment was trained on another stage than the one asked to evaluate."""


def evaluation_path(exp_dir: str | Path, stage: int) -> Path:
    return Path(exp_dir) / "reports" / f"stage_{stage}_evaluation.json"


def evaluation_device(summary: dict, requested: str | None = None) -> Any:
    """`requested`, else the device the run trained on when this machine has it, else the best one here."""
    import torch

    from pillsnap.utils import resolve_device

    if requested:
        return resolve_device(requested)  # a device this machine lacks: a DeviceError that says so
    trained = str((summary.get("system") or {}).get("device") or "")
    if trained.startswith("cuda") and torch.cuda.is_available():
        # the run's own GPU where this machine has it (cuda:3 trained, one GPU here: cuda)
        device = torch.device(trained)
        return device if device.index is None or device.index < torch.cuda.device_count() else torch.device("cuda")
    if trained.startswith("cuda"):
        LOGGER.warning("the run trained on %s but this machine has no CUDA device: latencies are measured on the "
                       "CPU and reported as not comparable to the GPU targets", trained)
    return resolve_device()


@contextmanager
def run_log(exp_dir: Path) -> Iterator[None]:
    """logs/pillsnap.log receives the evaluation too (training's own handlers are gone by the time it runs)."""
    target = (exp_dir / "logs" / "pillsnap.log").resolve()
    logger = logging.getLogger("pillsnap")
    if any(getattr(h, "baseFilename", None) == str(target) for h in logger.handlers):
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


def _run_summary(exp_dir: Path, stage: int) -> dict:
    ckpts = exp_dir / "checkpoints"
    summary_path = exp_dir / "reports" / "metrics.json"
    if not summary_path.is_file() or not (ckpts / "classification_best.pt").is_file():
        raise FileNotFoundError(f"{exp_dir} holds no finished training run (reports/metrics.json and "
                                "checkpoints/classification_best.pt): train the stage first")
    summary = read_json(summary_path)
    trained = (summary.get("stage") or {}).get("current_stage")
    if trained is not None and int(trained) != stage:
        raise StageMismatchError(f"{exp_dir} was trained on stage {trained}, not stage {stage}: evaluate it with "
                                 f"--stage {trained}, or train stage {stage} first")
    return summary


def _latency_ms(figures: dict) -> float | None:
    latency = figures.get("latency")
    return None if latency is None else latency.p95_ms


def collect_results(cfg: DictConfig, exp_dir: str | Path, build_loaders: Callable[[DictConfig], Any] | None = None,
                    device: str | None = None) -> dict:
    """The decision's input from a finished (or stopped) run of cfg's current stage."""
    from pillsnap.data import build_dataloaders_twostage

    exp_dir = Path(exp_dir)
    ckpts = exp_dir / "checkpoints"
    recorded = _run_summary(exp_dir, int(cfg.data.progressive_validation.current_stage))
    run = sm.run_figures(recorded, sm.read_stream(exp_dir / "reports" / "metrics.jsonl"))
    summary = sm.best_checkpoint_metrics(recorded, ckpts)  # the quality figures of the weights evaluated here
    on = evaluation_device(summary, device)
    loaders = (build_loaders or build_dataloaders_twostage)(cfg)
    det_ckpt = ckpts / "detection_best.pt" if (ckpts / "detection_best.pt").is_file() else None
    models = sm.load_models(ckpts / "classification_best.pt", det_ckpt, on)
    cls = sm.safely("classifier measurement", lambda: sm.classifier_figures(models["classifier"][0], loaders, on),
                    {}) if models["classifier"] else {}
    det = sm.safely("detector measurement", lambda: sm.detector_figures(cfg, models["detector"][0], loaders, on),
                    {}) if models.get("detector") else {}
    rows = sm.safely("stage rows", lambda: sm.stage_rows(cfg), None)
    pipeline = sm.safely("pipeline latency", lambda: sm.pipeline_latency(cfg, exp_dir, rows, on), None) \
        if rows is not None else None
    imbalance = sm.safely("class balance", lambda: sm.class_imbalance(rows), None) if rows is not None else None
    checks = sm.mandatory_checks(cfg, exp_dir, summary, run, models,
                                 lambda: sm.safely("ONNX export", lambda: sm.onnx_exports(models), False), imbalance,
                                 (loaders.meta.get("sizes") or {}).get("cls_train"))
    detection = {k: (summary.get("detection") or {}).get(k) for k in DETECTION_KEYS} if det_ckpt else {}
    reading = None if pipeline is None else pipeline["pipeline"]
    unread = None if pipeline is None else pipeline["pipeline_without_imprint"]
    latency = None if reading is None else reading.p95_ms
    return {
        "device": str(on), "device_name": device_name(on),
        "training_device": (summary.get("system") or {}).get("device"),
        "latency": {"classification": cls.get("latency") and cls["latency"].as_dict(),
                    "detection": det.get("latency") and det["latency"].as_dict(),
                    "pipeline": reading and reading.as_dict(),
                    "pipeline_without_imprint": unread and unread.as_dict()},
        "classification": {**(summary.get("classification") or {}),
                           **{k: cls.get(k) for k in PER_CLASS_KEYS},
                           "inference_time_ms": _latency_ms(cls)},
        "detection": {**detection, "inference_time_ms": _latency_ms(det)},
        "system": {"gpu_memory_gb": run["gpu_memory_gb"], "data_loading_s": run["data_loading_s"],
                   "peak_rss_mb": run["peak_rss_mb"],
                   "crop_cache": str(cfg.data.cache.format) if cfg.data.cache.enabled else None},
        "optimization": {"batch_size_achieved": run["batch_size"], "throughput_img_s": run["throughput_img_s"]},
        "advanced": {"class_imbalance_ratio": imbalance, "loss_variance": run["loss_variance"],
                     "memory_peak_over_avg": run["memory_peak_over_avg"]},
        "scalability": {"multi_batch_size": run["global_batch"]},
        "production": {"inference_latency_ms": latency},
        "mandatory_checks": checks,
        "latency_p95_ms": latency if latency is not None else math.inf,
        "n_eval_samples": cls.get("n_eval_samples", 0), "n_eval_available": cls.get("n_eval_available"),
        "n_eval_undecodable": cls.get("n_eval_undecodable"),
        "class_coverage": cls.get("class_coverage", 0.0),
        "no_crashes": summary.get("status") not in ("oom_emergency_exit", "crashed") and not run["nan_loss"],
        "memory_growth": run["memory_growth"], "memory_stable": run["memory_stable"],
        "repeated_oom": run["repeated_oom"], "nan_loss": run["nan_loss"], "skipped_steps": run["skipped_steps"],
        "data_corruption_rate": sm.corruption_rate(cfg), "time_cap": (summary.get("stage") or {}).get("time_cap"),
        "run_status": summary.get("status"),
        "init_weights": (recorded.get("system") or {}).get("init_weights") or {},
    }


# ---- the user's choice ----------------------------------------------------------------------------------------------
def choose(decision: dict, choice: int | None = None, assume_yes: bool = False,
           ask: Callable[[str], str] | None = None) -> dict:
    """The user's option: `choice` (--choice N), 1 with `assume_yes` (--yes), asked only on an interactive terminal
    outside CI; otherwise option 1 (the verdict's own recommendation) is recorded as chosen by default. Never blocks
    a job without a person."""
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


def _note(item: dict) -> str:
    return (f"not comparable: {item['path']} {item['value']:.4g} measured on {item['device']} "
            f"(the target {item['threshold']:g} is for {item['target_device']})")


def format_decision(decision: dict) -> str:
    """The block printed to the terminal and the log: the one verdict first, then why and what to change."""
    advisor = decision["advisor"]
    lines = [f"Stage {decision['stage']} evaluation: {decision['status']} — {decision['recommendation']} "
             f"(performance score {advisor['performance_score']:.3f})",
             f"  {advisor['color']} {advisor['message']}", f"  next step: {decision.get('action') or '-'}"]
    lines += [f"  reason: {r}" for r in decision["reasons"]] or ["  all checks and targets met"]
    lines += [f"  {_note(n)}" for n in decision.get("not_comparable", [])
              if isinstance(n.get("value"), (int, float)) and math.isfinite(n["value"])]
    lines += [f"  suggestion: {s}" for s in decision.get("suggestions", advisor["suggestions"])[:3]]
    lines += [f"  {o}" for o in advisor["user_options"]]
    return "\n".join(lines)


# ---- the whole evaluation -------------------------------------------------------------------------------------------
def classifier_identity(exp_dir: Path) -> str | None:
    """The SHA-256 of the classifier checkpoint the evaluation judges (None without one)."""
    from pillsnap.utils.io import file_sha256

    best = exp_dir / "checkpoints" / "classification_best.pt"
    return file_sha256(best) if best.is_file() else None


def regression_baseline(previous: dict | None, weights: str | None, results: dict | None = None) -> dict | None:
    """What the regression check compares this evaluation's accuracy with: the stage's previous evaluation, of other
    weights. The same weights evaluated again (`pillsnap evaluate` run twice) keep the baseline they were judged
    against: otherwise the second run compares them with themselves, and a regression the first run found is gone.
    A report from before weights were recorded counts as other weights. One that measured another validation split
    than `results` (another number of crops: a smoke test or a synthetic rehearsal in the same folder) is no
    baseline: an accuracy of 0.99 on 39 crops said a real run's 0.88 had regressed."""
    if not previous:
        return None
    same_weights = weights is not None and previous.get("classifier_sha256") == weights
    if same_weights:
        kept = previous.get("baseline") or {}
        if kept.get("classification.acc") is None:
            return None
        then = kept.get("n_eval_available")
        baseline = {"classification": {"acc": kept["classification.acc"]}, "n_eval_available": then}
    else:
        baseline = previous.get("results")
        then = (baseline or {}).get("n_eval_available")
    now = (results or {}).get("n_eval_available")
    # another split, or (kept for the same weights) one not recorded, as kept before splits were
    if now is not None and then != now and (then is not None or same_weights):
        LOGGER.warning("the baseline measured another validation split (%s crops, now %s): no regression check "
                       "against it", then, now)
        return None
    return baseline


def evaluate_stage(cfg: DictConfig, exp_dir: str | Path | None = None, choice: int | None = None,
                   assume_yes: bool = False, ask: Callable[[str], str] | None = None,
                   build_loaders: Callable[[DictConfig], Any] | None = None, device: str | None = None) -> dict:
    """Evaluate the run of cfg's current stage and write reports/stage_{N}_evaluation.json; returns the report."""
    exp_dir = Path(exp_dir or cfg.paths.exp_dir)
    with run_log(exp_dir):
        return _evaluate(cfg, exp_dir, choice, assume_yes, ask, build_loaders, device)


def _evaluate(cfg: DictConfig, exp_dir: Path, choice: int | None, assume_yes: bool,
              ask: Callable[[str], str] | None, build_loaders: Callable[[DictConfig], Any] | None,
              device: str | None) -> dict:
    from pillsnap.utils import TBWriter

    stage = int(cfg.data.progressive_validation.current_stage)
    path = evaluation_path(exp_dir, stage)
    previous = read_json(path) if path.is_file() else None
    weights = classifier_identity(exp_dir)
    results = collect_results(cfg, exp_dir, build_loaders, device)
    baseline = regression_baseline(previous, weights, results)
    decision = stage_decision(stage, results, baseline, exp_dir)
    LOGGER.info("%s", format_decision(decision))
    criteria = stage_criteria(stage)
    chosen = choose(decision, choice, assume_yes, ask)
    report = {**decision, "choice": chosen, "user_choice": str(chosen["option"]), "results": results,
              "baseline": None if baseline is None else {"classification.acc": (baseline.get("classification") or
                                                                                 {}).get("acc"),
                                                         "n_eval_available": baseline.get("n_eval_available")},
              "criteria": {"mandatory_checks": list(criteria.mandatory_checks),
                           "targets": {t.path: t.threshold for t in criteria.targets},
                           "target_devices": {t.path: t.device for t in criteria.targets if t.device}},
              "classifier_sha256": weights, "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_json(path, report)
    mark_done(exp_dir, "stage_evaluation")
    append_jsonl(exp_dir / "reports" / "metrics.jsonl", {
        "type": "stage_evaluation", "time": round(time.time(), 3), "stage": stage, "status": decision["status"],
        "recommendation": decision["recommendation"], "action": decision["action"], "reasons": decision["reasons"],
        "suggestions": decision["suggestions"], "not_comparable": decision["not_comparable"],
        "performance_score": decision["advisor"]["performance_score"], "choice": report["choice"]})
    tb = TBWriter(exp_dir)
    tb.add_scalars({"stage/performance_score": decision["advisor"]["performance_score"],
                    "stage/go": float(decision["status"] == "GO")}, stage)
    tb.close()
    LOGGER.info("stage evaluation: %s -> %s (chosen: %s, %s)", verdict_line(decision), path,
                report["choice"]["text"], report["choice"]["how"])
    return report


def finished_line(exp_dir: str | Path, stage: int, since: float = 0.0) -> str:
    """What scripts/train.sh prints last: training finished, the stage decision, the next step (the evaluation
    written since `since`, a Unix time, or recorded done for this training, reports/after_training.json; another
    one belongs to another run)."""
    from pillsnap.eval.after_training import AfterTrainingRecord

    path = evaluation_path(exp_dir, stage)
    recorded = path.is_file() and not AfterTrainingRecord.of(exp_dir).owes("stage_evaluation")
    if not path.is_file() or (path.stat().st_mtime < since and not recorded):
        return (f"training finished; stage {stage} not evaluated (train.stage_evaluation is off or it failed); "
                f"next step: pillsnap evaluate --exp {exp_dir} --stage {stage}")
    return f"training finished; {verdict_line(read_json(path))}"
