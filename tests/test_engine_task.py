"""The task contract and the GPU code paths, run on CPU through the same code: autocast (bf16, fp16), the
gradient scaler, fused AdamW, S1 escalation, auto batch with injected OOMs, torch.compile in training."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from fakes import fake_build_loaders, fake_det_batch, loaders_with_detection, make_cfg

from pillsnap.engine import ClassificationTask, DetectionTask, OomDecision, Task
from pillsnap.engine.optim import optimizer_implementation

pytestmark = pytest.mark.usefixtures("one_thread")


def classification_task(tmp_path, *overrides: str) -> ClassificationTask:
    cfg = make_cfg(tmp_path, *overrides)
    loaders = fake_build_loaders(cfg)
    return ClassificationTask(cfg, loaders.cls_train, loaders.cls_val, loaders.meta, "cpu")


def detection_task(tmp_path, *overrides: str) -> DetectionTask:
    cfg = make_cfg(tmp_path, *overrides)
    loaders = loaders_with_detection(cfg)
    return DetectionTask(cfg, loaders.det_train, loaders.det_val, "cpu")


def first_batch(task: Task):
    return next(iter(task.train_loader))


def conv_output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Record the output dtype of every Conv2d forward from now on."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_both_tasks_implement_the_whole_contract():
    for cls in (ClassificationTask, DetectionTask):
        assert issubclass(cls, Task) and not inspect.isabstract(cls), cls


def test_the_classes_seen_are_read_from_the_batch_the_loader_gave_not_the_devices_copy(tmp_path, monkeypatch):
    """Reading labels back from the GPU after a step would make the host wait for the step at every step."""
    task = classification_task(tmp_path)
    batch = first_batch(task)
    moved = []
    real = task.to_device
    monkeypatch.setattr(task, "to_device", lambda b: moved.append(real(b)) or moved[-1])
    given = []
    monkeypatch.setattr(task, "on_batch_trained", lambda b: given.append(b))
    task.train_step(batch)
    assert given == [batch] and given[0] is batch and moved and moved[0] is not batch
    task = classification_task(tmp_path)
    task.train_step(batch)
    assert task.classes_seen == set(batch[1].tolist())


@pytest.mark.parametrize("make", [classification_task, detection_task])
def test_bf16_autocast_on_cpu_trains_in_bf16_and_validates_in_fp32(tmp_path, make):
    section = "classification" if make is classification_task else "detection"
    task = make(tmp_path, "train.cpu_amp=true", f"train.{section}.amp_dtype=bf16", "train.ema.validate=raw")
    assert task.precision.autocast and task.precision.dtype == torch.bfloat16 and not task.scaler.is_enabled()
    seen = conv_output_dtypes(task.raw_model)
    out = task.train_step(first_batch(task))
    assert math.isfinite(out.loss) and set(seen) == {torch.bfloat16}
    seen.clear()
    task.validate(1)
    assert set(seen) == {torch.float32}  # validation is fp32 whatever the training precision


@pytest.mark.parametrize(("make", "precision"), [(classification_task, "fp32"), (classification_task, "bf16"),
                                                 (detection_task, "fp32")])
def test_a_nan_gradient_without_a_scaler_skips_the_step_and_keeps_the_weights(tmp_path, caplog, make, precision):
    """fp32 and bf16 train without a gradient scaler: a NaN gradient (a NaN loss) is skipped as the scaler would
    skip it, instead of making every weight NaN; the EMA does not average that step, the schedule goes on."""
    section = "classification" if make is classification_task else "detection"
    extra = ("train.cpu_amp=true", f"train.{section}.amp_dtype=bf16") if precision == "bf16" else ()
    task = make(tmp_path, *extra, "train.ema.decay=0.5")
    assert not task.scaler.is_enabled()
    weight = next(p for p in task.raw_model.parameters() if p.ndim == 4)
    ema_weight = next(p for p in task.ema.module.parameters() if p.ndim == 4)
    before, ema_before, lr_before = weight.detach().clone(), ema_weight.detach().clone(), task.lr
    hook = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    task.train_step(first_batch(task))
    hook.remove()
    assert torch.equal(before, weight) and torch.equal(ema_before, ema_weight)
    assert all(torch.isfinite(p).all() for p in task.raw_model.parameters())
    assert task.skipped_steps == 1 and task.lr != lr_before  # the schedule follows the samples
    assert "non-finite gradients (norm nan): optimizer step skipped" in caplog.text
    task.train_step(first_batch(task))  # the next step trains as usual
    assert not torch.equal(before, weight) and not torch.equal(ema_before, ema_weight) and task.skipped_steps == 1


@pytest.mark.parametrize("make", [classification_task, detection_task])
def test_fp16_on_cpu_uses_the_gradient_scaler_which_skips_a_step_with_inf_gradients(tmp_path, make):
    section = "classification" if make is classification_task else "detection"
    task = make(tmp_path, "train.cpu_amp=true", f"train.{section}.amp_dtype=fp16", "train.ema.enabled=false")
    assert task.scaler.is_enabled() and task.scaler._device == "cpu"
    scale = task.scaler.get_scale()
    weight = next(p for p in task.raw_model.parameters() if p.ndim == 4)
    before = weight.detach().clone()
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    task.train_step(first_batch(task))
    hook.remove()
    assert torch.equal(before, weight) and task.scaler.get_scale() == scale / 2  # skipped, then scaled down
    for _ in range(16):  # fp16 gradients may overflow at the starting scale: it shrinks until a step is taken
        task.train_step(first_batch(task))
        if not torch.equal(before, weight):
            break
    assert not torch.equal(before, weight) and task.scaler.get_scale() <= scale / 2


def test_s1_escalation_turns_fp32_into_fp16_autocast_with_a_scaler_on_cpu(tmp_path):
    task = classification_task(tmp_path, "train.cpu_amp=true", "train.classification.amp=false")
    assert not task.precision.autocast and task.fp16_saves_memory
    task.apply_oom_decision(OomDecision("amp_fp16", 1))
    assert task.precision.autocast and task.precision.dtype == torch.float16 and task.scaler.is_enabled()
    assert task.knobs.did_amp_escalate and not task.fp16_saves_memory
    seen = conv_output_dtypes(task.raw_model)
    assert math.isfinite(task.train_step(first_batch(task)).loss) and set(seen) == {torch.float16}


def test_a_carried_fp16_escalation_leaves_a_task_that_cannot_autocast_in_fp32(tmp_path):
    """A checkpoint or a restart's recovery from a run where S1 did nothing (a CPU without train.cpu_amp) carries
    did_amp_escalate; applying it must not switch on an autocast the config does not allow."""
    task = classification_task(tmp_path, "train.cpu_amp=false")
    task.apply_oom_decision(OomDecision("amp_fp16", 1))
    assert task.knobs.did_amp_escalate and not task.precision.autocast and not task.scaler.is_enabled()


@pytest.mark.parametrize("overrides", [("train.cpu_amp=true", "train.classification.amp_dtype=bf16"),
                                       ("train.cpu_amp=true", "train.classification.amp_dtype=fp16"),
                                       ("train.cpu_amp=false",)])
def test_fp16_saves_no_memory_in_16_bit_autocast_or_where_the_device_cannot_autocast(tmp_path, overrides):
    assert not classification_task(tmp_path, *overrides).fp16_saves_memory


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_an_oom_inside_the_fp16_optimizer_step_can_be_replayed(tmp_path):
    """The scaler unscaled the gradients for clipping, then the optimizer step ran out of memory (fused AdamW makes
    its state at its first step): the replay used to stop on "unscale_() has already been called"."""
    task = classification_task(tmp_path, "train.cpu_amp=true", "train.classification.amp_dtype=fp16",
                               "train.grad_clip=1.0", "train.ema.enabled=false")
    assert task.scaler.is_enabled() and task.grad_clip()
    real_step, calls = task.optimizer.step, []

    def step_once_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("fake CUDA out of memory in the optimizer step")
        return real_step(*args, **kwargs)

    task.optimizer.step = step_once_out_of_memory
    batch = first_batch(task)
    with pytest.raises(torch.OutOfMemoryError):
        task.train_step(batch)
    scale = task.scaler.get_scale()
    task.reset_after_oom()
    weight = next(p for p in task.raw_model.parameters() if p.ndim == 4)
    before = weight.detach().clone()
    for _ in range(16):  # the replay, then more steps until the scale lets one through (fp16 gradients overflow)
        assert math.isfinite(task.train_step(batch).loss)
        if not torch.equal(before, weight):
            break
    assert not torch.equal(before, weight) and task.scaler.get_scale() <= scale  # the scale was carried over


def test_adamw_picks_fused_kernels_where_they_exist_and_foreach_elsewhere(tmp_path):
    assert optimizer_implementation([torch.zeros(2, requires_grad=True)]) == {"fused": True}
    assert optimizer_implementation([torch.zeros(2, device="meta")]) == {"foreach": True}
    assert optimizer_implementation([]) == {"foreach": True}
    task = classification_task(tmp_path)
    assert task.optimizer.defaults["fused"] is True


@pytest.mark.parametrize("make", [classification_task, detection_task])
def test_auto_batch_with_injected_ooms_halves_then_forces_fp16_and_raises_accumulation(tmp_path, monkeypatch, make):
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "0,4")  # nothing fits in fp32, 4 images in fp16
    section = "classification" if make is classification_task else "detection"
    task = make(tmp_path, "train.cpu_amp=true", f"train.{section}.amp=false", "train.batch_size=8",
                "train.detection.batch_size=8", "train.oom.min_batch=2")
    before = {k: v.clone() for k, v in task.raw_model.state_dict().items()}
    choice = task.find_batch_size(max_bs=16, headroom=0.88)
    assert (choice.batch_size, choice.grad_accum, choice.force_fp16) == (4, 2, True)
    assert [(bs, fp16, r) for bs, fp16, r in choice.trials] == [
        (8, False, "oom"), (4, False, "oom"), (2, False, "oom"), (8, True, "oom"), (4, True, "fits")]
    for key, value in task.raw_model.state_dict().items():  # the trials ran real steps; the weights are restored
        assert torch.equal(value, before[key]), key


def test_auto_batch_does_not_force_fp16_on_a_task_already_in_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "0,4")  # the fake "GPU" would take 4 images in fp16
    task = classification_task(tmp_path, "train.cpu_amp=true", "train.classification.amp_dtype=bf16",
                               "train.batch_size=8", "train.oom.min_batch=2")
    with pytest.raises(RuntimeError, match="fp16 tried: False"):  # bf16 activations are fp16's size already
        task.find_batch_size(max_bs=16, headroom=0.88)


def test_trainer_applies_the_auto_batch_choice(tmp_path, monkeypatch):
    from pillsnap.engine.callbacks import MemoryWatchCallback
    from pillsnap.engine.run import run_training

    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "4")
    cfg = make_cfg(tmp_path, "train.classification.auto_batch_tune=true", "train.epochs=1", "train.batch_size=8")
    code, trainer = run_training(cfg, fake_build_loaders)
    task = trainer.tasks["classification"]
    assert code == 0 and (task.knobs.batch_size, task.knobs.grad_accum) == (4, 2)
    assert task.train_loader.batch_size == 4 and trainer.cfg.train.batch_size == 4
    assert task.global_batch_at_start == 8  # the global batch the config asked for is kept
    # the checkpoint keeps the batch the user configured, not the search's pick: a resume whose search picks
    # another size (another GPU) is not taken for a batch changed by the user, which dropped OOM recovery's choices
    from pillsnap.utils import load_ckpt

    oom_state = load_ckpt(tmp_path / "checkpoints" / "classification_last.pt")["oom_state"]
    assert (oom_state["configured_batch_size"], oom_state["batch_size"]) == (8, 4)
    # batches sized to fill 88% of the GPU are not warned about at 80% every epoch (the memory warning's limit)
    watch = trainer.callbacks.of_type(MemoryWatchCallback)
    assert [w.ratio for w in watch] == [0.88] and "auto_batch_vram_headroom" in watch[0].limit_name
    # a search that stopped at auto_batch_max, far from the headroom, keeps the warning at 80%
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "1000")
    cfg = make_cfg(tmp_path / "roomy", "train.classification.auto_batch_tune=true", "train.epochs=1",
                   "train.batch_size=8", "train.classification.auto_batch_max=16")
    code, trainer = run_training(cfg, fake_build_loaders)
    assert code == 0 and trainer.tasks["classification"].knobs.batch_size == 16
    assert [w.ratio for w in trainer.callbacks.of_type(MemoryWatchCallback)] == [0.8]


def test_memory_bound_reads_the_trials_at_the_chosen_precision():
    from pillsnap.engine.build import memory_bound
    from pillsnap.engine.oom import BatchChoice

    assert memory_bound(BatchChoice(8, trials=[(8, False, "fits"), (16, False, "over headroom")]))
    assert memory_bound(BatchChoice(4, trials=[(8, False, "oom"), (4, False, "fits")]))
    assert not memory_bound(BatchChoice(16, trials=[(8, False, "fits"), (16, False, "fits")]))  # auto_batch_max
    # nothing fitted in fp32; fp16 reached auto_batch_max: the fp32 OOMs say nothing of the fp16 batch
    assert not memory_bound(BatchChoice(16, force_fp16=True, trials=[(8, False, "oom"), (4, False, "oom"),
                                                                     (8, True, "fits"), (16, True, "fits")]))


@pytest.mark.slow
def test_torch_compile_trains_under_bf16_autocast_on_cpu(tmp_path, caplog):
    from pillsnap.engine.run import run_training

    cfg = make_cfg(tmp_path, "optimization.torch_compile=reduce-overhead", "train.cpu_amp=true",
                   "train.classification.amp_dtype=bf16", "train.epochs=1", "train.max_steps_per_epoch=3",
                   "optimization.channels_last=false")
    code, trainer = run_training(cfg, fake_build_loaders)
    task = trainer.tasks["classification"]
    assert code == 0 and "falling back to eager" not in caplog.text
    assert isinstance(task.model, torch._dynamo.eval_frame.OptimizedModule)
    history = trainer.history[-1]["classification"]
    assert np.isfinite(history["train_loss"]) and history["steps"] == 3


def test_fake_detection_batches_match_the_loader_contract():
    batch = fake_det_batch(np.random.default_rng(0), 3)
    assert batch["img"].dtype == torch.uint8 and batch["img"].shape == (3, 3, 64, 64)
    assert batch["bboxes"].shape[1] == 4 and len(batch["cls"]) == len(batch["batch_idx"])


def test_a_resume_on_another_number_of_ranks_goes_on_where_its_samples_bring_the_schedule(tmp_path, caplog):
    """A checkpoint of a 2-rank run counts each rank's optimizer steps (half the samples each); resumed on one GPU,
    where an epoch takes twice the steps, the schedule goes on at the samples trained so far, not at the old count
    (half as far). Resumed on 2 ranks again it goes on exactly where it stopped."""
    from pillsnap.engine.distributed import DistInfo

    first = classification_task(tmp_path / "a", "train.batch_size=8")
    first.info = DistInfo(rank=0, world_size=2)
    for _ in range(3):
        first.scheduler.step()
    first.samples_seen = 48  # every rank's: 3 steps of 8 photos on each of 2 ranks
    ckpt = first.checkpoint_state(epoch=1, best_metric=None)
    assert ckpt["task_state"]["world_size"] == 2
    alone = classification_task(tmp_path / "b", "train.batch_size=8")
    alone.load_checkpoint_state(ckpt)
    assert alone.scheduler.last_epoch == 6 and "not the checkpoint's step 3 (2 rank(s))" in caplog.text
    lr = alone.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(alone.peak_lr * alone.scheduler.lr_lambdas[0](6))
    again = classification_task(tmp_path / "c", "train.batch_size=8")
    again.info = DistInfo(rank=1, world_size=2)
    again.load_checkpoint_state(ckpt)
    assert again.scheduler.last_epoch == 3
    spread = classification_task(tmp_path / "e", "train.batch_size=8")  # and the one-GPU run's on 2 ranks: back
    spread.info = DistInfo(rank=0, world_size=2)
    spread.load_checkpoint_state(alone.checkpoint_state(epoch=1, best_metric=None))
    assert spread.scheduler.last_epoch == 3
    older = {**ckpt, "task_state": {k: v for k, v in ckpt["task_state"].items() if k != "world_size"}}
    unknown = classification_task(tmp_path / "d", "train.batch_size=8")
    unknown.load_checkpoint_state(older)  # a checkpoint that does not say its ranks: one rank is assumed
    assert unknown.scheduler.last_epoch == 3
    unknown.samples_seen = 24
    older_one = {**unknown.checkpoint_state(epoch=1, best_metric=None)}
    older_one["task_state"] = {k: v for k, v in older_one["task_state"].items() if k != "world_size"}
    spread_older = classification_task(tmp_path / "f", "train.batch_size=8")  # an older one-GPU run on 2 ranks
    spread_older.info = DistInfo(rank=0, world_size=2)
    spread_older.load_checkpoint_state(older_one)
    assert spread_older.scheduler.last_epoch == 2  # 24 samples at 8 a rank on 2 ranks (rounded from 1.5)
    exact = classification_task(tmp_path / "g", "train.batch_size=8")  # and on one process: as it was
    exact.load_checkpoint_state(older_one)
    assert exact.scheduler.last_epoch == 3


def test_a_resume_with_another_batch_trains_it_as_configured(tmp_path, caplog):
    """The checkpoint's knobs are what OOM recovery chose for the batch its run was configured with. Resumed with
    another batch size (the Stage 3 script's --batch-size, then --resume alone), they would cut every new batch into
    the old size's chunks, each an optimizer step, and run the schedule out early: the configured batch is trained.
    Resumed with the same batch, OOM recovery's choice is kept."""
    first = classification_task(tmp_path / "a", "train.batch_size=8")
    peak = first.peak_lr
    first.knobs.batch_size, first.knobs.grad_accum = 4, 1  # as OOM recovery leaves them, with its lr cut
    first._scale_lr(0.5)
    first.sched_mode, first.knobs.did_amp_escalate = "by_samples", True
    for _ in range(6):  # 6 optimizer steps of the configured 8 photos, 2 of them at recovery's 4 a step
        first.scheduler.step()
    first.samples_seen = 48
    ckpt = first.checkpoint_state(epoch=1, best_metric=None)
    assert ckpt["oom_state"]["configured_batch_size"] == 8
    same = classification_task(tmp_path / "b", "train.batch_size=8")
    same.load_checkpoint_state(ckpt)
    assert (same.knobs.batch_size, same.knobs.grad_accum, same.sched_mode) == (4, 1, "by_samples")
    assert same.scheduler.last_epoch == 6 and same.samples_seen == 48
    assert same.peak_lr == pytest.approx(peak * 0.5)  # recovery's choices, lr cut included, stand
    other = classification_task(tmp_path / "c", "train.batch_size=12")
    other.load_checkpoint_state(ckpt)
    assert (other.knobs.batch_size, other.knobs.grad_accum, other.sched_mode) == (12, 1, "steps")
    assert other.peak_lr == pytest.approx(peak)  # the configured batch at the configured peak
    step = other.scheduler.last_epoch
    assert step == 4  # the 48 photos trained so far are 4 steps of the new 12-photo batch, not the old run's 6
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(peak * other.scheduler.lr_lambdas[0](step))
    assert other.knobs.did_amp_escalate  # the fp16 switch does not depend on the batch
    assert "configured as 12 x 1 (batches of 12), the checkpoint's run as 8 x 1 (batches of 8)" in caplog.text
    older = {**ckpt, "oom_state": {k: v for k, v in ckpt["oom_state"].items()
                                   if not k.startswith("configured") and k != "loader_batch_size"}}
    kept = classification_task(tmp_path / "d", "train.batch_size=12")
    kept.load_checkpoint_state(older)  # a checkpoint from before the configured batch was kept: as before
    assert (kept.knobs.batch_size, kept.knobs.grad_accum) == (4, 1)


def test_the_detector_clips_as_ultralytics_does_over_every_ranks_batch(tmp_path):
    """ultralytics clips at 10 the gradient of a loss summed over the images of a step, every rank's under DDP; our
    loss is the mean over the global batch of all ranks, so the clip is 10 over that many images."""
    from pillsnap.engine.distributed import DistInfo

    task = detection_task(tmp_path, "train.detection.batch_size=4", "train.grad_accum_steps=2")
    alone = task.grad_clip()
    assert alone == pytest.approx(10.0 / (task.knobs.batch_size * task.knobs.grad_accum))
    task.info = DistInfo(rank=1, world_size=4)
    assert task.grad_clip() == pytest.approx(alone / 4)


def test_each_rank_draws_its_own_augmentation_and_an_epoch_replays_its_draws():
    from pillsnap.engine.trainer import seed_epoch

    def draws(rank: int, epoch: int = 3) -> list[float]:
        seed_epoch(7, epoch, [], rank)
        return torch.rand(4).tolist()

    assert draws(0) == draws(0) and draws(1) == draws(1)  # a resumed epoch replays them
    assert draws(0) != draws(1) and draws(1) != draws(2)  # under DDP each rank flips and crops on its own
    assert draws(0, epoch=4) != draws(0)
    seed_epoch(7, 3, [])
    assert torch.rand(4).tolist() == draws(0)  # a single process draws as before


def test_a_resume_whose_auto_batch_search_picks_another_size_trains_this_runs_batch(tmp_path, monkeypatch):
    """The first start's GPU fitted 8 x 1, the resume's 4 x 2: the resume trains 4 x 2 to the end of its schedule,
    not the checkpoint's 8 x 1 over batches of 4 (every optimizer step on half a global batch, the schedule spent
    at 60 % of the run)."""
    from pillsnap.engine.run import run_training

    exp = tmp_path / "exp"
    common = ("train.classification.auto_batch_tune=true", "train.batch_size=8",
              "train.classification.auto_batch_max=8", "train.warmup_steps=0")
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "1000")
    assert run_training(make_cfg(exp, *common, "train.epochs=1"), fake_build_loaders)[0] == 0
    monkeypatch.setenv("PILLSNAP_FAKE_OOM_MAX_BATCH", "4")
    code, trainer = run_training(make_cfg(exp, *common, "train.epochs=3", "train.resume=last"), fake_build_loaders)
    task = trainer.tasks["classification"]
    assert code == 0 and (task.train_loader.batch_size, task.knobs.batch_size, task.knobs.grad_accum) == (4, 4, 2)
    assert task.scheduler.last_epoch == 3 * -(-task.steps_per_epoch() // 2)  # the schedule's end, not past it
