"""`pillsnap monitor`: follow a training run live: a dashboard in the browser (default; `--daemon` runs it in the
background), or a table in the terminal (`--terminal`). Works before the run has written anything."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("monitor", help="live training dashboard", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The monitor's flags (shared with scripts/stage3/monitor_stage3_realtime.py)."""
    parser.add_argument("--exp", default=None, help="experiment directory to follow (default: paths.exp_dir of --cfg)")
    parser.add_argument("--cfg", default="config.yaml", help="config file, read only to find paths.exp_dir")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default: %(default)s; 0.0.0.0 to reach it from other machines)")
    parser.add_argument("--port", type=int, default=8888, help="dashboard port (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--daemon", action="store_true",
                      help="run in the background (pid and log in EXP/logs/monitor.pid|log); a second start says "
                           "where the running one is")
    mode.add_argument("--stop", action="store_true", help="stop the background dashboard of this experiment")
    mode.add_argument("--terminal", action="store_true", help="a live table in this terminal instead of a browser page")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (--terminal)")
    parser.add_argument("--pid-file", default=None, help=argparse.SUPPRESS)  # set by --daemon for its server


def resolve_exp(args: argparse.Namespace) -> Path:
    if args.exp:
        return Path(args.exp)
    from pillsnap.config import load_config

    cfg_path = Path(args.cfg)
    cfg = load_config(cfg_path if cfg_path.is_file() else None, dotenv_path=None)
    return Path(cfg.paths.exp_dir)


def run(args: argparse.Namespace) -> int:
    exp = resolve_exp(args)
    if not exp.is_dir():
        LOGGER.warning("monitor: %s does not exist yet; waiting for the run to create it", exp)
    if args.stop:
        return run_stop(exp)
    if args.daemon:
        return run_daemon(exp, args.host, args.port)
    if args.terminal:
        return run_terminal(exp, args.interval)
    return run_server(exp, args.host, args.port, Path(args.pid_file) if args.pid_file else None)


def run_server(exp: Path, host: str, port: int, pid_file: Path | None = None) -> int:
    import uvicorn

    from pillsnap.monitor.daemon import remove_own_pid_file, url_of
    from pillsnap.monitor.dashboard import create_dashboard

    stamp = time.strftime("%Y-%m-%d %H:%M:%S ") if pid_file else ""  # the daemon's log keeps the when
    print(f"{stamp}PillSnap monitor on {url_of(host, port)} (following {exp / 'reports' / 'metrics.jsonl'})",
          flush=True)
    try:
        uvicorn.run(create_dashboard(exp), host=host, port=port, log_level="warning")
    finally:
        if pid_file is not None:
            remove_own_pid_file(pid_file)
            print(time.strftime("%Y-%m-%d %H:%M:%S ") + "PillSnap monitor stopped", flush=True)
    return 0


def run_daemon(exp: Path, host: str, port: int) -> int:
    from pillsnap.monitor.daemon import start_daemon

    try:
        info, started = start_daemon(exp, host, port)
    except RuntimeError as err:
        LOGGER.error("monitor: %s", err)
        return 1
    if started:
        print(f"PillSnap monitor started in the background: {info['url']} (pid {info['pid']}, log {info['log']})")
    else:
        print(f"PillSnap monitor is already running for {exp}: {info['url']} (pid {info['pid']}); "
              f"stop it with --stop")
    return 0


def run_stop(exp: Path) -> int:
    from pillsnap.monitor.daemon import stop_daemon

    info = stop_daemon(exp)
    if info is None:
        print(f"No background monitor is running for {exp}.")
    else:
        print(f"Stopped the PillSnap monitor at {info['url']} (pid {info['pid']}).")
    return 0


def run_terminal(exp: Path, interval: float) -> int:
    """A rich table refreshed every `interval` seconds until the run ends (Ctrl-C to leave earlier)."""
    from rich.live import Live

    from pillsnap.monitor.live import LiveRun
    from pillsnap.monitor.terminal import after_training_under_way, render, trainer_gone

    live = LiveRun(exp)
    live.refresh()
    try:
        with Live(render(live.snapshot()), refresh_per_second=4) as screen:
            while True:
                live.refresh()
                snap = live.snapshot()
                screen.update(render(snap))
                # the work after training goes on past the end record: followed until its verdict
                # and torchrun's restart after a rank's OOM is the same run going on
                ended = snap["run"]["status"] not in ("running", "waiting", "restarting") and \
                    not after_training_under_way(snap)
                if ended or trainer_gone(snap):
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0
