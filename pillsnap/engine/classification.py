"""Classification task (seed D-2/D-5/D-6): one micro-batch per train_step, fp32 validation, Annex 8 state."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from pillsnap.config import config_to_dict
from pillsnap.engine.distributed import broadcast_tensors
from pillsnap.engine.oom import FakeOOM, auto_find_batch_size
from pillsnap.engine.optim import build_criterion_classification, build_optimizer, build_scheduler
from pillsnap.eval.metrics import evaluate_classification_metrics
from pillsnap.models.classifier import build_classification_model
from pillsnap.utils import TBWriter, enable_tf32, select_amp_dtype, try_torch_compile

LOGGER = logging.getLogger(__name__)


class ResumeMismatchError(ValueError):
    """A checkpoint was trained with another backbone or class count than this run."""


def resolve_num_classes(cfg: DictConfig, meta: dict) -> int:
    """model.num_classes, or (when 0) the number of classes the loaders found."""
    n = int(cfg.model.num_classes or 0) or int(meta.get("num_classes") or 0)
    if n < 1:
        raise ValueError("Cannot tell the class count: model.num_classes is 0 and the loaders' meta has none.")
    return n


def check_resume_compatible(snapshot: dict, backbone: str, num_classes: int, origin: str) -> None:
    """Raise ResumeMismatchError naming both setups when the checkpoint's model differs from this run's."""
    model_cfg = (snapshot or {}).get("model", {})
    old_bb, old_n = model_cfg.get("backbone"), int(model_cfg.get("num_classes") or 0)
    if old_bb != backbone or old_n != num_classes:
        raise ResumeMismatchError(
            f"Cannot resume from {origin}: it was trained with backbone '{old_bb}' and {old_n} classes, but this run "
            f"uses backbone '{backbone}' and {num_classes} classes. Resume with the original model.backbone / stage, "
            f"or start fresh with train.resume=null (or another paths.exp_dir)."
        )


def _to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def predict_classification(
    model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device, channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """fp32 pass over `loader`: (y_true, y_prob, mean loss); empty arrays and nan loss for an empty loader."""
    was_training = model.training
    model.eval()
    losses, probs, targets = [], [], []
    with torch.autocast(device.type, enabled=False):
        for batch in loader:
            x, y = _to_input(batch[0], device, channels_last), batch[1].to(device)
            logits = model(x).float()
            losses.append(criterion(logits, y).item() * len(y))
            probs.append(torch.softmax(logits, dim=1).cpu())
            targets.append(y.cpu())
    model.train(was_training)
    if not targets:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), float("nan")
    y_true = torch.cat(targets).numpy()
    return y_true, torch.cat(probs).numpy(), float(np.sum(losses) / len(y_true))


def validate_classification(
    model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device, channels_last: bool = False,
    topk: tuple[int, ...] = (1, 5),
) -> dict:
    """fp32 pass over the validation loader (never the test loader): loss, accuracy, macro_f1, top-k, n."""
    y_true, y_prob, loss = predict_classification(model, loader, criterion, device, channels_last)
    if not len(y_true):
        return {"loss": float("nan"), "accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    metrics = evaluate_classification_metrics(y_true, y_prob.argmax(axis=1), y_prob, topk)
    return {"loss": loss, **metrics}


def optimizer_step_count(optimizer: torch.optim.Optimizer) -> int:
    """Optimizer steps taken so far, as recorded in Adam's per-parameter state (0 before the first step)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


class ClassificationTask:
    """The classifier with its optimizer, schedule, scaler, EMA and OOM knobs.

    OOM knobs: each loader batch is split into chunks of `knobs["batch_size"]` and the optimizer steps
    every `knobs["grad_accum"]` chunks, so recovery never needs a new loader (the epoch order is kept).
    """

    name = "classification"

    def __init__(self, cfg: DictConfig, train_loader: Any, val_loader: Any, meta: dict, device: Any,
                 logger: logging.Logger | None = None, tb: TBWriter | None = None) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.train_loader, self.val_loader, self.meta = train_loader, val_loader, meta
        self.logger, self.tb = logger or LOGGER, tb
        self.num_classes = resolve_num_classes(cfg, meta)
        self.monitor, self.mode = str(cfg.train.early_stopping.monitor), str(cfg.train.early_stopping.mode)
        self.channels_last = bool(cfg.optimization.channels_last)
        self._setup_precision()
        self.raw_model = build_classification_model(
            cfg.model.backbone, self.num_classes, channels_last=self.channels_last,
            pretrained=bool(cfg.model.pretrained), weights_path=cfg.model.weights_path).to(self.device)
        self.model = self._wrap(self.raw_model)
        self.criterion = build_criterion_classification(cfg, meta.get("class_weights")).to(self.device)
        self.optimizer = build_optimizer(cfg, self.raw_model.named_parameters())
        self.knobs = {"batch_size": int(getattr(train_loader, "batch_size", None) or cfg.train.batch_size),
                      "grad_accum": int(cfg.train.grad_accum_steps), "did_amp_escalate": False}
        opt_steps = math.ceil(self.steps_per_epoch() / self.knobs["grad_accum"])
        self.scheduler = build_scheduler(cfg, self.optimizer, opt_steps)
        # GradScaler only for fp16: bf16 has fp32's exponent range and needs no loss scaling.
        fp16 = self.amp_enabled and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.ema = self._build_ema()
        self.fake_oom = FakeOOM.from_env()
        self._g0 = self.knobs["batch_size"] * self.knobs["grad_accum"]
        self._window_chunks, self._window_samples, self._sched_credit = 0, 0, 0.0
        self.sched_mode, self.micro_step, self.optimizer_steps = "steps", 0, 0
        self.samples_seen, self.classes_seen = 0, set()

    # ---- construction -------------------------------------------------------------------------------------------
    def _setup_precision(self) -> None:
        cls_cfg = self.cfg.train.classification
        # CPU autocast exists but is slow for convs and changes numerics: AMP is a CUDA feature here.
        self.amp_enabled = bool(cls_cfg.amp) and self.device.type == "cuda"
        self.amp_dtype = select_amp_dtype(str(cls_cfg.amp_dtype), self.device) if self.amp_enabled else torch.float32
        if self.device.type == "cuda":
            enable_tf32(bool(cls_cfg.tf32))
        LOGGER.info("classification precision: amp=%s dtype=%s", self.amp_enabled, self.amp_dtype)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if dist.is_available() and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        mode = str(self.cfg.optimization.torch_compile)
        if mode == "none":
            return model
        # Compile eagerly on a dummy batch in eval mode so a failure falls back now, without touching BN stats.
        size = int(self.cfg.model.image_size)
        example = _to_input(torch.zeros(2, 3, size, size), self.device, self.channels_last)
        model.eval()
        compiled = try_torch_compile(model, mode, example)
        model.train()
        return compiled

    def _build_ema(self) -> Any:
        ema_cfg = self.cfg.train.ema
        if not ema_cfg.enabled:
            return None
        from timm.utils import ModelEmaV2

        self.ema_decay = float(ema_cfg.decay)
        return ModelEmaV2(self.raw_model, decay=self.ema_decay)

    # ---- training -----------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        cap = self.cfg.train.max_steps_per_epoch
        n = len(self.train_loader)
        return min(n, int(cap)) if cap else n

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _sync_context(self) -> Any:
        # DDP all-reduces on every backward; skip it for all but the last chunk of an accumulation window.
        last = self._window_chunks + 1 >= self.knobs["grad_accum"]
        return contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()

    def _chunk_backward(self, x: torch.Tensor, y: torch.Tensor, global_batch: int) -> torch.Tensor:
        self.fake_oom.check(self.micro_step)
        self.micro_step += 1
        with self._sync_context():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled):
                loss = self.criterion(self.model(x).float(), y)
            # Scale by the chunk's share of the global batch so accumulated grads equal the full-batch mean.
            self.scaler.scale(loss * (len(y) / global_batch)).backward()
        return loss.detach() * len(y)

    def train_step(self, batch: Any) -> dict:
        """One loader batch (split into OOM-knob chunks); the optimizer steps when accumulation completes."""
        x, y = _to_input(batch[0], self.device, self.channels_last), batch[1].to(self.device, non_blocking=True)
        bs, accum = self.knobs["batch_size"], self.knobs["grad_accum"]
        total = torch.zeros((), device=self.device)
        for xc, yc in zip(x.split(bs), y.split(bs), strict=True):
            total += self._chunk_backward(xc, yc, bs * accum)
            self._window_chunks += 1
            self._window_samples += len(yc)
            if self._window_chunks >= accum:
                self._optimizer_step()
        self.samples_seen += len(y)
        self.classes_seen.update(np.unique(batch[1].numpy()).tolist())
        return {"loss": float(total.item()) / max(len(y), 1), "lr": self.lr, "n": int(len(y))}

    def _optimizer_step(self) -> None:
        clip = self.cfg.train.grad_clip
        if clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=bool(self.cfg.train.zero_grad_set_to_none))
        self._step_scheduler(self._window_samples)
        self.optimizer_steps += 1
        if self.ema is not None:
            # Decay warm-up (TF's num_updates rule): with 0.9998 from step 1 a short run would validate
            # weights that are still mostly the random init.
            self.ema.decay = min(self.ema_decay, (1 + self.optimizer_steps) / (10 + self.optimizer_steps))
            self.ema.update(self.raw_model)
        self._window_chunks, self._window_samples = 0, 0

    def _step_scheduler(self, samples: int) -> None:
        if self.sched_mode == "steps":
            self.scheduler.step()
            return
        # by_samples (after an OOM global-batch change): one schedule step per original global batch of samples.
        self._sched_credit += samples / self._g0
        while self._sched_credit >= 1.0 - 1e-9:
            self.scheduler.step()
            self._sched_credit -= 1.0

    # ---- OOM recovery ---------------------------------------------------------------------------------------------
    def oom_state(self) -> dict:
        """Plain values for oom_recovery_state_machine."""
        return dict(self.knobs)

    def reset_after_oom(self) -> None:
        """Drop the partial accumulation window (its graph and grads) so the failed batch can be replayed."""
        self.optimizer.zero_grad(set_to_none=True)
        self._window_chunks, self._window_samples = 0, 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def apply_oom_decision(self, decision: dict) -> None:
        """Apply a recovery decision (S1 fp16, S2 micro-batching, S3 global batch change)."""
        action = decision["action"]
        if action == "amp_fp16":
            self.knobs["did_amp_escalate"] = True
            if self.amp_enabled and self.amp_dtype != torch.float16:
                self.amp_dtype = torch.float16
                self.scaler = torch.amp.GradScaler(self.device.type, enabled=True)
            return
        if action not in ("microbatching", "global_batch_change"):
            raise ValueError(f"Cannot apply OOM action {action!r}")
        self.knobs["batch_size"], self.knobs["grad_accum"] = int(decision["batch_size"]), int(decision["grad_accum"])
        if action == "global_batch_change":
            self._scale_hyperparams(float(decision["lr_scale"]), float(decision["wd_scale"]))
            self.sched_mode = "by_samples"

    def _restore_oom_state(self, state: dict) -> None:
        # A resumed run keeps what OOM recovery chose (batch split, accumulation, fp16, schedule by samples);
        # the scaled lr / weight decay come back with the optimizer and scheduler states.
        self.knobs.update({k: state[k] for k in ("batch_size", "grad_accum", "did_amp_escalate") if k in state})
        self.sched_mode = str(state.get("sched_mode", self.sched_mode))
        if self.knobs["did_amp_escalate"]:
            self.apply_oom_decision({"action": "amp_fp16"})

    def _scale_hyperparams(self, lr_scale: float, wd_scale: float) -> None:
        self.scheduler.base_lrs = [lr * lr_scale for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale
            group["initial_lr"] = group.get("initial_lr", group["lr"]) * lr_scale
            group["weight_decay"] *= wd_scale

    def find_batch_size(self, max_bs: int, headroom: float) -> int:
        """Annex 1 auto batch on random inputs; weights, BN stats and grads are restored afterwards."""
        saved = copy.deepcopy(self.raw_model.state_dict())
        size = int(self.cfg.model.image_size)

        def trial(bs: int) -> None:
            x = _to_input(torch.randn(bs, 3, size, size), self.device, self.channels_last)
            y = torch.randint(0, self.num_classes, (bs,), device=self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled):
                loss = self.criterion(self.raw_model(x).float(), y)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)

        try:
            return auto_find_batch_size(trial, int(self.cfg.train.batch_size), int(self.cfg.train.oom.min_batch),
                                        max_bs, headroom=headroom)
        finally:
            self.raw_model.load_state_dict(saved)

    def sync_replicas(self) -> None:
        """DDP syncs gradients, not BatchNorm statistics or EMA buffers: give every rank rank 0's (end of epoch)."""
        tensors = list(self.raw_model.buffers())
        if self.ema is not None:
            tensors += list(self.ema.module.state_dict().values())
        broadcast_tensors([t for t in tensors if t.is_floating_point() or t.dtype == torch.long])

    # ---- validation and checkpoints -------------------------------------------------------------------------------
    def _validate(self, model: nn.Module) -> dict:
        if self.val_loader is None:
            LOGGER.warning("no validation loader (empty val split): metrics are empty")
            return {"loss": float("nan"), "accuracy": 0.0, "macro_f1": 0.0, "n": 0}
        return validate_classification(model, self.val_loader, self.criterion, self.device, self.channels_last)

    def validate(self, epoch: int) -> dict:
        """Metrics of the weights named by train.ema.validate (ema | raw | both: raw ones prefixed raw_)."""
        mode = str(self.cfg.train.ema.validate)
        if self.ema is None or mode == "raw":
            return self._validate(self.raw_model)
        metrics = self._validate(self.ema.module)
        if mode == "both":
            metrics.update({f"raw_{k}": v for k, v in self._validate(self.raw_model).items()})
        return metrics

    def write_reports(self, out_dir: Path) -> list[Path]:
        """Seed D-9 artefacts from the validated weights on the val set: confusion matrix, ROC and PR curves."""
        from sklearn.metrics import confusion_matrix

        from pillsnap.eval.reports import plot_confusion_matrix, plot_roc_pr_curves

        if self.val_loader is None:
            return []
        use_ema = self.ema is not None and str(self.cfg.train.ema.validate) != "raw"
        model = self.ema.module if use_ema else self.raw_model
        y_true, y_prob, _ = predict_classification(model, self.val_loader, self.criterion, self.device,
                                                   self.channels_last)
        if not len(y_true):
            return []
        labels = np.arange(self.num_classes)
        cm = confusion_matrix(y_true, y_prob.argmax(axis=1), labels=labels)
        names = list(self.meta.get("class_names") or [])
        if len(names) != self.num_classes:  # e.g. model.num_classes set larger than the stage's classes
            names = [str(i) for i in labels]
        paths = [plot_confusion_matrix(cm, names, out_dir / "confusion_matrix.png")]
        return paths + plot_roc_pr_curves(np.eye(self.num_classes)[y_true], y_prob, out_dir)

    def config_snapshot(self) -> dict:
        snap = config_to_dict(self.cfg)
        snap["model"]["num_classes"] = self.num_classes  # resolved, so inference and resume know it
        return snap

    def checkpoint_state(self, epoch: int, best_metric: float | None) -> dict:
        """Annex 8 schema (+ ema_state) for pillsnap.utils.save_ckpt."""
        return {
            "model_state": self.raw_model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(), "scaler_state": self.scaler.state_dict(),
            "epoch": int(epoch), "best_metric": best_metric, "config_snapshot": self.config_snapshot(),
            "ema_state": None if self.ema is None else self.ema.module.state_dict(),
            "oom_state": {**self.knobs, "sched_mode": self.sched_mode},
        }

    def load_checkpoint_state(self, ckpt: dict, origin: str = "checkpoint") -> None:
        """Restore weights, optimizer, schedule, scaler and EMA; a different backbone/class count is refused."""
        check_resume_compatible(ckpt.get("config_snapshot"), str(self.cfg.model.backbone), self.num_classes, origin)
        self.raw_model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if ckpt.get("oom_state"):
            self._restore_oom_state(ckpt["oom_state"])
        if ckpt.get("scaler_state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler_state"])
        if self.ema is not None and ckpt.get("ema_state") is not None:
            self.ema.module.load_state_dict(ckpt["ema_state"])
        self.optimizer_steps = optimizer_step_count(self.optimizer)
