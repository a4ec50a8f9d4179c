"""Training entry point: `python -m pillsnap.train --cfg config.yaml [dotted.key=value ...]` (= `pillsnap train`).

Runs the engine, then what a finished run owes its user (the work after training): the classifier's calibration,
its report plots from the validated weights, the stage's evaluation and, after the last stage, the one evaluation on
the test split. Each step records itself done in reports/after_training.json: a run resumed with nothing left to
train (a torchrun restart, a rerun) does the steps left, and nothing twice. A step that fails (a photo, a device, a
plot) costs that step, not the others, except that the stage evaluation and the final test wait for a calibration
that failed. One run per experiment folder: a second one on a folder in use is refused, naming the first (its
run.lock). Exit codes: 0 done, 1 any other error, 2 a config, resume or input error or a folder in use, 3 out of
memory (for good; under torchrun, a restart applies the recovery it saved), 4 the stage's time cap without its
minimums, 5 trained and saved but a step of the work after training failed (the log names the commands that finish
it; a resume does them too), 130 interrupted (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 or SIGQUIT; the last lines say how
to resume, or how to finish the work after training).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)
# training finished and saved, but a step of the work after it failed (the log names the commands that finish it)
EXIT_AFTER_TRAINING = 5
# the steps measured through the calibrated answers: a calibration that failed leaves them for after it
AFTER_CALIBRATION = ("stage_evaluation", "final_test")
ONLY = {"classification": {"train.strategy": "classification"},
        # sequential with no classification epochs: the detector alone, for train.detection.epochs
        "detection": {"train.strategy": "sequential", "train.epochs": 0}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", default="config.yaml", help="config file (default: config.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--only", choices=sorted(ONLY), default=None,
                        help="train one model alone (default: what train.strategy says)")
    parser.add_argument("--yes", action="store_true",
                        help="stage evaluation: take the advisor's first option without asking")
    parser.add_argument("--choice", type=int, default=None, metavar="N",
                        help="stage evaluation: take the advisor's option N")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=128")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the classifier and detector", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run, prog="pillsnap train")


def probability_tasks(trainer: Any) -> list[Any]:
    """The trained tasks whose validation gives class probabilities (the classifier): reports and calibration."""
    return [task for name, task in trainer.tasks.items() if task.spec.class_probabilities and trainer.trains(name)]


def write_reports(trainer: Any) -> list[Path]:
    """Confusion matrix and ROC/PR curves of the validated classifier weights, into reports/."""
    from pillsnap.eval.after_training import mark_done
    from pillsnap.eval.outputs import eval_loader
    from pillsnap.eval.reports import write_classification_reports

    paths: list[Path] = []
    for task in probability_tasks(trainer):
        # a loader of its own, sized as the loaders of the work after training are (run_training's after-work
        # counts this process alone on the machine; the training's was sized for one rank of many)
        loader = None if task.val_loader is None else eval_loader(task.val_loader.dataset, trainer.cfg)
        y_true, y_prob = task.predict_val(loader)
        paths += write_classification_reports(y_true, y_prob, task.class_names(), trainer.exp_dir / "reports")
        LOGGER.info("reports: %s", ", ".join(p.name for p in paths) or "none (no validation data)")
    mark_done(trainer.exp_dir, "reports")
    return paths


def calibrate(trainer: Any, build_loaders: Callable[[Any], Any] | None) -> dict | None:
    """Temperature and unknown-pill threshold of the best classifier, fit on the validation split (with the box
    check of the detector). A run that trained only the detector calibrates its box check again, into the
    classifier's calibration."""
    from pillsnap.eval.after_training import mark_done
    from pillsnap.eval.calibration import calibrate_classifier, load_manifest_if_any

    if any(task.val_loader is not None for task in probability_tasks(trainer)):
        return calibrate_classifier(trainer.cfg, trainer.exp_dir, build_loaders, device=trainer.device)
    if trainer.trains("detection"):
        from pillsnap.eval.box_calibration import refresh_box_check

        refresh_box_check(trainer.cfg, trainer.exp_dir, load_manifest_if_any(trainer.cfg), trainer.device)
    mark_done(trainer.exp_dir, "calibration")
    return None


def link_stage_checkpoints(trainer: Any) -> list[Path]:
    """stage{N}_{task}_best.pt: the stage's best checkpoints under the names the stage scripts use (hard links)."""
    from pillsnap.engine.checkpointing import ckpt_path, link_or_copy

    linked = []
    for task in trainer.tasks:
        best = ckpt_path(trainer.store.dir, task, "best")
        if best.is_file():
            alias = trainer.store.dir / f"stage{trainer.stage}_{task}_best.pt"
            link_or_copy(best, alias)
            linked.append(alias)
    return linked


def train(cfg: Any, build_loaders: Callable[[Any], Any] | None = None, choice: int | None = None,
          assume_yes: bool = False) -> int:
    """Train per `cfg`, then write the reports, link the stage's checkpoints, evaluate the stage
    (train.stage_evaluation) and, after stage 4, run the final test evaluation, all while holding the experiment
    folder. Returns the exit code (0 ok, 2 config/resume error or a folder another run holds, 3 OOM give-up, 4 time
    cap failed, 130 interrupted). An interrupt in the work after training raises KeyboardInterrupt (the checkpoints
    are whole: training_ended says so)."""
    from pillsnap.engine.run import run_training

    return run_training(cfg, build_loaders, after=partial(_after_training, build_loaders=build_loaders,
                                                          choice=choice, assume_yes=assume_yes))[0]


def training_ended(exp_dir: str | Path, since: float) -> bool:
    """Whether a run interrupted now had already ended its training on its own: its reports/metrics.json, written
    since `since`, says completed, early stop or time cap. Then the checkpoints are whole and what is left is the
    work after training (its commands, or a resume, which trains nothing and does the steps left). scripts/train.sh
    asks the same."""
    from pillsnap.utils.run_status import FINISHED_STATUSES

    path = Path(exp_dir) / "reports" / "metrics.json"
    try:
        if path.stat().st_mtime < since:
            return False
        status = json.loads(path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return False
    return status in FINISHED_STATUSES


def _after_training(code: int, trainer: Any, build_loaders: Callable[[Any], Any] | None, choice: int | None,
                    assume_yes: bool) -> int:
    from pillsnap.engine.run import run_logging
    from pillsnap.engine.trainer import EXIT_INTERRUPTED, EXIT_OK, EXIT_OOM, EXIT_TIME_CAP
    from pillsnap.eval.after_training import AfterTrainingRecord
    from pillsnap.eval.final import final_test_missing

    if code == EXIT_INTERRUPTED:
        return code
    if code == EXIT_OOM and trainer.info.enabled:  # stopped for a torchrun restart: no reports on a full GPU
        return code
    record = AfterTrainingRecord.of(trainer.exp_dir)
    steps = {"calibration": True, "reports": True,
             "stage_evaluation": code in (EXIT_OK, EXIT_TIME_CAP) and bool(trainer.cfg.train.stage_evaluation),
             # bound to the training by its own results (final_test_written)
             "final_test": code == EXIT_OK and final_test_missing(trainer.exp_dir, trainer.stage)}
    left = [step for step, owed in steps.items() if owed and (step == "final_test" or record.owes(step))]
    work = {"calibration": lambda: calibrate(trainer, build_loaders),
            "reports": lambda: write_reports(trainer),
            "stage_evaluation": lambda: _evaluate_stage(trainer, build_loaders, choice, assume_yes),
            "final_test": lambda: _final_test(trainer)}
    failed: list[str] = []
    # The run's log files again: the calibration and the stage decision belong in logs/pillsnap.log too.
    with run_logging(trainer.exp_dir, True):
        done = [step for step in record.done if step not in left]
        if done:
            LOGGER.warning("work after this training already done: %s (%s); %s", ", ".join(done), record.path,
                           f"left: {', '.join(left)}" if left else "nothing is left to do")
        link_stage_checkpoints(trainer)  # the stage's names for its best weights, whatever the steps left do
        waiting: list[str] = []
        for step in left:
            if step in AFTER_CALIBRATION and "calibration" in failed:
                waiting.append(step)  # measured through the calibrated answers: it waits for the calibration
                continue
            # each step records itself done (after_training.mark_done), so a failure in a later one keeps it
            try:
                with after_training_phase(trainer.exp_dir, step):
                    work[step]()
            except Exception:  # a photo, a device, a plot: the training is saved; the other steps still run
                LOGGER.exception("%s after training failed", step.replace("_", " "))
                failed.append(step)
        if failed:
            LOGGER.error("training finished and its checkpoints are whole, but the work after it failed in: %s "
                         "(the error above)%s; finish it with: %s", ", ".join(failed),
                         f", and {', '.join(waiting)} waited for the calibration" if waiting else "",
                         _finish_line(trainer.exp_dir, trainer.stage, failed + waiting))
            return EXIT_AFTER_TRAINING if code == EXIT_OK else code  # a time cap's 4 says more
    return code


def _finish_line(exp_dir: Path, stage: int, steps: list[str]) -> str:
    """The commands that do `steps` of the work after training, and the resume that does them all (the report
    plots have no command of their own)."""
    from pillsnap.eval.after_training import STEPS

    commands = _step_commands(exp_dir, stage)
    resume = "the same training command with train.resume=last (it trains nothing and does every step left)"
    named = [commands[step] for step in STEPS if step in steps and step in commands]
    if "reports" in steps or not named:
        return resume + (f"; or, for the other steps: {' && '.join(named)}" if named else "")
    return f"{' && '.join(named)} (or {resume})"


def _step_commands(exp_dir: str | Path, stage: int) -> dict[str, str]:
    """The command that does each step of the work after training that has one (the report plots have none)."""
    exp = shlex.quote(str(exp_dir))
    return {"calibration": f"pillsnap calibrate --exp {exp}",
            "stage_evaluation": f"pillsnap evaluate --exp {exp} --stage {stage}",
            "final_test": f"pillsnap evaluate --exp {exp} --final"}


def _evaluate_stage(trainer: Any, build_loaders: Callable[[Any], Any] | None, choice: int | None,
                    assume_yes: bool) -> None:
    from pillsnap.eval.stage_eval import evaluate_stage

    evaluate_stage(trainer.cfg, trainer.exp_dir, choice, assume_yes, build_loaders=build_loaders)


@contextmanager
def after_training_phase(exp_dir: Path, step: str) -> Iterator[None]:
    """A step of the work after training, told to the stream (metrics.jsonl: `after_training` records, `event`
    start, then done or failed) so that the dashboard shows it: at Stage 4 the calibration, the evaluation and the
    final test take hours after the `end` record, and the page said "completed", decision "pending", throughout."""
    from pillsnap.utils import append_jsonl

    stream = Path(exp_dir) / "reports" / "metrics.jsonl"

    def tell(event: str) -> None:
        append_jsonl(stream, {"type": "after_training", "time": round(time.time(), 3), "step": step, "event": event})

    tell("start")
    try:
        yield
    except BaseException:
        tell("failed")
        raise
    tell("done")


def _final_test(trainer: Any) -> None:
    """The test split, once, after the last stage."""
    from pillsnap.eval.final import final_test_evaluation

    final_test_evaluation(trainer.cfg, device=str(trainer.device))


def finish_command(exp_dir: str | Path, stage: int) -> str:
    """The commands that do the work after training left by a run interrupted in it: the calibration (with a
    classifier to calibrate), the stage's evaluation and, after a whole Stage 4, the final test evaluation; those
    already done for this training (reports/after_training.json) are left out."""
    from pillsnap.eval.after_training import AfterTrainingRecord
    from pillsnap.eval.final import final_test_missing

    exp = Path(exp_dir)
    record, commands = AfterTrainingRecord.of(exp), _step_commands(exp, stage)
    steps = []
    if (exp / "checkpoints" / "classification_best.pt").is_file() and record.owes("calibration"):
        steps.append(commands["calibration"])
    if record.owes("stage_evaluation"):
        steps.append(commands["stage_evaluation"])
    if final_test_missing(exp, stage):
        steps.append(commands["final_test"])
    return " && ".join(steps)


def only(cfg: Any, model: str) -> Any:
    """A copy of `cfg` that trains one model alone ("classification" or "detection")."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    for key, value in ONLY[model].items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _train_one(cfg: Any, model: str, checkpoint: str, build_loaders: Callable[[Any], Any] | None) -> Path:
    cfg = only(cfg, model)
    code = train(cfg, build_loaders)
    if code != 0:
        raise RuntimeError(f"training ended with exit code {code}; see {cfg.paths.exp_dir}/logs/train.err")
    return Path(cfg.paths.exp_dir) / "checkpoints" / checkpoint


def train_classification_stage(cfg: Any, build_loaders: Callable[[Any], Any] | None = None) -> Path:
    """The classifier alone (the design's name); returns classification_best.pt."""
    return _train_one(cfg, "classification", "classification_best.pt", build_loaders)


def train_detection_stage(cfg: Any, build_loaders: Callable[[Any], Any] | None = None) -> Path:
    """The detector alone for train.detection.epochs (the design's name); returns detection_best.pt."""
    return _train_one(cfg, "detection", "detection_best.pt", build_loaders)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues an interrupted run from its last checkpoints, from the folder it was started
    in (`cd` first: a relative --cfg or path override read from elsewhere named another config, or an empty folder
    where the resume started afresh). Under torchrun, the launcher's own command with its options (restarts,
    forwarded signals, rendezvous), read from the process that started this one where it can be; else a torchrun
    command with this node's number of processes (a plain `python -m pillsnap.train` would resume on one GPU)."""
    launcher = str(getattr(args, "prog", "python -m pillsnap.train")).split()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = _torchrun_launcher() or _plain_torchrun()
    parts = [*launcher, "--cfg", args.cfg]
    if args.only:
        parts += ["--only", args.only]
    parts += [o for o in args.overrides if not o.startswith("train.resume=")] + ["train.resume=last"]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(parts)}"


def _plain_torchrun() -> list[str]:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    nodes = int(os.environ.get("WORLD_SIZE") or per_node) // max(per_node, 1)
    return ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(per_node), "-m",
            "pillsnap.train"]


def _torchrun_launcher(cmdline: Path | None = None) -> list[str] | None:
    """torchrun's part of the command that started this rank (its options, up to `-m pillsnap.train`), with the
    store setting a restart needs (engine.restart.SEPARATE_STORES_ENV) in front; None where the parent process is
    not a torchrun of `-m pillsnap.train` that this process can read."""
    from pillsnap.engine.restart import SEPARATE_STORES_ENV

    try:
        argv = (cmdline or Path(f"/proc/{os.getppid()}/cmdline")).read_bytes().decode(errors="replace")
    except OSError:
        return None
    argv = argv.rstrip("\0").split("\0")
    for i, (flag, module) in enumerate(zip(argv, argv[1:], strict=False)):
        if flag == "-m" and module == "pillsnap.train":
            entry = i
            break
    else:
        return None
    start = next((k for k, a in enumerate(argv[:2]) if Path(a).name == "torchrun"), None)
    if start is not None:
        launcher = ["torchrun", *argv[start + 1:entry]]
    elif argv[1:3] == ["-m", "torch.distributed.run"]:
        launcher = argv[:entry]
    else:
        return None
    store = os.environ.get(SEPARATE_STORES_ENV)
    return ([f"{SEPARATE_STORES_ENV}={store}"] if store else []) + launcher + ["-m", "pillsnap.train"]


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import check_tf32, load_config

    cfg = load_config(args.cfg, args.overrides)
    check_tf32(cfg)  # what the run would refuse at its start, said before anything is built
    if args.check:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from pillsnap.engine.trainer import EXIT_INTERRUPTED

    started = time.time()
    try:
        code = train(only(cfg, args.only) if args.only else cfg, choice=args.choice, assume_yes=args.yes)
    except KeyboardInterrupt:  # outside the training's own handling: after it, or while it was set up or saving
        code = EXIT_INTERRUPTED
    if code != EXIT_INTERRUPTED:
        return code
    exp, stage = cfg.paths.exp_dir, int(cfg.data.progressive_validation.current_stage)
    if training_ended(exp, started):  # the steps cut short are run on their own instead of a resume
        # a resume trains nothing and does the steps left, the report plots too (they have no command of their own)
        left, resume = finish_command(exp, stage), resume_command(args)
        hint = ("interrupted after training; finish with: %s", f"{left} (or: {resume})" if left else resume)
    else:  # a resume with no checkpoints yet starts fresh, so the hint always holds
        hint = ("interrupted; resume with: %s", resume_command(args))
    if int(os.environ.get("RANK") or 0) == 0:  # once, not from every rank of a torchrun job
        LOGGER.warning(*hint)
    return code


def main(argv: list[str] | None = None) -> int:
    from pillsnap.cli import add_logging_arguments, configure_logging, run_command

    parser = argparse.ArgumentParser(prog="python -m pillsnap.train", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(prog="python -m pillsnap.train")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.log_level)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
