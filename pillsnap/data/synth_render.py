"""Pill drawing for the synthetic generator: one stable look per class, photo-like variation per image.

Pure functions of (class identity, photo conditions, rng) so that workers render in parallel deterministically.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FULL_W, FULL_H = 976, 1280  # size of every real AI Hub photo (portrait)
PX_PER_MM = 20.0  # a 10 mm tablet spans ~200 px in the real 976x1280 photos
SUPERSAMPLE = 2  # draw pills at 2x then downsample: cheap anti-aliasing

RGB = {
    "하양": (238, 238, 232), "노랑": (238, 212, 84), "주황": (236, 146, 62), "분홍": (238, 170, 188),
    "빨강": (196, 52, 52), "갈색": (138, 92, 54), "연두": (172, 208, 102), "초록": (62, 148, 74),
    "청록": (44, 148, 148), "파랑": (62, 102, 198), "남색": (42, 52, 118), "자주": (148, 42, 110),
    "보라": (128, 82, 168), "회색": (150, 150, 150), "검정": (42, 42, 42), "투명": (214, 222, 206),
}
BACKGROUND = {"0": (38, 38, 42), "1": (62, 92, 150), "2": (200, 200, 197)}
LIGHT_TINT = {"0": (1.0, 1.0, 1.0), "1": (0.95, 1.0, 1.07), "2": (1.05, 1.0, 0.93)}
# drawing primitive per drug_shape; capsules are drawn from the form, not the shape
POLYGON_SIDES = {"삼각형": 3, "사각형": 4, "마름모형": 4, "오각형": 5, "육각형": 6, "팔각형": 8}


@dataclass(frozen=True)
class PillLook:
    """What a class looks like: everything needed to draw it (fixed per class)."""

    shape: str
    capsule: bool
    colors: tuple[str, ...]
    print_front: str
    print_back: str
    line_front: str
    line_back: str
    long_mm: float
    short_mm: float
    base_angle: float


@dataclass(frozen=True)
class PhotoConditions:
    """File-name codes of one photo (drug_dir, back_color, light_color, camera_la, camera_lo)."""

    drug_dir: str
    back_color: str
    light_color: str
    camera_la: int
    camera_lo: int


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled scalable font: nothing is downloaded or read from the system.
    return ImageFont.load_default(size=max(6, size))


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in rgb)  # type: ignore[return-value]


def _polygon(sides: int, w: float, h: float, diamond: bool) -> list[tuple[float, float]]:
    start = 0.0 if diamond else -math.pi / 2 + (math.pi / sides if sides % 2 == 0 else 0.0)
    return [(w / 2 + w / 2 * math.cos(start + 2 * math.pi * i / sides),
             h / 2 + h / 2 * math.sin(start + 2 * math.pi * i / sides)) for i in range(sides)]


def _draw_body(draw: ImageDraw.ImageDraw, look: PillLook, w: int, h: int) -> None:
    body = RGB[look.colors[0]]
    edge = _shade(body, 0.75)
    box = (1, 1, w - 2, h - 2)
    if look.capsule:
        draw.rounded_rectangle(box, radius=h // 2, fill=body, outline=edge, width=2)
        if len(look.colors) > 1:  # second colour on the other half of the capsule
            half = Image.new("L", (w, h), 0)
            ImageDraw.Draw(half).rounded_rectangle(box, radius=h // 2, fill=255)
            half.paste(0, (0, 0, w // 2, h))
            draw.bitmap((0, 0), half, fill=RGB[look.colors[1]])
            draw.line((w // 2, 2, w // 2, h - 3), fill=_shade(edge, 0.9), width=2)
    elif look.shape in ("원형", "타원형", "기타"):
        draw.ellipse(box, fill=body, outline=edge, width=2)
    elif look.shape == "장방형":
        draw.rounded_rectangle(box, radius=h // 3, fill=body, outline=edge, width=2)
    elif look.shape == "반원형":
        draw.chord((1, 1, w - 2, 2 * h - 3), 180, 360, fill=body, outline=edge, width=2)
    else:
        sides = POLYGON_SIDES.get(look.shape, 6)
        draw.polygon(_polygon(sides, w - 3, h - 3, look.shape == "마름모형"), fill=body, outline=edge)


def _draw_marks(draw: ImageDraw.ImageDraw, look: PillLook, w: int, h: int, back: bool) -> None:
    text, line = (look.print_back, look.line_back) if back else (look.print_front, look.line_front)
    ink = _shade(RGB[look.colors[-1] if look.capsule else look.colors[0]], 0.45)
    if line in ("-", "+"):
        draw.line((w // 2, h // 6, w // 2, h - h // 6), fill=ink, width=2)
        if line == "+":
            draw.line((w // 6, h // 2, w - w // 6, h // 2), fill=ink, width=2)
    if text:
        font = _font(int(h * 0.34))
        draw.text((w / 2, h / 2), text, fill=ink, font=font, anchor="mm")


def draw_pill(look: PillLook, back: bool, scale: float) -> Image.Image:
    """RGBA tile of one pill, long axis horizontal, at `scale` x the real photo resolution."""
    w = max(8, int(look.long_mm * PX_PER_MM * scale * SUPERSAMPLE))
    h = max(8, int(look.short_mm * PX_PER_MM * scale * SUPERSAMPLE))
    tile = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    _draw_body(draw, look, w, h)
    # A soft specular highlight so the pill reads as a 3-D object under a lamp.
    draw.ellipse((w * 0.2, h * 0.15, w * 0.45, h * 0.4), fill=(255, 255, 255, 60))
    _draw_marks(draw, look, w, h, back)
    return tile


def place_pill(tile: Image.Image, angle: float, camera_la: int, zoom: float) -> Image.Image:
    """Rotate (azimuth), foreshorten (camera elevation) and downsample a supersampled pill tile."""
    rotated = tile.rotate(angle, resample=Image.BICUBIC, expand=True)
    squash = math.sin(math.radians(camera_la))
    w = max(2, int(rotated.width * zoom / SUPERSAMPLE))
    h = max(2, int(rotated.height * zoom * squash / SUPERSAMPLE))
    return rotated.resize((w, h), Image.BILINEAR)


def background(cond: PhotoConditions, size: tuple[int, int], rng: random.Random) -> np.ndarray:
    """Float HxWx3 background: base colour with a lamp falloff gradient."""
    w, h = size
    base = np.array(BACKGROUND.get(cond.back_color, BACKGROUND["2"]), dtype=np.float32)
    base *= rng.uniform(0.9, 1.08)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    falloff = 1.0 - 0.18 * ((xs - cx) ** 2 + (ys - cy) ** 2)
    return falloff[..., None] * base


def finish(canvas: Image.Image, cond: PhotoConditions, rng: random.Random, scale: float) -> bytes:
    """Light colour, brightness, blur and sensor noise; returns PNG bytes."""
    if rng.random() < 0.6:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2) * max(scale * 4, 0.5)))
    arr = np.asarray(canvas, dtype=np.float32)
    tint = np.array(LIGHT_TINT.get(cond.light_color, (1.0, 1.0, 1.0)), dtype=np.float32) * rng.uniform(0.85, 1.12)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(1.0, 5.0), arr.shape[:2])
    arr = arr * tint + noise[..., None].astype(np.float32)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)  # speed over size: synthetic data is regenerated at will
    return buf.getvalue()


def _opaque_bbox(sprite: Image.Image) -> tuple[int, int, int, int]:
    alpha = sprite.getchannel("A").point(lambda a: 255 if a > 96 else 0)
    return alpha.getbbox() or (0, 0, sprite.width, sprite.height)


def _shadow(canvas: Image.Image, sprite: Image.Image, pos: tuple[int, int]) -> None:
    alpha = sprite.getchannel("A").filter(ImageFilter.GaussianBlur(2)).point(lambda a: a * 0.35)
    canvas.paste((0, 0, 0), (pos[0] + 2, pos[1] + 3), alpha)


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], limit: float) -> bool:
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        ix = max(0, min(x + w, bx + bw) - max(x, bx))
        iy = max(0, min(y + h, by + bh) - max(y, by))
        if ix * iy > limit * min(w * h, bw * bh):
            return True
    return False


def _position(sprite_size: tuple[int, int], size: tuple[int, int], centre: bool, rng: random.Random) -> tuple[int, int]:
    sw, sh = sprite_size
    w, h = size
    if centre:  # single-pill photos: the pill sits near the centre, like the real ones
        return (int((w - sw) / 2 + rng.uniform(-0.08, 0.08) * w), int((h - sh) / 2 + rng.uniform(-0.08, 0.08) * h))
    return rng.randint(2, max(2, w - sw - 2)), rng.randint(2, max(2, h - sh - 2))


def render_photo(looks: list[PillLook], cond: PhotoConditions, scale: float,
                 seed: int) -> tuple[bytes, list[tuple[int, int, int, int]], tuple[int, int]]:
    """Render one photo of `looks` (1 = single, 2-4 = combination); returns PNG bytes, one bbox per pill, size."""
    rng = random.Random(seed)
    size = (max(32, round(FULL_W * scale)), max(32, round(FULL_H * scale)))
    canvas = Image.fromarray(np.clip(background(cond, size, rng), 0, 255).astype(np.uint8), "RGB")
    boxes: list[tuple[int, int, int, int]] = []
    for look in looks:
        tile = draw_pill(look, cond.drug_dir == "1", scale)
        angle = look.base_angle + cond.camera_lo + rng.uniform(-12, 12)
        sprite = place_pill(tile, angle, cond.camera_la, rng.uniform(0.88, 1.12))
        x0, y0, x1, y1 = _opaque_bbox(sprite)
        for _ in range(50):  # rejection sampling keeps combination pills from heavy overlap
            px, py = _position(sprite.size, size, len(looks) == 1, rng)
            box = (px + x0, py + y0, x1 - x0, y1 - y0)
            if not _overlaps(box, boxes, 0.1):
                break
        _shadow(canvas, sprite, (px, py))
        canvas.paste(sprite, (px, py), sprite)
        boxes.append(_clip_box(box, size))
    return finish(canvas, cond, rng, scale), boxes, size


def _clip_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(size[0], x + w), min(size[1], y + h)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)
