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
# How the labels write what is not letters: a logo ("마크213", "마크 A1", "마크") and a score line between characters
# ("I분할선Y"). The drawing follows the label text, so any real label's print_front / print_back can be drawn.
LOGO_WORD, SCORE_WORD = "마크", "분할선"
# Emblems a logo is drawn as: simple outlines, deliberately not letters (a real logo is a company's device).
LOGO_STYLES = ("ring_bar", "triangle", "diamond_dot", "crescent", "double_ring", "chevron", "square_ring", "leaf")


@dataclass(frozen=True)
class PillLook:
    """What a class looks like: everything needed to draw it (fixed per class)."""

    shape: str  # drug_shape
    capsule: str  # "" (tablet) | "hard" (two halves) | "soft" (one glossy piece)
    colors: tuple[str, ...]  # colour names as in the label (1 or 2)
    rgb: tuple[tuple[int, int, int], ...]  # this class's shade of each colour
    print_front: str
    print_back: str
    logo: int  # which emblem (LOGO_STYLES) a side labelled with "마크" carries
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


def imprint_parts(label: str) -> tuple[bool, tuple[str, ...]]:
    """(logo, text pieces) of a print_front / print_back label: "마크 A1" -> (True, ("A1",)), "I분할선Y" ->
    (False, ("I", "Y")), "마크" -> (True, ()). Pieces are split at score lines; spaces inside a piece stay."""
    text = label or ""
    logo = LOGO_WORD in text
    pieces = (p.strip() for p in text.replace(LOGO_WORD, " ").split(SCORE_WORD))
    return logo, tuple(p for p in pieces if p)


def _albedo(look: PillLook, mask: Image.Image, back: bool) -> Image.Image:
    w, h = mask.size
    albedo = Image.new("RGB", (w, h), look.rgb[0])
    if len(look.rgb) > 1:  # a two-tone capsule (cap and body) or a two-layer tablet
        split = int(w * (0.46 if look.capsule else 0.5))
        albedo.paste(look.rgb[1], (split, 0, w, h))
    text = " ".join(imprint_parts(look.print_back if back else look.print_front)[1])
    if look.ink and text:  # printed capsules carry their words only (no logo is printed)
        ink = (38, 38, 44) if sum(look.rgb[0]) > 300 else (235, 235, 230)
        ImageDraw.Draw(albedo).text((w / 2, h / 2), text, fill=ink, font=_font(int(h * 0.3)), anchor="mm")
    albedo.putalpha(mask)
    return albedo


def _logo(draw: ImageDraw.ImageDraw, style: str, cx: float, cy: float, r: float, stroke: int) -> None:
    """One emblem of radius `r` around (cx, cy), engraved as outlines."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if style == "ring_bar":
        draw.ellipse(box, outline=255, width=stroke)
        draw.line((cx - r * 0.6, cy, cx + r * 0.6, cy), fill=255, width=stroke)
    elif style == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.9, cy + r * 0.7), (cx - r * 0.9, cy + r * 0.7)], outline=255,
                     width=stroke)
    elif style == "diamond_dot":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], outline=255, width=stroke)
        draw.ellipse((cx - r * 0.2, cy - r * 0.2, cx + r * 0.2, cy + r * 0.2), fill=255)
    elif style == "crescent":
        draw.arc(box, 40, 320, fill=255, width=stroke)
        draw.arc((cx - r * 0.5, cy - r * 0.6, cx + r * 0.7, cy + r * 0.6), 60, 300, fill=255, width=stroke)
    elif style == "double_ring":
        draw.ellipse(box, outline=255, width=stroke)
        draw.ellipse((cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5), outline=255, width=stroke)
    elif style == "chevron":
        for dy in (-0.35, 0.35):
            draw.line([(cx - r, cy + r * (dy + 0.3)), (cx, cy + r * (dy - 0.3)), (cx + r, cy + r * (dy + 0.3))],
                      fill=255, width=stroke, joint="curve")
    elif style == "square_ring":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), outline=255, width=stroke)
        draw.ellipse((cx - r * 0.4, cy - r * 0.4, cx + r * 0.4, cy + r * 0.4), outline=255, width=stroke)
    else:  # leaf: two arcs meeting at the tips, a vein between them
        draw.chord((cx - r, cy - r * 0.55, cx + r, cy + r * 0.55), 0, 360, outline=255, width=stroke)
        draw.line((cx - r * 0.8, cy, cx + r * 0.8, cy), fill=255, width=max(1, stroke // 2 + 1))


def _engrave_text(draw: ImageDraw.ImageDraw, pieces: tuple[str, ...], box: tuple[float, float, float, float],
                  size: int, stroke: int) -> None:
    """The text pieces across `box` (x0, y0, x1, y1); between two pieces, a score line cut across the pill."""
    x0, y0, x1, y1 = box
    cy = (y0 + y1) / 2
    if len(pieces) == 1:
        draw.text(((x0 + x1) / 2, cy), pieces[0], fill=255, font=_font(size), anchor="mm")
        return
    step = (x1 - x0) / len(pieces)
    for i, piece in enumerate(pieces):
        draw.text((x0 + step * (i + 0.5), cy), piece, fill=255, font=_font(size), anchor="mm")
        if i:
            draw.line((x0 + step * i, y0, x0 + step * i, y1), fill=255, width=2 * stroke)


def _engraving(look: PillLook, w: int, h: int, back: bool) -> Image.Image:
    """Where the pill is engraved: imprint letters, a logo, score lines (white = deepest)."""
    groove = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(groove)
    logo, pieces = imprint_parts(look.print_back if back else look.print_front)
    line = look.line_back if back else look.line_front
    stroke = max(1, h // 28)
    if line in ("-", "+") and len(pieces) < 2:  # a score line on its own (one between pieces is drawn with them)
        draw.line((w // 2, h // 8, w // 2, h - h // 8), fill=255, width=2 * stroke)
    if line == "+":
        draw.line((w // 8, h // 2, w - w // 8, h // 2), fill=255, width=2 * stroke)
    if look.ink:
        logo, pieces = False, ()
    size = int(h * 0.3)
    if logo:  # beside the text on a long pill, above it on a round one, alone in the middle
        r, wide = h * 0.16, w >= 1.3 * h
        cx, cy = (w / 2 - w * 0.22, h / 2) if pieces and wide else (w / 2, h * 0.3 if pieces else h / 2)
        _logo(draw, LOGO_STYLES[look.logo % len(LOGO_STYLES)], cx, cy, r, stroke)
        text_box = ((w * 0.4, h * 0.2, w * 0.9, h * 0.8) if wide else (w * 0.15, h * 0.5, w * 0.85, h * 0.85))
        size = int(h * (0.3 if wide else 0.24))
    else:
        text_box = (w * 0.12, h / 8, w * 0.88, h - h / 8)
    if pieces:
        _engrave_text(draw, pieces, text_box, size, stroke)
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
