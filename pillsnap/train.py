"""Training entry point: `python -m pillsnap.train --cfg config.yaml [dotted.key=value ...]` (= `pillsnap train`).

Runs the engine, then what a finished run owes its user: the classifier's report plots from the validated
weights and, after the last stage, the one evaluation on the test split.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)
ONLY = {"classification": {"train.strategy": "classification"},
        # sequential with no classification epochs: the detector alone, for train.detection.epochs
        "detection": {"train.strategy": "sequential", "train.epochs": 0}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", default="config.yaml", help="config file (default: config.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--only", choices=sorted(ONLY), default=None,
                        help="train one model alone (default: what train.strategy says)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=128")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the classifier and detector", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def write_reports(trainer: Any) -> list[Path]:
    """Confusion matrix and ROC/PR curves of the validated classifier weights, into reports/."""
    from pillsnap.eval.reports import write_classification_reports

    task = trainer.tasks.get("classification")
    if task is None or not any("classification" in epoch for epoch in trainer.plan):
        return []
    y_true, y_prob = task.predict_val()
    paths = write_classification_reports(y_true, y_prob, list(task.meta.get("class_names") or []),
                                         trainer.exp_dir / "reports")
    LOGGER.info("reports: %s", ", ".join(p.name for p in paths) or "none (no validation data)")
    return paths


def train(cfg: Any, build_loaders: Callable[[Any], Any] | None = None) -> int:
    """Train per `cfg`, write the reports, and run the final test evaluation after stage 4; returns the exit code
    (0 ok, 2 config/resume error, 3 OOM give-up, 4 time cap failed)."""
    from pillsnap.engine.trainer import EXIT_OK, run_training

    code, trainer = run_training(cfg, build_loaders)
    if trainer is None or not trainer.info.is_main:
        return code
    write_reports(trainer)
    if code == EXIT_OK and trainer.stage == 4 and trainer.status != "time_capped":
        from pillsnap.eval.final import final_test_evaluation  # the test split, once, after the last stage

        final_test_evaluation(trainer.cfg)
    return code


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


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import load_config

    cfg = load_config(args.cfg, args.overrides)
    if args.check:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    return train(only(cfg, args.only) if args.only else cfg)


def main(argv: list[str] | None = None) -> int:
    from pillsnap.cli import configure_logging, run_command

    parser = argparse.ArgumentParser(prog="python -m pillsnap.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
