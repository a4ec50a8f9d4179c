"""The detection task: a one-class YOLO11 pill detector trained step by step (ultralytics' model and loss, our
loop), so that its optimizer steps interleave with the classifier's at mini-batch level."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from pillsnap.data.yolo import close_mosaic
from pillsnap.engine.oom import BatchChoice
from pillsnap.engine.spec import TaskSpec
from pillsnap.engine.task import ResumeMismatchError, Task
from pillsnap.metrics import evaluate_detection_metrics
from pillsnap.metrics.names import DETECTION_KEYS
from pillsnap.models.detector import build_yolo_model, postprocess_detections
from pillsnap.utils.boxes import cxcywh_to_xyxy

LOGGER = logging.getLogger(__name__)
# ultralytics' own trainer clips at 10 the gradient of a loss summed over the images of the accumulation window (and,
# under DDP, over every rank's: it scales the loss by the world size before DDP averages the gradients); our loss
# is the mean over the global batch of all ranks, so the same clip is 10 / (batch x accumulation x ranks).
ULTRALYTICS_GRAD_CLIP = 10.0
EMPTY_METRICS = {"mAP@0.5": 0.0, "mAP@0.5:0.95": 0.0, "precision": 0.0, "recall": 0.0}


def prepare_batch(batch: dict, device: torch.device) -> dict:
    """An ultralytics batch dict moved to `device`, images as float in [0, 1]."""
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    img = out["img"]
    out["img"] = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    return out


def batch_targets(batch: dict) -> list[torch.Tensor]:
    """Per-image ground truth [M, 5] (x1, y1, x2, y2, cls) in input pixels from normalised centre-xywh `bboxes`."""
    h, w = batch["img"].shape[-2:]
    boxes = cxcywh_to_xyxy(batch["bboxes"].detach().float().cpu() * torch.tensor([w, h, w, h], dtype=torch.float32))
    cls = batch["cls"].detach().float().cpu().view(-1, 1)
    idx = batch["batch_idx"].detach().cpu().view(-1)
    return [torch.cat([boxes[idx == i], cls[idx == i]], 1) for i in range(batch["img"].shape[0])]


@torch.no_grad()
def validate_detection(forward: Callable[[torch.Tensor], Any], loader: Iterable[dict], device: torch.device,
                       conf_threshold: float, iou_threshold: float) -> dict:
    """mAP/P/R of `forward` (images -> raw output, torch model or ONNX session) over `loader` via the shared NMS."""
    predictions, targets = [], []
    for batch in loader:
        batch = prepare_batch(batch, device)
        predictions.extend(postprocess_detections(forward(batch["img"]), conf_threshold, iou_threshold))
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


def random_detection_batch(batch_size: int, size: int, device: torch.device) -> dict:
    """Random images with two random boxes each, in the ultralytics batch format (for auto batch trials)."""
    n = 2 * batch_size
    centre, wh = torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.2 + 0.1
    return {"img": torch.rand(batch_size, 3, size, size, device=device), "cls": torch.zeros(n, 1, device=device),
            "bboxes": torch.cat([centre, wh], 1).to(device),
            "batch_idx": torch.arange(batch_size).repeat_interleave(2).float().to(device)}


class DetectionTask(Task):
    """The one-class pill detector; everything else comes from Task."""

    spec: ClassVar[TaskSpec] = TaskSpec(
        "detection", config_section="train.detection", batch_key="train.detection.batch_size", tb_prefix="det/",
        log_prefix="(detection) ", summary_keys=DETECTION_KEYS, ratio_index=0)

    def __init__(self, cfg: DictConfig, train_loader: Any, val_loader: Any, device: Any,
                 batch_choice: BatchChoice | None = None) -> None:
        self.epochs_trained = 0  # this task's own epochs (the run's epoch numbers differ under sequential)
        super().__init__(cfg, cfg.train.detection, train_loader, val_loader, device, batch_choice)
        self._close_mosaic_when_due()

    def _close_mosaic_when_due(self) -> None:
        """ultralytics' close_mosaic: the last N epochs see whole photos, as inference does (our loop applies it;
        ultralytics' own trainer, which would, is not used)."""
        augment = self.section.get("augment") or {}
        left = self.epochs() - self.epochs_trained
        if left <= int(augment.get("close_mosaic", 0)) and close_mosaic(self.train_loader, augment):
            LOGGER.info("detection: mosaic off for the last %d epoch(s)", left)

    @classmethod
    def wanted(cls, cfg: DictConfig, loaders: Any) -> bool:
        """Trained when the stage has combination photos, unless train.strategy=classification."""
        return loaders.det_train is not None and str(cfg.train.strategy) != "classification"

    @classmethod
    def from_loaders(cls, cfg: DictConfig, loaders: Any, device: Any, batch_choice: BatchChoice | None = None,
                     shard: Callable[[Any], Any] = lambda loader: loader) -> DetectionTask:
        return cls(cfg, shard(loaders.det_train), loaders.det_val, device, batch_choice)

    def build_model(self) -> nn.Module:
        return build_yolo_model(self.cfg.model.detector, num_classes=1, weights=self.cfg.model.detector_weights,
                                pretrained=bool(self.cfg.model.pretrained))

    def to_device(self, batch: dict) -> dict:
        return prepare_batch(batch, self.device)

    def batch_len(self, batch: dict) -> int:
        return int(batch["img"].shape[0])

    def split(self, batch: dict, size: int) -> list[dict]:
        return split_batch(batch, size)

    def chunk_loss(self, chunk: dict) -> torch.Tensor:
        # A dict input makes the DetectionModel return its loss (through DDP's forward when wrapped);
        # ultralytics' loss is the per-image loss times the images, summed over box, cls and dfl.
        loss, _ = self.model(chunk)
        return loss.sum() / chunk["img"].shape[0]

    def epoch_trained(self, epoch: int) -> None:
        # on every rank: under DDP a mosaic closed by rank 0 alone left the others training on mosaics
        self.epochs_trained += 1
        self._close_mosaic_when_due()

    def checkpoint_state(self, epoch: int, best_metric: float | None) -> dict:
        state = super().checkpoint_state(epoch, best_metric)
        state["task_state"]["epochs_trained"] = self.epochs_trained
        return state

    def load_checkpoint_state(self, ckpt: dict, origin: str = "checkpoint") -> None:
        super().load_checkpoint_state(ckpt, origin)
        # older checkpoints lack the count: the run's epoch is the task's own one unless the strategy is sequential
        self.epochs_trained = int((ckpt.get("task_state") or {}).get("epochs_trained", ckpt.get("epoch", 0)))
        self._close_mosaic_when_due()

    def evaluate(self, model: nn.Module) -> dict:
        return validate_detection(model, self.val_loader, self.device, float(self.section.conf_threshold),
                                  float(self.section.iou_threshold))

    def empty_metrics(self) -> dict:
        return dict(EMPTY_METRICS, num_images=0)

    def random_batch(self, batch_size: int) -> dict:
        return random_detection_batch(batch_size, int(self.cfg.model.det_image_size), self.device)

    def clip_norm(self, configured: float) -> float:
        # ultralytics' own norm for its loss scale, whatever train.grad_clip (which only switches clipping on/off)
        return ULTRALYTICS_GRAD_CLIP / (self.knobs.batch_size * self.knobs.grad_accum * self.info.world_size)

    def lr_and_weight_decay(self) -> tuple[float, float]:
        return float(self.section.lr), float(self.section.weight_decay)

    def configured_batch_size(self) -> int:
        return int(self.section.batch_size)

    def epochs(self) -> int:
        sequential = str(self.cfg.train.strategy) == "sequential"
        return int(self.section.epochs if sequential else self.cfg.train.epochs)

    @property
    def monitor(self) -> str:
        return "mAP@0.5"

    @property
    def tie_break(self) -> str:
        # mAP@0.5 reaches 1.0 on a small validation set long before the boxes stop tightening
        return "mAP@0.5:0.95"

    @property
    def mode(self) -> str:
        return "max"

    def check_compatible(self, ckpt: dict, origin: str) -> None:
        old = (ckpt.get("config_snapshot") or {}).get("model", {}).get("detector")
        if old != str(self.cfg.model.detector):
            raise ResumeMismatchError(
                f"Cannot resume from {origin}: it holds detector '{old}', but this run uses model.detector="
                f"'{self.cfg.model.detector}'. Resume with the original detector, or start fresh with "
                "train.resume=null (or another paths.exp_dir).")
