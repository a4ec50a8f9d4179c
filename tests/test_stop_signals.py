"""Stops from outside a long run: every stop signal an interrupt (once), nothing cut in half by one, a crash in the
run's own records, a full disk named as one, and scripts/train.sh passing a stop on to its trainer."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import StoppingLoader, fake_build_loaders, make_cfg

from pillsnap.engine import checkpointing
from pillsnap.engine.run import run_training
from pillsnap.engine.trainer import EXIT_INTERRUPTED
from pillsnap.utils import io as io_module
from pillsnap.utils.signals import held_signals, stops_as_interrupt

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_each_stop_signal_interrupts_once_and_a_held_one_lands_after_the_block(capfd) -> None:
    # as a terminal starts Python: pytest started in a script's background has SIGINT ignored, and under nohup
    # SIGHUP, and a signal ignored from the start stays so (the test below)
    terminal = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                signal.SIGHUP: signal.SIG_DFL, signal.SIGUSR1: signal.SIG_DFL, signal.SIGQUIT: signal.SIG_DFL}
    previous = {signum: signal.signal(signum, handler) for signum, handler in terminal.items()}
    try:
        _each_stop_signal(capfd)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _each_stop_signal(capfd) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT, signal.SIGINT):
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name), stops_as_interrupt():
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the interrupt comes at once: never reached
        assert signal.getsignal(signum) is not None
    done = []
    with pytest.raises(KeyboardInterrupt), stops_as_interrupt():
        with held_signals(doing="writing the checkpoints"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # sent twice (the process group and train.sh): one interrupt
            done.append("the block ran to its end")
        done.append("not reached")
    assert done == ["the block ran to its end"]
    assert "pillsnap: SIGTERM received: writing the checkpoints first" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt), stops_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGUSR1)  # stopping already: logged, not a second interrupt
            done.append("stopped cleanly")
            raise
    assert done[-1] == "stopped cleanly"
    assert "SIGUSR1 received while stopping on SIGTERM: ignored" in capfd.readouterr().err


def test_a_signal_the_process_was_started_ignoring_stays_ignored() -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    try:
        with stops_as_interrupt(), held_signals():
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_stop_during_the_checkpoint_commit_keeps_the_epoch_in_the_history(tmp_path, monkeypatch) -> None:
    """Before, a stop after the commit's journal and before the trainer recorded the epoch cut that epoch from
    metrics.json while its checkpoints were completed at the next start: the resume's history skipped it, and its
    early-stopping count went wrong."""
    real_apply = checkpointing.CheckpointStore._apply

    def stop_in_the_middle(self, moves, links):
        if json.loads((self.dir / checkpointing.JOURNAL).read_text())["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's stop, with the journal written
        real_apply(self, moves, links)

    monkeypatch.setattr(checkpointing.CheckpointStore, "_apply", stop_in_the_middle)
    exp = tmp_path / "exp"
    code, trainer = run_training(make_cfg(exp, "train.epochs=3"), fake_build_loaders)
    assert code == EXIT_INTERRUPTED and trainer.epoch_done == 2
    metrics = read_json(exp / "reports" / "metrics.json")
    assert metrics["status"] == "interrupted" and [h["epoch"] for h in metrics["history"]] == [1, 2]
    monkeypatch.undo()
    code, trainer = run_training(make_cfg(exp, "train.epochs=3", "train.resume=last"), fake_build_loaders)
    assert code == 0 and [h["epoch"] for h in read_json(exp / "reports" / "metrics.json")["history"]] == [1, 2, 3]


def test_a_crash_is_in_the_runs_log_and_metrics(tmp_path) -> None:
    def gone(batch: int) -> None:
        raise RuntimeError("the photo server went away")

    def build(cfg):
        loaders = fake_build_loaders(cfg)
        return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, 9, gone))  # epoch 2, batch 3

    exp = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="the photo server went away"):
        run_training(make_cfg(exp, "train.epochs=3"), build)
    metrics = read_json(exp / "reports" / "metrics.json")
    assert metrics["status"] == "crashed" and [h["epoch"] for h in metrics["history"]] == [1]
    log = (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    assert "training crashed during epoch 2; the checkpoints hold epoch 1" in log
    assert "Traceback" in log and "the photo server went away" in log
    end = [json.loads(line) for line in (exp / "reports" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["type"] == "end" and end["status"] == "crashed"


def test_a_full_disk_while_saving_a_checkpoint_is_named(tmp_path, monkeypatch) -> None:
    import shutil

    import torch

    state = {k: 0 for k in io_module.CKPT_REQUIRED_KEYS}
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(OSError, match=r"last.pt could not be written: the disk holding it is full \(10.5 MB") as err:
        io_module.save_ckpt(tmp_path / "last.pt", state)
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # no partial file left
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room on the disk: torch's own error, unchanged
        io_module.save_ckpt(tmp_path / "last.pt", state)


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc as on Linux")
def test_train_sh_passes_a_stop_sent_to_it_alone_on_to_the_trainer(tmp_path) -> None:
    """`kill <train.sh>` (or `timeout`, a supervisor): before, bash died and left the trainer running with the GPU
    and the folder's lock. The trainer is a stand-in that records the signal it gets and exits 130 as the real one
    does; the rest is the real script."""
    exp, root = tmp_path / "exp", tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "train.sh").write_text((REPO / "scripts" / "train.sh").read_text())
    got = tmp_path / "got"
    fake = root / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-m" ]; then\n'
                    f'  trap \'echo TERM > {got}; echo {{\\"status\\": \\"interrupted\\"}} > '
                    f'{exp}/reports/metrics.json; exit 130\' TERM\n'
                    f'  echo started > {got}; while :; do sleep 0.1; done\nfi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    proc = subprocess.Popen(["bash", str(root / "scripts" / "train.sh"), "--cfg", str(REPO / "config.yaml"),
                             f"paths.exp_dir={exp}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (got.is_file() and got.read_text().strip() == "started"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # to the script alone
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the script's processes
    assert got.read_text().strip() == "TERM"
    assert proc.returncode == 130 and "train.sh: interrupted; resume with:" in err.strip().splitlines()[-1]


def test_the_command_line_exits_1_on_a_crash_without_a_second_traceback(tmp_path) -> None:
    """The run's log holds the crash's traceback: `pillsnap train` (run_command) says nothing more and exits 1;
    an error nobody logged still goes up with its traceback."""
    import argparse

    from pillsnap.cli import run_command

    def gone(batch: int) -> None:
        raise RuntimeError("the photo server went away")

    def crashing_train(args: argparse.Namespace) -> int:
        def build(cfg):
            loaders = fake_build_loaders(cfg)
            return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, 3, gone))

        return run_training(make_cfg(tmp_path / "exp", "train.epochs=2"), build)[0]

    assert run_command(crashing_train, argparse.Namespace()) == 1  # returned: no second traceback from Python
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    assert log.count("Traceback (most recent call last)") == 1 and "the photo server went away" in log

    def bug(args: argparse.Namespace) -> int:
        raise RuntimeError("not logged by anyone")

    with pytest.raises(RuntimeError, match="not logged by anyone"):
        run_command(bug, argparse.Namespace())


def test_a_stop_sent_to_the_whole_process_group_interrupts_a_run_with_loader_workers(synth_cfg, tmp_path) -> None:
    """`timeout`, SLURM and `kill -- -PGID` stop every process of the group, the DataLoader workers too. torch's
    handler made a worker die of that SIGTERM, and the trainer's loader raised "DataLoader worker is killed by
    signal" inside the trainer's own interrupt: exit 1, a traceback, metrics.json left at "running". The trainer,
    stopping, now expects its workers to end, and the run ends as interrupted, with the resume line."""
    from omegaconf import OmegaConf

    OmegaConf.update(synth_cfg, "train.epochs", 500)
    OmegaConf.update(synth_cfg, "train.strategy", "classification")
    for key, value in {"num_workers": 2, "persistent_workers": True}.items():
        OmegaConf.update(synth_cfg, f"dataloader.{key}", value)
    cfg_path = tmp_path / "cfg.yaml"
    OmegaConf.save(synth_cfg, cfg_path)
    exp = Path(synth_cfg.paths.exp_dir)
    proc = subprocess.Popen([sys.executable, "-m", "pillsnap.train", "--cfg", str(cfg_path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log, deadline = exp / "logs" / "pillsnap.log", time.monotonic() + 240
        while not (log.is_file() and "[val] classification e=2" in log.read_text(encoding="utf-8")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert read_json(exp / "reports" / "metrics.json")["status"] == "interrupted"
    assert "train.resume=last" in err.strip().splitlines()[-1]


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(caplog) -> None:
    """`pillsnap data scan` (or evaluate, calibrate, ...) stopped with Ctrl-C printed a traceback of wherever it
    happened to be and died of SIGINT; it now says so in one line and exits 130, as `pillsnap train` does."""
    import argparse
    import logging

    from pillsnap.cli import run_command

    def scan(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    with caplog.at_level(logging.INFO):
        assert run_command(scan, argparse.Namespace()) == EXIT_INTERRUPTED == 130
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["interrupted"]

