"""`pillsnap data synth | scan | cache`: generate synthetic AI Hub data, ingest a tree, build the crop cache."""

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

    summary = generate_dataset(args.out, args.classes, args.per_class, args.combo, seed=args.seed,
                               zip_output=args.zip, image_scale=args.image_scale, workers=args.workers)
    summary.pop("classes")
    _print(summary)
    return 0


def run_scan(args: argparse.Namespace) -> int:
    from pillsnap.data.scan import scan_dataset

    cfg = _load_cfg(args)
    workers = args.workers if args.workers is not None else int(cfg.data.scan_workers)
    report = scan_dataset(args.data_root or cfg.paths.data_root, args.out or cfg.paths.manifest_dir, workers,
                          split_seed=int(cfg.data.split_seed), val_ratio=float(cfg.data.val_ratio),
                          test_ratio=float(cfg.data.test_ratio), resume=not args.no_resume)
    _print(report)
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from pillsnap.data.cache import build_cache
    from pillsnap.data.scan import load_manifest
    from pillsnap.data.stages import select_stage

    cfg = _load_cfg(args)
    rows = select_stage(load_manifest(cfg.paths.manifest_dir), cfg)
    cache = build_cache(rows[rows["image_type"] == "single"], cfg.paths.cache_dir, int(cfg.model.image_size),
                        float(cfg.data.crop_margin), workers=args.workers)
    _print({"cache_dir": str(cache.root), "crops": len(cache), "image_size": cache.image_size})
    return 0


def _cfg_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", default="config.yaml", help="config file (default: ./config.yaml if present)")


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a synthetic data set in the AI Hub layout",
                       description="Generate drawn pill photos with real-format label JSON (deterministic per seed).")
    p.add_argument("--out", required=True, help="output folder (becomes paths.data_root)")
    p.add_argument("--classes", type=int, default=50, help="number of drug classes (K-codes)")
    p.add_argument("--per-class", type=int, default=40, help="single-pill photos per class")
    p.add_argument("--combo", type=int, default=200, help="combination photos (2-4 pills each)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--zip", action="store_true", help="write TS_/TL_ zips instead of extracted folders")
    p.add_argument("--image-scale", type=float, default=0.25, help="photo scale vs the real 976x1280 (0.25: 244x320)")
    p.add_argument("--workers", type=int, default=0, help="render processes (0 = all cores)")
    p.set_defaults(func=run_synth)


def _add_scan(sub: Any) -> None:
    p = sub.add_parser("scan", help="ingest an AI Hub tree into manifests",
                       description="Parse labels (zips or folders), join images, write manifest.{parquet,csv}, "
                                   "class_map.json and scan_report.json. Resumes an interrupted scan.")
    _cfg_args(p)
    p.add_argument("--data-root", default=None, help="AI Hub root (default: paths.data_root)")
    p.add_argument("--out", default=None, help="manifest folder (default: paths.manifest_dir)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: data.scan_workers; 0 = all)")
    p.add_argument("--no-resume", action="store_true", help="ignore chunks left by an interrupted scan")
    p.set_defaults(func=run_scan)


def _add_cache(sub: Any) -> None:
    p = sub.add_parser("cache", help="build the uint8 crop cache for the current stage",
                       description="Decode, crop and resize the stage's single-pill photos once into memory-mapped "
                                   "shards under paths.cache_dir (used when data.cache.enabled=true).")
    _cfg_args(p)
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.image_size=224")
    p.set_defaults(func=run_cache)


def register(subparsers: Any) -> None:
    """Add `data` with sub-commands synth, scan and cache."""
    data = subparsers.add_parser("data", help="synthetic data, ingestion, cache",
                                 description="Data commands: synth, scan, cache.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    _add_synth(sub)
    _add_scan(sub)
    _add_cache(sub)
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])
