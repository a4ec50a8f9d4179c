#!/usr/bin/env python3
"""Check that a stage's manifest is fit to train on: the manifest and its columns, drug codes, the stage's train
and val rows, val classes seen in training, the classes the stage trains (too few for its gate fail at stages
3-4), image files on disk, and the per-stage manifest_{train,val}.csv.
Each failure says how to fix it. Exit code 0 when every check passes, 1 otherwise, 2 on a config error.

Usage: python scripts/stage3/validate_stage3_manifest.py [--cfg config.yaml] [--stage 3] [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None,
                        help="config file (default: the repository's config.yaml, its paths relative to the root)")
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3, 4), help="stage to check (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = parser.parse_args(argv)

    from pillsnap.config import ConfigError, load_config
    from pillsnap.data.manifest_check import check_stage_manifest
    from pillsnap.eval.criteria import needs_class_minimum

    try:
        overrides = [*args.overrides, f"data.progressive_validation.current_stage={args.stage}"]
        cfg = load_config(args.cfg or ROOT / "config.yaml", overrides, paths_base=None if args.cfg else ROOT)
    except ConfigError as err:
        print(f"validate_stage3_manifest: config error: {err}", file=sys.stderr)
        return 2
    findings = check_stage_manifest(cfg, args.stage, class_minimum=needs_class_minimum(args.stage))
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], ensure_ascii=False, indent=2))
    else:
        print(f"stage {args.stage} manifest in {cfg.paths.manifest_dir}:")
        print("\n".join(f.line() for f in findings))
    failed = [f for f in findings if not f.ok]
    print(f"{len(findings) - len(failed)} of {len(findings)} checks passed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from _venv import use_project_python  # beside this script

    use_project_python()
    sys.exit(main())
