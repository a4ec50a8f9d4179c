"""The classification task: a timm classifier trained on single-pill crops, validated in fp32."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from pillsnap.data.datasets import normalise
from pillsnap.engine.distributed import eval_share, gather_to_main
from pillsnap.engine.oom import BatchChoice
from pillsnap.engine.optim import build_criterion_classification
from pillsnap.engine.spec import TaskSpec
from pillsnap.engine.task import ResumeMismatchError, Task
from pillsnap.metrics.classification import metrics_from_hits
from pillsnap.metrics.names import CLASSIFICATION_KEYS
from pillsnap.models.classifier import build_classification_model
from pillsnap.utils.arrays import RowFiller

LOGGER = logging.getLogger(__name__)
EMPTY_METRICS = {"val_loss": float("nan"), "acc": 0.0, "macro_f1": 0.0, "n": 0}


def resolve_num_classes(cfg: DictConfig, meta: dict) -> int:
    """model.num_classes, or (when 0) the number of classes the loaders found."""
    n = int(cfg.model.num_classes or 0) or int(meta.get("num_classes") or 0)
    if n < 1:
        raise ValueError("Cannot tell the class count: model.num_classes is 0 and the loaders' meta has none.")
    return n


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Images moved to `device`, in channels_last memory format when the model uses it, and normalised there when
    they came as uint8 (training batches: data.datasets.normalise)."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # before the float conversion: a quarter of the bytes
    return normalise(x)


@torch.no_grad()
def _val_pass(model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device, channels_last: bool,
              keep: Callable[[torch.Tensor, torch.Tensor], None]) -> tuple[float, float, int]:
    """fp32 pass over `loader` in eval mode, `keep(logits, labels)` called per batch (fp32 logits, on `device`);
    returns (summed loss, summed weight, rows): the loss over the pass is their ratio whatever the batching (a
    class-weighted mean is over the weights of the batch's labels, not its rows). Batches whose every photo failed
    to decode (None) are skipped."""
    was_training = model.training
    model.eval()
    total, weight, rows = 0.0, 0.0, 0
    try:
        with torch.autocast(device.type, enabled=False):
            for batch in loader:
                if batch is None:
                    continue
                x, y = to_input(batch[0], device, channels_last), batch[1].to(device)
                logits = model(x).float()
                loss, mass = _loss_sum(criterion, logits, y)
                total, weight, rows = total + loss, weight + mass, rows + len(y)
                keep(logits, y)
    finally:
        model.train(was_training)
    return total, weight, rows


def _loss_sum(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(summed loss, summed weight) of a batch: per crop for a cross-entropy (its class weights counted), else the
    batch mean times its rows."""
    if isinstance(criterion, nn.CrossEntropyLoss):
        per_crop = nn.functional.cross_entropy(logits, y, weight=criterion.weight, reduction="none",
                                               label_smoothing=criterion.label_smoothing)
        mass = float(criterion.weight[y].sum()) if criterion.weight is not None else float(len(y))
        return float(per_crop.sum()), mass
    return criterion(logits, y).item() * len(y), float(len(y))


def predict_classification(model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device,
                           channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """fp32 pass over `loader`: (y_true, y_prob, mean loss); empty arrays and nan loss for an empty loader. The
    probabilities are [N, classes] (for the reports at the end of a run; validation keeps vectors only)."""
    size = len(loader.dataset) if hasattr(loader, "dataset") else 1
    probs, targets = RowFiller(size), RowFiller(size)  # filled in place: no second [N, classes] copy

    def keep(logits: torch.Tensor, y: torch.Tensor) -> None:
        probs.add(torch.softmax(logits, dim=1).cpu().numpy())
        targets.add(y.cpu().numpy())

    total, weight, rows = _val_pass(model, loader, criterion, device, channels_last, keep)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), float("nan")
    return targets.result((0,), np.int64), probs.result((0, 0)), total / weight


class ValidationRows(NamedTuple):
    """What a validation pass keeps: per crop [label, top-1 class, top-1 probability, hit in each top k], the
    summed loss and the summed weight it is a mean over. Passes over shares of a split (one per rank) add up
    (`joined`)."""

    table: list[list[float]]
    loss_sum: float
    weight_sum: float

    @staticmethod
    def joined(parts: Sequence[ValidationRows]) -> ValidationRows:
        return ValidationRows([row for part in parts for row in part.table], sum(part.loss_sum for part in parts),
                              sum(part.weight_sum for part in parts))


def validation_rows(model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device,
                    channels_last: bool = False, topk: tuple[int, ...] = (1, 5)) -> ValidationRows:
    """fp32 pass over `loader` keeping per crop only its label, top-1 class and probability and whether the label
    is in each top k: the [N, classes] probabilities of a Stage 4 validation split are 1.5 GB, and every epoch
    validates."""
    # One small host copy per batch into a Python list (one device sync): small tensors kept between each batch's
    # [batch, classes] temporaries fragment the CPU heap (+1.2 GB at 30,000 x 5,000, bench/val_metrics_memory.py)
    kept: list[list[float]] = []
    depth = max(topk, default=1)

    def keep(logits: torch.Tensor, y: torch.Tensor) -> None:
        ranked = logits.topk(min(depth, logits.shape[1]), dim=1)
        # the top-1 probability without the [batch, classes] softmax; the top-1 class is the ranking's first, so
        # acc and top1 agree even on tied logits
        conf = torch.exp(ranked.values[:, 0] - torch.logsumexp(logits, dim=1))
        hits = [(ranked.indices[:, :k] == y[:, None]).any(dim=1) for k in topk]
        columns = [y, ranked.indices[:, 0], conf, *hits]
        kept.extend(torch.stack([c.double() for c in columns], dim=1).cpu().tolist())

    total, weight, _ = _val_pass(model, loader, criterion, device, channels_last, keep)
    return ValidationRows(kept, total, weight)


def validation_metrics(rows: ValidationRows, topk: tuple[int, ...] = (1, 5)) -> dict:
    """val_loss, acc, macro_f1, top-k, confidence, n of the rows a validation pass kept."""
    if not rows.table:
        return dict(EMPTY_METRICS)
    table = np.asarray(rows.table, dtype=np.float64)
    metrics = metrics_from_hits(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64),
                                {k: table[:, 3 + i] > 0.5 for i, k in enumerate(topk)}, table[:, 2])
    return {"val_loss": rows.loss_sum / rows.weight_sum, **metrics}


def validate_classification(model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device,
                            channels_last: bool = False, topk: tuple[int, ...] = (1, 5)) -> dict:
    """fp32 pass over a loader (the validation one while training): val_loss, acc, macro_f1, top-k, confidence, n
    (validation_rows, then validation_metrics)."""
    return validation_metrics(validation_rows(model, loader, criterion, device, channels_last, topk), topk)


def class_names_digest(names: list[str]) -> str:
    """Which drugs, in which order, a classifier's output rows are (a checkpoint keeps it to refuse a resume on
    other classes of the same count)."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


class ClassificationTask(Task):
    """The pill classifier with its criterion; everything else comes from Task. It owns the design's bare names:
    last.pt/best.pt, unprefixed TensorBoard tags and log line; its samples and classes drive the time-cap rule."""

    spec: ClassVar[TaskSpec] = TaskSpec(
        "classification", config_section="train.classification", batch_key="train.batch_size", tb_prefix="",
        log_prefix="", checkpoint_aliases={"last": "last.pt", "best": "best.pt"}, summary_keys=CLASSIFICATION_KEYS,
        ratio_index=1, counts_for_time_cap=True, class_probabilities=True, shared_validation=True)
    compile_model: ClassVar[bool] = True

    def __init__(self, cfg: DictConfig, train_loader: Any, val_loader: Any, meta: dict, device: Any,
                 batch_choice: BatchChoice | None = None) -> None:
        self.meta = meta
        self._val_share: Any = None  # this rank's share of the validation split, under DDP
        self.num_classes = resolve_num_classes(cfg, meta)
        self.channels_last = bool(cfg.optimization.channels_last)
        self.criterion = build_criterion_classification(cfg, meta.get("class_weights")).to(torch.device(device))
        super().__init__(cfg, cfg.train.classification, train_loader, val_loader, device, batch_choice)

    @classmethod
    def from_loaders(cls, cfg: DictConfig, loaders: Any, device: Any, batch_choice: BatchChoice | None = None,
                     shard: Callable[[Any], Any] = lambda loader: loader) -> ClassificationTask:
        """Every run trains the classifier, so a stage without training crops is an error that names them."""
        if loaders.cls_train is None or len(loaders.cls_train) == 0:
            stage = int(cfg.data.progressive_validation.current_stage)
            raise ValueError(f"stage {stage} has no classification training crops (single-pill photos, or "
                             "combination pills with data.combo_crops=true): check paths.manifest_dir "
                             f"({cfg.paths.manifest_dir}) and data.progressive_validation.stage_{stage}")
        return cls(cfg, shard(loaders.cls_train), loaders.cls_val, loaders.meta, device, batch_choice)

    # ---- the contract ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = self.cfg.model
        return build_classification_model(model.backbone, self.num_classes, channels_last=self.channels_last,
                                          pretrained=bool(model.pretrained), weights_path=model.weights_path)

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return to_input(batch[0], self.device, self.channels_last), batch[1].to(self.device, non_blocking=True)

    def batch_len(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(batch[1])

    def split(self, batch: tuple[torch.Tensor, torch.Tensor], size: int) -> list:
        return list(zip(batch[0].split(size), batch[1].split(size), strict=True))

    def chunk_loss(self, chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.criterion(self.model(chunk[0]).float(), chunk[1])

    def on_batch_trained(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.classes_seen.update(batch[1].unique().tolist())

    def evaluate(self, model: nn.Module) -> dict:
        """The validation metrics; under DDP each rank passes over its share of the split and rank 0 joins them
        (the others return {}): one rank reading a Stage 4 split alone kept the other GPUs idle for minutes."""
        info = self.info
        if not info.enabled:
            return validate_classification(model, self.val_loader, self.criterion, self.device, self.channels_last)
        if self._val_share is None:
            self._val_share = eval_share(self.val_loader, info)
        rows = validation_rows(model, self._val_share, self.criterion, self.device, self.channels_last)
        parts = gather_to_main(info, rows)
        return {} if parts is None else validation_metrics(ValidationRows.joined(parts))

    def empty_metrics(self) -> dict:
        return dict(EMPTY_METRICS)

    def random_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = int(self.cfg.model.image_size)
        x = to_input(torch.randn(batch_size, 3, size, size), self.device, self.channels_last)
        return x, torch.randint(0, self.num_classes, (batch_size,), device=self.device)

    def lr_and_weight_decay(self) -> tuple[float, float]:
        return float(self.cfg.train.lr), float(self.cfg.train.weight_decay)

    def configured_batch_size(self) -> int:
        return int(self.cfg.train.batch_size)

    def epochs(self) -> int:
        return int(self.cfg.train.epochs)

    @property
    def monitor(self) -> str:
        return str(self.cfg.train.early_stopping.monitor)

    @property
    def mode(self) -> str:
        return str(self.cfg.train.early_stopping.mode)

    def config_snapshot(self) -> dict:
        snap = super().config_snapshot()
        snap["model"]["num_classes"] = self.num_classes  # resolved, so inference and resume know it
        return snap

    def checkpoint_state(self, epoch: int, best_metric: float | None) -> dict:
        state = super().checkpoint_state(epoch, best_metric)
        state["task_state"]["class_names_sha256"] = class_names_digest(self.class_names())
        return state

    def check_compatible(self, ckpt: dict, origin: str) -> None:
        old = (ckpt.get("config_snapshot") or {}).get("model", {})
        old_bb, old_n = old.get("backbone"), int(old.get("num_classes") or 0)
        backbone = str(self.cfg.model.backbone)
        if old_bb != backbone or old_n != self.num_classes:
            raise ResumeMismatchError(
                f"Cannot resume from {origin}: it was trained with backbone '{old_bb}' and {old_n} classes, but this "
                f"run uses backbone '{backbone}' and {self.num_classes} classes. Resume with the original "
                "model.backbone / stage, or start fresh with train.resume=null (or another paths.exp_dir).")
        # As many classes, but other drugs or another order (a rescan that found more drugs, another
        # data.split_seed): each output row would go on learning another drug's name. Older checkpoints kept no
        # digest and are taken on the count.
        digest = (ckpt.get("task_state") or {}).get("class_names_sha256")
        if digest is not None and digest != class_names_digest(self.class_names()):
            raise ResumeMismatchError(
                f"Cannot resume from {origin}: its {old_n} classes are not this run's {self.num_classes} drugs in the "
                "same order (the manifest was rescanned, or data.split_seed or the stage's classes changed since). "
                "Resume on the manifest and config it was trained on, or start fresh with train.resume=null.")

    # ---- reports ---------------------------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    def predict_val(self, loader: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_prob) of the validated weights on the validation split (empty without one), through `loader`
        (default: the task's validation loader)."""
        if self.val_loader is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.num_classes), dtype=np.float32)
        y_true, y_prob, _ = predict_classification(self.eval_model(), loader or self.val_loader, self.criterion,
                                                   self.device, self.channels_last)
        return y_true, y_prob
