#!/usr/bin/env python3
"""Live dashboard of a (Stage 3) training run: `pillsnap monitor` under the name the Stage 3 README uses, with the
same flags. Opens http://127.0.0.1:8888 following EXP/reports/metrics.jsonl (EXP: --exp, else paths.exp_dir of
--cfg): per-task loss and validation curves, learning rate, throughput, data vs compute time, progress and ETA,
system resources, OOM events, and the stage's Go/No-Go decision.

Usage:
  python scripts/stage3/monitor_stage3_realtime.py [--exp EXP] [--port 8888] [--host 127.0.0.1]
  python scripts/stage3/monitor_stage3_realtime.py --daemon     # background; pid and log in EXP/logs/monitor.*
  python scripts/stage3/monitor_stage3_realtime.py --stop       # stop the background dashboard
  python scripts/stage3/monitor_stage3_realtime.py --terminal   # a table in this terminal instead
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from pillsnap.cli import configure_logging, run_command
    from pillsnap.monitor.cli import add_arguments, run

    parser = argparse.ArgumentParser(prog="monitor_stage3_realtime.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    return run_command(run, args)


if __name__ == "__main__":
    from _venv import use_project_python  # beside this script

    use_project_python()
    sys.exit(main())
