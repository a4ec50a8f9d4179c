"""`pillsnap monitor`: follow a training run live, in the browser (default) or in the terminal."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("monitor", help="live training dashboard", description=__doc__)
    parser.add_argument("--exp", required=True, help="experiment directory (paths.exp_dir) of the run to follow")
    parser.add_argument("--host", default="127.0.0.1", help="dashboard bind address")
    parser.add_argument("--port", type=int, default=8888, help="dashboard port (seed: 8888)")
    parser.add_argument("--terminal", action="store_true", help="show a live table in the terminal instead")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (terminal)")
    parser.set_defaults(func=run)


def _table(summary: dict):
    from rich.table import Table

    table = Table(title=f"PillSnap: {summary['status']}  epoch {summary['epoch']}  OOM {summary['oom_events']}")
    for col in ("task", "kind", "metrics"):
        table.add_column(col)
    for kind, block in (("step", summary["last_step"]), ("val", summary["last_val"])):
        for task, rec in block.items():
            shown = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, (int, float)))
            table.add_row(task, kind, shown)
    return table


def run_terminal(exp: Path, interval: float) -> int:
    from rich.live import Live

    from pillsnap.monitor.stream import MetricsFollower

    follower = MetricsFollower(exp / "reports" / "metrics.jsonl")
    follower.poll()
    with Live(_table(follower.summary()), refresh_per_second=4) as live:
        while follower.summary()["status"] in ("running", "waiting"):
            time.sleep(interval)
            follower.poll()
            live.update(_table(follower.summary()))
    return 0


def run(args: argparse.Namespace) -> int:
    exp = Path(args.exp)
    if not exp.is_dir():
        raise SystemExit(f"monitor: experiment directory not found: {exp}")
    if args.terminal:
        return run_terminal(exp, args.interval)
    import uvicorn

    from pillsnap.monitor.dashboard import create_dashboard

    print(f"PillSnap monitor on http://{args.host}:{args.port} (following {exp / 'reports' / 'metrics.jsonl'})")
    uvicorn.run(create_dashboard(exp), host=args.host, port=args.port, log_level="warning")
    return 0
