"""`pillsnap` command line: one subcommand per concern, each module registering its own arguments.

Command modules keep heavy imports (torch, ultralytics) inside their run functions so that
`pillsnap --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from collections.abc import Callable

# subcommand -> module exposing register(subparsers); each registers a parser with a `func` default.
COMMAND_MODULES = (
    "pillsnap.data.cli",      # data synth | scan | cache
    "pillsnap.train",         # train
    "pillsnap.eval.cli",      # evaluate, calibrate
    "pillsnap.infer.cli",     # predict
    "pillsnap.infer.enrol_cli",  # enrol
    "pillsnap.infer.export",  # export
    "pillsnap.demo",          # demo
    "pillsnap.serve.cli",     # serve
    "pillsnap.monitor.cli",   # monitor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pillsnap", description="PillSnap: which drugs are in this photo?")
    add_logging_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    from pillsnap.utils.logs import LOG_LEVELS

    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (= --log-level DEBUG)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="log level of every logger (default: INFO, or $PILLSNAP_LOG_LEVEL)")


def configure_logging(verbose: bool = False, level: str | None = None) -> None:
    """Console logging for command-line use (library code only uses getLogger)."""
    from pillsnap.utils.logs import LOG_LEVEL_ENV, set_log_level

    set_log_level("DEBUG" if verbose else level or os.environ.get(LOG_LEVEL_ENV) or "INFO")


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command at the process boundary: a config problem or a missing file is one clear line, exit code 2;
    Ctrl-C is one line too, exit code 130 (`pillsnap train` says how to resume before that)."""
    from pillsnap.config import ConfigError
    from pillsnap.utils.devices import DeviceError, resolve_device
    from pillsnap.utils.logs import LOGGED
    from pillsnap.utils.signals import EXIT_INTERRUPTED

    try:
        if getattr(args, "device", None):
            resolve_device(args.device)  # a device this machine lacks: said before anything loads
        return int(func(args) or 0)
    except DeviceError as err:
        logging.getLogger("pillsnap").error("%s", err)
        return 2
    except ConfigError as err:
        logging.getLogger("pillsnap").error("config error: %s", err)
        return 2
    except FileNotFoundError as err:  # e.g. `pillsnap serve` on an experiment with no checkpoints
        logging.getLogger("pillsnap").error("%s", err)
        return 2
    except KeyboardInterrupt:  # a traceback here would only show where the command happened to be
        logging.getLogger("pillsnap").warning("interrupted")  # also how a server stopped with Ctrl-C ends
        return EXIT_INTERRUPTED
    except Exception as err:
        if getattr(err, LOGGED, False):  # its traceback is in the log already (a training crash): not twice
            return 1
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    configure_logging(args.verbose, args.log_level)
    return run_command(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
