"""Training entry point: `python -m pillsnap.train --cfg config.yaml [dotted.key=value ...]` (= `pillsnap train`)."""

from __future__ import annotations

import argparse
import sys

from pillsnap.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", default="config.yaml", help="config file (default: config.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=128")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the classifier and detector", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.cfg, args.overrides)
    if args.check:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from pillsnap.engine.trainer import main as train_main

    return int(train_main(cfg) or 0)


def main(argv: list[str] | None = None) -> int:
    from pillsnap.cli import configure_logging, run_command

    parser = argparse.ArgumentParser(prog="python -m pillsnap.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
