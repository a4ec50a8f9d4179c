"""Photos of the synthetic generator: pill placement, soft shadows, and the photo's style (synth_style.py: backdrop,
dish, light, blur, noise, JPEG) around them.

Pure functions of (class looks, photo conditions, seeds), so that workers render in parallel deterministically.
The targets are the measured statistics of real AI Hub photos (docs/REAL_DATA.md): a matte
blue-grey backdrop, evenly lit; pills 170-500 px on 976x1280, spread over the frame and not touching.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from pillsnap.data.synth_pill import PX_PER_MM, PillLook, draw_pill, place, shade_sprite
from pillsnap.data.synth_style import PhotoStyle, StyleShares, draw_dish, finish, photo_style

FULL_W, FULL_H = 976, 1280  # size of every real AI Hub photo (portrait)


@dataclass(frozen=True)
class PhotoConditions:
    """File-name codes of one photo (drug_dir, back_color, light_color, camera_la, camera_lo)."""

    drug_dir: str
    back_color: str
    light_color: str
    camera_la: int
    camera_lo: int


def background(style: PhotoStyle, size: tuple[int, int]) -> Image.Image:
    """The backdrop in its colour, and the style's dish on it (light and falloff come at the end, over all)."""
    canvas = Image.new("RGB", size, tuple(int(np.clip(c, 0, 255)) for c in style.backdrop))
    if style.dish is not None:
        draw_dish(canvas, style.dish)
    return canvas


def _opaque_bbox(sprite: Image.Image) -> tuple[int, int, int, int]:
    alpha = sprite.getchannel("A").point(lambda a: 255 if a > 96 else 0)
    return alpha.getbbox() or (0, 0, sprite.width, sprite.height)


def _blurred_alpha(sprite: Image.Image, radius: float, strength: float) -> tuple[Image.Image, int]:
    """The sprite's alpha, padded so that the blur can spread past the sprite's edges, blurred and scaled."""
    pad = int(radius * 3) + 1
    alpha = Image.new("L", (sprite.width + 2 * pad, sprite.height + 2 * pad), 0)
    alpha.paste(sprite.getchannel("A"), (pad, pad))
    return alpha.filter(ImageFilter.GaussianBlur(radius)).point(lambda a: a * strength), pad


def _shadow(canvas: Image.Image, sprite: Image.Image, pos: tuple[int, int]) -> None:
    """A soft shadow below the pill, light from above and a little to the top."""
    size = max(sprite.size)
    mask, pad = _blurred_alpha(sprite, max(0.8, size * 0.05), 0.5)
    canvas.paste((6, 8, 16), (pos[0] - pad + round(size * 0.02), pos[1] - pad + round(size * 0.045)), mask)


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], gap: int) -> bool:
    x, y, w, h = box
    return any(x < bx + bw + gap and bx < x + w + gap and y < by + bh + gap and by < y + h + gap
               for bx, by, bw, bh in boxes)


def _clip_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(size[0], x + w), min(size[1], y + h)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _combo_angle(look: PillLook, layout: random.Random) -> float:
    # Pills placed by hand in a portrait frame: caplets and capsules mostly lie along the long side of the photo,
    # rounder pills any way, half of them roughly across it (fitted to the real box widths and heights).
    if look.short_mm < look.long_mm * 0.55 and layout.random() < 0.8:
        return 90.0 + layout.uniform(-15, 15)
    if layout.random() < 0.5:
        return layout.uniform(-40, 40)
    return layout.uniform(0, 360)


def _sprite(look: PillLook, cond: PhotoConditions, scale: float, angle: float,
            rng: random.Random) -> Image.Image:
    albedo, height = draw_pill(look, cond.drug_dir == "1", scale)
    small_albedo, small_height = place(albedo, height, angle, cond.camera_la, rng.uniform(0.95, 1.05))
    return shade_sprite(small_albedo, small_height, look.gloss, rng.uniform(0.95, 1.05))


def _single_position(sprite: Image.Image, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    # Single-pill photos: the pill sits near the centre, like the real ones.
    w, h = size
    return (int((w - sprite.width) / 2 + rng.uniform(-0.08, 0.08) * w),
            int((h - sprite.height) / 2 + rng.uniform(-0.08, 0.08) * h))


def _nominal_box(look: PillLook, angle: float, scale: float) -> tuple[float, float]:
    """Width and height of the pill's box seen from straight above (no camera tilt), in photo pixels."""
    w, h = look.long_mm * PX_PER_MM * scale * 1.06, look.short_mm * PX_PER_MM * scale * 1.06  # + zoom and jitter
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    return w * c + h * s, w * s + h * c


def _try_layout(looks: list[PillLook], size: tuple[int, int], scale: float,
                layout: random.Random) -> list[tuple[float, float, float]] | None:
    w, h = size
    margin, gap = 0.03 * w, 0.02 * w
    placed: list[tuple[int, int, int, int]] = []
    out = []
    for look in looks:
        angle = _combo_angle(look, layout)
        bw, bh = _nominal_box(look, angle, scale)
        for _ in range(40):
            cx = layout.uniform(margin + bw / 2, max(margin + bw / 2, w - margin - bw / 2))
            cy = layout.uniform(margin + bh / 2, max(margin + bh / 2, h - margin - bh / 2))
            box = (int(cx - bw / 2), int(cy - bh / 2), int(bw), int(bh))
            if not _overlaps(box, placed, int(gap)):
                break
        else:
            return None
        placed.append(box)
        out.append((angle, cx, cy))
    return out


def combo_layout(looks: list[PillLook], size: tuple[int, int], scale: float,
                 layout: random.Random) -> list[tuple[float, float, float]]:
    """(angle, centre x, centre y) per pill: spread over the frame by rejection sampling, never touching (a gap of
    2 % of the width). It depends on the looks and the layout seed only, so every shot of a combination agrees."""
    for _ in range(50):  # a crowded start leaves no room for the last pill: start again
        out = _try_layout(looks, size, scale, layout)
        if out is not None:
            return out
    # Pills too large for the frame (never with real sizes): a column, each pill in its own band, no overlap.
    band = size[1] / len(looks)
    return [(0.0, size[0] / 2, band * (i + 0.5)) for i in range(len(looks))]


def style_of(looks: list[PillLook], cond: PhotoConditions, seed: int, layout_seed: int | None = None,
             shares: StyleShares | None = None) -> PhotoStyle:
    """The photometric style render_photo gives these arguments (backdrop, dish, light, blur, noise, JPEG); other
    `shares` of variety (synth_style.HARD_SHARES, PLAIN_SHARES) for a style to pass to render_photo."""
    scene_seed = seed if layout_seed is None else layout_seed
    return photo_style(cond.back_color, cond.light_color, len(looks), seed, scene_seed, shares)


def render_photo(looks: list[PillLook], cond: PhotoConditions, scale: float, seed: int,
                 layout_seed: int | None = None, style: PhotoStyle | None = None,
                 ) -> tuple[bytes, list[tuple[int, int, int, int]], tuple[int, int]]:
    """Render one photo of `looks` (1 = single, 2-4 = combination); returns PNG bytes, one bbox per pill, size.

    `layout_seed` fixes where and how the pills lie, and the scene (backdrop, dish), so that the shots of one
    combination at several camera elevations show the same arrangement (as the real ones do); `seed` varies
    everything else. `style` (default: style_of the same arguments) sets the photometric look.
    """
    rng = random.Random(seed)
    size = (max(32, round(FULL_W * scale)), max(32, round(FULL_H * scale)))
    layout = random.Random(seed if layout_seed is None else layout_seed)
    style = style or style_of(looks, cond, seed, layout_seed)
    # a single pill is centred once its size is known
    placements = [None] if len(looks) == 1 else combo_layout(looks, size, scale, layout)
    canvas = background(style, size)
    boxes: list[tuple[int, int, int, int]] = []
    for look, placement in zip(looks, placements, strict=True):
        if placement is None:
            sprite = _sprite(look, cond, scale, look.base_angle + cond.camera_lo + rng.uniform(-12, 12), rng)
            pos = _single_position(sprite, size, rng)
        else:
            angle, cx, cy = placement
            sprite = _sprite(look, cond, scale, angle + rng.uniform(-2, 2), rng)
            pos = (round(cx - sprite.width / 2), round(cy - sprite.height / 2))
        _shadow(canvas, sprite, pos)
        canvas.paste(sprite, pos, sprite)
        x0, y0, x1, y1 = _opaque_bbox(sprite)
        boxes.append(_clip_box((pos[0] + x0, pos[1] + y0, x1 - x0, y1 - y0), size))
    return finish(canvas, style, scale, rng.getrandbits(32)), boxes, size


def box_stats(boxes: list[tuple[int, int, int, int]], scale: float) -> dict[str, list[float]]:
    """Box width and height percentiles (5, 25, 50, 75, 95) at the real photo resolution."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale
    return {name: [round(float(v)) for v in np.percentile(arr[:, col], (5, 25, 50, 75, 95))]
            for name, col in (("width", 2), ("height", 3))} if len(arr) else {}

