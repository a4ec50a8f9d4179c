"""`pillsnap evaluate --exp EXP --stage N`: the end-of-stage evaluation (Go/No-Go gate, stage criteria, advisor)
of a trained experiment, written to EXP/reports/stage_N_evaluation.json. `pillsnap evaluate --exp EXP --final`: the
final test evaluation of a Stage 4 run's best checkpoints (EXP/reports/final_test_results.json), as training runs it
after Stage 4: again, when that was interrupted or failed. `pillsnap calibrate --exp EXP`: fit the calibration of
its best classifier again (temperature, unknown-pill rules), as training does at its end.

The advisor asks which option to take only on an interactive terminal; --yes, --choice N, no terminal or CI never
block, and the report records what was chosen and how.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any


def add_choice_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="take the advisor's first option without asking")
    parser.add_argument("--choice", type=int, default=None, metavar="N", help="take the advisor's option N")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a stage: Go/No-Go and the advisor's recommendation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="experiment directory (paths.exp_dir of the run)")
    parser.add_argument("--stage", type=int, default=None, choices=(1, 2, 3, 4),
                        help="stage to evaluate (default: the run's data.progressive_validation.current_stage)")
    parser.add_argument("--cfg", default=None,
                        help="config file (default: EXP/config.yaml, the run's resolved config)")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N: where latencies are measured (default: the device the run "
                             "trained on, when this machine has it); with --final, where the test split runs "
                             "(default: cuda when available)")
    parser.add_argument("--final", action="store_true",
                        help="the final test evaluation of a Stage 4 run instead (the test split, which training "
                             "opens once after Stage 4): writes EXP/reports/final_test_results.json")
    add_choice_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run)

    calibrate = subparsers.add_parser(
        "calibrate", help="fit the best classifier's temperature and unknown-pill rules again",
        description="Fit EXP/checkpoints/classification_best.pt's temperature on the validation split and both "
                    "unknown-pill rules (feature distance, probability), measured on the classes held out of the "
                    "stage; writes EXP/checkpoints/calibration.json, unknown_features-<hash>.npz and "
                    "EXP/reports/calibration.json, reliability.png. Training does this at its end.")
    calibrate.add_argument("--exp", required=True, help="experiment directory (paths.exp_dir of the run)")
    calibrate.add_argument("--cfg", default=None,
                           help="config file (default: EXP/config.yaml, the run's resolved config)")
    calibrate.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    calibrate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    calibrate.set_defaults(func=run_calibrate)


def _refused(command: str, err: Exception) -> int:
    """Exit 2 with one line: an input the command cannot run with, or (BusyError) a folder another run holds."""
    from pillsnap.utils.locks import BusyError

    wait = f"; {command.split()[0]} when it has ended" if isinstance(err, BusyError) else ""
    logging.getLogger("pillsnap").error("%s: %s%s", command, err, wait)
    return 2


def _run_config(exp: Path, cfg_file: str | None, overrides: list[str]) -> Any:
    from pillsnap.config import load_run_config

    # the run's own config (EXP/config.yaml unless --cfg), from any directory; both commands read the manifests
    return load_run_config(exp, overrides, cfg_file, required=("manifest_dir",))


def run_calibrate(args: argparse.Namespace) -> int:
    from pillsnap.engine.run import hold_experiment
    from pillsnap.eval.calibration import calibrate_classifier
    from pillsnap.utils.locks import BusyError

    exp = Path(args.exp)
    if not (exp / "checkpoints" / "classification_best.pt").is_file():
        raise FileNotFoundError(f"{exp / 'checkpoints' / 'classification_best.pt'} not found: train first")
    try:
        with hold_experiment(exp, "calibrate"):  # a training run into the folder writes its calibration at its end
            report = calibrate_classifier(_run_config(exp, args.cfg, args.overrides), exp, device=args.device)
    except (ValueError, BusyError) as err:  # no validation split, an unknown unknown_rule; a folder in use
        return _refused("calibrate", err)
    from pillsnap.infer.artefacts import Temperatures

    print(f"temperature {Temperatures.from_stored(report).text()}, ECE {report['ece_before']:.4f} -> "
          f"{report['ece_after']:.4f}; unknown pills by {report['unknown_rule']} -> "
          f"{exp / 'checkpoints' / 'calibration.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import ConfigError
    from pillsnap.engine.run import hold_experiment
    from pillsnap.eval.gates import verdict_line
    from pillsnap.eval.stage_eval import evaluate_stage, format_decision
    from pillsnap.utils.locks import BusyError

    exp = Path(args.exp)
    if args.final:
        return run_final(args)
    if args.choice is not None and not 1 <= args.choice <= 3:  # every verdict offers three options
        logging.getLogger("pillsnap").error("evaluate: --choice must be 1, 2 or 3, got %d", args.choice)
        return 2
    overrides = list(args.overrides)
    if args.stage is not None:
        overrides.append(f"data.progressive_validation.current_stage={args.stage}")
    try:
        # a training run into the folder evaluates its stage at its end (a folder that is not there: no lock file
        # left behind, the config's own error follows)
        with hold_experiment(exp, "evaluate") if exp.is_dir() else contextlib.nullcontext():
            cfg = _run_config(exp, args.cfg, overrides)
            report = evaluate_stage(cfg, exp, choice=args.choice, assume_yes=args.yes, device=args.device)
    except ConfigError:
        raise  # the command line's own "config error: ..." line
    except (ValueError, BusyError) as err:  # another stage's run, an unusable --device; a folder in use
        return _refused("evaluate", err)
    print(format_decision(report))
    print(f"chosen: {report['choice']['text']} ({report['choice']['how']})")
    print(verdict_line(report))
    return 0


def run_final(args: argparse.Namespace) -> int:
    """`pillsnap evaluate --final`: the test split, for a run that owes it (pillsnap.eval.final.final_test_owed: a
    Stage 4 run that trained all it meant to, by its own saved config), on the device asked for (pillsnap.cli
    checks it before any command), holding the experiment folder like any evaluation."""
    from pillsnap.engine.run import hold_experiment
    from pillsnap.eval.final import final_test_evaluation, final_test_owed, final_test_written
    from pillsnap.utils.locks import BusyError

    log = logging.getLogger("pillsnap")
    exp = Path(args.exp)
    if args.stage not in (None, 4):
        log.error("evaluate --final: the test split is evaluated after Stage 4 only, not with --stage %d", args.stage)
        return 2
    if args.yes or args.choice is not None or any(
            o.split("=", 1)[0].strip() == "data.progressive_validation.current_stage" for o in args.overrides):
        log.error("evaluate --final: --yes, --choice and a stage override do not apply: the final test has no "
                  "advisor, and the run's stage is the one it trained")
        return 2
    if not exp.is_dir():
        log.error("evaluate --final: %s: no such experiment folder", exp)
        return 2
    try:
        with hold_experiment(exp, "evaluate"):
            cfg = _run_config(exp, args.cfg, list(args.overrides))
            why = final_test_owed(exp, int(cfg.data.progressive_validation.current_stage))
            if why is not None:
                log.error("evaluate --final: %s: %s", exp, why)
                return 2
            if final_test_written(exp):
                log.warning("evaluate --final: %s has its final test results already; evaluating the same "
                            "checkpoints again", exp)
            result = final_test_evaluation(cfg, device=args.device)  # checked before any command (pillsnap.cli)
    except BusyError as err:  # a config error has the command line's own line; anything else its traceback
        return _refused("evaluate --final", err)
    print(f"final test evaluation: {result['recommendation']} -> {exp / 'reports' / 'final_test_results.json'}")
    for line in result["improvements"]:
        print(f"  {line}")
    return 0
