"""Checkpoints inside an epoch (train.checkpoint_interval_minutes): a run killed part-way through a long epoch goes
on from its last save, and ends as the unbroken run would have; each epoch's order is the seed's and the epoch's."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from fakes import StoppingLoader, collate, fake_build_loaders, make_cfg, run_ranks
from torch.utils.data import DataLoader, Dataset

from pillsnap.data.samplers import EpochSampler
from pillsnap.engine.distributed import DistInfo, shard_loader
from pillsnap.engine.run import run_training
from pillsnap.engine.trainer import EXIT_INTERRUPTED
from pillsnap.utils import load_ckpt, read_json, save_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
EVERY_LOG_STEP = "train.checkpoint_interval_minutes=1e-9"  # due at every check (every step_log_interval steps)


class Jittered(Dataset):
    """A random colour jitter drawn from torch's global generator, as a loader without workers draws augmentation."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y, path = self.data[i]
        return x + 0.3 * torch.randn(3, 1, 1), y, path


def epoch_sampler_loaders(cfg, stop_at: int | None = None, stop=None):
    """fake_build_loaders with the classification train loader on an EpochSampler, as the real builder makes it, over
    jittered images; `stop_at`: a Ctrl-C (or `stop`) when the run asks for that batch (counted over the run)."""
    loaders = fake_build_loaders(cfg)
    data = Jittered(loaders.cls_train.dataset)
    train = DataLoader(data, batch_size=int(cfg.train.batch_size), sampler=EpochSampler(data, seed=int(cfg.train.seed)),
                       drop_last=True, collate_fn=collate, num_workers=0)
    if stop_at is not None:
        train = StoppingLoader(train, stop_at, stop or ctrl_c)
    return loaders._replace(cls_train=train)


def ctrl_c(batch: int) -> None:
    raise KeyboardInterrupt


def saved_positions(exp) -> list[tuple[int, int]]:
    """(epoch, steps) of every checkpoint saved inside an epoch, from the run's log."""
    text = (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    return [(int(e), int(n)) for e, n in re.findall(r"checkpoint inside epoch (\d+) saved, after (\d+) class", text)]


def test_the_epoch_order_is_the_seeds_and_the_epochs_and_a_skip_lasts_for_its_epoch():
    sampler = EpochSampler(range(20), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    torch.manual_seed(0)  # the global generator, which torch's RandomSampler and the loader's worker seeds draw from
    torch.rand(5)
    assert list(sampler) == order and sorted(order) == list(range(20)) and order != list(range(20))
    sampler.skip(7)
    assert list(sampler) == order[7:]
    assert list(sampler) == order[7:]  # a pass started and dropped (a loader's workers may) does not use it up
    sampler.set_epoch(3)
    assert list(sampler) != order and len(list(sampler)) == 20  # the next epoch is whole
    sampler.set_epoch(2)
    assert list(sampler) == order


def test_a_single_process_epoch_sampler_is_sharded_under_torchrun():
    data = list(range(10))
    loader = DataLoader(data, batch_size=2, sampler=EpochSampler(data, seed=1))
    shards = [shard_loader(loader, DistInfo(rank=r, world_size=2), seed=1) for r in (0, 1)]
    assert [(s.sampler.num_replicas, s.sampler.rank) for s in shards] == [(2, 0), (2, 1)]
    assert sorted(i for s in shards for i in s.sampler) == data
    assert shard_loader(shards[1], DistInfo(rank=1, world_size=2), seed=1) is shards[1]  # already sharded


def test_a_run_killed_inside_an_epoch_goes_on_from_its_last_save_and_ends_as_the_unbroken_run(tmp_path, caplog):
    """48 images of batch 8: 6 steps an epoch. Saves every 2 steps; the kill asks for batch 11 (epoch 2, step 5),
    so the last save holds 4 steps of epoch 2. The resumed run trains steps 5 and 6 alone."""
    settings = ("train.epochs=2", EVERY_LOG_STEP)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_training(make_cfg(whole, *settings), epoch_sampler_loaders)[0] == 0
    # at the epoch's last step only once its steps are done, before validation (a stop there redoes no step)
    assert saved_positions(whole) == [(1, 2), (1, 4), (1, 6), (2, 2), (2, 4), (2, 6)]

    code, _ = run_training(make_cfg(broken, *settings), lambda cfg: epoch_sampler_loaders(cfg, stop_at=11))
    assert code == EXIT_INTERRUPTED
    err = (broken / "logs" / "train.err").read_text(encoding="utf-8")
    assert "the checkpoints hold epoch 1 and 4 classification steps of epoch 2" in err
    last = load_ckpt(broken / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["epoch"] == 2 and last["progress"]["done"] == {"classification": 4}
    best = load_ckpt(broken / "checkpoints" / "best.pt")
    assert "progress" not in best and best["epoch"] == 1  # nothing was validated inside the epoch

    steps = []
    with caplog.at_level(logging.INFO):
        code, trainer = run_training(make_cfg(broken, *settings, "train.resume=last"), epoch_sampler_loaders,
                                     callbacks=[StepLog(steps)])
    assert code == 0 and "resuming inside epoch 2, after 4 classification steps" in caplog.text
    assert steps == [(2, 5), (2, 6)]
    mine, theirs = (load_ckpt(d / "checkpoints" / "last.pt") for d in (broken, whole))
    assert mine["epoch"] == theirs["epoch"] == 2 and "progress" not in mine
    for key in ("model_state", "ema_state"):
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key]), key
    assert mine["task_state"]["samples_seen"] == theirs["task_state"]["samples_seen"] == 96
    assert mine["global_step"] == theirs["global_step"] == 12
    history = [load_history(d) for d in (broken, whole)]
    assert history[0] == pytest.approx(history[1])  # epoch 2's mean train loss counts the steps before the kill


def load_history(exp) -> list[float]:
    import json

    metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    return [h["classification"]["train_loss"] for h in metrics["history"]]


class StepLog:
    def __init__(self, out: list) -> None:
        self.out = out

    def __getattr__(self, name):
        return lambda *args: None

    def on_step_end(self, record: dict) -> None:
        self.out.append((record["epoch"], record["step"]))


def sigterm(batch: int = 0) -> None:
    """SIGTERM as the kernel delivers it: the handler the run installed, called where the run is (it returns)."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler), "SIGTERM would kill the process without a word"
    handler(signal.SIGTERM, None)


class StopAfterStep(StepLog):
    """A SIGTERM while the step (`epoch`, `step`) trains: after its batch was drawn."""

    def __init__(self, out: list, epoch: int, step: int) -> None:
        super().__init__(out)
        self.at = (epoch, step)

    def on_step_end(self, record: dict) -> None:
        super().on_step_end(record)
        if (record["epoch"], record["step"]) == self.at:
            sigterm()


@pytest.mark.parametrize(("where", "saved_steps", "resumed_steps"), [
    ("drawing step 5", 5, [(2, 6)]),  # the batch being drawn is trained, then the place saved
    ("training step 6", 6, []),  # the epoch's last step: its end would be committed only after validation
])
def test_a_stop_signal_saves_the_epochs_place_and_the_resume_ends_as_the_unbroken_run(tmp_path, capfd, where,
                                                                                      saved_steps, resumed_steps):
    """A pre-emption's SIGTERM (or SLURM's warning, or Ctrl-C) lost everything trained since the last checkpoint,
    up to train.checkpoint_interval_minutes (30) of a GPU's work: the run now saves its place at the next step,
    then stops; here with no interval saves at all."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_training(make_cfg(whole, "train.epochs=2"), epoch_sampler_loaders)[0] == 0
    if where == "drawing step 5":
        build, callbacks = lambda cfg: epoch_sampler_loaders(cfg, stop_at=11, stop=sigterm), []
    else:
        build, callbacks = epoch_sampler_loaders, [StopAfterStep([], 2, 6)]
    code, trainer = run_training(make_cfg(broken, "train.epochs=2"), build, callbacks=callbacks)
    assert code == EXIT_INTERRUPTED and trainer.status == "interrupted"
    assert "SIGTERM received: saving the training's place after this step" in capfd.readouterr().err
    assert saved_positions(broken) == [(2, saved_steps)]
    last = load_ckpt(broken / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["done"] == {"classification": saved_steps}
    steps = []
    code, _ = run_training(make_cfg(broken, "train.epochs=2", "train.resume=last"), epoch_sampler_loaders,
                           callbacks=[StepLog(steps)])
    assert code == 0 and steps == resumed_steps
    mine, theirs = (load_ckpt(d / "checkpoints" / "last.pt") for d in (broken, whole))
    assert mine["epoch"] == theirs["epoch"] == 2 and mine["global_step"] == theirs["global_step"] == 12
    for key in ("model_state", "ema_state"):
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key]), key


def test_a_rank_whose_torchrun_launcher_died_saves_its_place_and_stops(tmp_path, monkeypatch, capfd):
    """torchrun dies of a signal it does not pass on (SLURM's SIGUSR1 sent to its process group), of SIGKILL or with
    its session: its ranks trained on, detached and holding the folder, until a time limit killed them with nothing
    saved. A rank now takes its launcher's end (it became another process's child) as a stop."""
    import os

    from pillsnap.utils import signals

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    parent = [os.getppid()]
    monkeypatch.setattr(signals.os, "getppid", lambda: parent[0])

    class LauncherDiesAt(StepLog):
        def on_step_end(self, record: dict) -> None:
            super().on_step_end(record)
            if (record["epoch"], record["step"]) == (2, 3):
                parent[0] = 1  # adopted by init

    exp = tmp_path / "exp"
    code, trainer = run_training(make_cfg(exp, "train.epochs=2"), epoch_sampler_loaders,
                                 callbacks=[LauncherDiesAt([])])
    assert code == EXIT_INTERRUPTED and trainer.status == "interrupted"
    assert "torchrun, this rank's launcher, has ended: saving the training's place" in capfd.readouterr().err
    assert saved_positions(exp) == [(2, 4)]  # the next step, as for a signal noted while drawing


def test_a_stop_during_validation_resumes_with_the_epochs_steps_done_and_validates_again(tmp_path, capfd):
    """A stop during a Stage 4 validation (minutes) sent the resume back to the last save inside the epoch, up to
    train.checkpoint_interval_minutes of every GPU's steps to train again: the epoch's place is now saved when its
    steps are done, before validation, so the resume trains no step and ends as the unbroken run."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    interval = "train.checkpoint_interval_minutes=1e-9"
    assert run_training(make_cfg(whole, "train.epochs=2", interval), epoch_sampler_loaders)[0] == 0
    val_batches = len(fake_build_loaders(make_cfg(whole, "train.epochs=2")).cls_val)

    def stop_in_second_validation(cfg):
        loaders = epoch_sampler_loaders(cfg)
        return loaders._replace(cls_val=StoppingLoader(loaders.cls_val, val_batches + 1, lambda n: sigterm()))

    code, _ = run_training(make_cfg(broken, "train.epochs=2", interval), stop_in_second_validation)
    assert code == EXIT_INTERRUPTED
    assert load_ckpt(broken / "checkpoints" / "last.pt")["progress"]["done"] == {"classification": 6}
    steps = []
    code, _ = run_training(make_cfg(broken, "train.epochs=2", interval, "train.resume=last"), epoch_sampler_loaders,
                           callbacks=[StepLog(steps)])
    assert code == 0 and steps == []  # validated again, nothing trained again
    mine, theirs = (load_ckpt(d / "checkpoints" / "last.pt") for d in (broken, whole))
    assert mine["epoch"] == theirs["epoch"] == 2 and mine["global_step"] == theirs["global_step"] == 12
    for key in ("model_state", "ema_state"):
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key]), key
    # with the default interval, tiny epochs never save before validation (a tenth of 30 min is far off)
    quiet = tmp_path / "quiet"
    assert run_training(make_cfg(quiet, "train.epochs=1"), epoch_sampler_loaders)[0] == 0
    assert saved_positions(quiet) == []


def test_the_same_stop_again_at_once_is_its_copy_and_later_stops_without_the_save(monkeypatch, capfd):
    """`timeout`, SLURM and scripts/train.sh send a stop twice at once: the copy is ignored. Sent again seconds
    later it is a person insisting: the run stops where it is."""
    from pillsnap.utils import signals

    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    with pytest.raises(KeyboardInterrupt, match="again: stopping now"), signals.stops_as_interrupt(), \
            signals.stops_at_safe_points():
        sigterm()
        assert signals.stop_requested() == "SIGTERM"
        sigterm()  # the copy
        assert "ignored" in capfd.readouterr().err and signals.stop_requested() == "SIGTERM"
        clock[0] += signals.STOP_AGAIN_S + 1
        sigterm()
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"), signals.stops_as_interrupt(), \
            signals.stops_at_safe_points():
        sigterm()  # noted, and never acted on inside: it raises as the block ends
    with pytest.raises(KeyboardInterrupt), signals.stops_as_interrupt():
        sigterm()  # outside the training's steps: at once, as before


def test_checkpoints_inside_an_epoch_wait_for_the_accumulated_gradients(tmp_path):
    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=1", "train.grad_accum_steps=2", "train.step_log_interval=1",
                                 EVERY_LOG_STEP), epoch_sampler_loaders)[0] == 0
    assert saved_positions(exp) == [(1, 2), (1, 4), (1, 6)]  # the last: the steps done, before validation


def test_a_loader_that_cannot_skip_trains_the_steps_left_from_a_fresh_pass(tmp_path, caplog):
    """fake_build_loaders' loader shuffles with torch's RandomSampler: it cannot skip, so the resumed epoch draws its
    2 steps left from a new pass, and says so."""
    exp = tmp_path / "exp"

    def build(cfg, stop=True):
        loaders = fake_build_loaders(cfg)
        return loaders._replace(cls_train=StoppingLoader(loaders.cls_train, 5, ctrl_c)) if stop else loaders

    assert run_training(make_cfg(exp, "train.epochs=1", EVERY_LOG_STEP), build)[0] == EXIT_INTERRUPTED
    err = (exp / "logs" / "train.err").read_text(encoding="utf-8")
    assert "the checkpoints hold 4 classification steps of epoch 1, where" in err  # no "epoch 0"
    steps = []
    with caplog.at_level(logging.INFO):
        code, trainer = run_training(make_cfg(exp, "train.epochs=1", EVERY_LOG_STEP, "train.resume=last"),
                                     lambda cfg: build(cfg, stop=False), callbacks=[StepLog(steps)])
    assert code == 0 and steps == [(1, 5), (1, 6)]
    assert "cannot skip the 32 samples it had drawn" in caplog.text
    assert load_ckpt(exp / "checkpoints" / "last.pt")["task_state"]["samples_seen"] == 48


def test_a_position_of_another_epoch_is_not_taken_and_a_best_file_starts_the_epoch_over(tmp_path, caplog):
    exp = tmp_path / "exp"
    settings = ("train.epochs=2", EVERY_LOG_STEP)
    assert run_training(make_cfg(exp, *settings), lambda cfg: epoch_sampler_loaders(cfg, stop_at=11))[0] == \
        EXIT_INTERRUPTED
    steps = []
    code, trainer = run_training(make_cfg(exp, *settings, f"train.resume={exp / 'checkpoints' / 'best.pt'}"),
                                 epoch_sampler_loaders, callbacks=[StepLog(steps)])
    assert code == 0 and steps[0] == (2, 1) and len(steps) == 6

    assert run_training(make_cfg(exp, "train.epochs=3", EVERY_LOG_STEP),
                        lambda cfg: epoch_sampler_loaders(cfg, stop_at=11))[0] == EXIT_INTERRUPTED
    path = exp / "checkpoints" / "classification_last.pt"
    ckpt = load_ckpt(path)
    ckpt["progress"]["epoch"] = 3  # as if saved inside another epoch than the one after its own
    save_ckpt(path, ckpt)
    steps.clear()
    with caplog.at_level(logging.WARNING):
        code, _ = run_training(make_cfg(exp, "train.epochs=3", EVERY_LOG_STEP, "train.resume=last"),
                               epoch_sampler_loaders, callbacks=[StepLog(steps)])
    assert code == 0 and "epoch 2 starts over" in caplog.text and steps[0] == (2, 1)


class _StopAtBatch:
    """fakes' collate, but when a rank asks for its `at`-th batch: a Ctrl-C raised there (on every rank at the same
    batch), or with `signal_rank`, a real SIGTERM sent to that rank's own process only (a node's pre-emption, or
    `kill` of one worker, reaches some ranks and not others)."""

    def __init__(self, at: int | None, rank: int = 0, signal_rank: int | None = None, fail_draw: bool = False) -> None:
        self.at, self.calls, self.rank, self.signal_rank, self.fail_draw = at, 0, rank, signal_rank, fail_draw

    def __call__(self, items):
        self.calls += 1
        if self.calls == self.at:
            if self.signal_rank is None:
                raise KeyboardInterrupt
            if self.rank == self.signal_rank:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
                if self.fail_draw:  # the stop ended the loader's workers too, as a process group's stop does
                    raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")
        return collate(items)


def ddp_loaders(cfg, stop_at: int | None = None, rank: int = 0, signal_rank: int | None = None,
                fail_draw: bool = False):
    """96 jittered images on an EpochSampler (6 steps a rank and epoch over 2 ranks, at batch 8)."""
    from fakes import ColourDataset

    loaders = fake_build_loaders(cfg)
    data = Jittered(ColourDataset(24, int(cfg.model.image_size), seed=1))
    train = DataLoader(data, batch_size=int(cfg.train.batch_size), sampler=EpochSampler(data, seed=int(cfg.train.seed)),
                       drop_last=True, collate_fn=_StopAtBatch(stop_at, rank, signal_rank, fail_draw), num_workers=0)
    return loaders._replace(cls_train=train)


def ddp_worker(rank: int, world: int, port: int, exp: str, stop_at: int | None, resume: bool, out: str,
               signal_rank: int | None = None, interval_saves: bool = True, fail_draw: bool = False) -> None:
    import os
    from functools import partial
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    cfg = make_cfg(Path(exp), "train.epochs=2", "train.deterministic=true", "train.step_log_interval=1",
                   *([EVERY_LOG_STEP] if interval_saves else []), *(["train.resume=last"] if resume else []))
    code, trainer = run_training(cfg, partial(ddp_loaders, stop_at=stop_at, rank=rank, signal_rank=signal_rank,
                                              fail_draw=fail_draw))
    task = trainer.tasks["classification"]
    torch.save({"code": code, "state": task.raw_model.state_dict(), "steps": trainer.state.global_step},
               Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_save_inside_an_epoch_together_and_resume_as_the_unbroken_run(tmp_path):
    """Each rank draws its own shard; the saves come at the same steps on both (rank 0's clock decides), and the
    resumed run, every rank skipping the indices its own shard had drawn, ends with the unbroken run's weights."""
    from test_engine_ddp import free_port

    def spawn(exp, name, stop_at=None, resume=False):
        out = tmp_path / name
        out.mkdir()
        args = (2, free_port(), str(tmp_path / exp), stop_at, resume, str(out))
        run_ranks(ddp_worker, args)
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

    whole = spawn("whole", "whole")
    assert [r["code"] for r in whole] == [0, 0]
    assert saved_positions(tmp_path / "whole") == [(1, n) for n in range(1, 7)] + [(2, n) for n in range(1, 7)]
    broken = spawn("broken", "broken", stop_at=9)  # epoch 2, batch 3 on each rank
    assert [r["code"] for r in broken] == [EXIT_INTERRUPTED] * 2
    assert load_ckpt(tmp_path / "broken" / "checkpoints" / "last.pt")["progress"]["done"] == {"classification": 2}
    # The same checkpoints resumed by one process: it skips the 32 images both ranks had taken and trains the 64
    # left, 8 steps (the epoch's whole 96 images, none twice)
    import shutil

    shutil.copytree(tmp_path / "broken", tmp_path / "alone")
    steps: list = []
    code, trainer = run_training(make_cfg(tmp_path / "alone", "train.epochs=2", "train.step_log_interval=1",
                                          EVERY_LOG_STEP, "train.resume=last"), ddp_loaders,
                                 callbacks=[StepLog(steps)])
    assert code == 0 and steps == [(2, n) for n in range(3, 11)]
    assert trainer.tasks["classification"].samples_seen == 96 + 96
    resumed = spawn("broken", "resumed", resume=True)
    assert [r["code"] for r in resumed] == [0, 0] and resumed[0]["steps"] == whole[0]["steps"] == 12
    for name, tensor in whole[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], tensor), name
        assert torch.equal(resumed[1]["state"][name], tensor), name
    # the resumed epoch's mean training loss is the unbroken one's: the save kept every rank's loss so far, which
    # rank 0 carries on (before, rank 0's own part stood for every rank's)
    def last_loss(exp: str) -> float:
        return read_json(tmp_path / exp / "reports" / "metrics.json")["history"][-1]["classification"]["train_loss"]

    assert last_loss("broken") == pytest.approx(last_loss("whole"), rel=1e-6)


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_saves_every_ranks_place_together_and_the_resume_ends_as_the_unbroken_run(
        tmp_path):
    """A SIGTERM that reaches one rank only, while it draws a batch: every rank trains that step, saves its place
    at the same step (the ranks vote on the stop with the step's lost-batch vote) and stops; the resume ends with
    the unbroken run's weights. No interval saves here: the only checkpoint inside the epoch is the stop's."""
    from test_engine_ddp import free_port

    def spawn(exp, name, stop_at=None, resume=False, signal_rank=None):
        out = tmp_path / name
        out.mkdir()
        args = (2, free_port(), str(tmp_path / exp), stop_at, resume, str(out), signal_rank, False)
        run_ranks(ddp_worker, args)
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

    whole = spawn("whole", "whole")
    broken = spawn("broken", "broken", stop_at=9, signal_rank=1)  # rank 1 only, drawing step 3 of epoch 2
    assert [r["code"] for r in broken] == [EXIT_INTERRUPTED] * 2
    assert saved_positions(tmp_path / "broken") == [(2, 3)]  # rank 0 saves for both, after the step in hand
    last = load_ckpt(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["done"] == {"classification": 3}
    resumed = spawn("broken", "resumed", resume=True)
    assert [r["code"] for r in resumed] == [0, 0] and resumed[0]["steps"] == whole[0]["steps"] == 12
    for name, tensor in whole[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], tensor), name
        assert torch.equal(resumed[1]["state"][name], tensor), name


@pytest.mark.slow
def test_a_stop_that_also_ends_one_ranks_loader_workers_saves_every_ranks_place_without_a_data_warning(tmp_path,
                                                                                                      capfd):
    """A process group's stop ends the loader's workers too: the rank's draw fails. Every rank still saves its place
    together and stops; neither says its batch was unreadable (every stop of a run with workers said so)."""
    from test_engine_ddp import free_port

    out = tmp_path / "out"
    out.mkdir()
    args = (2, free_port(), str(tmp_path / "exp"), 9, False, str(out), 1, False, True)
    # ranks of their own: the test reads what they write on stderr (capfd), and a start here may be the session's
    # first, which would leave the fork server writing to this test's capture for good
    run_ranks(ddp_worker, args, own_interpreter=True)
    codes = [torch.load(out / f"rank{r}.pt", weights_only=False)["code"] for r in range(2)]
    assert codes == [EXIT_INTERRUPTED] * 2
    assert saved_positions(tmp_path / "exp") == [(2, 2)]  # the steps trained before the failed draw
    err = capfd.readouterr().err
    assert "SIGTERM received: saving the training's place" in err and "half readable" not in err
    # the batch rank 0 drew in that step was not trained: the resume draws it again (as rank 1's), none is lost
    assert load_ckpt(tmp_path / "exp" / "checkpoints" / "last.pt")["progress"]["drawn"] == {"classification": 2}
    again = tmp_path / "again"
    again.mkdir()
    args = (2, free_port(), str(tmp_path / "exp"), None, True, str(again), None, False)
    run_ranks(ddp_worker, args, own_interpreter=True)
    resumed = [torch.load(again / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["code"] for r in resumed] == [0, 0] and resumed[0]["steps"] == 12


def test_tensorboard_hides_the_steps_a_resume_redoes(tmp_path):
    """Killed at epoch 2's fifth batch with checkpoints at epoch ends only: steps 7-10 were logged, then redone by
    the resume. TensorBoard shows each step once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    settings = ("train.epochs=2", "train.checkpoint_interval_minutes=0")
    assert run_training(make_cfg(exp, *settings), lambda cfg: epoch_sampler_loaders(cfg, stop_at=11))[0] == \
        EXIT_INTERRUPTED
    losses: dict[int, float] = {}

    class Losses(StepLog):
        def on_step_end(self, record: dict) -> None:
            losses[record["global_step"]] = record["loss"]

    assert run_training(make_cfg(exp, *settings, "train.resume=last"), epoch_sampler_loaders,
                        callbacks=[Losses([])])[0] == 0
    events = EventAccumulator(str(exp / "tb"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in shown] == [2, 4, 6, 8, 10, 12]
    assert [value for step, value in shown if step > 6] == pytest.approx([losses[s] for s in (8, 10, 12)])


def test_a_changed_batch_size_goes_on_from_the_same_photo_and_the_stage_clock_from_the_save(tmp_path):
    """Saved after 4 steps of 8 images (32 of epoch 2's 48 taken), resumed at batch 12: the 16 images left make one
    whole batch (drop_last), so one step is trained, and the clock goes on from the save's."""
    exp = tmp_path / "exp"
    settings = ("train.epochs=2", EVERY_LOG_STEP)
    assert run_training(make_cfg(exp, *settings), lambda cfg: epoch_sampler_loaders(cfg, stop_at=11))[0] == \
        EXIT_INTERRUPTED
    saved = load_ckpt(exp / "checkpoints" / "last.pt")["progress"]
    steps = []
    code, trainer = run_training(make_cfg(exp, *settings, "train.resume=last", "train.batch_size=12"),
                                 epoch_sampler_loaders, callbacks=[StepLog(steps)])
    assert code == 0 and steps == [(2, 5)]
    assert trainer.tasks["classification"].samples_seen == 48 + 32 + 12
    assert trainer.state.clock_offset == pytest.approx(saved["elapsed_s"]) and saved["elapsed_s"] > 0


def two_task_loaders(cfg, stop_at: int | None = None, det_batches: int = 4):
    """epoch_sampler_loaders plus `det_batches` fake detection batches on an EpochSampler (one batch an index)."""
    import numpy as np
    from fakes import batch_loader, fake_det_batch

    loaders = epoch_sampler_loaders(cfg, stop_at)
    rng = np.random.default_rng(3)
    batches = [fake_det_batch(rng, 2) for _ in range(det_batches)]
    train = DataLoader(batches, batch_size=None, sampler=EpochSampler(batches, seed=5), num_workers=0)
    return loaders._replace(det_train=train, det_val=batch_loader([fake_det_batch(rng, 2)]))


@pytest.mark.slow
def test_two_tasks_resumed_inside_an_epoch_go_on_in_the_unbroken_runs_order(tmp_path):
    """Interleaved 1:1, 6 classifier and 4 detector steps an epoch, saves after every step. The kill asks for the
    classifier's batch 9 (epoch 2's third): the last save is after the detector's third step, so the unbroken order
    goes on with the classifier (an order started afresh would begin with the detector). The resumed run continues
    that order and ends with both of the unbroken run's models."""
    settings = ("train.epochs=2", "train.strategy=interleaved", "train.warmup_steps=0", "train.step_log_interval=1",
                EVERY_LOG_STEP)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    order: list = []
    assert run_training(make_cfg(whole, *settings), two_task_loaders, callbacks=[TaskLog(order)])[0] == 0
    assert run_training(make_cfg(broken, *settings), lambda cfg: two_task_loaders(cfg, stop_at=9))[0] == \
        EXIT_INTERRUPTED
    progress = load_ckpt(broken / "checkpoints" / "detection_last.pt")["progress"]
    assert progress["epoch"] == 2 and progress["drawn"] == {"classification": 2, "detection": 3}
    resumed: list = []
    assert run_training(make_cfg(broken, *settings, "train.resume=last"), two_task_loaders,
                        callbacks=[TaskLog(resumed)])[0] == 0
    assert resumed == order[-len(resumed):] and len(resumed) == 5 and resumed[0][1] == "classification"
    for name in ("classification", "detection"):
        mine, theirs = (load_ckpt(d / "checkpoints" / f"{name}_last.pt")["model_state"] for d in (broken, whole))
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


class TaskLog(StepLog):
    def on_step_end(self, record: dict) -> None:
        self.out.append((record["epoch"], record["task"], record["step"]))


def test_a_task_done_with_its_epoch_does_not_hold_off_the_saves(tmp_path):
    """grad_accum 2 and 3 detector steps: the detector ends its epoch with a window open. The classifier's steps
    after it are still saved at (after its fourth step; before, saves stopped with the detector's last step)."""
    exp = tmp_path / "exp"
    assert run_training(make_cfg(exp, "train.epochs=1", "train.strategy=interleaved", "train.grad_accum_steps=2",
                                 "train.step_log_interval=1", EVERY_LOG_STEP),
                        lambda cfg: two_task_loaders(cfg, det_batches=3))[0] == 0
    text = (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    saves = re.findall(r"checkpoint inside epoch 1 saved, after (\d+) classification \+ (\d+) detection", text)
    assert ("4", "3") in saves and ("2", "2") in saves


def test_cuda_random_states_are_given_back_to_torch_on_the_cpu(monkeypatch):
    """A checkpoint loaded with map_location=cuda brings the saved CUDA random states to the GPU; torch's setter
    takes CPU byte tensors only."""
    from pillsnap.utils import restore_host_rng

    given = []

    class OnTheGpu:  # stands for a CUDA tensor: what the setter needs is its .cpu() copy
        def cpu(self):
            return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", given.extend)
    restore_host_rng({"cuda": [OnTheGpu(), OnTheGpu()]})
    assert len(given) == 2 and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in given)


def test_a_save_due_inside_an_accumulation_window_is_made_when_it_closes(tmp_path, monkeypatch):
    """grad_accum 2 and a log step every 3 steps: the log steps 3 and 9 fall inside a window; their saves come one
    step later (4, 10), with 12 steps an epoch. Before, a due save was dropped until a log step met a closed window."""
    import pillsnap.engine.loop as loop

    monkeypatch.setattr(loop, "record_due", lambda step, steps, cfg: step % 3 == 0 or step == steps)
    exp = tmp_path / "exp"

    def build(cfg):
        from fakes import ColourDataset

        loaders = fake_build_loaders(cfg)
        data = ColourDataset(24, int(cfg.model.image_size), seed=1)
        return loaders._replace(cls_train=DataLoader(data, batch_size=8, sampler=EpochSampler(data), drop_last=True,
                                                     collate_fn=collate))

    assert run_training(make_cfg(exp, "train.epochs=1", "train.grad_accum_steps=2", EVERY_LOG_STEP), build)[0] == 0
    assert saved_positions(exp) == [(1, 4), (1, 6), (1, 10), (1, 12)]


def test_positions_of_two_tasks_with_a_nan_loss_are_still_one_save():
    from pillsnap.engine.checkpointing import same_save as _same_save

    saved = {"epoch": 2, "loss_sum": {"detection": float("nan")}, "rng": [{"torch": torch.zeros(3)}]}
    assert _same_save({**saved, "rng": [{"torch": torch.ones(3)}]}, saved)
    assert not _same_save({**saved, "epoch": 3}, saved) and not _same_save(None, saved)


def test_a_negative_interval_is_refused_when_the_config_loads_in_one_line(tmp_path, caplog):
    from pillsnap.cli import main
    from pillsnap.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.checkpoint_interval_minutes=-5 is out of range: it must be >= 0"):
        make_cfg(tmp_path / "exp", "train.checkpoint_interval_minutes=-5")
    assert main(["train", "--check", "train.checkpoint_interval_minutes=-5"]) == 2  # before anything is built
    assert "config error: train.checkpoint_interval_minutes=-5 is out of range" in caplog.text


def test_a_checkpoint_inside_an_epoch_the_disk_has_no_room_for_is_skipped_not_a_crash(tmp_path, monkeypatch,
                                                                                    caplog):
    """A commit writes a whole new generation beside the last one: on a disk that had filled, the save inside the
    epoch crashed the run (under torchrun's restarts, again every interval). It is skipped with a warning; the
    epoch's own commit is left to fail by name, as before."""
    import shutil
    from collections import namedtuple

    exp = tmp_path / "exp"
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def nearly_full(path):
        figures = real(path)
        return usage(figures.total, figures.used, 1000) if str(path).startswith(str(exp)) else figures

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with caplog.at_level(logging.WARNING):
        code, _ = run_training(make_cfg(exp, "train.epochs=2", EVERY_LOG_STEP), epoch_sampler_loaders)
    assert code == 0
    # before any last file the weights with Adam's moments and the EMA are what a generation needs
    assert saved_positions(exp) == []
    assert "checkpoint inside epoch 1 skipped: it needs about" in caplog.text
    assert "the last commit (epoch 1) stays where a resume goes on" in caplog.text  # inside epoch 2
    assert load_ckpt(exp / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_stop_noted_in_steps_an_error_then_left_still_stops_at_the_next_signal(capfd):
    """A SIGTERM noted in a step that then failed (OOM recovery gave up): the error leaves the steps without acting
    on it, and the run goes on to its emergency save and the work after training. The next stop there raises; before,
    every later one was ignored as a copy of the first, until SIGKILL."""
    from pillsnap.utils import signals

    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"), signals.stops_as_interrupt():
        with pytest.raises(RuntimeError), signals.stops_at_safe_points():
            sigterm()
            raise RuntimeError("the step's own error")
        sigterm()  # outside the steps now: it stops
    assert signals.stop_requested() is None  # and nothing is left noted for the next run in this process


def test_a_resume_inside_an_epoch_whose_epochs_grew_ends_at_its_schedules_end(tmp_path):
    """Saved inside epoch 2 after 3 of its 4 steps, resumed with 6 steps an epoch (max_steps_per_epoch raised): the
    whole epoch before scales to 6 steps, the 3 taken inside count as they are, and the run ends exactly at the
    rebuilt schedule's end (scaling all 7 put it past, the last steps at lr 0)."""
    exp = tmp_path / "exp"
    base = ("train.warmup_steps=0", "train.epochs=2")
    code, _ = run_training(make_cfg(exp, *base, "train.max_steps_per_epoch=4"), epoch_sampler_loaders,
                           callbacks=[StopAfterStep([], 2, 2)])  # noted in step 2, saved after step 3
    saved = load_ckpt(exp / "checkpoints" / "last.pt")
    assert code == EXIT_INTERRUPTED and saved["progress"]["done"] == {"classification": 3}
    assert saved["scheduler_state"]["last_epoch"] == 7
    code, trainer = run_training(make_cfg(exp, *base, "train.max_steps_per_epoch=6", "train.resume=last"),
                                 epoch_sampler_loaders)
    assert code == 0
    assert load_ckpt(exp / "checkpoints" / "last.pt")["scheduler_state"]["last_epoch"] == 12  # 2 epochs x 6 steps
