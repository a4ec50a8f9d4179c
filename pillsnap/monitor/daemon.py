"""`pillsnap monitor --daemon`: the dashboard as a detached background process, one per experiment, found again
through {exp_dir}/logs/monitor.pid (JSON: pid, url, its start time) and logging to {exp_dir}/logs/monitor.log."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from pillsnap.utils import save_json

LOGGER = logging.getLogger(__name__)
PID_FILE, LOG_FILE = "monitor.pid", "monitor.log"
APP_NAME = "pillsnap-monitor"  # the dashboard's /api/health says this, so a start can tell it from another program


def pid_path(exp: Path) -> Path:
    return exp / "logs" / PID_FILE


def log_path(exp: Path) -> Path:
    return exp / "logs" / LOG_FILE


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached on loopback
    return f"http://{shown}:{port}/"


def running_daemon(exp: Path) -> dict | None:
    """The pid file's content when its process is still our dashboard; a stale pid file is removed."""
    path = pid_path(exp)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        proc = psutil.Process(int(info["pid"]))
        alive = abs(proc.create_time() - info["create_time"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except FileNotFoundError:
        return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError, TypeError):
        alive = False  # the pid is gone or was reused by another program
    if alive:
        return info
    path.unlink(missing_ok=True)
    return None


def start_daemon(exp: Path, host: str, port: int, wait_s: float = 60.0) -> tuple[dict, bool]:
    """Start the dashboard in the background unless one already serves `exp`. Returns (pid info, started now).
    Raises RuntimeError, with the log's last lines, when the server does not come up."""
    existing = running_daemon(exp)
    if existing is not None:
        return existing, False
    pid_path(exp).parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pillsnap", "monitor", "--exp", str(exp), "--host", host, "--port", str(port),
           "--pid-file", str(pid_path(exp))]
    with open(log_path(exp), "ab") as log:
        # A new session: the server outlives this shell and its Ctrl-C; its output goes to the log only.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    info = {"pid": proc.pid, "url": url_of(host, port), "host": host, "port": port, "exp": str(exp.resolve()),
            "create_time": psutil.Process(proc.pid).create_time(), "log": str(log_path(exp))}
    save_json(pid_path(exp), info)
    if not wait_until_serving(proc, info["url"], exp, wait_s):
        stop_process(proc.pid)
        pid_path(exp).unlink(missing_ok=True)
        raise RuntimeError(f"the dashboard did not start (is port {port} taken? try --port). "
                           f"Last lines of {log_path(exp)}:\n{tail(log_path(exp))}")
    return info, True


def wait_until_serving(proc: subprocess.Popen, url: str, exp: Path, wait_s: float) -> bool:
    """True once `url` answers as our dashboard for `exp`; False if the process exits or time runs out."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if serves_dashboard(url, exp):
            return True
        time.sleep(0.2)
    return False


def serves_dashboard(url: str, exp: Path) -> bool:
    """Whether `url` is this experiment's dashboard (another program on the port is not)."""
    try:
        with urllib.request.urlopen(url + "api/health", timeout=2) as resp:
            health = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return health.get("app") == APP_NAME and health.get("exp") == str(exp.resolve())


def stop_daemon(exp: Path, wait_s: float = 10.0) -> dict | None:
    """Stop the experiment's background dashboard; returns what was stopped, or None if none was running."""
    info = running_daemon(exp)
    if info is None:
        return None
    stop_process(int(info["pid"]), wait_s)
    pid_path(exp).unlink(missing_ok=True)
    return info


def stop_process(pid: int, wait_s: float = 10.0) -> None:
    """SIGTERM (uvicorn shuts down cleanly on it), then SIGKILL if it lingers."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(wait_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        LOGGER.warning("monitor pid %d ignored SIGTERM for %.0f s; killing it", pid, wait_s)
        proc.kill()


def remove_own_pid_file(path: Path) -> None:
    """At the server's exit: remove the pid file if it still names this process (not a newer server's)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError):
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
