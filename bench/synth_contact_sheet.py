"""Contact sheet of synthetic photos (default docs/synth_contact_sheet.png), to compare by eye with the real-photo
statistics in docs/REAL_DATA.md.

    .venv/bin/python bench/synth_contact_sheet.py [--out docs/synth_contact_sheet.png] [--scale 0.3] [--seed 0]

Twelve combination photos (four combinations at the three camera elevations: one with the real look, one with a
round dish, one on a grey or light backdrop, one on a backdrop of another hue) and four single-pill photos, 4 x 4, each
tile captioned with its photo style; printed: the box-size percentiles of all combination photos of the generated
set against the real ones, and the share of each kind of variety in the set.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from pillsnap.data import aihub
from pillsnap.data.synth import dataset_styles, generate_dataset
from pillsnap.data.synth_render import box_stats

REAL_BOXES = {"width": [180, 209, 242, 295, 408], "height": [167, 199, 231, 403, 497]}


WANTED = (lambda s: s.backdrop_kind == "real" and s.dish is None,
          lambda s: s.dish is not None and s.dish.kind == "dish",
          lambda s: s.backdrop_kind in ("grey", "light"), lambda s: s.backdrop_kind == "hue")


def _photos(root: Path, styles: dict) -> tuple[list[Path], list[Path]]:
    """Every shot of four combinations, one of each kind in WANTED (the scene is shared by the shots of a
    combination), and single-pill photos."""
    folders = sorted({p.parent for p in root.rglob("K-*-*/K-*_0_*.png")})
    scene = {folder: styles[next(folder.glob("K-*_0_*.png")).stem] for folder in folders}
    picked: list[Path] = []
    for wanted in WANTED:
        picked += [f for f in folders if f not in picked and wanted(scene[f])][:1]
    picked += [f for f in folders[:: max(1, len(folders) // 4)] if f not in picked][:4 - len(picked)]
    combos = [p for folder in picked for p in sorted(folder.glob("K-*_0_*.png"),
                                                     key=lambda p: p.stem.split("_")[5])]
    singles = sorted(p for p in root.rglob("K-??????/*.png"))
    return combos, singles


def _boxes(root: Path) -> list[tuple[int, int, int, int]]:
    return [aihub.load_label(p.read_bytes()).bbox for p in root.rglob("K-*-*_json/K-*/*.json")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/synth_contact_sheet.png")
    parser.add_argument("--scale", type=float, default=0.3, help="photo scale vs 976x1280")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--combo", type=int, default=300, help="combination photos generated for the box statistics")
    parser.add_argument("--classes", type=int, default=150, help="classes generated (pill sizes vary by class)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root, args.classes, 1, args.combo, seed=args.seed, image_scale=args.scale, workers=1,
                         progress=False)
        styles = dataset_styles(args.classes, 1, args.combo, args.seed)
        combos, singles = _photos(root, styles)
        picks = combos[:12] + singles[:: max(1, len(singles) // 4)][:4]
        tiles = [Image.open(p).convert("RGB") for p in picks]
        w, h = tiles[0].size
        sheet = Image.new("RGB", (4 * w, 4 * h), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, (tile, path) in enumerate(zip(tiles, picks, strict=True)):
            sheet.paste(tile, ((i % 4) * w, (i // 4) * h))
            draw.text(((i % 4) * w + 4, (i // 4) * h + 4), path.stem.split("_", 1)[1], fill=(255, 255, 255))
            draw.text(((i % 4) * w + 4, (i // 4) * h + 16), _caption(styles[path.stem]), fill=(255, 255, 255))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out, optimize=True)
        stats = box_stats(_boxes(root), args.scale)
    print(json.dumps({"sheet": args.out, "synthetic_boxes_p5_25_50_75_95": stats, "real": REAL_BOXES,
                      "style_shares": _shares(styles.values())}))


def _caption(style) -> str:
    parts = [style.backdrop_kind, "dish" if style.dish else "", style.blur,
             f"jpeg{style.jpeg_quality}" if style.jpeg_quality else "", f"noise{style.noise:.0f}"]
    return " ".join(p for p in parts if p)


def _shares(styles) -> dict[str, float]:
    styles = list(styles)
    counts = Counter(f"backdrop={s.backdrop_kind}" for s in styles)
    counts.update(f"blur={s.blur}" for s in styles if s.blur)
    counts.update(["dish"] * sum(s.dish is not None for s in styles) + ["jpeg"] * sum(bool(s.jpeg_quality)
                                                                                     for s in styles))
    return {k: round(v / len(styles), 3) for k, v in sorted(counts.items())}


if __name__ == "__main__":
    main()
