"""What an iPhone photo costs to read: the shared decoder (pillsnap.utils.images.decode_image, as `pillsnap predict`
and the API read uploads) on a HEIC photo vs the same photo as a JPEG (the baseline), both at a phone's 12 MP
(4032 x 3024) by default, alternating in the same run; and the page's preview (`POST /v1/preview`'s work: decode,
shrink to 1600 px, JPEG) of the HEIC vs the decode alone. The photo is a drawn stand-in (a mottled backdrop and four
pill-like ellipses), the same pixels for both encoders.

    .venv/bin/python bench/heic_decode.py [--width 4032 --height 3024 --rounds 5 --quality 80]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pillsnap.utils.images import decode_image  # noqa: E402


def photo(width: int, height: int) -> Image.Image:
    """A mottled light backdrop with four pill-like ellipses, at a phone's size."""
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    base = (rng.random((height // 8, width // 8, 3)) * 40 + 150).astype("uint8")  # a mottled light backdrop
    image = Image.fromarray(base).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for i in range(4):  # four pill-like ellipses with a shade each
        x, y = width * (0.2 + 0.2 * i), height * (0.3 + 0.1 * (i % 2))
        draw.ellipse((x, y, x + width * 0.12, y + height * 0.1), fill=(230 - 40 * i, 200, 120 + 30 * i),
                     outline=(90, 90, 90), width=6)
    return image


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_pillow(image).save(buf, quality=quality)
    else:
        image.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    image = photo(args.width, args.height)
    heic, jpeg = encode(image, "HEIF", args.quality), encode(image, "JPEG", args.quality)
    decode_image(heic, "warm.heic")  # pillow-heif is loaded on the first HEIC: not part of a photo's cost
    heic_ms, jpeg_ms = [], []
    for _ in range(args.rounds):  # alternating, so that the machine's load falls on both alike
        heic_ms.append(timed(lambda: decode_image(heic, "photo.heic"), 1))
        jpeg_ms.append(timed(lambda: decode_image(jpeg, "photo.jpg"), 1))
    heic_med, jpeg_med = statistics.median(heic_ms), statistics.median(jpeg_ms)

    def preview() -> None:
        shown = decode_image(heic, "photo.heic")
        shown.thumbnail((1600, 1600))
        shown.save(io.BytesIO(), format="JPEG", quality=85)

    preview_ms = timed(preview, args.rounds)
    print(f"{args.width}x{args.height}: HEIC {len(heic) / 1e6:.2f} MB, JPEG {len(jpeg) / 1e6:.2f} MB (quality "
          f"{args.quality})")
    print(f"decode (median of {args.rounds}): HEIC {heic_med:.0f} ms vs JPEG {jpeg_med:.0f} ms = "
          f"{heic_med / jpeg_med:.2f}x")
    print(f"page preview of the HEIC (decode, shrink to 1600 px, JPEG): {preview_ms:.0f} ms = "
          f"{preview_ms / heic_med:.2f}x its decode")


if __name__ == "__main__":
    main()
