"""One pill of the synthetic generator: its class look, its albedo and height map, and its shading.

A pill is drawn in its own frame as colour (albedo) plus a height map (dome, debossed imprint, score line, capsule
seam). The photo rotates and foreshortens both, and only then shades them (shade_sprite), so that the light stays
fixed in the photo whatever way the pill lies: engraved letters show as shading, not as ink, like real tablets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PX_PER_MM = 25.5  # at the real 976x1280 resolution (real boxes: an 8 mm round tablet spans about 200 px)
SUPERSAMPLE = 2  # pills are drawn at 2x and downsampled: cheap anti-aliasing
POLYGON_SIDES = {"삼각형": 3, "사각형": 4, "마름모형": 4, "오각형": 5, "육각형": 6, "팔각형": 8}
LIGHT = np.array([-0.35, -0.6, 1.0]) / np.linalg.norm([-0.35, -0.6, 1.0])  # from the top, a little left
HALF = (LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(LIGHT + np.array([0.0, 0.0, 1.0]))
_FLAT = 0.55 + 0.5 * LIGHT[2]  # the shade of a flat, level surface: shading is relative to it


@dataclass(frozen=True)
class PillLook:
    """What a class looks like: everything needed to draw it (fixed per class)."""

    shape: str  # drug_shape
    capsule: str  # "" (tablet) | "hard" (two halves) | "soft" (one glossy piece)
    colors: tuple[str, ...]  # colour names as in the label (1 or 2)
    rgb: tuple[tuple[int, int, int], ...]  # this class's shade of each colour
    print_front: str
    print_back: str
    mark_front: bool  # a logo ("마크" in the label) is engraved on the front
    line_front: str  # "" | "-" | "+" score line
    line_back: str
    ink: bool  # imprint printed in ink (capsules, a few tablets) rather than debossed
    gloss: float  # 0 (matte plain tablet) .. 1 (soft capsule)
    long_mm: float
    short_mm: float
    base_angle: float


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled scalable font: nothing is downloaded or read from the system.
    return ImageFont.load_default(size=max(6, size))


def _polygon(sides: int, w: float, h: float, diamond: bool) -> list[tuple[float, float]]:
    start = 0.0 if diamond else -math.pi / 2 + (math.pi / sides if sides % 2 == 0 else 0.0)
    return [(w / 2 + w / 2 * math.cos(start + 2 * math.pi * i / sides),
             h / 2 + h / 2 * math.sin(start + 2 * math.pi * i / sides)) for i in range(sides)]


def _shape_mask(look: PillLook, w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    box = (1, 1, w - 2, h - 2)
    if look.capsule or look.shape == "장방형":
        draw.rounded_rectangle(box, radius=h // 2 if look.capsule else int(h * 0.42), fill=255)
    elif look.shape == "반원형":
        draw.chord((1, 1, w - 2, 2 * h - 3), 180, 360, fill=255)
    elif look.shape in POLYGON_SIDES:
        draw.polygon(_polygon(POLYGON_SIDES[look.shape], w - 3, h - 3, look.shape == "마름모형"), fill=255)
        mask = mask.filter(ImageFilter.GaussianBlur(max(1, h // 14))).point(lambda a: 255 if a > 127 else 0)
    else:  # round, oval, other
        draw.ellipse(box, fill=255)
    return mask


def _albedo(look: PillLook, mask: Image.Image, back: bool) -> Image.Image:
    w, h = mask.size
    albedo = Image.new("RGB", (w, h), look.rgb[0])
    if len(look.rgb) > 1:  # a two-tone capsule (cap and body) or a two-layer tablet
        split = int(w * (0.46 if look.capsule else 0.5))
        albedo.paste(look.rgb[1], (split, 0, w, h))
    if look.ink:
        text = look.print_back if back else look.print_front
        if text and not text.startswith("마크"):
            ink = (38, 38, 44) if sum(look.rgb[0]) > 300 else (235, 235, 230)
            ImageDraw.Draw(albedo).text((w / 2, h / 2), text, fill=ink, font=_font(int(h * 0.3)), anchor="mm")
    albedo.putalpha(mask)
    return albedo


def _engraving(look: PillLook, w: int, h: int, back: bool) -> Image.Image:
    """Where the pill is engraved: imprint letters, a logo, score lines (white = deepest)."""
    groove = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(groove)
    text = look.print_back if back else look.print_front
    line = look.line_back if back else look.line_front
    stroke = max(1, h // 28)
    if line in ("-", "+"):
        draw.line((w // 2, h // 8, w // 2, h - h // 8), fill=255, width=2 * stroke)
        if line == "+":
            draw.line((w // 8, h // 2, w - w // 8, h // 2), fill=255, width=2 * stroke)
    if not look.ink and not back and look.mark_front:  # a logo: a ring with a bar, left of the text
        r = h * 0.16
        cx = w / 2 - (w * 0.22 if text.removeprefix("마크").strip() else 0)
        draw.ellipse((cx - r, h / 2 - r, cx + r, h / 2 + r), outline=255, width=stroke)
        draw.line((cx - r * 0.6, h / 2, cx + r * 0.6, h / 2), fill=255, width=stroke)
        text = text.removeprefix("마크").strip()
    if text and not look.ink and not text.startswith("마크"):
        x = w / 2 + (w * 0.1 if look.mark_front and not back else 0)
        draw.text((x, h / 2), text, fill=255, font=_font(int(h * 0.3)), anchor="mm")
    if look.capsule == "hard":  # the seam where cap and body meet
        seam = int(w * 0.46)
        draw.line((seam, 0, seam, h), fill=160, width=stroke)
    return groove.filter(ImageFilter.GaussianBlur(max(0.6, stroke * 0.6)))


def _height(look: PillLook, mask: Image.Image, groove: Image.Image) -> np.ndarray:
    """Height in pixels of the tile: a rounded rim, a dome over the face, minus the engraving."""
    w, h = mask.size
    rim = 0.45 if look.capsule else 0.16  # a capsule is a cylinder; a tablet has a flat face and rounded edges
    edge = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(1.0, h * rim * 0.5))), dtype=np.float32) / 255
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    dome = np.clip(1 - (xs * xs + ys * ys) * 0.5, 0, 1)
    depth = np.asarray(groove, dtype=np.float32) / 255
    height = h * (0.28 * edge + 0.12 * dome * edge) - depth * max(1.0, h * 0.035)
    return height * (np.asarray(mask, dtype=np.float32) / 255)


@lru_cache(maxsize=512)  # a class looks the same in every photo: draw each side once per process
def draw_pill(look: PillLook, back: bool, scale: float) -> tuple[Image.Image, Image.Image]:
    """The pill in its own frame (long axis horizontal) at `scale` x the real resolution: an RGBA albedo and its
    height map (mode "F", in pixels). Drawn at SUPERSAMPLE x and reduced (cheap anti-aliasing). Treat as read-only:
    the result is shared between photos."""
    w = max(8, int(look.long_mm * PX_PER_MM * scale * SUPERSAMPLE))
    h = max(8, int(look.short_mm * PX_PER_MM * scale * SUPERSAMPLE))
    mask = _shape_mask(look, w, h)
    height = Image.fromarray(_height(look, mask, _engraving(look, w, h, back)) / SUPERSAMPLE, "F")
    size = (max(4, w // SUPERSAMPLE), max(4, h // SUPERSAMPLE))
    return _albedo(look, mask, back).resize(size, Image.BOX), height.resize(size, Image.BOX)


def place(albedo: Image.Image, height: Image.Image, angle: float, camera_la: int,
          zoom: float) -> tuple[Image.Image, np.ndarray]:
    """Rotate (azimuth), foreshorten (camera elevation) and scale the albedo and the height map together."""
    squash = math.sin(math.radians(camera_la))
    rot_a = albedo.rotate(angle, resample=Image.BICUBIC, expand=True)
    rot_h = height.rotate(angle, resample=Image.BILINEAR, expand=True)
    size = (max(2, round(rot_a.width * zoom)), max(2, round(rot_a.height * zoom * squash)))
    small = np.asarray(rot_h.resize(size, Image.BILINEAR), dtype=np.float32) * zoom
    return rot_a.resize(size, Image.BILINEAR), small


def shade_sprite(albedo: Image.Image, height: np.ndarray, gloss: float, light_scale: float = 1.0) -> Image.Image:
    """Lambert shading plus a soft specular highlight from the height map's normals, in photo space."""
    gy, gx = np.gradient(height)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    n_dot_l = (-gx * LIGHT[0] - gy * LIGHT[1] + LIGHT[2]) / norm
    n_dot_h = (-gx * HALF[0] - gy * HALF[1] + HALF[2]) / norm
    shade = (0.55 + 0.5 * np.clip(n_dot_l, 0, 1)) / _FLAT * light_scale
    spec = gloss * 120.0 * np.clip(n_dot_h, 0, 1) ** 24
    rgba = np.asarray(albedo, dtype=np.float32)
    rgb = rgba[..., :3] * shade[..., None] + spec[..., None]
    out = np.concatenate([np.clip(rgb, 0, 255), rgba[..., 3:]], axis=2).astype(np.uint8)
    return Image.fromarray(out, "RGBA")
