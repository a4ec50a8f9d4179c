"""The task contract: what the trainer and the step loop may ask of a model being trained.

`Task` owns everything that is the same for every model: precision, optimizer, schedule, gradient scaler, EMA,
accumulation, OOM recovery, auto batch, validation of raw/EMA weights, checkpoint state and replica sync.
A subclass (classification, detection) only says how to build its model, move and split a batch, compute a
chunk's loss and evaluate weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from pillsnap.config import config_to_dict
from pillsnap.engine.checkpointing import saved_peak_lr
from pillsnap.engine.compiling import compile_for_training
from pillsnap.engine.distributed import DistInfo, broadcast_tensors
from pillsnap.engine.oom import BatchChoice, FakeOOM, OomDecision, auto_find_batch_size
from pillsnap.engine.optim import build_optimizer, build_scheduler
from pillsnap.engine.precision import Precision, resolve_precision
from pillsnap.engine.spec import TaskSpec
from pillsnap.utils import release_cuda_cache
from pillsnap.utils.offline import WEIGHTS_ORIGIN

LOGGER = logging.getLogger(__name__)
# torch warns when a schedule steps before its optimizer ever did: here that is a skipped first step (an fp16
# overflow, non-finite gradients), and the schedule follows the samples on purpose. Set once: a filter set around
# each step would reset Python's record of warnings already shown, and every "once" warning would repeat.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")


class ResumeMismatchError(ValueError):
    """A checkpoint was trained with another model (backbone, class count or detector) than this run."""


class StepOutput(NamedTuple):
    """What one train_step reports: mean loss per sample, learning rate after the step, samples in the batch."""

    loss: float
    lr: float
    n: int


@dataclass
class OomKnobs:
    """The knobs OOM recovery turns. A loader batch is split into chunks of `batch_size`; the optimizer steps every
    `grad_accum` chunks. Global batch = batch_size x grad_accum (for every task)."""

    batch_size: int
    grad_accum: int
    did_amp_escalate: bool = False


class Task(ABC):
    """A model in training. A subclass declares `spec` (its TaskSpec) and implements the abstract methods below.

    Construction order, the one rule for subclasses: set your own fields first, then call `super().__init__()`
    last. The base builds the model, optimizer, schedule, EMA and (if asked) the compiled model through the hooks,
    and those may read any field the subclass set.
    """

    spec: ClassVar[TaskSpec]
    name: ClassVar[str]  # = spec.name
    compile_model: ClassVar[bool] = False  # optimization.torch_compile applies to this task's model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name = cls.spec.name

    def __init__(self, cfg: DictConfig, section: DictConfig, train_loader: Any, val_loader: Any, device: Any,
                 batch_choice: BatchChoice | None = None) -> None:
        self.cfg, self.section = cfg, section
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device = torch.device(device)
        self.precision = resolve_precision(section, self.device, bool(cfg.train.cpu_amp))
        self.raw_model = self.build_model().to(self.device)
        # where the weights training starts from came from (a resume keeps its checkpoint's: those are its weights)
        self.weights_origin: str | None = getattr(self.raw_model, WEIGHTS_ORIGIN, None)
        self.model = self._distribute(self.raw_model)
        self.optimizer = build_optimizer(self.raw_model.parameters(), *self.lr_and_weight_decay())
        loader_bs = int(getattr(train_loader, "batch_size", None) or self.configured_batch_size())
        self.loader_batch = loader_bs
        self.knobs = OomKnobs(loader_bs, max(1, int(cfg.train.grad_accum_steps)))
        # the batch the user configured (not the auto batch search's pick, which may differ between two starts of
        # one run): a checkpoint keeps it, so that a resume tells OOM recovery's choices from a batch changed since
        configured = batch_choice.configured if batch_choice is not None else None
        self.configured_knobs = (configured or self.configured_batch_size(), self.knobs.grad_accum)
        if batch_choice is not None:
            self.knobs.grad_accum = batch_choice.grad_accum
            if batch_choice.force_fp16:
                self._escalate_to_fp16()
        self.global_batch_at_start = self.knobs.batch_size * self.knobs.grad_accum
        self.build_schedule(self.epochs())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaled)
        self.ema = self._build_ema()
        self.fake_oom = FakeOOM.from_env()
        self.sched_mode = "steps"  # "by_samples" after an OOM changed the global batch
        self.micro_step = self.optimizer_steps = self.samples_seen = self.skipped_steps = 0
        self.classes_seen: set[int] = set()  # filled by tasks whose batches carry class labels
        self.info = DistInfo()  # the run's ranks (the trainer sets them under torchrun)
        self._window_chunks = self._window_samples = 0
        self._sched_credit = 0.0
        self.model = compile_for_training(self, self.model)
        LOGGER.info("%s: precision %s, global batch %d (%d x %d)", self.name, self.precision,
                    self.global_batch_at_start, self.knobs.batch_size, self.knobs.grad_accum)

    # ---- how the trainer finds and builds a task ---------------------------------------------------------------
    @classmethod
    def wanted(cls, cfg: DictConfig, loaders: Any) -> bool:
        """Whether this run trains the task (given the config and the stage's loaders)."""
        return True

    @classmethod
    @abstractmethod
    def from_loaders(cls, cfg: DictConfig, loaders: Any, device: Any, batch_choice: BatchChoice | None = None,
                     shard: Callable[[Any], Any] = lambda loader: loader) -> Task:
        """The task built from the stage's loaders; `shard` wraps its training loader for distributed runs."""

    # ---- what a task must say ----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, on the CPU."""

    @abstractmethod
    def to_device(self, batch: Any) -> Any:
        """A loader batch moved to the task's device, in the model's input format."""

    @abstractmethod
    def batch_len(self, batch: Any) -> int:
        """Samples (images) in a batch."""

    @abstractmethod
    def split(self, batch: Any, size: int) -> list[Any]:
        """Chunks of at most `size` samples of a device batch."""

    @abstractmethod
    def chunk_loss(self, chunk: Any) -> torch.Tensor:
        """Mean loss per sample of a chunk, computed through `self.model` (so DDP sees the forward)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict:
        """Validation metrics of `model` (eval mode, no grad) over the validation loader."""

    @abstractmethod
    def empty_metrics(self) -> dict:
        """The metrics reported when there is nothing to validate."""

    @abstractmethod
    def random_batch(self, batch_size: int) -> Any:
        """A device batch of random inputs with the real shapes, for the auto batch trials."""

    @abstractmethod
    def lr_and_weight_decay(self) -> tuple[float, float]:
        """Peak learning rate and weight decay from the task's config."""

    @abstractmethod
    def configured_batch_size(self) -> int:
        """The loader batch size the config asks for."""

    @abstractmethod
    def epochs(self) -> int:
        """Epochs this task trains in the run (sets the length of the schedule)."""

    @property
    @abstractmethod
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint and drives early stopping."""

    @property
    @abstractmethod
    def mode(self) -> str:
        """"max" or "min" for `monitor`."""

    @property
    def tie_break(self) -> str | None:
        """A validation metric in `mode`'s direction that decides between epochs no worse on `monitor` than the
        best but short of improving on it (early_stopping); None: the first best epoch stays the best."""
        return None

    @abstractmethod
    def check_compatible(self, ckpt: dict, origin: str) -> None:
        """Raise ResumeMismatchError when a checkpoint holds another model than this run builds (before loading it)."""

    def grad_clip(self) -> float | None:
        """Max gradient norm at an optimizer step (None: no clipping). train.grad_clip null or 0 turns clipping
        off for every task; a task with its own norm overrides clip_norm."""
        clip = self.cfg.train.grad_clip
        return self.clip_norm(float(clip)) if clip else None

    def clip_norm(self, configured: float) -> float:
        """The norm this task clips at when clipping is on (default: train.grad_clip itself)."""
        return configured

    def on_batch_trained(self, batch: Any) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Bookkeeping after a whole loader batch was trained (e.g. the classes seen), given the batch as its loader
        gave it (on the host); none by default."""

    def predict_val(self, loader: Any = None) -> tuple[Any, Any]:
        """(y_true, y_prob) of the validated weights on the validation split, through `loader` (default: the task's
        validation loader), for tasks whose spec says class_probabilities (the report plots and calibration use
        them)."""
        raise NotImplementedError(f"{self.name}: its validation gives no class probabilities")

    def class_names(self) -> list[str]:
        """Class names in index order (for tasks whose spec says class_probabilities)."""
        return []

    def config_snapshot(self) -> dict:
        return config_to_dict(self.cfg)

    # ---- construction ------------------------------------------------------------------------------------------
    def _distribute(self, model: nn.Module) -> nn.Module:
        """DDP when a process group is up (gradients all-reduced on backward)."""
        if dist.is_available() and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def build_schedule(self, epochs: int) -> None:
        """The lr schedule over `epochs` of this task's optimizer steps (warmup + cosine, or constant)."""
        opt_steps = epochs * math.ceil(self.steps_per_epoch() / self.knobs.grad_accum)
        for group in self.optimizer.param_groups:  # a rebuilt schedule starts from the configured peak again
            group.pop("initial_lr", None)
            group["lr"] = self.lr_and_weight_decay()[0]
        self.scheduler = build_scheduler(str(self.cfg.train.scheduler), self.optimizer, opt_steps,
                                         int(self.cfg.train.warmup_steps))

    def _build_ema(self) -> Any:
        """timm's ModelEmaV3 with its own decay warm-up (a short run would otherwise validate the random init)."""
        ema_cfg = self.cfg.train.ema
        if not ema_cfg.enabled:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.raw_model, decay=float(ema_cfg.decay), use_warmup=True)

    # ---- training ------------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        n = len(self.train_loader) if self.train_loader is not None else 0
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, int(cap)) if cap else n

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _sync_context(self) -> contextlib.AbstractContextManager:
        # DDP all-reduces on every backward; skip it for all but the last chunk of an accumulation window.
        last = self._window_chunks + 1 >= self.knobs.grad_accum
        no_sync = getattr(self.model, "no_sync", None)  # a DDP wrapper's, when there is one
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def train_step(self, batch: Any) -> StepOutput:
        """One loader batch, in chunks of knobs.batch_size; the optimizer steps every knobs.grad_accum chunks."""
        self.model.train()
        given, batch = batch, self.to_device(batch)
        n = self.batch_len(batch)
        global_batch = self.knobs.batch_size * self.knobs.grad_accum
        total = torch.zeros((), device=self.device)
        for chunk in self.split(batch, self.knobs.batch_size):
            m = self.batch_len(chunk)
            self.fake_oom.check(self.micro_step)
            self.micro_step += 1
            with self._sync_context():
                with self.precision.context(self.device):
                    loss = self.chunk_loss(chunk)
                # Each chunk weighs by its share of the global batch, so accumulated grads equal the batch mean.
                self.scaler.scale(loss * (m / global_batch)).backward()
            total += loss.detach().float() * m
            self._window_chunks += 1
            self._window_samples += m
            if self._window_chunks >= self.knobs.grad_accum:
                self._optimizer_step()
        self.samples_seen += n
        self.on_batch_trained(given)  # as the loader gave it: reading the device's copy would wait for the GPU
        return StepOutput(float(total.item()) / max(n, 1), self.lr, n)

    @property
    def accumulating(self) -> bool:
        """Whether gradients of chunks since the last optimizer step are waiting (grad_accum > 1)."""
        return self._window_chunks > 0

    def _optimizer_step(self) -> None:
        clip = self.grad_clip()
        norm = None
        if clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        if self.scaler.is_enabled():
            # fp16: the scaler skips a step whose gradients overflowed and lowers its scale (usual in the first steps)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        else:
            # fp32 and bf16 have no scaler: a NaN or infinite gradient (a NaN loss) would make every weight NaN, so
            # such a step is skipped as the scaler would. Under DDP the gradients are already averaged over the
            # ranks, so every rank skips alike. The step's loss is still logged, and the stage gate still sees it.
            if norm is None:
                norm = nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters() if p.grad is not None])
            stepped = bool(torch.isfinite(norm))
            if stepped:
                self.optimizer.step()
            else:
                self.skipped_steps += 1
                LOGGER.warning("%s: non-finite gradients (norm %s): optimizer step skipped, weights kept (%d so far)",
                               self.name, float(norm), self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=bool(self.cfg.train.zero_grad_set_to_none))
        self._step_scheduler(self._window_samples)  # the schedule follows the samples, stepped or not
        self.optimizer_steps += 1
        if self.ema is not None and stepped:  # the average of weights that did not move would only lag
            self.ema.update(self.raw_model, step=self.optimizer_steps)
        self._window_chunks = self._window_samples = 0

    def _step_scheduler(self, samples: int) -> None:
        if self.sched_mode == "steps":
            self.scheduler.step()
            return
        # After an OOM shrank the global batch: one schedule step per original global batch of samples, so the
        # schedule still ends where the epochs end.
        self._sched_credit += samples / self.global_batch_at_start
        while self._sched_credit >= 1.0 - 1e-9:
            self.scheduler.step()
            self._sched_credit -= 1.0

    # ---- OOM recovery --------------------------------------------------------------------------------------------
    def oom_state(self) -> dict:
        """Plain values for oom_recovery_state_machine."""
        return asdict(self.knobs)

    @property
    def fp16_saves_memory(self) -> bool:
        """Whether fp16 autocast would shrink this task's activations: it trains in fp32 on a device that autocasts
        (CUDA; CPU with train.cpu_amp). A task in bf16 or fp16 autocast already has half-size activations."""
        return not self.precision.autocast and (self.device.type == "cuda" or bool(self.cfg.train.cpu_amp))

    def reset_after_oom(self) -> None:
        """Drop the partial accumulation window (its graph and grads) so the failed batch can be replayed; call it
        outside the `except` block, where the failed step's tensors can be freed."""
        self.optimizer.zero_grad(set_to_none=True)
        self._window_chunks = self._window_samples = 0
        if self.scaler.is_enabled():
            # An OOM inside the optimizer step can leave the scaler half-way through it (gradients unscaled, no
            # step taken; a fused optimizer still holding the scale), and the replay's unscale_ would raise. A fresh
            # scaler with the same scale and growth count starts the step clean.
            fresh = torch.amp.GradScaler(self.device.type, enabled=True)
            fresh.load_state_dict(self.scaler.state_dict())
            self.scaler = fresh
            for leftover in ("grad_scale", "found_inf"):
                self.optimizer.__dict__.pop(leftover, None)
        if self.device.type == "cuda":
            release_cuda_cache()

    def apply_oom_decision(self, decision: OomDecision) -> None:
        """S1: fp16 autocast; S2: smaller chunks, same global batch; S3: smaller global batch, scaled lr."""
        if decision.action == "amp_fp16":
            self._escalate_to_fp16()
            return
        if decision.action not in ("microbatching", "global_batch_change"):
            raise ValueError(f"Cannot apply OOM action {decision.action!r}")
        self.knobs.batch_size, self.knobs.grad_accum = decision.batch_size, decision.grad_accum
        if decision.action == "global_batch_change":
            self._scale_lr(decision.lr_scale)
            self.sched_mode = "by_samples"

    def _escalate_to_fp16(self) -> None:
        """S1: fp16 autocast with loss scaling from here on, where that saves memory (the flag is kept either way: a
        checkpoint or a restart's recovery may carry it from a run where it did nothing)."""
        self.knobs.did_amp_escalate = True
        if self.fp16_saves_memory:
            self.precision = Precision(True, torch.float16)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=True)

    def _scale_lr(self, scale: float) -> None:
        self.scheduler.base_lrs = [lr * scale for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= scale
            group["initial_lr"] = group.get("initial_lr", group["lr"]) * scale

    # ---- auto batch ---------------------------------------------------------------------------------------------
    def _trial(self, batch_size: int, fp16: bool) -> None:
        self.fake_oom.check_batch(batch_size, fp16)
        precision = Precision(True, torch.float16) if fp16 else self.precision
        with precision.context(self.device):
            loss = self.chunk_loss(self.random_batch(batch_size))
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def find_batch_size(self, max_bs: int, headroom: float) -> BatchChoice:
        """Auto batch search on random inputs through this task's own loss; weights and BN stats are restored.

        The trials run on the bare model, not its DDP wrapper: each rank searches its own GPU alone (the trainer
        then takes the smallest size any rank found), whereas wrapped trials all-reduce their gradients, and ranks
        whose trials ran out of memory at different sizes would wait on each other for good."""
        saved = copy.deepcopy(self.raw_model.state_dict())
        wrapped, self.model = self.model, self.raw_model
        oom = self.cfg.train.oom
        try:
            return auto_find_batch_size(
                self._trial, self.configured_batch_size(), int(oom.min_batch), max_bs,
                amp_force_fp16=bool(oom.escalate_to_fp16) and self.fp16_saves_memory, headroom=headroom,
                max_grad_accum=int(oom.max_grad_accum))
        finally:
            self.model = wrapped
            self.raw_model.load_state_dict(saved)

    # ---- validation ----------------------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights validated and saved as best: EMA unless train.ema.validate is "raw" (or EMA is off)."""
        if self.ema is not None and str(self.cfg.train.ema.validate) != "raw":
            return self.ema.module
        return self.raw_model

    @contextlib.contextmanager
    def _evaluating(self, model: nn.Module) -> Iterator[nn.Module]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # validation runs in fp32
                yield model
        finally:
            model.train(was_training)

    def validate(self, epoch: int) -> dict:
        """Metrics of the weights named by train.ema.validate (ema | raw | both: raw ones prefixed raw_)."""
        if self.val_loader is None:
            LOGGER.warning("%s: no validation loader (empty val split): metrics are empty", self.name)
            return self.empty_metrics()
        with self._evaluating(self.eval_model()) as model:
            metrics = self.evaluate(model)
        if self.ema is not None and str(self.cfg.train.ema.validate) == "both":
            with self._evaluating(self.raw_model) as model:
                metrics.update({f"raw_{k}": v for k, v in self.evaluate(model).items()})
        return metrics

    # ---- checkpoints and replicas ------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int, best_metric: float | None) -> dict:
        """The checkpoint schema's keys for this task (the trainer adds the run's global_step)."""
        return {
            "model_state": self.raw_model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(), "scaler_state": self.scaler.state_dict(),
            "epoch": int(epoch), "best_metric": best_metric, "config_snapshot": self.config_snapshot(),
            "ema_state": None if self.ema is None else self.ema.module.state_dict(),
            "oom_state": {**asdict(self.knobs), "sched_mode": self.sched_mode, "sched_credit": self._sched_credit,
                          "configured_batch_size": self.configured_knobs[0],
                          "configured_grad_accum": self.configured_knobs[1], "loader_batch_size": self.loader_batch},
            "task_state": {"optimizer_steps": self.optimizer_steps, "samples_seen": self.samples_seen,
                           "world_size": self.info.world_size, "skipped_steps": self.skipped_steps,
                           "micro_step": self.micro_step, "peak_lr": self.lr_and_weight_decay()[0],
                           "classes_seen": sorted(self.classes_seen), "weights_origin": self.weights_origin,
                           "steps_per_epoch": self.steps_per_epoch()},
        }

    def load_checkpoint_state(self, ckpt: dict, origin: str = "checkpoint") -> None:
        """Restore weights, optimizer, schedule, scaler, EMA, OOM knobs and counters (refusing another model).
        A peak learning rate configured differently from the checkpoint's applies from the resumed step on."""
        self.check_compatible(ckpt, origin)
        self.raw_model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        counters = ckpt.get("task_state") or {}
        self.optimizer_steps = int(counters.get("optimizer_steps", 0))
        self.samples_seen = int(counters.get("samples_seen", 0))
        self.micro_step = int(counters.get("micro_step", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.classes_seen = set(counters.get("classes_seen", ()))
        self.weights_origin = counters.get("weights_origin")  # an older checkpoint does not say
        self._apply_configured_lr(saved_peak_lr(ckpt))
        self._follow_schedule()
        batch_changed = self._restore_oom_state(ckpt.get("oom_state") or {})
        # a checkpoint from before ranks were recorded: its samples are every rank's already; one rank is assumed
        ranks = int(counters.get("world_size") or 1)
        if batch_changed or ranks != self.info.world_size:
            self._reposition_schedule(ranks)
        elif counters.get("steps_per_epoch") and int(counters["steps_per_epoch"]) != self.steps_per_epoch():
            done = int(((ckpt.get("progress") or {}).get("done") or {}).get(self.name, 0))
            self._rescale_schedule(int(counters["steps_per_epoch"]), done // max(self.knobs.grad_accum, 1))
        if ckpt.get("scaler_state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler_state"])
        if self.ema is not None and ckpt.get("ema_state") is not None:
            self.ema.module.load_state_dict(ckpt["ema_state"])

    def _apply_configured_lr(self, saved_peak: float | None) -> None:
        """The optimizer and schedule come back with the checkpoint's peak lr; when the config now asks for another
        peak (e.g. --lr on resume), rescale to it, keeping any OOM recovery scaling."""
        peak = self.lr_and_weight_decay()[0]
        if saved_peak is None or math.isclose(peak, float(saved_peak), rel_tol=1e-9, abs_tol=0.0):
            return
        scale = peak / float(saved_peak) if saved_peak else 1.0
        self.scheduler.base_lrs = [lr * scale for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group.get("initial_lr", group["lr"]) * scale
        # The run's config is the truth for every setting, lr included; a resume without the earlier --lr goes back
        # to the config's, so say so loudly.
        LOGGER.warning("%s: peak lr %.2e from the config replaces the checkpoint's %.2e (to keep that one, resume "
                       "with --lr / train.lr=%.2e)", self.name, peak, float(saved_peak), float(saved_peak))

    @property
    def peak_lr(self) -> float:
        """The schedule's peak learning rate in force (the configured one, times any OOM recovery scaling)."""
        return float(self.scheduler.base_lrs[0])

    def _follow_schedule(self) -> None:
        """Set the rate the schedule gives at the resumed step. The schedule is rebuilt from the config, so a run
        resumed with more epochs follows the longer warmup+cosine (never the finished run's final rate of 0);
        an exact resume gets the same rate it stopped at."""
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(step)

    def _restore_oom_state(self, state: dict) -> bool:
        # A resumed run keeps what OOM recovery chose for the batch it was configured with; the scaled lr comes back
        # with the optimizer and scheduler. A batch configured differently since (train.batch_size, --batch-size,
        # grad accumulation) is the user's choice: it is trained as configured, not cut to the old run's chunks.
        # The fp16 switch does not depend on the batch: it is kept either way. True when the batch was changed.
        if state.get("did_amp_escalate"):
            self._escalate_to_fp16()
        saved = (state.get("configured_batch_size"), state.get("configured_grad_accum"))
        # the loader's batch, which the auto batch search may pick otherwise on another start (another GPU): the
        # old run's chunks would not divide this loader's batches, nor its accumulation match the schedule
        loader = state.get("loader_batch_size")
        loader_changed = loader is not None and int(loader) != self.loader_batch
        if loader_changed or (saved[0] is not None and (int(saved[0]), int(saved[1] or 1)) != self.configured_knobs):
            # recovery's learning-rate cut came back with the scheduler: the configured batch trains at the
            # configured peak
            peak = self.lr_and_weight_decay()[0]
            if self.peak_lr:
                self._scale_lr(peak / self.peak_lr)  # every group by the same factor, as recovery cut them
            LOGGER.warning("%s: the batch is configured as %d x %d (batches of %d), the checkpoint's run as %s x %s "
                           "(batches of %s): training as set now at peak lr %.2e (what OOM recovery had chosen for "
                           "the old batch is not kept)", self.name, *self.configured_knobs, self.loader_batch,
                           saved[0], saved[1] or 1, "?" if loader is None else loader, peak)
            return True
        for key in ("batch_size", "grad_accum"):
            if key in state:
                setattr(self.knobs, key, int(state[key]))
        self.sched_mode = str(state.get("sched_mode", self.sched_mode))
        self._sched_credit = float(state.get("sched_credit", 0.0))
        return False

    def _reposition_schedule(self, saved_ranks: int) -> None:
        """The schedule counts optimizer steps of this run's batch over this run's ranks. Resumed with another
        configured batch or another number of ranks, the checkpoint's step count is in steps of the old ones (a
        longer step count than the new schedule plans runs it out early): go on from where the samples trained so
        far (every rank's, as the checkpoint counts them) bring the new batch."""
        if not self.samples_seen:
            return
        old_step = self._move_schedule(round(self.samples_seen / (self.global_batch_at_start * self.info.world_size)))
        LOGGER.warning("%s: the schedule goes on from step %d (%d samples at %d x %d on %d rank(s)), not the "
                       "checkpoint's step %d (%d rank(s))", self.name, self.scheduler.last_epoch, self.samples_seen,
                       self.knobs.batch_size, self.knobs.grad_accum, self.info.world_size, old_step, saved_ranks)

    def _move_schedule(self, step: int) -> int:
        """Go on with the schedule from `step` (its rate set now); returns the step it was at."""
        old_step, self.scheduler.last_epoch = self.scheduler.last_epoch, step
        self._sched_credit = 0.0
        self._follow_schedule()
        return old_step

    def _rescale_schedule(self, saved_steps: int, inside: int = 0) -> None:
        """The checkpoint's epochs had `saved_steps` steps and this run's have another number (the stage's data
        rescanned or resampled, train.max_steps_per_epoch changed): the schedule, rebuilt over this run's epochs,
        goes on from the same share of the whole epochs, not from the old step count (half as many steps an epoch
        left every remaining step at the schedule's end, a learning rate of 0). The `inside` optimizer steps of a
        checkpoint saved inside an epoch count as they are: the epoch goes on after them."""
        old_step = self.scheduler.last_epoch
        inside = min(inside, old_step)
        self._move_schedule(round((old_step - inside) * self.steps_per_epoch() / saved_steps) + inside)
        LOGGER.warning("%s: an epoch is now %d steps, %d when checkpointed: the schedule goes on from step %d, not "
                       "%d", self.name, self.steps_per_epoch(), saved_steps, self.scheduler.last_epoch, old_step)

    def epoch_trained(self, epoch: int) -> None:  # noqa: B027 (an optional hook, no-op by default)
        """Called on every rank after each epoch this task trained, before validation (which may run on rank 0
        alone): per-epoch schedule changes belong here, so that every replica makes them."""

    def sync_replicas(self) -> None:
        """DDP syncs gradients, not BatchNorm statistics or EMA buffers: give every rank rank 0's (end of epoch)."""
        tensors = list(self.raw_model.buffers())
        if self.ema is not None:
            tensors += list(self.ema.module.state_dict().values())
        broadcast_tensors([t for t in tensors if t.is_floating_point() or t.dtype == torch.long])
