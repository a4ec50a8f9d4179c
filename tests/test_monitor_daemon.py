"""`pillsnap monitor --daemon`: starts a detached dashboard (pid and log under EXP/logs), a second start says it is
running and where, `--stop` stops it and removes the pid file; a stale pid file or a taken port are handled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each start imports FastAPI in a fresh interpreter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def monitor(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, str(REPO / "scripts" / "stage3" / "monitor_stage3_realtime.py")] if script
           else [sys.executable, "-m", "pillsnap", "monitor"])
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture
def exp(tmp_path):
    exp = tmp_path / "exp"
    yield exp
    monitor("--exp", str(exp), "--stop")  # never leave a server behind, even when a test fails


def test_daemon_start_second_start_and_stop(exp):
    port = free_port()
    first = monitor("--exp", str(exp), "--port", str(port), "--daemon")
    assert first.returncode == 0, first.stderr
    url = f"http://127.0.0.1:{port}/"
    assert f"{url}" in first.stdout and "started in the background" in first.stdout
    info = json.loads((exp / "logs" / "monitor.pid").read_text())
    assert info["url"] == url and psutil.pid_exists(info["pid"])
    with urllib.request.urlopen(url + "api/state", timeout=10) as resp:
        assert json.loads(resp.read())["run"]["status"] == "waiting"

    # the Stage 3 wrapper, same flags: a second start finds the first and says where it is
    second = monitor("--exp", str(exp), "--port", str(free_port()), "--daemon", script=True)
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stdout and f"pid {info['pid']}" in second.stdout and url in second.stdout

    stop = monitor("--exp", str(exp), "--stop")
    assert stop.returncode == 0 and f"pid {info['pid']}" in stop.stdout
    assert not (exp / "logs" / "monitor.pid").exists()
    assert not psutil.pid_exists(info["pid"]) or psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "No background monitor" in monitor("--exp", str(exp), "--stop").stdout


def test_stale_pid_file_is_replaced_and_a_taken_port_is_reported(exp):
    (exp / "logs").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (exp / "logs" / "monitor.pid").write_text(json.dumps({"pid": dead.pid, "create_time": 0, "url": "x"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = monitor("--exp", str(exp), "--port", str(port), "--daemon")
    assert failed.returncode == 1
    assert f"port {port}" in failed.stderr and "--port" in failed.stderr
    assert not (exp / "logs" / "monitor.pid").exists()  # neither the stale file nor the failed start's
    assert (exp / "logs" / "monitor.log").is_file()


def test_server_removes_its_own_pid_file_on_exit(tmp_path):
    from pillsnap.monitor.daemon import remove_own_pid_file

    mine, other = tmp_path / "mine.pid", tmp_path / "other.pid"
    mine.write_text(json.dumps({"pid": os.getpid()}))
    other.write_text(json.dumps({"pid": os.getpid() + 1}))
    remove_own_pid_file(mine)
    remove_own_pid_file(other)
    remove_own_pid_file(tmp_path / "missing.pid")
    assert not mine.exists() and other.exists()
