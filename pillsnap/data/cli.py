"""`pillsnap data synth | scan | manifest | cache`: generate synthetic AI Hub data, ingest a tree, write a stage's
manifests, build the crop cache."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


def _load_cfg(args: argparse.Namespace) -> Any:
    from pillsnap.config import load_config

    cfg_path = args.cfg if args.cfg and (Path(args.cfg).is_file() or args.cfg != "config.yaml") else None
    return load_config(cfg_path, overrides=getattr(args, "overrides", []) or [])


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


def run_synth(args: argparse.Namespace) -> int:
    from pillsnap.data.synth import generate_dataset

    try:
        summary = generate_dataset(args.out, args.classes, args.per_class, args.combo, seed=args.seed,
                                   zip_output=args.zip, image_scale=args.image_scale, workers=args.workers)
    except ValueError as err:  # a count or scale out of range, named
        LOGGER.error("synth: %s", err)
        return 2
    summary.pop("classes")
    _print(summary)
    return 0


def run_scan(args: argparse.Namespace) -> int:
    from pillsnap.data.scan import ScanError, scan_dataset

    cfg = _load_cfg(args)
    workers = args.workers if args.workers is not None else int(cfg.data.scan_workers)
    try:
        report = scan_dataset(args.data_root or cfg.paths.data_root, args.out or cfg.paths.manifest_dir, workers,
                              split_seed=int(cfg.data.split_seed), val_ratio=float(cfg.data.val_ratio),
                              test_ratio=float(cfg.data.test_ratio), resume=not args.no_resume)
    except ScanError as err:  # nothing usable: one line that says what was found and what was expected
        LOGGER.error("scan failed: %s", err)
        return 2
    _print(report)
    return 0


def _manifest_summary(rows: Any, path: Path) -> str:
    photos = rows.drop_duplicates("photo_id")["image_type"].value_counts()
    return (f"{path.name}: {len(rows)} rows, {int(photos.sum())} photos "
            f"({int(photos.get('single', 0))} single, {int(photos.get('combination', 0))} combination), "
            f"{rows.loc[rows['stage_class'], 'mapping_code'].nunique()} classes to classify"
            f"{_other_pills(rows)} -> {path}")


def _other_pills(rows: Any) -> str:
    """The drugs of the file that are not the stage's classes: the other pills of its combination photos, kept for
    the detector (a drug count over the whole file would say Stage 3 classifies ~4,000 drugs, not 1,000)."""
    classified = rows["stage_class"].astype(bool)
    others = len(set(rows.loc[~classified, "mapping_code"]) - set(rows.loc[classified, "mapping_code"]))
    return f" (and {others} other drugs' pills in its combination photos, for the detector)" if others else ""


def run_manifest(args: argparse.Namespace) -> int:
    from pillsnap.data.manifest_check import stage_manifest_dir
    from pillsnap.data.scan import load_manifest, write_manifest_csv
    from pillsnap.data.stages import select_stage

    cfg = _load_cfg(args)
    stage = args.stage if args.stage is not None else int(cfg.data.progressive_validation.current_stage)
    try:
        rows = select_stage(load_manifest(cfg.paths.manifest_dir), cfg, stage)
    except ValueError as err:  # an unknown stage, or nothing to classify
        LOGGER.error("data manifest: %s", err)
        return 2
    out = Path(args.out) if args.out else stage_manifest_dir(cfg.paths.manifest_dir, stage)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        part = rows[rows["split"] == split]
        print(_manifest_summary(part, write_manifest_csv(part, out / f"manifest_{split}.csv")))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    # the stage's own settings, as training applies them: stages 3-4 cache their crops as JPEGs
    from omegaconf import OmegaConf

    from pillsnap.config import apply_stage_overrides
    from pillsnap.data.cache import CacheError, build_cache
    from pillsnap.data.scan import load_manifest
    from pillsnap.data.stages import classification_rows, select_stage
    from pillsnap.utils.io import DiskSpaceError

    cfg = _load_cfg(args)
    if args.stage is not None:  # as the training of that stage will select it
        OmegaConf.update(cfg, "data.progressive_validation.current_stage", int(args.stage))
    cfg = apply_stage_overrides(cfg, int(cfg.data.progressive_validation.current_stage))
    rows = classification_rows(select_stage(load_manifest(cfg.paths.manifest_dir), cfg))
    try:
        cache = build_cache(rows, cfg.paths.cache_dir, int(cfg.model.image_size),
                            float(cfg.data.crop_margin), workers=args.workers, fmt=str(cfg.data.cache.format))
    except (DiskSpaceError, CacheError) as err:  # a disk too small, a cache folder that cannot be written
        LOGGER.error("%s", err)
        return 2
    _print({"cache_dir": str(cache.root), "crops": len(cache), "unreadable": len(cache.unreadable),
            "image_size": cache.image_size, "format": cache.format})
    return 0


def _cfg_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", default="config.yaml", help="config file (default: ./config.yaml if present)")


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a synthetic data set in the AI Hub layout",
                       description="Generate drawn pill photos with real-format label JSON (deterministic per seed).")
    p.add_argument("--out", required=True, help="output folder (becomes paths.data_root)")
    p.add_argument("--classes", type=int, default=50, help="number of drug classes (K-codes)")
    p.add_argument("--per-class", type=int, default=40, help="single-pill photos per class")
    p.add_argument("--combo", type=int, default=200,
                   help="combination photos (3-4 pills each, fewer with fewer classes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--zip", action="store_true", help="write TS_/TL_ zips instead of extracted folders")
    p.add_argument("--image-scale", type=float, default=0.25, help="photo scale vs the real 976x1280 (0.25: 244x320)")
    p.add_argument("--workers", type=int, default=0, help="render processes (0 = every usable core)")
    p.set_defaults(func=run_synth)


def _add_scan(sub: Any) -> None:
    p = sub.add_parser("scan", help="ingest an AI Hub tree into manifests",
                       description="Parse labels (zips or folders; the AI Hub layout or the competition's "
                                   "train_images/ + train_annotations/), check them, join images, split by groups of "
                                   "near-duplicate photos, write manifest.{parquet,csv}, class_map.json and "
                                   "scan_report.json. Resumes an interrupted scan. Exits 2 with a diagnosis when "
                                   "no record is kept.")
    _cfg_args(p)
    p.add_argument("--data-root", default=None, help="AI Hub root (default: paths.data_root)")
    p.add_argument("--out", default=None, help="manifest folder (default: paths.manifest_dir)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: data.scan_workers; 0 = all)")
    p.add_argument("--no-resume", action="store_true", help="ignore chunks left by an interrupted scan")
    p.set_defaults(func=run_scan)


def _add_manifest(sub: Any) -> None:
    p = sub.add_parser("manifest", help="write a stage's train and val manifests (CSV)",
                       description="Select a stage's rows from the scanned manifest (paths.manifest_dir) and write "
                                   "manifest_train.csv and manifest_val.csv (the columns of manifest.csv) into "
                                   "paths.manifest_dir/stageN/, one summary line per file. Run `pillsnap data "
                                   "scan` first.")
    _cfg_args(p)
    p.add_argument("--stage", type=int, default=None,
                   help="stage 1-4 (default: data.progressive_validation.current_stage)")
    p.add_argument("--out", default=None, help="output folder (default: paths.manifest_dir/stageN)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. paths.manifest_dir=runs/x/manifests")
    p.set_defaults(func=run_manifest)


def _add_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="build the crop cache for a stage",
                       description="Decode, crop and resize the stage's classifier pills once into shards under "
                                   "paths.cache_dir (used when data.cache.enabled=true), in data.cache.format: npy "
                                   "(uint8, memory-mapped) or jpeg (about 14x smaller; the stage 3-4 default).")
    _cfg_args(p)
    p.add_argument("--stage", type=int, default=None, choices=(1, 2, 3, 4),
                   help="stage 1-4 (default: data.progressive_validation.current_stage)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = every usable core)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.image_size=224")
    p.set_defaults(func=run_cache)


def register(subparsers: Any) -> None:
    """Add `data` with sub-commands synth, scan, manifest and cache."""
    data = subparsers.add_parser("data", help="synthetic data, ingestion, stage manifests, cache",
                                 description="Data commands: synth, scan, manifest, cache.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    _add_synth(sub)
    _add_scan(sub)
    _add_manifest(sub)
    _add_cache(sub)
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])
