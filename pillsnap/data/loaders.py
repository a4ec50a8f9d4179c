"""The one loader builder: classification and detection loaders for the current stage, plus the worker autotune.
Test loaders are only built when the final evaluation asks (build_test=True).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pillsnap.data.datasets import ClassificationDataset, compute_class_weights, safe_collate, worker_init
from pillsnap.data.samplers import EpochSampler
from pillsnap.data.scan import load_class_map, load_manifest
from pillsnap.data.stages import classification_rows, select_stage
from pillsnap.utils.devices import usable_cores

LOGGER = logging.getLogger(__name__)
SHM_SHARE = 0.5  # of /dev/shm, what the loaders' batches in flight may fill (other processes use it too)


class Loaders(NamedTuple):
    """The loaders of one stage. Test loaders are None unless asked for; detection loaders are None without
    combination photos or with train.strategy=classification. See docs/ARCHITECTURE.md for batches and meta."""

    cls_train: Any
    cls_val: Any
    cls_test: Any
    det_train: Any
    det_val: Any
    det_test: Any
    meta: dict


def _timed_batches(loader: Any, warmup: int, steps: int) -> float:
    """Mean seconds spent waiting for a batch, after `warmup` discarded batches (the loader is cycled)."""
    iterator, waits = iter(loader), []
    for i in range(warmup + steps):
        start = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
        if i >= warmup:
            waits.append(time.perf_counter() - start)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:  # persistent workers would otherwise outlive the trial
        shutdown()
    return sum(waits) / max(1, len(waits))


def _ranks_on_this_machine() -> int:
    """The ranks torchrun starts on this machine (LOCAL_WORLD_SIZE; 1 without torchrun): they share its cores and
    its /dev/shm."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _cores_for_this_rank(loaders_together: int = 1) -> int:
    """This rank's share of the usable cores for each of `loaders_together` training loaders drawing at once
    (interleaved training keeps the classifier's and the detector's workers busy together)."""
    return max(usable_cores() // (_ranks_on_this_machine() * max(loaders_together, 1)), 1)


def workers_for_this_rank(workers: int, loaders_together: int = 1) -> int:
    """dataloader.num_workers, at most this rank's share of the cores for each loader (a stage override of 8 on a
    box of 16 cores and 4 GPUs would start 8 classification and 8 detection workers on each rank, 64 processes on
    16 cores)."""
    cap = _cores_for_this_rank(loaders_together)
    if workers > cap:
        LOGGER.info("dataloader.num_workers=%d capped to %d: %d usable cores for %d rank(s) on this machine and %d "
                    "training loader(s) each", workers, cap, usable_cores(), _ranks_on_this_machine(),
                    loaders_together)
        return cap
    return workers


def autotune_num_workers(build_loader_fn: Callable[[int], Any], candidates: Sequence[int], warmup: int, steps: int,
                         tb: Any = None, loaders_together: int = 1) -> int:
    """Pick the worker count with the lowest mean data time; logged and written to TB perf/num_workers.

    Candidates above this rank's share of the cores are dropped (more workers than cores only adds contention; under
    torchrun the other ranks' loaders share the machine); ties go to the smaller count.
    """
    cores = _cores_for_this_rank(loaders_together)
    tried = sorted({int(c) for c in candidates if 0 <= int(c) <= cores}) or [min(cores, max(0, min(candidates)))]
    results: dict[int, float] = {}
    for workers in tried:
        results[workers] = _timed_batches(build_loader_fn(workers), warmup, steps)
        LOGGER.info("autotune: num_workers=%d data_time=%.2f ms/batch", workers, results[workers] * 1000)
        if tb is not None:
            tb.add_scalar("perf/autotune_data_time_ms", results[workers] * 1000, workers)
    best = min(tried, key=lambda w: results[w])
    LOGGER.info("autotune: chose num_workers=%d (candidates %s, %d cores for this rank)", best, list(candidates), cores)
    if tb is not None:
        tb.add_scalar("perf/num_workers", best, 0)
    return best


def _classification_loader(dataset: ClassificationDataset, cfg: DictConfig, train: bool,
                           num_workers: int) -> DataLoader:
    dl = cfg.dataloader
    batch_size = int(cfg.train.batch_size)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"persistent_workers": bool(dl.persistent_workers), "prefetch_factor": int(dl.prefetch_factor)}
    seed = int(cfg.train.seed)
    generator = torch.Generator().manual_seed(seed)  # the workers' seeds; the order is the sampler's
    return DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(dataset, seed=seed) if train else None,
        num_workers=num_workers, collate_fn=functools.partial(safe_collate, fill=True) if train else safe_collate,
        pin_memory=bool(dl.pin_memory) and torch.cuda.is_available(), generator=generator, worker_init_fn=worker_init,
        # drop_last on a train set smaller than one batch would leave an epoch with no step at all
        drop_last=train and bool(dl.drop_last) and len(dataset) >= batch_size, **kwargs,
    )


def _class_meta(rows: pd.DataFrame, manifest_dir: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Class names and class map of the classifier rows (a class seen only in combination photos included)."""
    names = sorted(rows["mapping_code"].unique())
    full = load_class_map(manifest_dir)
    # `index` is re-numbered to the stage's class order: it is the classifier's output index.
    return names, {code: {**full.get(code, {"mapping_code": code}), "index": i} for i, code in enumerate(names)}


def _cache_for(rows: pd.DataFrame, cfg: DictConfig) -> Any:
    if not cfg.data.cache.enabled:
        return None
    from pillsnap.data.cache import build_cache

    return build_cache(rows, cfg.paths.cache_dir, int(cfg.model.image_size), float(cfg.data.crop_margin),
                       fmt=str(cfg.data.cache.format))


def _yolo_dir(cfg: DictConfig) -> Path:
    pv = cfg.data.progressive_validation
    tag = f"stage_{pv.current_stage}" if pv.enabled else "all"
    if cfg.data.detection_export == "jpeg":  # photos resized to the detector's size: an export per size
        tag += f"_jpeg{int(cfg.model.det_image_size)}"
    return Path(cfg.paths.cache_dir) / f"yolo_{tag}"


def detection_singles(rows: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Single-pill photos for the detector's train and val splits: `share` times as many as the split's combination
    photos, drawn with `seed`. `auto` runs the detector on every photo, single ones included, so it must learn that
    one pill is one box (a detector that never saw a single-pill photo finds extra pills in some of them). The test
    split stays combination photos only, so its mAP compares across runs."""
    chosen = []
    for split in ("train", "val"):
        in_split = rows[rows["split"] == split]
        photos = in_split.loc[in_split["image_type"] == "single", "image_path"].drop_duplicates()
        wanted = int(round(share * in_split.loc[in_split["image_type"] == "combination", "image_path"].nunique()))
        if wanted > 0 and len(photos):
            picked = photos.sample(n=min(wanted, len(photos)), random_state=seed)
            chosen.append(in_split[in_split["image_path"].isin(picked)])
    return pd.concat(chosen) if chosen else rows.iloc[:0]


def _detection_loaders(rows: pd.DataFrame, cfg: DictConfig, build_test: bool,
                       num_workers: int) -> tuple[Any, Any, Any, Path | None]:
    combos = rows[rows["image_type"] == "combination"]
    if cfg.train.strategy == "classification" or combos.empty:
        return None, None, None, None
    from pillsnap.data.yolo import build_detection_loader, count_images, export_yolo

    singles = detection_singles(rows, float(cfg.data.detection_singles), int(cfg.data.split_seed))
    data_yaml = export_yolo(pd.concat([combos, singles]), _yolo_dir(cfg), include_single=True,
                            image_format=str(cfg.data.detection_export), image_size=int(cfg.model.det_image_size))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = []
    for split in ("train", "val", "test"):
        if (split == "test" and not build_test) or count_images(data_yaml, split) == 0:
            loaders.append(None)
            continue
        loaders.append(build_detection_loader(data_yaml, split, int(cfg.model.det_image_size),
                                              int(cfg.train.detection.batch_size), num_workers,
                                              train=split == "train", device=device,
                                              augment=detection_augment(cfg)))
    if loaders[0] is None:
        return None, None, None, data_yaml
    return loaders[0], loaders[1], loaders[2], data_yaml


def detection_augment(cfg: DictConfig) -> dict[str, Any]:
    """train.detection.augment as plain values (ultralytics' names), {} when the config has none."""
    section = cfg.train.detection.get("augment") or {}
    return {str(key): value for key, value in section.items()}


def _detection_sizes(data_yaml: Path | None) -> dict[str, int]:
    from pillsnap.data.yolo import count_images

    return {f"det_{s}": count_images(data_yaml, s) if data_yaml else 0 for s in ("train", "val", "test")}


def _classification_datasets(rows: pd.DataFrame, class_names: list[str],
                             cfg: DictConfig) -> dict[str, ClassificationDataset]:
    index = {code: i for i, code in enumerate(class_names)}
    cache = _cache_for(rows, cfg)
    size, margin = int(cfg.model.image_size), float(cfg.data.crop_margin)
    jitter = float(cfg.data.crop_jitter.scale), float(cfg.data.crop_jitter.shift)
    return {s: ClassificationDataset(rows[rows["split"] == s], index, size, s == "train", margin, cache, jitter)
            for s in ("train", "val", "test")}


def _no_training_rows(cfg: DictConfig, manifest_dir: Path) -> ValueError:
    stage = cfg.data.progressive_validation.current_stage
    return ValueError(f"Stage {stage} has no classifier training rows in {manifest_dir} (single-pill photos, or "
                      f"combination pills with data.combo_crops=true): check the manifest splits and the stage "
                      f"sizes (data.progressive_validation.stage_{stage})")


def _shared_memory_size() -> int | None:
    """Bytes of /dev/shm, where loader workers hand their batches to the trainer (None where there is none)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_blocks * st.f_frsize


def _batches_in_flight(cfg: DictConfig, together: int) -> Callable[[int, int], int]:
    """Bytes the loaders' batches in flight hold in /dev/shm with `w` workers at prefetch `p`: each classifier worker
    holds `p` batches, float32 ones while validating (57 MB each at 32 x 384 px; training's uint8 ones are a
    quarter of that) and, training interleaved, ultralytics' two uint8 detection batches, which its workers keep
    ready through the validation too; every rank on the machine shares it."""
    ranks = _ranks_on_this_machine()
    cls_batch = int(cfg.train.batch_size) * 3 * int(cfg.model.image_size) ** 2 * 4  # a validation batch, the larger
    det_batch = int(cfg.train.detection.batch_size) * 3 * int(cfg.model.det_image_size) ** 2 if together > 1 else 0
    return lambda w, p: ranks * w * (p * cls_batch + 2 * det_batch)


def _fit_shared_memory(cfg: DictConfig, workers: int, together: int) -> tuple[int, int]:
    """(num_workers, prefetch_factor) whose batches in flight fill at most SHM_SHARE of /dev/shm, lowering the
    prefetch first, then the workers. A container's default 64 MB fills at the first batches, and the workers died
    of a bus error after the run's whole start-up."""
    prefetch, size = int(cfg.dataloader.prefetch_factor), _shared_memory_size()
    if not workers or size is None:
        return workers, prefetch
    need, budget = _batches_in_flight(cfg, together), SHM_SHARE * size
    fitted_w, fitted_p = workers, prefetch
    while fitted_p > 1 and need(fitted_w, fitted_p) > budget:
        fitted_p -= 1
    while fitted_w > 0 and need(fitted_w, fitted_p) > budget:
        fitted_w -= 1
    if (fitted_w, fitted_p) != (workers, prefetch):
        LOGGER.warning("/dev/shm holds %.0f MB, where loader workers hand over their batches: %d rank(s) x %d "
                       "workers x prefetch %d need %.0f MB. Loading with %d workers, prefetch %d; give the "
                       "container more shared memory (docker run --shm-size=16g, or --ipc=host) to load with all of "
                       "them", size / 2**20, _ranks_on_this_machine(), workers, prefetch,
                       need(workers, prefetch) / 2**20, fitted_w, fitted_p)
    return fitted_w, fitted_p


def _fits_shared_memory(cfg: DictConfig, workers: int, together: int) -> bool:
    """Whether `workers` at the configured prefetch fit (_fit_shared_memory): the worker autotune tries no more."""
    size = _shared_memory_size()
    return size is None or _batches_in_flight(cfg, together)(workers, int(cfg.dataloader.prefetch_factor)) <= \
        SHM_SHARE * size


def _sizes(datasets: dict[str, ClassificationDataset], rows: pd.DataFrame, data_yaml: Path | None) -> dict[str, int]:
    from_combos = rows[rows["image_type"] == "combination"]
    return ({f"cls_{s}": len(d) for s, d in datasets.items()}
            | {f"cls_{s}_from_combinations": int((from_combos["split"] == s).sum()) for s in ("train", "val", "test")}
            | _detection_sizes(data_yaml))


def build_dataloaders_twostage(cfg: DictConfig, build_test: bool = False, tb: Any = None) -> Loaders:
    """The current stage's Loaders, read from `paths.manifest_dir` (the test split only with `build_test`).

    The classifier trains on single-pill crops and, with `data.combo_crops`, on the soundly boxed pills of
    combination photos, so a stage without single-pill photos still trains both models.
    """
    manifest_dir = Path(cfg.paths.manifest_dir)
    rows = select_stage(load_manifest(manifest_dir), cfg)
    cls_rows = classification_rows(rows)
    class_names, class_map = _class_meta(cls_rows, manifest_dir)
    datasets = _classification_datasets(cls_rows, class_names, cfg)
    if not len(datasets["train"]):
        raise _no_training_rows(cfg, manifest_dir)
    together = 2 if str(cfg.train.strategy) == "interleaved" else 1  # both models' training loaders draw at once
    workers, prefetch = _fit_shared_memory(cfg, workers_for_this_rank(int(cfg.dataloader.num_workers), together),
                                           together)
    if prefetch != int(cfg.dataloader.prefetch_factor):
        cfg = copy.deepcopy(cfg)
        cfg.dataloader.prefetch_factor = prefetch
    if cfg.dataloader.autotune_workers:
        candidates = [n for n in cfg.dataloader.autotune_candidates if _fits_shared_memory(cfg, int(n), together)]
        workers = autotune_num_workers(
            lambda n: _classification_loader(datasets["train"], cfg, True, n), candidates or [workers],
            int(cfg.dataloader.autotune_warmup), int(cfg.dataloader.autotune_steps), tb=tb, loaders_together=together)
    cls = {s: _classification_loader(d, cfg, s == "train", workers) if len(d) else None for s, d in datasets.items()}
    if not build_test:
        cls["test"] = None
    det_train, det_val, det_test, data_yaml = _detection_loaders(rows, cfg, build_test, workers)
    weights = None
    if cfg.loss.use_class_weights:
        weights = compute_class_weights(datasets["train"].labels, len(class_names))
    meta = {
        "num_classes": len(class_names), "class_names": class_names, "class_map": class_map,
        "class_weights": weights, "yolo_data_yaml": str(data_yaml) if data_yaml else None,
        "stage": int(cfg.data.progressive_validation.current_stage), "num_workers": workers,
        "sizes": _sizes(datasets, cls_rows, data_yaml),
    }
    LOGGER.info("loaders: %d classes, sizes %s", meta["num_classes"], meta["sizes"])
    return Loaders(cls["train"], cls["val"], cls["test"], det_train, det_val, det_test, meta)
