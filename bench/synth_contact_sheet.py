"""Contact sheet of synthetic photos (default docs/synth_contact_sheet.png), to compare by eye with the real-photo
statistics in docs/REAL_DATA.md.

    .venv/bin/python bench/synth_contact_sheet.py [--out docs/synth_contact_sheet.png] [--scale 0.3] [--seed 0]

Twelve combination photos (four combinations at the three camera elevations) and four single-pill photos, 4 x 4,
with the printed box-size percentiles of all combination photos of the generated set against the real ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from pillsnap.data import aihub
from pillsnap.data.synth import generate_dataset
from pillsnap.data.synth_render import box_stats

REAL_BOXES = {"width": [180, 209, 242, 295, 408], "height": [167, 199, 231, 403, 497]}


def _photos(root: Path) -> tuple[list[Path], list[Path]]:
    """Every shot of four combinations spread over the set (not the first four: those share their lowest code),
    and single-pill photos."""
    folders = sorted({p.parent for p in root.rglob("K-*-*/K-*_0_*.png")})
    picked = folders[:: max(1, len(folders) // 4)][:4]
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
        combos, singles = _photos(root)
        picks = combos[:12] + singles[:: max(1, len(singles) // 4)][:4]
        tiles = [Image.open(p).convert("RGB") for p in picks]
        w, h = tiles[0].size
        sheet = Image.new("RGB", (4 * w, 4 * h), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, (tile, path) in enumerate(zip(tiles, picks, strict=True)):
            sheet.paste(tile, ((i % 4) * w, (i // 4) * h))
            draw.text(((i % 4) * w + 4, (i // 4) * h + 4), path.stem.split("_", 1)[1], fill=(255, 255, 255))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out, optimize=True)
        stats = box_stats(_boxes(root), args.scale)
    print(json.dumps({"sheet": args.out, "synthetic_boxes_p5_25_50_75_95": stats, "real": REAL_BOXES}))


if __name__ == "__main__":
    main()
