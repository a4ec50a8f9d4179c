"""What varies from one synthetic photo to the next besides the pills: backdrop colour, a white dish or tray in the
frame, light colour and falloff, lens blur, sensor noise and JPEG compression.

Most photos look like the real set (docs/REAL_DATA.md: a matte blue-grey backdrop, evenly lit, sharp); a share gets
the variety a detector meets elsewhere (grey or light backdrops, a dish rim it must not box, casts, blur, noise,
JPEG), so that it learns pills rather than our renderer. A style is a pure function of the photo's seeds.
"""

from __future__ import annotations

import colorsys
import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# Backdrops by file-name code. "2" (연회색 배경 in the labels) is the matte blue-grey of the real photos, median
# border RGB (90, 100, 140); 0 and 1 are our own darker and bluer variants.
BACKGROUND = {"0": (52, 56, 66), "1": (70, 88, 140), "2": (90, 100, 140)}
ALT_BACKGROUND = (128, 143, 146)  # one real photo's greener grey: a few photos use it
LIGHT_TINT = {"0": (1.0, 1.0, 1.0), "1": (0.97, 1.0, 1.04), "2": (1.03, 1.0, 0.96)}  # neutral, daylight, warm


@dataclass(frozen=True)
class StyleShares:
    """How often each kind of variety appears (the rest of the photos look like the real set)."""

    backdrop: tuple[tuple[str, float], ...] = (("real", 0.64), ("hue", 0.14), ("grey", 0.13), ("light", 0.09))
    # Single-pill photos keep the studio backdrop: the real single-pill set is shot on it, the detector does not
    # train on them, and the classifier's crops would otherwise learn backdrops instead of pills (on the test
    # fixture, held-out drugs looked more known than known ones: AUROC 0.13).
    backdrop_single: tuple[tuple[str, float], ...] = (("real", 1.0),)
    # Single-pill photos get no dish and no strong falloff: single mode finds its pill as what stands out from an
    # evenly lit plain backdrop (infer/preprocess.py locate_pill), as the real studio shots allow.
    dish_single: float = 0.0
    dish_combination: float = 0.35
    cast: float = 0.3  # a colour cast beyond the file name's light colour
    falloff: float = 0.3  # strong vignetting (combination photos)
    jpeg: float = 0.5
    blur: tuple[tuple[str, float], ...] = (("lens", 0.45), ("defocus", 0.12), ("motion", 0.08))  # sharp: the rest


SHARES = StyleShares()  # the generator's mix
# Held-out "hard" photos (bench/detector_transfer.py): most of them off the real look.
_HARD_BACKDROPS = (("real", 0.2), ("hue", 0.25), ("grey", 0.35), ("light", 0.2))
HARD_SHARES = StyleShares(backdrop=_HARD_BACKDROPS, backdrop_single=_HARD_BACKDROPS, dish_single=0.5,
                          dish_combination=0.6, cast=0.6, falloff=0.6, jpeg=0.8,
                          blur=(("lens", 0.3), ("defocus", 0.3), ("motion", 0.25)))
# Every photo the real look: backdrop by its file-name code, no dish, cast, strong falloff, JPEG or strong blur.
PLAIN_SHARES = StyleShares(backdrop=(("real", 1.0),), dish_single=0.0, dish_combination=0.0, cast=0.0,
                           falloff=0.0, jpeg=0.0, blur=(("lens", 0.5),))


@dataclass(frozen=True)
class Dish:
    """A white dish (ellipse) or tray (rounded rectangle): a bright distractor that is never labelled."""

    kind: str  # "dish" | "tray"
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the frame (may reach past it)
    rgb: tuple[int, int, int]
    rim: float  # rim width, as a share of the dish's smaller side


@dataclass(frozen=True)
class PhotoStyle:
    """The look of one photo apart from its pills. Scene fields (backdrop, dish) are shared by the shots of one
    combination; the rest (light, lens, sensor, file) vary per shot. Blur sizes are in pixels of a full-size
    976x1280 photo."""

    backdrop_kind: str  # real | hue | grey | light
    backdrop: tuple[float, float, float]  # RGB before the light
    dish: Dish | None
    cast: tuple[float, float, float]  # gains per channel: light colour, white balance and exposure
    falloff: float  # share of brightness lost in the corners (vignetting)
    falloff_centre: tuple[float, float]  # centre of the light, -1..1 in x and y
    blur: str  # "" | lens | defocus | motion
    blur_px: float
    motion_angle: float  # degrees, for motion blur
    noise: float  # sensor noise sigma, grey levels
    chroma_noise: bool  # noise per channel rather than in brightness only
    jpeg_quality: int  # 0: no JPEG round trip


def _pick(rng: random.Random, shares: tuple[tuple[str, float], ...]) -> str:
    names, weights = [n for n, _ in shares], [w for _, w in shares]
    return rng.choices([*names, ""], weights=[*weights, max(1.0 - sum(weights), 0.0)])[0]


def _backdrop(back_color: str, kind: str, rng: random.Random) -> tuple[float, float, float]:
    if kind == "grey":
        level, tint = rng.uniform(70, 165), rng.uniform(-5, 5)
        return level + tint, level, level - tint
    if kind == "light":
        level = rng.uniform(165, 215)
        return level, level + rng.uniform(-3, 3), level + rng.uniform(-2, 8)
    base = BACKGROUND.get(back_color, BACKGROUND["2"])
    if back_color == "2" and rng.random() < 0.1:
        base = ALT_BACKGROUND
    if kind == "hue":  # around the real blue-grey: hue turned, saturation and brightness changed
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in BACKGROUND["2"]))
        r, g, b = colorsys.hsv_to_rgb((h + rng.uniform(-0.09, 0.09)) % 1.0, s * rng.uniform(0.4, 1.3),
                                      min(1.0, v * rng.uniform(0.7, 1.35)))
        return r * 255, g * 255, b * 255
    gain = rng.uniform(0.92, 1.08)
    return tuple(c * gain + rng.uniform(-3, 3) for c in base)  # type: ignore[return-value]


def _dish(rng: random.Random) -> Dish:
    """Half of the dishes only reach into the frame from an edge or a corner (a rim beside the pills); the others
    lie under the middle of the frame (pills on it)."""
    kind = "dish" if rng.random() < 0.65 else "tray"
    w, h = rng.uniform(0.55, 1.1), rng.uniform(0.4, 0.85)
    if rng.random() < 0.5:
        cx, cy = rng.choice((-0.05, 1.05)) + rng.uniform(-0.12, 0.12), rng.uniform(-0.1, 1.1)
        if rng.random() < 0.5:
            cx, cy = rng.uniform(-0.1, 1.1), rng.choice((-0.05, 1.05)) + rng.uniform(-0.1, 0.1)
    else:
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    level = rng.uniform(222, 250)
    rgb = (round(level), round(level + rng.uniform(-3, 3)), round(level + rng.uniform(-2, 6)))
    return Dish(kind, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), rgb, rng.uniform(0.06, 0.14))


def photo_style(back_color: str, light_color: str, n_pills: int, seed: int, scene_seed: int,
                shares: StyleShares | None = None) -> PhotoStyle:
    """The style of one photo: the scene from `scene_seed` (the combination's layout seed), the shot from `seed`;
    `shares` (default SHARES, the generator's mix) says how often each kind of variety appears."""
    shares = shares or SHARES
    scene, shot = random.Random(f"scene:{scene_seed}"), random.Random(f"shot:{seed}")
    kind = _pick(scene, shares.backdrop if n_pills > 1 else shares.backdrop_single) or "real"
    backdrop = _backdrop(back_color, kind, scene)
    dish = _dish(scene) if scene.random() < (shares.dish_combination if n_pills > 1 else shares.dish_single) else None
    tint = np.array(LIGHT_TINT.get(light_color, (1.0, 1.0, 1.0))) * shot.uniform(0.92, 1.08)
    if shot.random() < shares.cast:  # a colour cast of the light or the white balance
        tint = tint * np.array([shot.uniform(0.9, 1.1) for _ in range(3)])
    strong = shot.random() < shares.falloff and n_pills > 1
    falloff = shot.uniform(0.12, 0.35) if strong else shot.uniform(0.0, 0.06)
    centre = (shot.uniform(-0.4, 0.4), shot.uniform(-0.4, 0.4))
    blur = _pick(shot, shares.blur)
    blur_px = {"lens": shot.uniform(0.6, 2.0), "defocus": shot.uniform(2.5, 6.0),
               "motion": shot.uniform(4.0, 12.0)}.get(blur, 0.0)
    noise = shot.uniform(1.0, 3.0) if shot.random() < 0.7 else shot.uniform(3.0, 7.0)
    jpeg = shot.randint(55, 95) if shot.random() < shares.jpeg else 0
    return PhotoStyle(kind, backdrop, dish, tuple(float(t) for t in tint), falloff, centre, blur, blur_px,  # type: ignore[arg-type]
                      shot.uniform(0, 180), noise, shot.random() < 0.25, jpeg)


def _dish_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, ...], fill: int) -> None:
    if kind == "dish":
        draw.ellipse(box, fill=fill)
    else:
        draw.rounded_rectangle(box, radius=int(min(box[2] - box[0], box[3] - box[1]) * 0.12), fill=fill)


def draw_dish(canvas: Image.Image, dish: Dish) -> None:
    """The dish on the backdrop: a soft shadow, a bright rim with a highlight and a slightly darker well."""
    w, h = canvas.size
    box = (dish.box[0] * w, dish.box[1] * h, dish.box[2] * w, dish.box[3] * h)
    rim = dish.rim * min(box[2] - box[0], box[3] - box[1])
    small = Image.new("L", (max(4, w // 4), max(4, h // 4)), 0)  # the shadow is smooth: drawn small, enlarged
    off = 0.012 * w
    _dish_shape(ImageDraw.Draw(small), dish.kind, tuple((v + off) / 4 for v in box), 110)
    shadow = small.filter(ImageFilter.GaussianBlur(max(1.0, w * 0.006))).resize(canvas.size, Image.BILINEAR)
    canvas.paste((8, 10, 18), (0, 0), shadow)
    rgb = np.array(dish.rgb, dtype=np.float32)
    layers = ((box, rgb), ((box[0] + rim * 0.35, box[1] + rim * 0.2, box[2] - rim * 0.35, box[3] - rim * 0.5),
                           rgb * 1.02), ((box[0] + rim, box[1] + rim, box[2] - rim, box[3] - rim), rgb * 0.88),
              ((box[0] + rim * 1.1, box[1] + rim * 1.25, box[2] - rim * 1.0, box[3] - rim * 0.95), rgb * 0.95))
    mask = Image.new("L", canvas.size, 0)
    mdraw = ImageDraw.Draw(mask)
    for layer_box, colour in layers:  # rim, its highlight, the step down into the well, the well
        if layer_box[2] - layer_box[0] < 2 or layer_box[3] - layer_box[1] < 2:
            continue
        mdraw.rectangle((0, 0, w, h), fill=0)
        _dish_shape(mdraw, dish.kind, layer_box, 255)
        canvas.paste(tuple(int(c) for c in np.clip(colour, 0, 255)), (0, 0), mask)


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), dtype=np.float32)
    c = (length - 1) / 2
    t = np.linspace(-c, c, 4 * length)
    xs = np.clip(np.round(c + t * np.cos(np.radians(angle))), 0, length - 1).astype(int)
    ys = np.clip(np.round(c + t * np.sin(np.radians(angle))), 0, length - 1).astype(int)
    k[ys, xs] = 1.0
    return k / k.sum()


def _blur(canvas: Image.Image, style: PhotoStyle, scale: float) -> Image.Image:
    px = style.blur_px * scale
    if style.blur in ("lens", "defocus"):
        return canvas.filter(ImageFilter.GaussianBlur(max(0.3, px / 2)))
    if style.blur == "motion" and px >= 1.5:
        length = 5 if px >= 3.5 else 3  # PIL kernels are 3x3 or 5x5: a short streak, as a hand-held shake gives
        kernel = _motion_kernel(length, style.motion_angle)
        return canvas.filter(ImageFilter.Kernel((length, length), kernel.ravel().tolist(), scale=1.0))
    return canvas


def _falloff(canvas: Image.Image, style: PhotoStyle) -> Image.Image:
    """Darken away from the light's centre. The map is smooth: computed on a coarse grid, enlarged, and applied as
    an 8-bit multiply (a float pass over the whole photo would cost as much as the pills)."""
    ys = np.linspace(-1.0, 1.0, 20, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, 16, dtype=np.float32)[None, :]
    cx, cy = style.falloff_centre
    coarse = 1.0 - style.falloff * np.clip(((xs - cx) ** 2 + (ys - cy) ** 2) / 2.0, 0.0, 1.0)
    gain = Image.fromarray(np.round(coarse * 255).astype(np.uint8), "L").resize(canvas.size, Image.BILINEAR)
    return ImageChops.multiply(canvas, Image.merge("RGB", (gain, gain, gain)))


def finish(canvas: Image.Image, style: PhotoStyle, scale: float, noise_seed: int) -> bytes:
    """Lens blur, light (colour, exposure, falloff), sensor noise and the JPEG round trip; returns PNG bytes."""
    canvas = _blur(canvas, style, scale)
    if style.falloff > 0.004:  # below that, under one grey level anywhere
        canvas = _falloff(canvas, style)
    arr = np.asarray(canvas, dtype=np.float32)  # a fresh array: modified in place below
    arr *= np.array(style.cast, dtype=np.float32)
    shape = arr.shape if style.chroma_noise else arr.shape[:2]
    noise = np.random.default_rng(noise_seed).standard_normal(shape, dtype=np.float32) * style.noise
    arr += noise if style.chroma_noise else noise[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "RGB")
    if style.jpeg_quality:  # the artefacts of a JPEG camera file, kept in our PNG
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=style.jpeg_quality)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)  # speed over size: synthetic data is regenerated at will
    return buf.getvalue()
