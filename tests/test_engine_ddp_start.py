"""DDP on CPU (two gloo ranks sharing one experiment directory, as under torchrun): what a first multi-GPU run
would trip over before and between its steps. Rank 0 builds the shared files before the others read them, the
ranks agree on one batch size, the time-cap rule counts every rank's samples, and an OOM on one rank stops the
run with its recovery saved for the restart, where every rank applies it."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
from fakes import fake_build_loaders, make_cfg, run_ranks
from test_engine_ddp import free_port

pytestmark = pytest.mark.slow


def start_rank(rank: int, world: int, port: int, **env: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), **env})


def record(root: str, rank: int, **values) -> None:
    """What a rank saw, written by the test (not the library) for the test process to read."""
    torch.save(values, Path(root) / f"rank{rank}.pt")


def outcome(root: Path, rank: int) -> dict:
    return torch.load(root / f"rank{rank}.pt", weights_only=False)


# ---- rank 0 builds the shared files first -----------------------------------------------------------------------
def loaders_taking_turns(cfg, root: str):
    """The fake loaders, built slowly, with when each rank's build began and ended appended to a file."""
    start = time.time()
    time.sleep(1.5)
    loaders = fake_build_loaders(cfg)
    with open(Path(root) / "builds.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"rank": int(os.environ["RANK"]), "start": start, "end": time.time()}) + "\n")
    return loaders


def turns_worker(rank: int, world: int, port: int, root: str) -> None:
    from functools import partial

    from pillsnap.engine.run import run_training

    start_rank(rank, world, port)
    cfg = make_cfg(Path(root) / "exp", "train.epochs=1")
    code, _ = run_training(cfg, partial(loaders_taking_turns, root=root))
    record(root, rank, code=code)


def test_rank0_builds_the_shared_files_before_the_other_ranks_read_them(tmp_path):
    """Building the loaders writes the crop cache and the detection export that every rank reads; rank 0 builds
    them alone first (ranks exporting at once stopped with FileExistsError: see the export test below)."""
    run_ranks(turns_worker, (2, free_port(), str(tmp_path)))
    assert outcome(tmp_path, 0)["code"] == outcome(tmp_path, 1)["code"] == 0
    builds = {b["rank"]: b for b in map(json.loads, (tmp_path / "builds.jsonl").read_text().splitlines())}
    assert builds[1]["start"] >= builds[0]["end"], builds


def loaders_autotuned(cfg, root: str):
    """The fake loaders; with dataloader.autotune_workers the "measurement" picks 3 workers (as the real autotune
    sets meta["num_workers"]). Each build's rank and worker settings are appended to a file."""
    loaders = fake_build_loaders(cfg)
    tuned = bool(cfg.dataloader.autotune_workers)
    loaders.meta["num_workers"] = 3 if tuned else int(cfg.dataloader.num_workers)
    with open(Path(root) / "builds.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"rank": int(os.environ["RANK"]), "autotune": tuned,
                              "num_workers": int(cfg.dataloader.num_workers)}) + "\n")
    return loaders


def autotune_worker(rank: int, world: int, port: int, root: str) -> None:
    from functools import partial

    from pillsnap.engine.run import run_training

    start_rank(rank, world, port)
    cfg = make_cfg(Path(root) / "exp", "train.epochs=1", "dataloader.autotune_workers=true")
    code, trainer = run_training(cfg, partial(loaders_autotuned, root=root))
    record(root, rank, code=code, workers=trainer.meta["num_workers"])


def test_only_rank0_autotunes_the_workers_and_every_rank_uses_its_count(tmp_path):
    run_ranks(autotune_worker, (2, free_port(), str(tmp_path)))
    assert [outcome(tmp_path, r)["code"] for r in (0, 1)] == [0, 0]
    assert [outcome(tmp_path, r)["workers"] for r in (0, 1)] == [3, 3]
    builds = [json.loads(line) for line in (tmp_path / "builds.jsonl").read_text().splitlines()]
    assert sorted((b["rank"], b["autotune"], b["num_workers"]) for b in builds) == [(0, True, 0), (1, False, 3)]


def no_rows(cfg):
    raise ValueError("Stage 1 has no classifier training rows")


def failing_build_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.run import run_training

    start_rank(rank, world, port)
    cfg = make_cfg(Path(root) / "exp", "train.epochs=1", "dataloader.autotune_workers=true")
    code, _ = run_training(cfg, no_rows)
    record(root, rank, code=code, log=(Path(root) / "exp" / "logs" / "train.err").read_text(encoding="utf-8"))


def test_a_build_that_fails_on_rank0_stops_every_rank_as_a_config_error(tmp_path):
    """Only rank 0 builds while it measures the workers: the other ranks learn its error from it and stop the same
    way (exit 2, "cannot start training"), instead of dying on a closed connection."""
    run_ranks(failing_build_worker, (2, free_port(), str(tmp_path)))
    assert [outcome(tmp_path, r)["code"] for r in (0, 1)] == [2, 2]
    assert "cannot start training" in outcome(tmp_path, 0)["log"] and "no classifier training rows" in \
        outcome(tmp_path, 0)["log"]


def _export(rows, out: str, queue, start) -> None:
    from pillsnap.data.yolo import export_yolo

    try:
        start.wait(30)
        export_yolo(rows, out, include_single=True)
        queue.put("ok")
    except Exception as err:  # the test wants to see what a process met
        queue.put(f"{type(err).__name__}: {err}")


def test_processes_exporting_the_same_photos_at_once_all_succeed(manifest_dir, tmp_path):
    """Four processes export one detection set at once (two commands, or ranks): each link is made under a private
    name and moved into place, so none meets another's link between its check and its own (FileExistsError
    stopped 3 of 4 processes in each of 3 trials on the demo's photos, and the first trial here every time)."""
    import multiprocessing

    from pillsnap.data.scan import load_manifest

    rows = load_manifest(manifest_dir)
    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        out = tmp_path / f"yolo{trial}"
        queue, start = ctx.Queue(), ctx.Barrier(4)
        processes = [ctx.Process(target=_export, args=(rows, str(out), queue, start)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
        assert sorted(queue.get(timeout=5) for _ in processes) == ["ok"] * 4
        images = list((out / "images").rglob("*.png"))
        assert len(images) == rows["photo_id"].nunique() and all(os.path.exists(p) for p in images)
        assert not [p for p in out.rglob("*") if p.name.endswith(".lnk")]


# ---- one batch size for every rank ------------------------------------------------------------------------------
def batch_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.oom import FAKE_OOM_BATCH_ENV
    from pillsnap.engine.run import run_training

    # rank 1's "GPU" holds 8 images, rank 0's 16: each rank's own search finds a different size
    start_rank(rank, world, port, **{FAKE_OOM_BATCH_ENV: "16" if rank == 0 else "8"})
    cfg = make_cfg(Path(root) / "exp", "train.epochs=1", "train.classification.auto_batch_tune=true",
                   "train.classification.auto_batch_max=16", "train.deterministic=true",
                   "train.ddp_timeout_minutes=1")
    code, trainer = run_training(cfg, fake_build_loaders)
    task = trainer.tasks["classification"]
    record(root, rank, code=code, batch=task.knobs.batch_size, steps=trainer.state.global_step,
           state=task.raw_model.state_dict())


def test_ranks_train_at_the_smallest_batch_any_rank_found(tmp_path):
    """Each rank's auto batch search measures its own GPU; a rank with a larger batch has fewer steps per epoch and
    the others would wait at their last steps for its gradients. Every rank takes the smallest size found."""
    run_ranks(batch_worker, (2, free_port(), str(tmp_path)))
    r0, r1 = outcome(tmp_path, 0), outcome(tmp_path, 1)
    assert r0["code"] == r1["code"] == 0
    assert r0["batch"] == r1["batch"] == 8
    assert r0["steps"] == r1["steps"] == 3  # 48 images / 2 ranks / 8
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name


# ---- the time-cap rule counts every rank's samples --------------------------------------------------------------
def time_cap_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.run import run_training

    start_rank(rank, world, port)
    stage = "data.progressive_validation.stage_1"
    # the cap is spent at the first check (step 2 of each rank: 16 samples a rank, 32 in all)
    cfg = make_cfg(Path(root) / "exp", "train.epochs=3", f"{stage}.time_limit_hours=1e-9",
                   f"{stage}.allow_success_on_time_cap=true", f"{stage}.min_samples_required=24",
                   f"{stage}.min_class_coverage=4")
    code, trainer = run_training(cfg, fake_build_loaders)
    record(root, rank, code=code, verdict=trainer.time_cap_verdict(),
           own=trainer.tasks["classification"].samples_seen)


def test_the_time_cap_rule_counts_the_samples_of_every_rank(tmp_path):
    """A time-capped Stage 1 passes when the run saw min_samples_required samples: under DDP each rank sees its
    shard only, and counting rank 0's alone failed a run that met the minimum (16 of 24, with 32 seen)."""
    run_ranks(time_cap_worker, (2, free_port(), str(tmp_path)))
    r0, r1 = outcome(tmp_path, 0), outcome(tmp_path, 1)
    assert r0["own"] == r1["own"] == 16
    assert r0["verdict"]["samples_seen"] == r1["verdict"]["samples_seen"] == 32
    assert r0["verdict"]["success"] and r0["code"] == r1["code"] == 0
    metrics = json.loads((tmp_path / "exp" / "reports" / "metrics.json").read_text())
    assert metrics["status"] == "time_capped" and metrics["stage"]["time_cap"]["success"]
    assert metrics["batch"]["classification"]["samples_seen"] == 32
    ckpt = torch.load(tmp_path / "exp" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["task_state"]["samples_seen"] == 32  # every rank's, so a resume on any world size counts right


def test_a_resumed_run_whose_stage_clock_is_spent_trains_no_more(tmp_path):
    """torchrun restarts on every non-zero exit, 4 (time cap not met) included. A restart resumed the spent clock,
    trained on to the first check and passed the cap with the extra samples; it now reports the verdict again.
    Resumed in one process after two ranks, the count is the checkpoint's 32, not rank 0's 16."""
    from pillsnap.engine.run import run_training

    run_ranks(time_cap_worker, (2, free_port(), str(tmp_path)))
    stage = "data.progressive_validation.stage_1"
    cfg = make_cfg(tmp_path / "exp", "train.epochs=3", f"{stage}.time_limit_hours=1e-9",
                   f"{stage}.allow_success_on_time_cap=true", f"{stage}.min_samples_required=40",
                   f"{stage}.min_class_coverage=4", "train.resume=last")
    code, trainer = run_training(cfg, fake_build_loaders)
    assert code == 4 and trainer.status == "time_capped"
    assert trainer.state.global_step == 2 and trainer.tasks["classification"].samples_seen == 32  # nothing trained
    assert trainer.time_cap_verdict()["reasons"] == ["SAMPLES_32_BELOW_40"]


# ---- OOM on one rank: stop, save the recovery, apply it on every rank at the restart ------------------------------
OOM_CFG = ("train.oom.escalate_to_fp16=false", "train.oom.max_grad_accum=1", "train.oom.min_batch=2",
           "train.deterministic=true", "train.ddp_timeout_minutes=1")


def oom_worker(rank: int, world: int, port: int, root: str, attempt: int, oom_at: str, blind: bool = False) -> None:
    from pillsnap.engine import trainer as trainer_module
    from pillsnap.engine.oom import FAKE_OOM_ENV
    from pillsnap.engine.run import run_training

    env = {"TORCHELASTIC_RUN_ID": "oom-job", "TORCHELASTIC_RESTART_COUNT": str(attempt)}
    if rank == 1 and oom_at:
        env[FAKE_OOM_ENV] = oom_at
    if rank == 1 and blind:  # a rank that cannot see the file (a node with a folder of its own)
        trainer_module.load_recovery = lambda ckpt_dir: {}
    start_rank(rank, world, port, **env)
    cfg = make_cfg(Path(root) / "exp", "train.epochs=2", *OOM_CFG)
    try:
        code, trainer = run_training(cfg, fake_build_loaders)
    except Exception as err:  # a rank whose collective partner left
        record(root, rank, code=None, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc())
        return
    task = trainer.tasks["classification"]
    record(root, rank, code=code, batch=task.knobs.batch_size, peak_lr=task.peak_lr,
           start_epoch=trainer.start_epoch, state=task.raw_model.state_dict())


def saved_recovery(root: Path) -> dict:
    return json.loads((root / "exp" / "checkpoints" / "oom_recovery.json").read_text())["tasks"]["classification"]


def test_an_oom_on_one_rank_stops_the_run_and_every_rank_applies_its_recovery_on_restart(tmp_path):
    """One rank cannot replay a step alone under DDP, and a recovery it made alone (here a halved batch with a
    halved learning rate) parted its weights from the others'. The run stops with the recovery saved; torchrun's
    restart (TORCHELASTIC_RESTART_COUNT) resumes the last checkpoints and every rank applies it. A restart that runs
    out of memory again before the next checkpoint saves the state both recoveries reached (saving the second step
    alone, made for knobs the checkpoint does not hold, left the next restart at the first knobs again)."""
    root = str(tmp_path)
    # micro-steps of rank 1 (3 a rank per epoch at batch 8): the 5th is epoch 2's second step
    run_ranks(oom_worker, (2, free_port(), root, 0, "4"))
    r0, r1 = outcome(tmp_path, 0), outcome(tmp_path, 1)
    assert r1.get("code") == 3, r1
    assert r0.get("code") is None and "Connection closed" in r0["error"], "rank 0 went on without rank 1"
    entry = saved_recovery(tmp_path)
    assert entry["rank"] == 1 and entry["epoch"] == 1  # it starts from epoch 1's checkpoints
    assert entry["made_for"]["batch_size"] == 8 and entry["knobs"]["batch_size"] == 4
    assert entry["lr_scale"] == pytest.approx(0.5) and entry["retries"] == 1

    # restart 1 applies it, then runs out of memory again before epoch 2's checkpoint (its micro-steps go on from
    # the checkpoint's 3, two chunks a step at batch 4: the 6th is its second step)
    run_ranks(oom_worker, (2, free_port(), root, 1, "5"))
    assert outcome(tmp_path, 1).get("code") == 3
    entry = saved_recovery(tmp_path)
    assert entry["epoch"] == 1 and entry["made_for"]["batch_size"] == 8  # still the checkpoint's knobs
    assert entry["knobs"]["batch_size"] == 2 and entry["lr_scale"] == pytest.approx(0.25) and entry["retries"] == 2

    # rank 1 cannot read the file itself: rank 0's reading reaches it (ranks reading it each could part their knobs)
    run_ranks(oom_worker, (2, free_port(), root, 2, "", True))
    r0, r1 = outcome(tmp_path, 0), outcome(tmp_path, 1)
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()
    assert "applying the OOM recovery rank 1 saved at epoch 1" in log and "torchrun restart 2" in log
    assert r0["code"] == r1["code"] == 0, (r0.get("error"), r1.get("error"))
    assert r0["start_epoch"] == r1["start_epoch"] == 1  # resumed, not started over
    assert r0["batch"] == r1["batch"] == 2
    assert r0["peak_lr"] == r1["peak_lr"] == pytest.approx(0.0025)  # train.lr 0.01 x the global batch's 2 / 8
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), f"{name} differs between ranks"
    assert not (tmp_path / "exp" / "checkpoints" / "oom_recovery.json").exists()  # the checkpoints hold it now
    ckpt = torch.load(tmp_path / "exp" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["oom_state"]["batch_size"] == 2


KNOBS = {"batch_size": 8, "grad_accum": 1, "did_amp_escalate": False}


def interrupted_at_first_batch(cfg):
    """The fake loaders, with Ctrl-C at the first training batch (a run stopped before its first checkpoint)."""
    from fakes import StoppingLoader

    loaders = fake_build_loaders(cfg)

    def stop(n):
        raise KeyboardInterrupt

    return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, 1, stop))


def test_a_recovery_file_left_in_the_folder_does_not_change_a_fresh_run(tmp_path, monkeypatch):
    """A saved recovery applies only to the run that resumes it. A fresh single-process run in the same folder
    keeps its configured batch and learning rate and says why; and the file is gone at once, so that a torchrun
    restart of that fresh run, stopped before its first checkpoint, does not apply it either."""
    from pillsnap.engine.oom import SavedRecovery, save_recovery
    from pillsnap.engine.run import run_training
    from pillsnap.engine.trainer import EXIT_INTERRUPTED

    ckpt_dir = tmp_path / "exp" / "checkpoints"
    save_recovery(ckpt_dir, SavedRecovery("classification", KNOBS, {**KNOBS, "batch_size": 4}, 0.5, 1, 0, 1))
    code, trainer = run_training(make_cfg(tmp_path / "exp", "train.epochs=1"), interrupted_at_first_batch)
    assert code == EXIT_INTERRUPTED and trainer.tasks["classification"].knobs.batch_size == 8
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()
    assert "not applying the OOM recovery rank 1 saved" in log and "neither resumes" in log
    assert not (ckpt_dir / "oom_recovery.json").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, trainer = run_training(make_cfg(tmp_path / "exp", "train.epochs=1"), fake_build_loaders)
    task = trainer.tasks["classification"]
    assert code == 0 and task.knobs.batch_size == 8 and task.peak_lr == pytest.approx(0.01)


def test_a_recovery_that_gave_up_stops_the_restart_and_one_made_for_other_knobs_is_left(tmp_path, monkeypatch):
    """A restart of a run whose OOM recovery gave up would only meet the same OOMs: it refuses to start (exit 2)
    and says what to change. A recovery made for other knobs (the run now has another batch) is not applied."""
    from pillsnap.engine.oom import SavedRecovery, save_recovery
    from pillsnap.engine.run import run_training
    from pillsnap.engine.trainer import EXIT_CONFIG

    ckpt_dir = tmp_path / "exp" / "checkpoints"
    assert run_training(make_cfg(tmp_path / "exp", "train.epochs=1"), fake_build_loaders)[0] == 0
    save_recovery(ckpt_dir, SavedRecovery("classification", KNOBS, KNOBS, 1.0, 5, 1, 1, gave_up=True))
    cfg = make_cfg(tmp_path / "exp", "train.epochs=2", "train.resume=last")
    code, trainer = run_training(cfg, fake_build_loaders)
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()
    assert code == EXIT_CONFIG and trainer is None
    assert "OOM recovery gave up on rank 1 after 5 retries" in log and "Lower train.batch_size" in log
    made_for = {**KNOBS, "batch_size": 16}
    save_recovery(ckpt_dir, SavedRecovery("classification", made_for, {**made_for, "batch_size": 8}, 0.5, 1, 1, 1))
    code, trainer = run_training(cfg, fake_build_loaders)
    assert code == 0 and trainer.tasks["classification"].peak_lr == pytest.approx(0.01)
    assert "was made for {'batch_size': 16" in (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()


def test_a_restart_after_a_failed_time_cap_in_the_last_epoch_reports_it_again(tmp_path, monkeypatch):
    """The cap spent in the last planned epoch: a restart finds the run trained to its end, and used to exit 0
    ("already trained") where the run had failed its time cap (exit 4)."""
    from pillsnap.engine.run import run_training
    from pillsnap.engine.trainer import EXIT_TIME_CAP

    stage = "data.progressive_validation.stage_1"
    cfg = make_cfg(tmp_path / "exp", "train.epochs=1", f"{stage}.time_limit_hours=1e-9",
                   f"{stage}.allow_success_on_time_cap=true", f"{stage}.min_samples_required=1000")
    assert run_training(cfg, fake_build_loaders)[0] == EXIT_TIME_CAP
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, trainer = run_training(make_cfg(tmp_path / "exp", "train.epochs=1", f"{stage}.time_limit_hours=1e-9",
                                          f"{stage}.allow_success_on_time_cap=true",
                                          f"{stage}.min_samples_required=1000", "train.resume=last"),
                                 fake_build_loaders)
    assert code == EXIT_TIME_CAP and trainer.status == "time_capped"


def test_a_restart_does_not_resume_what_an_older_run_left_in_the_folder(tmp_path, monkeypatch):
    """An older run's checkpoints are in the folder; a new torchrun job starts fresh there and is stopped before
    its first checkpoint. Its restart starts fresh again (the job's mark says when it began), instead of resuming
    the older run's weights."""
    from pillsnap.engine.run import run_training
    from pillsnap.engine.trainer import EXIT_INTERRUPTED

    assert run_training(make_cfg(tmp_path / "exp", "train.epochs=1"), fake_build_loaders)[0] == 0  # the older run
    older = tmp_path / "exp" / "checkpoints" / "classification_last.pt"
    os.utime(older, (time.time() - 60, time.time() - 60))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert run_training(make_cfg(tmp_path / "exp", "train.epochs=2"), interrupted_at_first_batch)[0] == \
        EXIT_INTERRUPTED
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, trainer = run_training(make_cfg(tmp_path / "exp", "train.epochs=2"), fake_build_loaders)
    assert code == 0 and trainer.start_epoch == 0  # fresh, not the older run's epoch 1
    assert "older than this job" in (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()


def test_a_restart_resumes_only_checkpoints_its_own_job_wrote(tmp_path):
    """A torchrun restart goes on from the last checkpoints this job wrote, even when its first start resumed a
    given file; a fresh run that failed before its first checkpoint starts fresh again, not from the files an
    older run left in the folder."""
    from pillsnap.engine.restart import resume_for_restart

    ckpt = tmp_path / "checkpoints"
    assert resume_for_restart(None, ckpt, 1000.0)[0] is None  # nothing written yet
    ckpt.mkdir()
    last = ckpt / "classification_last.pt"
    last.write_bytes(b"an older run's")
    os.utime(last, (500.0, 500.0))
    resume, why = resume_for_restart(None, ckpt, 1000.0)
    assert resume is None and "older than this job" in why
    assert resume_for_restart("/runs/old/best.pt", ckpt, 1000.0)[0] == "/runs/old/best.pt"
    os.utime(last, (1500.0, 1500.0))  # written by this job
    assert resume_for_restart(None, ckpt, 1000.0)[0] == "last"
    assert resume_for_restart("/runs/old/best.pt", ckpt, 1000.0)[0] == "last"
    assert resume_for_restart(None, ckpt, None)[0] is None  # no mark of the job's start: it wrote nothing yet


@pytest.mark.parametrize(("backend", "abort", "expected"), [
    ("nccl", True, "abort"), ("nccl", False, "destroy"), ("gloo", True, "destroy")])
def test_a_rank_stopping_on_an_oom_aborts_its_nccl_communicators(monkeypatch, backend, abort, expected):
    """NCCL's graceful teardown (destroy_process_group) flushes the collectives in flight: a rank leaving a broken
    step would wait there until NCCL's watchdog ends it. A rank stopping on an OOM aborts them instead; a normal
    end, and gloo, tear down as before."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from pillsnap.engine import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append("destroy"))
    monkeypatch.setattr(distributed_c10d, "_abort_process_group", lambda group=None: calls.append("abort"))
    distributed.cleanup(distributed.DistInfo(rank=1, world_size=2, local_rank=1), abort=abort)
    assert calls == [expected]


def test_a_job_started_with_resume_last_goes_on_resuming_on_restart(tmp_path, monkeypatch):
    """A job started with train.resume=last resumes the older run's checkpoints, as asked; a restart before its own
    first checkpoint resumes them again rather than judging them an older run's and starting fresh. Its first start
    also warns that torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    from pillsnap.engine.run import run_training
    from pillsnap.engine.trainer import EXIT_INTERRUPTED

    assert run_training(make_cfg(tmp_path / "exp", "train.epochs=1"), fake_build_loaders)[0] == 0  # the older run
    older = tmp_path / "exp" / "checkpoints" / "classification_last.pt"
    os.utime(older, (time.time() - 60, time.time() - 60))
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-3")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    cfg = ("train.epochs=2", "train.resume=last")
    code, trainer = run_training(make_cfg(tmp_path / "exp", *cfg), interrupted_at_first_batch)
    assert code == EXIT_INTERRUPTED and trainer.start_epoch == 1
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()
    assert "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in log
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, trainer = run_training(make_cfg(tmp_path / "exp", *cfg), fake_build_loaders)
    assert code == 0 and trainer.start_epoch == 1  # the older run's epoch 1, as the job was started to do


def step_vote_worker(rank: int, world: int, port: int, root: str) -> None:
    from omegaconf import OmegaConf

    from pillsnap.engine.distributed import cleanup, init_distributed
    from pillsnap.engine.loop import EpochRunner

    start_rank(rank, world, port)
    info = init_distributed(timeout_minutes=0.05)  # the wait group gives up after 3 s
    runner = EpochRunner({}, OmegaConf.create({}), info=info, time_limit_hours=1.0)
    if rank == 1:
        time.sleep(6)  # a rank slow between two steps (a loader that stalls, a slow file system)
    try:
        record(root, rank, capped=runner.time_capped("cpu"), error=None)
    except RuntimeError as err:
        record(root, rank, capped=None, error=str(err)[:200])
    finally:
        cleanup(info)


def test_the_time_cap_vote_between_steps_waits_on_the_steps_own_clock(tmp_path):
    """The vote between steps goes through the steps' own group (NCCL's timeout on GPUs), not the wait group, whose
    timeout (train.ddp_timeout_minutes, two hours by default) is for rank 0's lone validation and checkpoints: a
    rank stuck between steps must stop the run within the steps' timeout, and a slow one must not trip the other."""
    run_ranks(step_vote_worker, (2, free_port(), str(tmp_path)), timeout=120)
    assert [outcome(tmp_path, r)["error"] for r in (0, 1)] == [None, None]
    assert outcome(tmp_path, 0)["capped"] is outcome(tmp_path, 1)["capped"] is False


def restart_worker(rank: int, world: int, port: int, root: str, epochs: int, counts: tuple[str, ...]) -> None:
    from pillsnap.engine.run import run_training

    start_rank(rank, world, port, TORCHELASTIC_RUN_ID="job-1", TORCHELASTIC_RESTART_COUNT=counts[rank])
    code, trainer = run_training(make_cfg(Path(root) / "exp", f"train.epochs={epochs}"), fake_build_loaders)
    record(root, rank, code=code, start_epoch=trainer.start_epoch if trainer else None)


def test_a_restart_that_one_node_counts_and_another_does_not_resumes_on_every_rank(tmp_path):
    """torchrun counts restarts per node: a node that replaced a failed one starts at 0 while the others count 1.
    Rank 0 at 0 went on while rank 1 waited in the restart's broadcast (a hang), and would have started the job
    over, its checkpoints overwritten. A restart any rank counts is one on every rank."""
    run_ranks(restart_worker, (2, free_port(), str(tmp_path), 1, ("0", "0")))  # the job's first start: epoch 1
    assert outcome(tmp_path, 0)["code"] == outcome(tmp_path, 1)["code"] == 0
    run_ranks(restart_worker, (2, free_port(), str(tmp_path), 2, ("0", "1")), timeout=120)  # rank 0's node is new
    for rank in (0, 1):
        assert outcome(tmp_path, rank) == {"code": 0, "start_epoch": 1}, rank  # resumed, not started over
    log = (tmp_path / "exp" / "logs" / "pillsnap.log").read_text()
    assert "torchrun restart 1: resuming the last checkpoints" in log
    # rank 0 (counting 0) records the restart the ranks agreed on: a record of 0 reads as a fresh start, and the
    # evaluation and the monitor would drop what the job's earlier attempt recorded
    starts = [json.loads(line) for line in (tmp_path / "exp" / "reports" / "metrics.jsonl").read_text().splitlines()
              if '"type": "start"' in line or '"type":"start"' in line]
    assert [s["restart"] for s in starts] == [0, 1]


def turn_taker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.distributed import cleanup, init_distributed, main_rank_first

    start_rank(rank, world, port)
    info = init_distributed(timeout_minutes=1)
    with main_rank_first(info):
        time.sleep(2.0 if rank else 0.0)  # the other rank's turn takes a while (Stage 4's loaders)
        block_end = time.time()
    record(root, rank, block_end=block_end, left=time.time())
    cleanup(info)


def test_no_rank_leaves_its_turn_before_the_last_rank_has_run_its_block(tmp_path):
    """Rank 0 left main_rank_first as the last rank began its block, and met it next in a collective of the default
    group (DDP's construction), under NCCL's 10-minute watchdog rather than train.ddp_timeout_minutes."""
    run_ranks(turn_taker, (2, free_port(), str(tmp_path)), timeout=60)
    first, last = outcome(tmp_path, 0), outcome(tmp_path, 1)
    assert last["block_end"] >= first["block_end"] + 2.0  # rank 1's turn came after rank 0's
    assert first["left"] >= last["block_end"]


def test_a_stop_in_a_ranks_turn_leaves_without_waiting_for_the_others_and_an_error_lets_them_go(monkeypatch):
    """A stop during set-up (the crop cache at Stage 3-4 takes a while): rank 0 waited in the turns left, met the
    ranks that had already left, and gloo's "Connection closed by peer" replaced the stop, a crash with no resume
    line. An error still lets the other ranks go (they meet it too)."""
    import pillsnap.engine.distributed as distributed
    from pillsnap.engine.distributed import DistInfo, main_rank_first

    waits = []
    monkeypatch.setattr(distributed, "barrier", lambda info: waits.append(info.rank))
    with pytest.raises(KeyboardInterrupt), main_rank_first(DistInfo(rank=0, world_size=2)):
        raise KeyboardInterrupt
    assert waits == []
    with pytest.raises(OSError), main_rank_first(DistInfo(rank=0, world_size=2)):
        raise OSError("disk full")
    assert waits == [0, 0, 0]
    waits.clear()
    with main_rank_first(DistInfo(rank=1, world_size=2, local_rank=1)):
        assert waits == [1, 1]  # its turn
    assert waits == [1, 1, 1]


def after_worker(rank: int, world: int, port: int, root: str) -> None:
    from pillsnap.engine.run import run_training

    start_rank(rank, world, port, LOCAL_WORLD_SIZE=str(world))

    def after(code, trainer):
        from pillsnap.data.loaders import workers_for_this_rank

        record(root, rank, seen=os.environ["LOCAL_WORLD_SIZE"], workers=workers_for_this_rank(64))
        return code

    code, _ = run_training(make_cfg(Path(root) / "exp", "train.epochs=1"), fake_build_loaders, after=after)
    if rank:
        record(root, rank, code=code)
    else:
        record(root, rank, code=code, **outcome(Path(root), 0), restored=os.environ["LOCAL_WORLD_SIZE"])


def test_the_work_after_training_has_the_machine_to_itself(tmp_path):
    """Rank 0 calibrates and evaluates alone once the other ranks have left; its loaders kept one rank's share of the
    cores (LOCAL_WORLD_SIZE), one worker a loader for 8 ranks on 16 cores."""
    from pillsnap.utils.devices import usable_cores

    run_ranks(after_worker, (2, free_port(), str(tmp_path)))
    first = outcome(tmp_path, 0)
    assert first["code"] == outcome(tmp_path, 1)["code"] == 0 and "seen" not in outcome(tmp_path, 1)
    assert first["seen"] == "1" and first["workers"] == usable_cores() and first["restored"] == "2"
