"""Synthetic generator speed: the current renderer against the previous one, measured in the same run.

The previous generator (aihub.py, synth.py, synth_render.py and, where the commit has it, synth_pill.py as of
--baseline-ref, read with `git show`, nothing checked out) is loaded as a throw-away package; both write the same
data set (classes, photos per class, combination photos, scale) into temp folders, alternately, `--rounds` times;
the best round of each counts. `--plain-style` adds a third arm: the current generator with the photo variety
switched off (every photo the real-looking style: no dish, grey backdrop, cast, strong blur or JPEG), which
isolates what the variety costs.

    .venv/bin/python bench/bench_synth.py [--classes 8 --per-class 60 --combo 120 --scale 0.25 --workers 1]
    .venv/bin/python bench/bench_synth.py --baseline-ref HEAD --plain-style
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "3852607fb3e4fcd1e3ca145ec219f13b72e93cc2"  # the last commit with the flat-colour renderer
OLD_FILES = ("aihub.py", "synth.py", "synth_render.py", "synth_pill.py")


def load_baseline(ref: str, into: Path) -> Any:
    """The generator at `ref` as package `synth_baseline` under `into` (its imports pointed at itself)."""
    package = into / "synth_baseline"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    for name in OLD_FILES:
        shown = subprocess.run(["git", "show", f"{ref}:pillsnap/data/{name}"], cwd=REPO, capture_output=True,
                               text=True)
        if shown.returncode and name == "synth_pill.py":  # older commits drew pills inside synth_render.py
            continue
        shown.check_returncode()
        text = shown.stdout.replace("from pillsnap.data import aihub", "from synth_baseline import aihub")
        for module in ("synth_render", "synth_pill"):
            text = text.replace(f"from pillsnap.data.{module} import", f"from synth_baseline.{module} import")
        (package / name).write_text(text, encoding="utf-8")
    sys.path.insert(0, str(into))
    return importlib.import_module("synth_baseline.synth")


def photos_per_second(generate: Any, out: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    summary = generate(out, args.classes, args.per_class, args.combo, seed=0, image_scale=args.scale,
                       workers=args.workers, progress=False)
    seconds = time.perf_counter() - start
    return (summary["single_images"] + summary["combination_images"]) / seconds


@contextlib.contextmanager
def plain_style() -> Iterator[None]:
    """The photo variety switched off in this process (and forked workers): every photo the real-looking style."""
    from pillsnap.data import synth_style

    saved, synth_style.SHARES = synth_style.SHARES, synth_style.PLAIN_SHARES
    try:
        yield
    finally:
        synth_style.SHARES = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--combo", type=int, default=120)
    parser.add_argument("--scale", type=float, default=0.25, help="photo scale vs 976x1280 (demo: 0.25)")
    parser.add_argument("--workers", type=int, default=1, help="render processes for both generators")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the previous generator")
    parser.add_argument("--plain-style", action="store_true", help="also time the current generator without "
                        "the photo variety (arm current_plain)")
    args = parser.parse_args()
    from pillsnap.data.synth import generate_dataset

    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        old = load_baseline(args.baseline_ref, Path(tmp)).generate_dataset
        rates: dict[str, list[float]] = {"baseline": [], "current": []}
        for i in range(args.rounds):
            rates["baseline"].append(photos_per_second(old, Path(tmp) / f"old{i}", args))
            rates["current"].append(photos_per_second(generate_dataset, Path(tmp) / f"new{i}", args))
            if args.plain_style:
                with plain_style():
                    rates.setdefault("current_plain", []).append(
                        photos_per_second(generate_dataset, Path(tmp) / f"plain{i}", args))
    best = {k: max(v) for k, v in rates.items()}
    extra = ({"ratio_current_vs_current_plain": round(best["current"] / best["current_plain"], 3)}
             if args.plain_style else {})
    print(json.dumps({"photos": args.classes * args.per_class + args.combo, "scale": args.scale,
                      "workers": args.workers, "baseline_ref": args.baseline_ref[:7],
                      "photos_per_second": {k: round(v, 1) for k, v in best.items()},
                      "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                      "ratio_current_vs_baseline": round(best["current"] / best["baseline"], 3), **extra}))


if __name__ == "__main__":
    main()
