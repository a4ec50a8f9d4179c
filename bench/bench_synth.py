"""Synthetic generator speed: the current renderer against the previous one, measured in the same run.

The previous generator (aihub.py, synth.py, synth_render.py as of --baseline-ref, read with `git show`, nothing
checked out) is loaded as a throw-away package; both write the same data set (classes, photos per class,
combination photos, scale) into temp folders, alternately, `--rounds` times; the best round of each counts.

    .venv/bin/python bench/bench_synth.py [--classes 8 --per-class 60 --combo 120 --scale 0.25 --workers 1]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "3852607fb3e4fcd1e3ca145ec219f13b72e93cc2"  # the last commit with the flat-colour renderer
OLD_FILES = ("aihub.py", "synth.py", "synth_render.py")


def load_baseline(ref: str, into: Path) -> Any:
    """The generator at `ref` as package `synth_baseline` under `into` (its imports pointed at itself)."""
    package = into / "synth_baseline"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    for name in OLD_FILES:
        text = subprocess.run(["git", "show", f"{ref}:pillsnap/data/{name}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from pillsnap.data import aihub", "from synth_baseline import aihub")
        text = text.replace("from pillsnap.data.synth_render import", "from synth_baseline.synth_render import")
        (package / name).write_text(text, encoding="utf-8")
    sys.path.insert(0, str(into))
    return importlib.import_module("synth_baseline.synth")


def photos_per_second(generate: Any, out: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    summary = generate(out, args.classes, args.per_class, args.combo, seed=0, image_scale=args.scale,
                       workers=args.workers, progress=False)
    seconds = time.perf_counter() - start
    return (summary["single_images"] + summary["combination_images"]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--combo", type=int, default=120)
    parser.add_argument("--scale", type=float, default=0.25, help="photo scale vs 976x1280 (demo: 0.25)")
    parser.add_argument("--workers", type=int, default=1, help="render processes for both generators")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the previous generator")
    args = parser.parse_args()
    from pillsnap.data.synth import generate_dataset

    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        old = load_baseline(args.baseline_ref, Path(tmp)).generate_dataset
        rates: dict[str, list[float]] = {"baseline": [], "current": []}
        for i in range(args.rounds):
            rates["baseline"].append(photos_per_second(old, Path(tmp) / f"old{i}", args))
            rates["current"].append(photos_per_second(generate_dataset, Path(tmp) / f"new{i}", args))
    best = {k: max(v) for k, v in rates.items()}
    print(json.dumps({"photos": args.classes * args.per_class + args.combo, "scale": args.scale,
                      "workers": args.workers, "baseline_ref": args.baseline_ref[:7],
                      "photos_per_second": {k: round(v, 1) for k, v in best.items()},
                      "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                      "ratio_current_vs_baseline": round(best["current"] / best["baseline"], 3)}))


if __name__ == "__main__":
    main()
