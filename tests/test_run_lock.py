"""One run per experiment folder. A second `pillsnap train` (a job started twice, a restart typed while the first
still runs under nohup) would interleave its checkpoints, history and logs with the first's; it is refused before
it writes anything, naming the run that holds the folder. The folder is held through the work after training
(reports, calibration, stage decision), which a SIGTERM also ends as an interrupt. A killed holder leaves no
stale lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import fake_build_loaders, make_cfg

from pillsnap.engine.run import RUN_LOCK, run_training
from pillsnap.utils.locks import BusyError, file_lock

pytestmark = pytest.mark.usefixtures("one_thread")

HOLDER = """
import sys, time
from pillsnap.utils.locks import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(lock: Path) -> subprocess.Popen:
    """A process that holds `lock` until killed (its command line names the lock file)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


FORKING_HOLDER = """
import multiprocessing as mp, sys, time
from pillsnap.utils.locks import file_lock

def worker(ready):
    ready.set()  # the child runs: its fork hooks (which let go of the lock) ran before any of its own code
    time.sleep(600)

with file_lock(sys.argv[1]):
    fork = mp.get_context("fork")
    ready = fork.Event()
    child = fork.Process(target=worker, args=(ready,))  # as a loader worker is started
    child.start()
    ready.wait(60)  # on a loaded machine the child may not have run yet when its pid is known
    print(child.pid, flush=True)
    time.sleep(600)
"""


def folder_state(exp: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `exp` (except the lock) with its modification time and contents."""
    return {str(p.relative_to(exp)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(exp.rglob("*"))
            if p.is_file() and p.name != RUN_LOCK}


def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / "sub" / "x.lock"
    holder = hold_in_another_process(lock)
    try:
        with pytest.raises(BusyError) as refused, file_lock(lock):
            pass
        message = str(refused.value)
        assert f"{lock} is held by pid {holder.pid} on " in message and "since 20" in message
        assert str(lock) in message.split(": ", 1)[1]  # the holder's command line
    finally:
        holder.kill()  # SIGKILL: no chance to unlock; the kernel drops the lock with the process
        holder.wait()
    with file_lock(lock):  # no stale lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """flock belongs to the open file, which a forked child shares: a loader worker outliving its killed trainer
    kept the lock, and the restarted run was refused in the name of a dead process."""
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child still runs
        with file_lock(lock):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_file_system_that_cannot_lock_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING), file_lock(tmp_path / "x.lock"):
        ran.append(True)
    assert ran and f"cannot lock {tmp_path / 'x.lock'} (No locks available): going on without it" in caplog.text


def test_another_users_lock_file_is_refused_in_one_line(tmp_path, monkeypatch):
    """A lock file this user cannot write (another user's, in a shared folder): its holder could not name itself
    in it, and NFS locks need write access, so it is a refusal that says what to do (root skips file modes, so
    the open is refused here by hand)."""
    import errno

    real_open = os.open

    def denied(path, flags, *args):
        if Path(path).name == "x.lock":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(BusyError, match=r"x.lock cannot be opened for writing \(Permission denied\): it belongs to "
                                        r"another user; make it writable for you \(chmod g\+w\)"), \
            file_lock(tmp_path / "x.lock"):
        pass


def test_the_enrolment_store_waits_for_the_other_writer(tmp_path):
    from pillsnap.infer.enrolment import LOCK_FILE, store_lock

    holder = hold_in_another_process(tmp_path / LOCK_FILE)
    try:
        subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
        with store_lock(tmp_path):  # queued, not refused: the server and the CLI each get their turn
            assert holder.poll() is not None
    finally:
        holder.kill()
        holder.wait()


def test_waiting_for_a_lock_queues_behind_its_holder(tmp_path):
    lock = tmp_path / "x.lock"
    holder = hold_in_another_process(lock)
    try:
        started = time.monotonic()
        subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
        with file_lock(lock, wait=True):
            got = time.monotonic() - started
            # it got the lock only once the holder was gone (its lock goes as it exits, a moment before the
            # process has ended: wait for that instead of polling once)
            assert holder.wait(timeout=10) == -signal.SIGTERM  # ended by the kill, not before it
        assert got > 0.5  # the holder is killed after 1 s
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_a_held_folder_is_refused_before_it_writes(tmp_path, caplog):
    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 0
    before = folder_state(exp)
    holder = hold_in_another_process(exp / RUN_LOCK)
    try:
        with caplog.at_level(logging.ERROR):
            code, trainer = run_training(make_cfg(exp, "train.epochs=2", "train.resume=last"), fake_build_loaders)
        assert (code, trainer) == (2, None)
        assert f"cannot start training: {exp / RUN_LOCK} is held by pid {holder.pid}" in caplog.text
        assert "paths.exp_dir" in caplog.text
        assert folder_state(exp) == before  # not a byte: config.yaml, logs, TensorBoard, checkpoints

        from pillsnap.cli import main

        caplog.clear()  # `pillsnap calibrate` would overwrite the calibration the run writes at its end
        with caplog.at_level(logging.ERROR):
            assert main(["calibrate", "--exp", str(exp)]) == 2
        assert f"calibrate: {exp / RUN_LOCK} is held by pid {holder.pid}" in caplog.text
        caplog.clear()  # nor the stage decision it writes at its end
        with caplog.at_level(logging.ERROR):
            assert main(["evaluate", "--exp", str(exp), "--stage", "1", "--yes"]) == 2
        assert f"evaluate: {exp / RUN_LOCK} is held by pid {holder.pid}" in caplog.text
        caplog.clear()  # nor the final test evaluation's report
        with caplog.at_level(logging.ERROR):
            assert main(["evaluate", "--exp", str(exp), "--final"]) == 2
        assert f"evaluate --final: {exp / RUN_LOCK} is held by pid {holder.pid}" in caplog.text
        assert "evaluate when it has ended" in caplog.text
        assert folder_state(exp) == before
    finally:
        holder.kill()
        holder.wait()
    caplog.clear()  # free again: evaluate gets as far as the run's config (these fake runs have no manifests)
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", "--exp", str(exp), "--stage", "1", "--yes"]) == 2
    assert "config error: paths.manifest_dir" in caplog.text  # the command line's own line for a config error
    code, trainer = run_training(make_cfg(exp, "train.epochs=2", "train.resume=last"), fake_build_loaders)
    assert code == 0 and trainer.start_epoch == 1  # the killed holder left nothing behind


def test_the_folder_stays_held_through_the_work_after_training(tmp_path, monkeypatch):
    import pillsnap.train

    exp = tmp_path / "exp"
    seen = []

    def calibrate(trainer, build_loaders):
        try:
            with file_lock(exp / RUN_LOCK):
                seen.append("free")
        except BusyError as err:
            seen.append(str(err))

    monkeypatch.setattr(pillsnap.train, "calibrate", calibrate)
    assert pillsnap.train.train(make_cfg(exp, "train.epochs=1"), fake_build_loaders) == 0
    assert len(seen) == 1 and f"held by pid {os.getpid()}" in seen[0]
    with file_lock(exp / RUN_LOCK):  # and given back at the end
        pass


def test_a_sigterm_after_training_is_an_interrupt_that_frees_the_folder(tmp_path, monkeypatch):
    """A scheduler's stop during the calibration: before, the default SIGTERM action killed the process there
    without a word; now `pillsnap train` gets KeyboardInterrupt and prints the commands that finish the work."""
    import pillsnap.train

    exp = tmp_path / "exp"

    def calibrate(trainer, build_loaders):
        handler = signal.getsignal(signal.SIGTERM)  # what the kernel would call (the test process is spared)
        assert callable(handler), "a SIGTERM here would kill the process without a word"
        handler(signal.SIGTERM, None)

    monkeypatch.setattr(pillsnap.train, "calibrate", calibrate)
    before = signal.getsignal(signal.SIGTERM)
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        pillsnap.train.train(make_cfg(exp, "train.epochs=1"), fake_build_loaders)
    assert pillsnap.train.training_ended(exp, started)  # so the hint is the work left, not a resume
    assert signal.getsignal(signal.SIGTERM) is before
    with file_lock(exp / RUN_LOCK):
        pass


def refused_rank(rank: int, world: int, port: int, root: str) -> None:
    from test_engine_ddp_start import record, start_rank

    start_rank(rank, world, port)
    code, trainer = run_training(make_cfg(Path(root) / "exp", "train.epochs=1"), fake_build_loaders)
    record(root, rank, code=code, trained=trainer is not None)


@pytest.mark.slow
def test_every_rank_of_a_refused_ddp_run_stops_as_a_config_error(tmp_path):
    """Only rank 0 takes the lock; the others learn from it that the folder is held and stop with it (exit 2)
    instead of waiting for it in the first collective."""
    from test_engine_ddp import free_port
    from test_engine_ddp_start import outcome, run_ranks

    holder = hold_in_another_process(tmp_path / "exp" / RUN_LOCK)
    try:
        run_ranks(refused_rank, (2, free_port(), str(tmp_path)), timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert [outcome(tmp_path, r) for r in (0, 1)] == [{"code": 2, "trained": False}] * 2
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [RUN_LOCK]


def test_a_job_refused_at_first_marks_itself_when_a_restart_gets_the_folder(tmp_path, monkeypatch):
    """torchrun restarts a job that exit 2 refused. The first attempt to get the folder was a restart, and the
    job's mark (when it began, written at the first attempt) was never made: a later OOM restart of that job then
    found no mark and trained over its own checkpoints from scratch."""
    from pillsnap.engine.restart import JOB_MARKER

    exp = tmp_path / "exp"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    holder = hold_in_another_process(exp / RUN_LOCK)
    try:
        assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 2
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the holder is gone: this attempt trains
    assert run_training(make_cfg(exp, "train.epochs=1"), fake_build_loaders)[0] == 0
    assert json.loads((exp / "checkpoints" / JOB_MARKER).read_text())["run_id"] == "job-7"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # a later restart of the job goes on from its files
    code, trainer = run_training(make_cfg(exp, "train.epochs=2"), fake_build_loaders)
    assert code == 0 and trainer.start_epoch == 1
