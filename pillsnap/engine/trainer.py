"""The training run: build the tasks, interleave their steps, validate, commit checkpoints, resume, stop.

Side concerns hang on callbacks (engine/callbacks.py); policies (OOM recovery, early stopping, time cap,
interleaving) are pure functions in their own modules. The trainer only speaks the Task contract.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pillsnap.config import apply_stage_overrides, stage_settings
from pillsnap.engine import checkpointing as ck
from pillsnap.engine.callbacks import TB_PREFIX, Callback, CallbackList, default_callbacks
from pillsnap.engine.classification import ClassificationTask
from pillsnap.engine.detection import DetectionTask
from pillsnap.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup,
    device_for,
    init_distributed,
    shard_loader,
)
from pillsnap.engine.early_stopping import early_stopping, new_early_stopping_state, time_cap_success
from pillsnap.engine.interleave import CLASSIFICATION, DETECTION
from pillsnap.engine.loop import EmergencyExit, EpochRunner, RunState
from pillsnap.engine.oom import FAKE_OOM_BATCH_ENV, BatchChoice
from pillsnap.engine.task import ResumeMismatchError, Task
from pillsnap.metrics.names import CLASSIFICATION_KEYS, DETECTION_KEYS
from pillsnap.utils import TBWriter, build_logger, ensure_dir, load_ckpt, memory_snapshot, resolve_device, set_seed
from pillsnap.utils.io import save_text
from pillsnap.utils.logs import streams_are_logs

LOGGER = logging.getLogger(__name__)
EXIT_OK, EXIT_CONFIG, EXIT_OOM, EXIT_TIME_CAP = 0, 2, 3, 4
# Per task: the config section with its auto batch keys, and the key of its loader batch size.
AUTO_BATCH = {CLASSIFICATION: ("train.classification", "train.batch_size"),
              DETECTION: ("train.detection", "train.detection.batch_size")}
BuildLoaders = Callable[[DictConfig], Any]  # cfg -> pillsnap.data.Loaders


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
    """Console + logs/pillsnap.log + logs/train.out (INFO) + logs/train.err (WARNING); handlers removed at the end.
    Under scripts/train.sh the process's own streams are written to train.out/err, so no handlers are added."""
    logger = build_logger(exp_dir) if enabled else logging.getLogger("pillsnap")
    added = []
    if enabled and not streams_are_logs():
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


def default_build_loaders(cfg: DictConfig, tb: TBWriter | None = None) -> Any:
    """pillsnap.data's loaders for the current stage (never the test split while training)."""
    from pillsnap.data import build_dataloaders_twostage

    return build_dataloaders_twostage(cfg, build_test=False, tb=tb)


class Trainer:
    """One training run over the tasks that the config and loaders call for."""

    def __init__(self, cfg: DictConfig, info: DistInfo, logger: logging.Logger, tb: TBWriter,
                 build_loaders: BuildLoaders, extra_callbacks: list[Callback] | None = None) -> None:
        self.cfg, self.info, self.logger, self.tb = cfg, info, logger, tb
        self.exp_dir = Path(cfg.paths.exp_dir)
        self.store = ck.CheckpointStore(self.exp_dir / "checkpoints")
        if info.is_main:
            self.store.recover()
        self.device = device_for(info, resolve_device())
        self.callbacks = CallbackList()
        if info.is_main:
            self.callbacks = default_callbacks(self.exp_dir, logger, tb, float(cfg.train.memory_warning_ratio),
                                               int(cfg.train.profile_interval))
            self.callbacks.callbacks.extend(extra_callbacks or [])
        self.stage = int(cfg.data.progressive_validation.current_stage)
        self.stage_cfg = stage_settings(cfg)
        self.state = RunState()
        self.auto_batch: dict[str, dict] = {}  # what the auto batch search chose, per task
        self.tasks = self._build_tasks(build_loaders)
        self.plan = self._epoch_plan()
        self.runner = EpochRunner(self.tasks, cfg, self.state, self.callbacks, logger, info,
                                  self.stage_cfg.get("time_limit_hours"), len(self.plan))
        self.start_epoch, self.history = 0, []
        self.es_state = {name: new_early_stopping_state() for name in self.tasks}
        self.stopped: set[str] = set()
        self.status = "running"

    # ---- build ------------------------------------------------------------------------------------------------------
    def _build_tasks(self, build_loaders: BuildLoaders) -> dict[str, Task]:
        loaders = build_loaders(self.cfg)
        if loaders.cls_train is None or len(loaders.cls_train) == 0:
            raise ValueError(f"stage {self.stage} has no classification training crops (single-pill photos, or "
                             "combination pills with data.combo_crops=true): check paths.manifest_dir "
                             f"({self.cfg.paths.manifest_dir}) and data.progressive_validation.stage_{self.stage}")
        names = [CLASSIFICATION]
        if loaders.det_train is not None and str(self.cfg.train.strategy) != "classification":
            names.append(DETECTION)
        choices = self._auto_batch(names, loaders)
        if choices:
            loaders = build_loaders(self.cfg)  # rebuilt with the batch sizes the search chose
        self.meta = loaders.meta
        tasks = {name: self._make_task(name, loaders, choices.get(name)) for name in names}
        self.logger.info("tasks: %s (strategy=%s, stage=%d, device=%s)", names, self.cfg.train.strategy, self.stage,
                         self.device)
        return tasks

    def _make_task(self, name: str, loaders: Any, choice: BatchChoice | None = None) -> Task:
        seed = int(self.cfg.train.seed)
        if name == CLASSIFICATION:
            return ClassificationTask(self.cfg, shard_loader(loaders.cls_train, self.info, seed), loaders.cls_val,
                                      loaders.meta, self.device, choice)
        return DetectionTask(self.cfg, shard_loader(loaders.det_train, self.info, seed), loaders.det_val,
                             self.device, choice)

    def _auto_batch(self, names: list[str], loaders: Any) -> dict[str, BatchChoice]:
        """The auto batch search for each task that asks for it; the chosen sizes are written into the config."""
        wanted = [n for n in names if OmegaConf.select(self.cfg, AUTO_BATCH[n][0]).auto_batch_tune]
        if wanted and self.device.type != "cuda" and not os.environ.get(FAKE_OOM_BATCH_ENV):
            self.logger.info("auto batch measures GPU memory; on %s the configured batch sizes are kept",
                             self.device)
            return {}
        choices = {}
        for name in wanted:
            section_key, batch_key = AUTO_BATCH[name]
            task = self._make_task(name, loaders)
            choice = task.find_batch_size(int(OmegaConf.select(self.cfg, section_key).auto_batch_max),
                                          float(self.cfg.train.auto_batch_vram_headroom))
            del task
            OmegaConf.update(self.cfg, batch_key, choice.batch_size)
            self.tb.add_scalar(f"{TB_PREFIX[name]}perf/auto_batch_found", choice.batch_size, 0)
            self.logger.info("%s auto batch: %s=%d, grad_accum %d, fp16 forced: %s", name, batch_key,
                             choice.batch_size, choice.grad_accum, choice.force_fp16)
            self.auto_batch[name] = {"batch_size": choice.batch_size, "grad_accum": choice.grad_accum,
                                     "force_fp16": choice.force_fp16, "trials": len(choice.trials)}
            choices[name] = choice
        return choices

    def _epoch_plan(self) -> list[list[str]]:
        """Tasks trained in each epoch: all of them together, or (sequential) classification then detection."""
        cls_epochs = int(self.cfg.train.epochs)
        if str(self.cfg.train.strategy) == "sequential" and DETECTION in self.tasks:
            return [[CLASSIFICATION]] * cls_epochs + [[DETECTION]] * int(self.cfg.train.detection.epochs)
        return [list(self.tasks)] * cls_epochs

    # ---- resume -----------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """train.resume: restore every task that has a checkpoint; the epochs after the newest one are (re)done."""
        epochs = {}
        for name, task in self.tasks.items():
            path = ck.resume_source(self.cfg.train.resume, self.store.dir, name)
            if path is None:
                continue
            ckpt = load_ckpt(path, map_location=self.device)
            task.load_checkpoint_state(ckpt, origin=str(path))
            epochs[name] = int(ckpt["epoch"])
            self.state.global_step = max(self.state.global_step, int(ckpt.get("global_step") or 0))
            self.logger.info("resumed %s from %s (epoch %d, best %s)", name, path, ckpt["epoch"], ckpt["best_metric"])
        if not epochs:
            return
        self.start_epoch = max(epochs.values())
        self.history = ck.previous_history(self.exp_dir / "reports" / "metrics.json", self.start_epoch)
        es = self.cfg.train.early_stopping
        for name, task in self.tasks.items():
            self.es_state[name] = ck.replay_early_stopping(self.history, name, task.monitor, task.mode,
                                                           float(es.min_delta))

    # ---- validation, checkpoints, stopping --------------------------------------------------------------------------
    def validate(self, epoch: int, active: list[str]) -> dict[str, dict]:
        """Rank 0 validates (val loaders only); every rank receives the same metrics."""
        metrics = {}
        if self.info.is_main:
            for name in active:
                metrics[name] = self.tasks[name].validate(epoch)
                self.callbacks.fire("on_validation_end", name, epoch, metrics[name])
        return broadcast_object(self.info, metrics)

    def _state(self, name: str, epoch: int) -> dict:
        return {**self.tasks[name].checkpoint_state(epoch, self.es_state[name]["best"]),
                "global_step": self.state.global_step}

    def end_epoch(self, epoch: int, active: list[str], train: dict, val: dict) -> None:
        """Early stopping per task, the epoch's history record and metrics.json, then one checkpoint generation."""
        es = self.cfg.train.early_stopping
        record: dict[str, Any] = {"epoch": epoch, "elapsed_s": self.elapsed(), **memory_snapshot()}
        saves = []
        for name in active:
            task = self.tasks[name]
            metric = float(val[name].get(task.monitor, float("nan")))
            stop, is_best = early_stopping(self.es_state[name], metric, task.mode, int(es.patience),
                                           float(es.min_delta))
            if stop and es.enabled:
                self.stopped.add(name)
                self.logger.info("early stopping %s at epoch %d (%s best %.4f)", name, epoch, task.monitor,
                                 self.es_state[name]["best"])
            record[name] = {**val[name], **train[name], "lr": task.lr}
            saves.append(ck.Save(name, ("last", "best") if is_best else ("last",), self._state(name, epoch)))
        self.history.append(record)
        # metrics.json before the checkpoints: a kill in between leaves a history that resume cuts back to the
        # committed epoch, never a committed epoch missing from the history.
        self.callbacks.fire("on_epoch_end", epoch, self.summary(epoch))
        if self.info.is_main:
            self.store.commit(epoch, saves)

    def elapsed(self) -> float:
        return round(self.state.elapsed(), 2)

    def summary(self, epoch: int) -> dict:
        """reports/metrics.json: latest metrics per task, history, stage/time-cap verdict, status."""
        latest = {CLASSIFICATION: CLASSIFICATION_KEYS, DETECTION: DETECTION_KEYS}
        out: dict[str, Any] = {"epoch": epoch, "status": self.status}
        for name, keys in latest.items():
            last = next((h[name] for h in reversed(self.history) if name in h), None)
            if last is not None:
                out[name] = {k: last.get(k) for k in keys}
        out["best"] = {name: s["best"] for name, s in self.es_state.items()}
        out["stage"] = {"current_stage": self.stage, "elapsed_s": self.elapsed()}
        out["system"] = {"device": str(self.device), **memory_snapshot()}
        out["batch"] = {name: {**asdict(task.knobs), "samples_seen": task.samples_seen}
                        for name, task in self.tasks.items()}
        out["auto_batch"] = self.auto_batch
        if self.status == "time_capped":
            cls = self.tasks[CLASSIFICATION]
            out["stage"]["time_cap"] = time_cap_success(self.stage_cfg, cls.samples_seen, len(cls.classes_seen))
        out["history"] = self.history
        return out

    # ---- the run ----------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train all planned epochs (or until early stop / time cap / OOM give-up); returns the exit code."""
        if self.info.is_main:
            ck.write_classes_json(self.store.dir, self.meta)
        self.callbacks.fire("on_train_start", {"tasks": list(self.tasks), "epochs": len(self.plan), "stage": self.stage,
                                               "start_epoch": self.start_epoch})
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
        self.callbacks.fire("on_epoch_start", epoch, {
            "total_steps": sum(self.tasks[t].steps_per_epoch() for t in active), "max_epochs": len(self.plan),
            "batch_size": self.tasks[CLASSIFICATION].knobs.batch_size})
        train = self.runner.train_one_epoch(epoch, active)
        if self.info.enabled:
            for name in active:
                self.tasks[name].sync_replicas()
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
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return code

    def _emergency(self, epoch: int, reason: str) -> int:
        self.status = "oom_emergency_exit"
        if self.info.is_main:
            # epoch-1: the interrupted epoch is incomplete, so a resume from here redoes it.
            done = max(epoch - 1, 0)
            self.store.commit(done, [ck.Save(name, ("emergency",), self._state(name, done)) for name in self.tasks])
            self.logger.error("emergency checkpoints written: %s",
                              ", ".join(str(ck.ckpt_path(self.store.dir, n, "emergency")) for n in self.tasks))
        self.logger.error("training stopped: %s. Lower train.batch_size or model.image_size and resume.", reason)
        self.callbacks.fire("on_train_end", self.summary(epoch))
        return EXIT_OOM


def _prepare_cfg(cfg: DictConfig) -> DictConfig:
    cfg = apply_stage_overrides(cfg, int(cfg.data.progressive_validation.current_stage))
    set_seed(int(cfg.train.seed), bool(cfg.train.deterministic))
    return cfg


def run_training(cfg: DictConfig, build_loaders: BuildLoaders | None = None,
                 callbacks: list[Callback] | None = None) -> tuple[int, Trainer | None]:
    """Run training per `cfg`; returns (exit code, the Trainer or None when it could not start).

    Exit codes: 0 ok, 2 config/resume error, 3 OOM give-up, 4 time cap failed. `build_loaders(cfg)` defaults to
    pillsnap.data.build_dataloaders_twostage; `callbacks` are added to the rank-0 defaults. Under `torchrun` every
    rank runs this; only rank 0 writes files.
    """
    info = init_distributed()
    cfg = _prepare_cfg(cfg)
    exp_dir = Path(cfg.paths.exp_dir)
    if info.is_main:
        for sub in ("logs", "tb", "reports", "checkpoints", "export"):
            ensure_dir(exp_dir / sub)
        # The resolved config of the run, for `pillsnap evaluate` and for people (also inside every checkpoint).
        save_text(exp_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    barrier(info)
    tb = TBWriter(exp_dir, enabled=info.is_main)
    try:
        with run_logging(exp_dir, info.is_main) as logger:
            try:
                trainer = Trainer(cfg, info, logger, tb, build_loaders or partial(default_build_loaders, tb=tb),
                                  callbacks)
                trainer.resume()
            except (ResumeMismatchError, FileNotFoundError, ValueError) as err:
                logger.error("cannot start training: %s", err)
                return EXIT_CONFIG, None
            return trainer.fit(), trainer
    finally:
        tb.close()
        cleanup(info)


def main(cfg: DictConfig, build_loaders: BuildLoaders | None = None) -> int:
    """run_training's exit code alone."""
    return run_training(cfg, build_loaders)[0]
