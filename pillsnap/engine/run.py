"""The training process around a run: the experiment folder held for this process alone, the run's log files,
every stop signal as an interrupt, the process group joined and left, and the exit code.

`run_training` is the engine's entry point (`pillsnap train` adds the work after training, pillsnap/train.py); the
run itself (build, resume, epochs, checkpoints) is `Trainer` in engine/trainer.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pillsnap.config import apply_stage_overrides, check_ranges, check_tf32
from pillsnap.engine import checkpointing as ck
from pillsnap.engine.build import BuildLoaders
from pillsnap.engine.callbacks import Callback
from pillsnap.engine.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from pillsnap.engine.restart import settle_restart
from pillsnap.engine.task import ResumeMismatchError, Task
from pillsnap.engine.trainer import (
    DEFAULT_TASKS,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OOM,
    Trainer,
)
from pillsnap.utils import TBWriter, build_logger, ensure_dir, set_seed
from pillsnap.utils.io import save_text
from pillsnap.utils.locks import RUN_LOCK, BusyError, file_lock
from pillsnap.utils.logs import streams_are_logs
from pillsnap.utils.signals import stops_as_interrupt

LOGGER = logging.getLogger(__name__)


@contextmanager
def run_logging(exp_dir: Path, enabled: bool) -> Iterator[logging.Logger]:
    """Console + logs/pillsnap.log + logs/train.out (INFO) + logs/train.err (WARNING); handlers removed at the end.
    Under scripts/train.sh the process's own streams are written to train.out/err, so no handlers are added.
    The other ranks of a torchrun job (`enabled` False) say only warnings and errors: every rank repeating rank 0's
    progress lines would bury them."""
    logger = build_logger(exp_dir) if enabled else logging.getLogger("pillsnap")
    saved_level = logger.level
    if not enabled:
        logger.setLevel(max(logging.WARNING, saved_level))
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
        logger.setLevel(saved_level)
        logs_dir = str((exp_dir / "logs").resolve())
        for handler in list(logger.handlers):
            if handler in added or str(getattr(handler, "baseFilename", "")).startswith(logs_dir):
                logger.removeHandler(handler)
                handler.close()


def default_build_loaders(cfg: DictConfig, tb: TBWriter | None = None) -> Any:
    """pillsnap.data's loaders for the current stage (never the test split while training)."""
    from pillsnap.data import build_dataloaders_twostage

    return build_dataloaders_twostage(cfg, build_test=False, tb=tb)


def _prepare_cfg(cfg: DictConfig) -> DictConfig:
    cfg = apply_stage_overrides(cfg, int(cfg.data.progressive_validation.current_stage))
    check_ranges(cfg)  # what the stage's overrides set, and a config changed after it was loaded
    check_tf32(cfg)
    set_seed(int(cfg.train.seed), bool(cfg.train.deterministic))
    return cfg


@contextmanager
def hold_experiment(exp_dir: str | Path, role: str = "train") -> Iterator[None]:
    """The experiment folder for this process alone (its run.lock); BusyError names the process that holds it.
    Two runs writing one folder would interleave their checkpoints, logs and history. `role` ("train",
    "calibrate", "evaluate") tells the monitor which holder is a trainer."""
    with file_lock(Path(exp_dir) / RUN_LOCK, role=role):
        yield


def run_training(cfg: DictConfig, build_loaders: BuildLoaders | None = None,
                 callbacks: list[Callback] | None = None,
                 task_types: Sequence[type[Task]] = DEFAULT_TASKS,
                 after: Callable[[int, Trainer], int] | None = None) -> tuple[int, Trainer | None]:
    """Run training per `cfg`; returns (exit code, the Trainer or None when it could not start).

    Exit codes: 0 ok (also: a resume with nothing left to train, Trainer.trains_nothing), 2 config/resume error or
    an experiment folder another run holds, 3 OOM give-up (under DDP: any OOM, its recovery saved for the restart),
    4 time cap failed, 130 interrupted (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1). `build_loaders(cfg)` defaults to
    pillsnap.data.build_dataloaders_twostage; `callbacks` are added to the rank-0 defaults; `task_types` are the
    Task classes the run may train; `after(code, trainer)`: rank 0's work once the process group is gone (reports,
    calibration, the stage decision), still holding the folder and with a stop still an interrupt; it returns the
    run's exit code. Under `torchrun` every rank runs this; only rank 0 writes files (and a rank that runs out of
    memory, its recovery file).
    """
    info = init_distributed(float(cfg.train.get("ddp_timeout_minutes", 120)))
    cfg = _prepare_cfg(cfg)
    exp_dir = Path(cfg.paths.exp_dir)
    with ExitStack() as held:
        busy = None
        if info.is_main:  # before anything is written: a refused run leaves the folder as the other run has it
            try:
                held.enter_context(hold_experiment(exp_dir))
            except BusyError as err:
                busy = str(err)
        busy = broadcast_object(info, busy)
        if busy is not None:
            if info.is_main:
                LOGGER.error("cannot start training: %s; wait for that run to end or stop it, or train into "
                             "another folder (paths.exp_dir=...)", busy)
            cleanup(info)
            return EXIT_CONFIG, None
        with stops_as_interrupt():
            code, trainer = _train_in(exp_dir, cfg, info, build_loaders, callbacks, task_types)
            if after is not None and trainer is not None and info.is_main:
                with _alone_on_the_machine(info):
                    code = after(code, trainer)
            return code, trainer


@contextmanager
def _alone_on_the_machine(info: DistInfo) -> Iterator[None]:
    """Rank 0's work after training runs once the other ranks have left, so the machine's cores and /dev/shm are its
    own: its loaders (calibration, the stage evaluation, the final test) would otherwise keep the share of one rank
    of LOCAL_WORLD_SIZE (1 worker a loader for 8 ranks on 16 cores)."""
    saved = os.environ.get("LOCAL_WORLD_SIZE")
    if info.enabled and saved is not None:
        os.environ["LOCAL_WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_WORLD_SIZE"] = saved


def _train_in(exp_dir: Path, cfg: DictConfig, info: DistInfo, build_loaders: BuildLoaders | None,
              callbacks: list[Callback] | None, task_types: Sequence[type[Task]]) -> tuple[int, Trainer | None]:
    if info.is_main:
        for sub in ("logs", "tb", "reports", "checkpoints", "export"):
            ensure_dir(exp_dir / sub)
        # The resolved config of the run, for `pillsnap evaluate` and for people (also inside every checkpoint).
        save_text(exp_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    barrier(info)
    tb = TBWriter(exp_dir, enabled=info.is_main)
    code: int | None = None
    try:
        with run_logging(exp_dir, info.is_main) as logger:
            code, trainer = _start_and_fit(cfg, info, logger, tb,
                                           build_loaders or partial(default_build_loaders, tb=tb), callbacks,
                                           task_types)
            return code, trainer
    finally:
        tb.close()
        # A rank that stops on an OOM, an interrupt or an error may leave the others inside a collective: abort
        # its communicators rather than flush them (the flush would wait for that collective).
        cleanup(info, abort=code is None or code in (EXIT_OOM, EXIT_INTERRUPTED))


def _start_and_fit(cfg: DictConfig, info: DistInfo, logger: logging.Logger, tb: TBWriter,
                   build_loaders: BuildLoaders, callbacks: list[Callback] | None,
                   task_types: Sequence[type[Task]]) -> tuple[int, Trainer | None]:
    restart, older_before = settle_restart(cfg, info, logger)
    if not cfg.train.resume:
        earlier = ck.earlier_run(Path(cfg.paths.exp_dir) / "checkpoints") if info.is_main else None
        if earlier is not None:
            logger.warning("%s holds %s: this fresh run replaces its last and best checkpoints, classes.json and "
                           "reports as it goes (stage links such as stage1_classification_best.pt stay). To keep "
                           "it, give this run its own paths.exp_dir; to go on with it, train.resume=last",
                           cfg.paths.exp_dir, earlier)
        tb.purge_from(0)  # a fresh run: TensorBoard shows this one alone, not over the folder's earlier runs
    try:
        trainer = Trainer(cfg, info, logger, tb, build_loaders, callbacks, task_types)
        trainer.resume_newer_than = older_before  # another task's last file may be an older run's
        trainer.restart = restart
        trainer.resume()
        trainer.check_resumed_alike()
        trainer.apply_saved_recovery(resuming=bool(cfg.train.resume) or restart > 0)
    except (ResumeMismatchError, FileNotFoundError, ValueError) as err:
        logger.error("cannot start training: %s", err)
        return EXIT_CONFIG, None
    except KeyboardInterrupt:
        logger.warning("interrupted before training started")
        return EXIT_INTERRUPTED, None
    why = trainer.trains_nothing()
    if why is not None and not trainer.has_record():
        # checkpoints resumed from another folder (or a folder whose reports were removed): no training of this
        # folder to end, and nothing of it to finish
        logger.warning("%s; %s records no training to finish: nothing is trained or written",
                       why, Path(cfg.paths.exp_dir) / "reports" / "metrics.json")
        return EXIT_OK, None
    return trainer.fit(), trainer


def main(cfg: DictConfig, build_loaders: BuildLoaders | None = None) -> int:
    """run_training's exit code alone."""
    return run_training(cfg, build_loaders)[0]
