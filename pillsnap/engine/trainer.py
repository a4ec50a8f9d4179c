"""The training run (seed Part D): build tasks, interleave their steps, validate, checkpoint, resume, stop.

Side concerns hang on callbacks (engine/callbacks.py); policies (OOM recovery, early stopping, time cap,
interleaving) are pure functions in their own modules.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pillsnap.config import apply_stage_overrides, stage_settings
from pillsnap.engine import checkpointing as ck
from pillsnap.engine.callbacks import CallbackList, default_callbacks
from pillsnap.engine.classification import ClassificationTask, ResumeMismatchError
from pillsnap.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup,
    device_for,
    init_distributed,
    shard_loader,
)
from pillsnap.engine.early_stopping import early_stopping, time_cap_success
from pillsnap.engine.interleave import CLASSIFICATION, DETECTION
from pillsnap.engine.loop import EmergencyExit, EpochRunner
from pillsnap.utils import TBWriter, build_logger, ensure_dir, load_ckpt, resolve_device, set_seed

LOGGER = logging.getLogger(__name__)
EXIT_OK, EXIT_CONFIG, EXIT_OOM, EXIT_TIME_CAP = 0, 2, 3, 4
Loaders = tuple  # (cls_train, cls_val, cls_test, det_train, det_val, det_test, meta)


def seed_epoch(seed: int, epoch: int, loaders: list[Any]) -> None:
    """Seed every RNG from (seed, epoch) so a resumed epoch replays the same shuffle, augmentation and dropout."""
    s = seed * 1000 + epoch
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    for loader in loaders:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(s)


@contextmanager
def run_logging(exp_dir: Path, enabled: bool) -> Iterator[logging.Logger]:
    """Console + logs/pillsnap.log + logs/train.out (INFO) + logs/train.err (WARNING); handlers removed at the end."""
    logger = build_logger(exp_dir) if enabled else logging.getLogger("pillsnap")
    added = []
    if enabled:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name, level in (("train.out", logging.INFO), ("train.err", logging.WARNING)):
            handler = logging.FileHandler(exp_dir / "logs" / name, encoding="utf-8")
            handler.setLevel(level)
            handler.setFormatter(fmt)
            logger.addHandler(handler)
            added.append(handler)
    try:
        yield logger
    finally:
        logs_dir = str((exp_dir / "logs").resolve())
        for handler in list(logger.handlers):
            if handler in added or str(getattr(handler, "baseFilename", "")).startswith(logs_dir):
                logger.removeHandler(handler)
                handler.close()


def default_build_loaders(cfg: DictConfig, tb: TBWriter | None = None) -> Loaders:
    """pillsnap.data's loaders for the current stage (never the test split while training, seed D-3)."""
    from pillsnap.data import build_dataloaders_twostage

    return build_dataloaders_twostage(cfg, build_test=False, tb=tb)


class Trainer:
    """One training run over the tasks that the config and loaders call for."""

    def __init__(self, cfg: DictConfig, info: DistInfo, logger: logging.Logger, tb: TBWriter,
                 build_loaders: Callable[[DictConfig], Loaders]) -> None:
        self.cfg, self.info, self.logger, self.tb = cfg, info, logger, tb
        self.exp_dir = Path(cfg.paths.exp_dir)
        self.ckpt_dir = self.exp_dir / "checkpoints"
        self.device = device_for(info, resolve_device())
        self.callbacks = (default_callbacks(self.exp_dir, logger, tb, float(cfg.train.memory_warning_ratio),
                                            int(cfg.train.profile_interval)) if info.is_main else CallbackList())
        self.stage = int(cfg.data.progressive_validation.current_stage)
        self.stage_cfg = stage_settings(cfg)
        self.tasks = self._build_tasks(build_loaders)
        self.plan = self._epoch_plan()
        self.runner = EpochRunner(self.tasks, cfg, self.callbacks, logger, info,
                                  self.stage_cfg.get("time_limit_hours"), len(self.plan))
        self.start_epoch, self.history = 0, []
        self.es_state = {name: {"best": None, "bad_epochs": 0} for name in self.tasks}
        self.stopped: set[str] = set()
        self.status = "running"

    # ---- build ------------------------------------------------------------------------------------------------------
    def _build_tasks(self, build_loaders: Callable[[DictConfig], Loaders]) -> dict[str, Any]:
        cls_train, cls_val, _, det_train, det_val, _, meta = build_loaders(self.cfg)
        self.meta = meta
        if cls_train is None or len(cls_train) == 0:
            raise ValueError(f"stage {self.stage} has no single-pill training images: check paths.manifest_dir "
                             f"({self.cfg.paths.manifest_dir}) and data.progressive_validation.stage_{self.stage}")
        cls_train = shard_loader(cls_train, self.info, int(self.cfg.train.seed))
        tasks: dict[str, Any] = {CLASSIFICATION: ClassificationTask(
            self.cfg, cls_train, cls_val, meta, self.device, self.logger, self.tb)}
        tasks[CLASSIFICATION] = self._maybe_auto_batch(tasks[CLASSIFICATION], build_loaders)
        det = self._build_detection(det_train, det_val)
        if det is not None:
            tasks[DETECTION] = det
        self.logger.info("tasks: %s (strategy=%s, stage=%d, device=%s)", list(tasks), self.cfg.train.strategy,
                         self.stage, self.device)
        return tasks

    def _maybe_auto_batch(self, task: ClassificationTask, build_loaders: Callable) -> ClassificationTask:
        cls_cfg = self.cfg.train.classification
        if not cls_cfg.auto_batch_tune:
            return task
        if self.device.type != "cuda":
            self.logger.info("auto batch tune needs CUDA: keeping train.batch_size=%d", self.cfg.train.batch_size)
            return task
        bs = task.find_batch_size(int(cls_cfg.auto_batch_max), float(self.cfg.train.auto_batch_vram_headroom))
        self.tb.add_scalar("perf/auto_batch_found", bs, 0)
        if bs == int(self.cfg.train.batch_size):
            return task
        self.cfg.train.batch_size = bs
        cls_train, cls_val, *_, meta = build_loaders(self.cfg)
        cls_train = shard_loader(cls_train, self.info, int(self.cfg.train.seed))
        return ClassificationTask(self.cfg, cls_train, cls_val, meta, self.device, self.logger, self.tb)

    def _build_detection(self, det_train: Any, det_val: Any) -> Any:
        if det_train is None or str(self.cfg.train.strategy) == "classification":
            return None
        try:
            from pillsnap.engine.detection import DetectionTask
        except ImportError as err:
            self.logger.warning("detection loaders exist but DetectionTask is unavailable (%s): classification only",
                                err)
            return None
        if self.info.enabled:
            self.logger.warning("DDP: the detection task trains per rank without gradient sync")
        return DetectionTask(self.cfg, det_train, det_val, self.device, self.logger, self.tb)

    def _epoch_plan(self) -> list[list[str]]:
        """Tasks trained in each epoch: all of them together, or (sequential) classification then detection."""
        cls_epochs = int(self.cfg.train.epochs)
        if str(self.cfg.train.strategy) == "sequential" and DETECTION in self.tasks:
            det_epochs = int(self.cfg.train.detection.epochs)
            return [[CLASSIFICATION]] * cls_epochs + [[DETECTION]] * det_epochs
        return [list(self.tasks)] * cls_epochs

    # ---- resume -----------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """train.resume: restore every task that has a checkpoint; epochs after it are (re)done."""
        epochs = []
        for name, task in self.tasks.items():
            path = ck.resume_source(self.cfg.train.resume, self.ckpt_dir, name)
            if path is None:
                continue
            ckpt = load_ckpt(path, map_location=self.device)
            if isinstance(task, ClassificationTask):
                task.load_checkpoint_state(ckpt, origin=str(path))
            else:
                task.load_checkpoint_state(ckpt)
            epochs.append(int(ckpt["epoch"]))
            self.runner.global_step = max(self.runner.global_step, int(ckpt.get("global_step") or 0))
            self.es_state[name]["best"] = ckpt.get("best_metric")
            self.logger.info("resumed %s from %s (epoch %d, best %s)", name, path, ckpt["epoch"], ckpt["best_metric"])
        if not epochs:
            return
        self.start_epoch = max(epochs)
        self.history = ck.previous_history(self.exp_dir / "reports" / "metrics.json", self.start_epoch)
        for name, task in self.tasks.items():
            if self.history:
                es = self.cfg.train.early_stopping
                self.es_state[name] = ck.replay_early_stopping(
                    self.history, name, task.monitor, self._mode(name), float(es.min_delta))

    def _mode(self, name: str) -> str:
        return str(self.cfg.train.early_stopping.mode) if name == CLASSIFICATION else "max"

    # ---- validation, checkpoints, stopping --------------------------------------------------------------------------
    def validate(self, epoch: int, active: list[str]) -> dict[str, dict]:
        """Rank 0 validates (val loaders only); every rank receives the same metrics."""
        metrics = {}
        if self.info.is_main:
            for name in active:
                metrics[name] = self.tasks[name].validate(epoch)
                self.callbacks.fire("on_validation_end", name, epoch, metrics[name])
        return broadcast_object(self.info, metrics)

    def end_epoch(self, epoch: int, active: list[str], train: dict, val: dict) -> None:
        """Early stopping per task, last/best checkpoints (rank 0), history and metrics.json."""
        es = self.cfg.train.early_stopping
        record: dict[str, Any] = {"epoch": epoch, "elapsed_s": self.elapsed()}
        for name in active:
            task = self.tasks[name]
            metric = float(val[name].get(task.monitor, float("nan")))
            stop, is_best = early_stopping(self.es_state[name], metric, self._mode(name), int(es.patience),
                                           float(es.min_delta))
            if stop and es.enabled:
                self.stopped.add(name)
                self.logger.info("early stopping %s at epoch %d (%s best %.4f)", name, epoch, task.monitor,
                                 self.es_state[name]["best"])
            self._save(name, epoch, is_best)
            record[name] = {**val[name], **train[name], "lr": task.lr if hasattr(task, "lr") else None}
        self.history.append(record)
        self.callbacks.fire("on_epoch_end", epoch, self.summary(epoch))

    def _save(self, name: str, epoch: int, is_best: bool) -> None:
        if not self.info.is_main:
            return
        state = {**self.tasks[name].checkpoint_state(epoch, self.es_state[name]["best"]),
                 "global_step": self.runner.global_step}
        ck.save_task_checkpoint(self.ckpt_dir, name, "last", state)
        if is_best:
            ck.save_task_checkpoint(self.ckpt_dir, name, "best", state)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.runner.started, 2)

    def summary(self, epoch: int) -> dict:
        """reports/metrics.json: latest metrics per task, history, stage/time-cap verdict, status."""
        latest = {"classification": ("accuracy", "macro_f1", "top5", "loss"),
                  "detection": ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall")}
        out: dict[str, Any] = {"epoch": epoch, "status": self.status}
        for name, keys in latest.items():
            last = next((h[name] for h in reversed(self.history) if name in h), None)
            if last is not None:
                out[name] = {k: last.get(k) for k in keys}
        out["best"] = {name: s["best"] for name, s in self.es_state.items()}
        out["stage"] = {"current_stage": self.stage, "elapsed_s": self.elapsed()}
        if self.status == "time_capped":
            cls = self.tasks[CLASSIFICATION]
            out["stage"]["time_cap"] = time_cap_success(self.stage_cfg, cls.samples_seen, len(cls.classes_seen))
        out["history"] = self.history
        return out

    # ---- the run ----------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train all planned epochs (or until early stop / time cap / OOM give-up); returns the exit code."""
        if self.info.is_main:
            ck.write_classes_json(self.ckpt_dir, self.meta)
        self.callbacks.fire("on_train_start", {"tasks": list(self.tasks), "epochs": len(self.plan)})
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch + 1, len(self.plan) + 1):
                active = [t for t in self.plan[epoch - 1] if t not in self.stopped]
                if not active:
                    continue
                self._run_epoch(epoch, active)
                if self.status == "time_capped" or set(self.tasks) <= self.stopped:
                    break
        except EmergencyExit as err:
            return self._emergency(epoch, str(err))
        return self._finish(epoch)

    def _run_epoch(self, epoch: int, active: list[str]) -> None:
        seed_epoch(int(self.cfg.train.seed), epoch, [self.tasks[t].train_loader for t in active])
        cls = self.tasks[CLASSIFICATION]
        self.callbacks.fire("on_epoch_start", epoch, {"total_steps": sum(self.tasks[t].steps_per_epoch()
                            for t in active), "max_epochs": len(self.plan), "batch_size": cls.knobs["batch_size"]})
        train = self.runner.train_one_epoch(epoch, active)
        if self.info.enabled:
            for name in active:
                getattr(self.tasks[name], "sync_replicas", lambda: None)()
        if self.runner.time_capped():
            self.status = "time_capped"
        self.end_epoch(epoch, active, train, self.validate(epoch, active))
        barrier(self.info)

    def _finish(self, epoch: int) -> int:
        code = EXIT_OK
        if self.status == "time_capped":
            verdict = self.summary(epoch)["stage"]["time_cap"]
            self.logger.info("stage %d time cap reached: %s", self.stage, verdict)
            code = EXIT_OK if verdict["success"] else EXIT_TIME_CAP
        else:
            self.status = "early_stopped" if self.stopped else "completed"
        if self.info.is_main and any(CLASSIFICATION in active for active in self.plan):
            plots = self.tasks[CLASSIFICATION].write_reports(self.exp_dir / "reports")
            self.logger.info("reports: %s", ", ".join(p.name for p in plots) or "none (no validation data)")
        if self.info.is_main and self.stage == 4 and self.status != "time_capped":
            from pillsnap.eval.final import final_test_evaluation  # the test split, once, after the last stage

            final_test_evaluation(self.cfg)
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return code

    def _emergency(self, epoch: int, reason: str) -> int:
        self.status = "oom_emergency_exit"
        if self.info.is_main:
            for name, task in self.tasks.items():
                # epoch-1: the interrupted epoch is incomplete, so a resume from here would redo it.
                state = {**task.checkpoint_state(max(epoch - 1, 0), self.es_state[name]["best"]),
                         "global_step": self.runner.global_step}
                path = ck.save_task_checkpoint(self.ckpt_dir, name, "emergency", state)
                self.logger.error("emergency checkpoint written: %s", path)
        self.logger.error("training stopped: %s. Lower train.batch_size or model.image_size and resume.", reason)
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return EXIT_OOM


def _prepare_cfg(cfg: DictConfig) -> DictConfig:
    cfg = apply_stage_overrides(cfg, int(cfg.data.progressive_validation.current_stage))
    set_seed(int(cfg.train.seed), bool(cfg.train.deterministic))
    return cfg


def run_training(cfg: DictConfig, build_loaders: Callable[[DictConfig], Loaders] | None = None
                 ) -> tuple[int, Trainer | None]:
    """main() that also returns the Trainer (None when it could not start), for tests and notebooks."""
    info = init_distributed()
    cfg = _prepare_cfg(cfg)
    exp_dir = Path(cfg.paths.exp_dir)
    if info.is_main:
        for sub in ("logs", "tb", "reports", "checkpoints", "export"):
            ensure_dir(exp_dir / sub)
    barrier(info)
    tb = TBWriter(exp_dir, enabled=info.is_main)
    try:
        with run_logging(exp_dir, info.is_main) as logger:
            try:
                trainer = Trainer(cfg, info, logger, tb, build_loaders or partial(default_build_loaders, tb=tb))
                trainer.resume()
            except (ResumeMismatchError, FileNotFoundError, ValueError) as err:
                logger.error("cannot start training: %s", err)
                return EXIT_CONFIG, None
            return trainer.fit(), trainer
    finally:
        tb.close()
        cleanup(info)


def main(cfg: DictConfig, build_loaders: Callable[[DictConfig], Loaders] | None = None) -> int:
    """Run training per `cfg`; returns the exit code (0 ok, 2 config/resume error, 3 OOM give-up, 4 time cap failed).

    `build_loaders(cfg)` defaults to pillsnap.data.build_dataloaders_twostage (tests pass small fakes).
    Under `torchrun` every rank runs this; only rank 0 writes files.
    """
    return run_training(cfg, build_loaders)[0]


def _run_one_task(cfg: DictConfig, overrides: dict[str, Any], checkpoint: str, build_loaders: Any) -> Path:
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    code = main(cfg, build_loaders)
    if code != EXIT_OK:
        raise RuntimeError(f"training ended with exit code {code}; see {cfg.paths.exp_dir}/logs/train.err")
    return Path(cfg.paths.exp_dir) / "checkpoints" / checkpoint


def train_classification_stage(cfg: DictConfig, build_loaders: Callable[[DictConfig], Loaders] | None = None
                               ) -> Path:
    """Seed Part D name: train the classifier alone (strategy=classification); returns classification_best.pt."""
    return _run_one_task(cfg, {"train.strategy": "classification"}, "classification_best.pt", build_loaders)


def train_detection_stage(cfg: DictConfig, build_loaders: Callable[[DictConfig], Loaders] | None = None) -> Path:
    """Seed Part D name: train the detector alone for train.detection.epochs (sequential plan with no
    classification epochs); returns detection_best.pt."""
    return _run_one_task(cfg, {"train.strategy": "sequential", "train.epochs": 0}, "detection_best.pt",
                         build_loaders)
