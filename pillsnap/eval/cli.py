"""`pillsnap evaluate --exp EXP --stage N`: the end-of-stage evaluation (Go/No-Go gate, stage criteria, advisor)
of a trained experiment, written to EXP/reports/stage_N_evaluation.json.

The advisor asks which option to take only on an interactive terminal; --yes, --choice N, no terminal or CI never
block, and the report records what was chosen and how.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    add_choice_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import load_config
    from pillsnap.eval.stage_eval import evaluate_stage, format_decision

    exp = Path(args.exp)
    cfg_path = Path(args.cfg) if args.cfg else exp / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: give --cfg, or train the experiment first "
                                "(a run writes its resolved config to EXP/config.yaml)")
    overrides = [f"paths.exp_dir={exp}", *args.overrides]
    if args.stage is not None:
        overrides.append(f"data.progressive_validation.current_stage={args.stage}")
    cfg = load_config(cfg_path, overrides, dotenv_path=None)
    report = evaluate_stage(cfg, exp, choice=args.choice, assume_yes=args.yes)
    print(format_decision(report))
    print(f"chosen: {report['choice']['text']} ({report['choice']['how']})")
    return 0
