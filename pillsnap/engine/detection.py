"""Detection task for the trainer: a step-level YOLO11 train step (ultralytics model + loss, our loop) and validation.

Owning the step (instead of calling `YOLO.train()` per epoch) is what lets the trainer interleave detection and
classification optimizer steps at mini-batch level (seed D-1/D-5). Each task keeps its own optimizer, scheduler,
AMP scaler and EMA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pillsnap.config import config_to_dict
from pillsnap.engine.optim import param_groups, warmup_cosine_factor
from pillsnap.eval.detection_metrics import evaluate_detection_metrics
from pillsnap.models.detector import build_yolo_model
from pillsnap.models.export import postprocess_detections
from pillsnap.utils import enable_tf32, select_amp_dtype

LOGGER = logging.getLogger(__name__)
# ultralytics' own trainer clips detector gradients at 10: its loss is summed over the batch, so gradient norms
# run far above the classifier's, and train.grad_clip (1.0, tuned for the classifier) would throttle learning.
DET_GRAD_CLIP = 10.0
EMPTY_METRICS = {"mAP@0.5": 0.0, "mAP@0.5:0.95": 0.0, "precision": 0.0, "recall": 0.0}


def prepare_batch(batch: dict, device: torch.device) -> dict:
    """Move an ultralytics batch dict to `device`, images as float in [0, 1]."""
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    img = out["img"]
    out["img"] = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    return out


def batch_targets(batch: dict) -> list[torch.Tensor]:
    """Per-image ground truth [M, 5] (x1, y1, x2, y2, cls) in input pixels from normalised xywh `bboxes`."""
    h, w = batch["img"].shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = batch["bboxes"].detach().float().cpu() * scale
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    cls = batch["cls"].detach().float().cpu().view(-1, 1)
    idx = batch["batch_idx"].detach().cpu().view(-1)
    return [torch.cat([xyxy[idx == i], cls[idx == i]], 1) for i in range(batch["img"].shape[0])]


@torch.no_grad()
def validate_detection(
    forward: Callable[[torch.Tensor], Any],
    loader: Iterable[dict],
    device: torch.device,
    conf_threshold: float,
    iou_threshold: float,
) -> dict:
    """mAP/P/R of `forward` (images -> raw output, torch model or ONNX session) over `loader` via the shared NMS."""
    predictions, targets = [], []
    for batch in loader:
        batch = prepare_batch(batch, device)
        raw = forward(batch["img"])
        predictions.extend(postprocess_detections(raw, conf_threshold, iou_threshold))
        targets.extend(batch_targets(batch))
    if not targets:
        return dict(EMPTY_METRICS, num_images=0)
    return evaluate_detection_metrics(predictions, targets)


def split_batch(batch: dict, size: int) -> list[dict]:
    """Chunks of at most `size` images of an ultralytics batch (targets re-indexed), for OOM micro-batching."""
    n = batch["img"].shape[0]
    if size >= n:
        return [batch]
    chunks, idx = [], batch["batch_idx"].view(-1)
    for start in range(0, n, size):
        stop = min(start + size, n)
        keep = (idx >= start) & (idx < stop)
        chunk = {k: (v[start:stop] if isinstance(v, (list, tuple)) else v) for k, v in batch.items()}
        chunk.update(img=batch["img"][start:stop], cls=batch["cls"][keep], bboxes=batch["bboxes"][keep],
                     batch_idx=idx[keep] - start)
        chunks.append(chunk)
    return chunks


def _loss_value(items: Any) -> float:
    """Per-image loss (box + cls + dfl) from ultralytics' detached loss items (a tensor or, in 8.4, a dict)."""
    if isinstance(items, dict):
        return float(sum(float(v) for v in items.values()))
    return float(items.sum())


class DetectionTask:
    """One-class pill detector trained step by step; see docs/ARCHITECTURE.md "Engine contract"."""

    name = "detection"
    monitor = "mAP@0.5"

    def __init__(self, cfg: Any, train_loader: Any, val_loader: Any, device: Any, logger: logging.Logger | None = None,
                 tb: Any = None) -> None:
        self.cfg, self.det_cfg = cfg, cfg.train.detection
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device = torch.device(device)
        self.logger, self.tb = logger or LOGGER, tb
        self.model = build_yolo_model(cfg.model.detector, num_classes=1, lazy_load=False,
                                      weights=cfg.model.detector_weights).to(self.device)
        self.accum = max(1, int(cfg.train.grad_accum_steps))
        groups = param_groups(self.model.parameters(), self.det_cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.det_cfg.lr)
        self.scheduler = self._build_scheduler()
        self._setup_amp()
        self.ema = self._build_ema()
        self.micro_step = 0
        self.global_step = 0
        # OOM recovery knobs (engine/oom.py): the loader's batch is split into chunks of knobs["batch_size"].
        self.knobs = {"batch_size": int(self.det_cfg.batch_size), "grad_accum": self.accum, "did_amp_escalate": False}

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        epochs = self.det_cfg.epochs if self.cfg.train.strategy == "sequential" else self.cfg.train.epochs
        total = max(1, int(epochs) * math.ceil(self.steps_per_epoch() / self.accum))
        if self.cfg.train.scheduler not in ("cosine", "none"):
            raise ValueError(f"train.scheduler must be 'cosine' or 'none', got {self.cfg.train.scheduler!r}")
        if self.cfg.train.scheduler == "none":
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        warmup = min(int(self.cfg.train.warmup_steps), total)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine_factor(s, warmup, total))

    def _setup_amp(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            enable_tf32(bool(self.det_cfg.tf32))
        self.amp = bool(self.det_cfg.amp) and cuda  # CPU runs fp32
        self.amp_dtype = select_amp_dtype(self.cfg.train.classification.amp_dtype, self.device) if self.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

    def _build_ema(self) -> Any:
        if not self.cfg.train.ema.enabled:
            return None
        from ultralytics.utils.torch_utils import ModelEMA

        return ModelEMA(self.model, decay=float(self.cfg.train.ema.decay))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def steps_per_epoch(self) -> int:
        steps = len(self.train_loader) if self.train_loader is not None else 0
        cap = self.cfg.train.max_steps_per_epoch
        return min(steps, int(cap)) if cap else steps

    def train_step(self, batch: dict) -> dict:
        """Forward + backward on one loader batch (in OOM chunks if recovery asked for them); the optimizer
        steps when accumulation completes."""
        self.model.train()
        batch = prepare_batch(batch, self.device)
        n, losses = int(batch["img"].shape[0]), []
        for chunk in split_batch(batch, int(self.knobs["batch_size"])):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                loss, items = self.model.loss(chunk)
            # ultralytics' loss is ~ per-image loss x images: summing the chunks' sums gives the batch's.
            self.scaler.scale(loss.sum() / self.accum).backward()
            losses.append(_loss_value(items) * chunk["img"].shape[0] / n)
        self.micro_step += 1
        if self.micro_step % self.accum == 0:
            self._optimizer_step()
        return {"loss": float(sum(losses)), "lr": self.lr, "n": n}

    def oom_state(self) -> dict:
        """Plain values for engine.oom.oom_recovery_state_machine."""
        return dict(self.knobs)

    def reset_after_oom(self) -> None:
        """Drop the partial accumulation (graph and grads) so the failed batch can be replayed."""
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_step -= self.micro_step % self.accum
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def apply_oom_decision(self, decision: dict) -> None:
        """S1: fp16 autocast once; S2/S3: smaller chunks. The loader's batch (the global batch) is kept, so the
        schedules and learning rate stay as they are."""
        action = decision["action"]
        if action == "amp_fp16":
            self.knobs["did_amp_escalate"] = True
            if self.amp:
                self.amp_dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda", enabled=True)
            return
        if action not in ("microbatching", "global_batch_change"):
            raise ValueError(f"Cannot apply OOM action {action!r}")
        self.knobs["batch_size"] = max(1, int(decision["batch_size"]))
        self.knobs["grad_accum"] = int(decision["grad_accum"])  # bookkeeping for the state machine's next call
        self.logger.warning("detection: OOM recovery, splitting each batch into chunks of %d images",
                            self.knobs["batch_size"])

    def _optimizer_step(self) -> None:
        if self.cfg.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), DET_GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=bool(self.cfg.train.zero_grad_set_to_none))
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1

    def eval_model(self) -> nn.Module:
        """The weights validated and saved as best: EMA when enabled and train.ema.validate is ema/both."""
        if self.ema is not None and self.cfg.train.ema.validate in ("ema", "both"):
            return self.ema.ema
        return self.model

    def validate(self, epoch: int) -> dict:
        if self.val_loader is None:
            return dict(EMPTY_METRICS, num_images=0)
        model = self.eval_model().eval()
        metrics = validate_detection(model, self.val_loader, self.device, float(self.det_cfg.conf_threshold),
                                     float(self.det_cfg.iou_threshold))
        self.model.train()
        return metrics  # the trainer's callbacks log it and write TensorBoard (det/ prefix)

    def checkpoint_state(self, epoch: int, best_metric: float) -> dict:
        return {
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "ema_state": self.ema.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "best_metric": best_metric,
            "global_step": self.global_step,
            "config_snapshot": config_to_dict(self.cfg),
        }

    def load_checkpoint_state(self, ckpt: dict) -> None:
        """Resume: weights, optimizer, scheduler, scaler and EMA; a different detector gives a clear error."""
        try:
            self.model.load_state_dict(ckpt["model_state"])
        except RuntimeError as err:
            raise ValueError(
                f"detection checkpoint does not fit model.detector={self.cfg.model.detector}: {err}") from err
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        if ckpt.get("scaler_state"):
            self.scaler.load_state_dict(ckpt["scaler_state"])
        if self.ema is not None and ckpt.get("ema_state"):
            self.ema.ema.load_state_dict(ckpt["ema_state"])
        # The trainer stores its run-wide step as global_step; this task's own optimizer steps are the scheduler's.
        self.global_step = int(self.scheduler.last_epoch)
        if self.ema is not None:
            self.ema.updates = self.global_step  # keeps the EMA warm-up ramp where it was
