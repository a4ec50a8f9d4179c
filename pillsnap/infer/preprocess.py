"""Image handling for inference: decoding, the single-photo crop, bbox+margin crops, the YOLO letterbox and the one
pill-against-backdrop segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pillsnap.utils.boxes import xyxy_to_xywh
from pillsnap.utils.images import read_image, to_rgb, upright

if TYPE_CHECKING:
    import torch

LETTERBOX_FILL = (114, 114, 114)  # ultralytics' padding grey, so the detector sees what it trained on


def load_image(image: Any) -> tuple[Image.Image, str | None]:
    """(RGB PIL image, its name) from a path / 'zip:<zip>!<member>' string, a PIL image or an HxWx3 uint8 array.
    A PIL image is read as a file would be (EXIF orientation, any mode to RGB), without changing the caller's."""
    if isinstance(image, (str, Path)):
        text = str(image)
        if not text.startswith("zip:") and not Path(text).is_file():
            raise FileNotFoundError(f"Image not found: {text}")
        return read_image(text).convert("RGB"), text
    if isinstance(image, Image.Image):  # decoded as a file is: upright, transparency on white, 16-bit rescaled
        name = getattr(image, "filename", None) or None
        return to_rgb(upright(image, name or "<image>")), name
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"array images must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image, "RGB"), None
    raise TypeError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def single_crop_box(size: tuple[int, int], fraction: float) -> tuple[int, int, int, int]:
    """Centred square [x, y, w, h] with side `fraction` x the shorter side (1.0 = the whole image)."""
    w, h = size
    if fraction >= 1.0:
        return 0, 0, w, h
    side = max(1, int(round(min(w, h) * fraction)))
    return (w - side) // 2, (h - side) // 2, side, side


def single_photo_crop(image: Image.Image, margin: float, locate: bool = True,
                      fraction: float = 1.0) -> tuple[Image.Image, Sequence[float], bool]:
    """A single-pill photo's crop as inference cuts it: (crop, box [x, y, w, h], whether the pill was located).
    Cropped like training when the pill stands out on its backdrop (locate_pill), else a centred square of
    `fraction` of the shorter side."""
    box = locate_pill(image) if locate else None
    if box is not None:
        return crop_pill(image, box, margin), box, True
    x, y, w, h = square = single_crop_box(image.size, fraction)
    return image.crop((x, y, x + w, y + h)), square, False


def crop_pill(image: Image.Image, box: Sequence[float], margin: float) -> Image.Image:
    """The training crop of a pill box [x, y, w, h]: pillsnap.data.crop_box's square, grown by `margin`."""
    from pillsnap.data import crop_box

    x, y, w, h = (float(v) for v in box)
    return image.crop(crop_box(image.width, image.height, (x, y, max(w, 1.0), max(h, 1.0)), margin))


def letterbox(image: Image.Image, size: int) -> tuple[torch.Tensor, float, tuple[float, float]]:
    """Resize the long side to `size`, pad to a square: ([1, 3, S, S] float in [0, 1], scale, (pad_x, pad_y))."""
    import torch  # here, so that the segmentation below (used by the imprint reader) does not load torch

    w, h = image.size
    scale = min(size / w, size / h)
    new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    pad_x, pad_y = (size - new_w) / 2, (size - new_h) / 2
    canvas = Image.new("RGB", (size, size), LETTERBOX_FILL)
    canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (int(round(pad_x - 0.1)), int(round(pad_y - 0.1))))
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous(), scale, (pad_x, pad_y)


def unletterbox_boxes(xyxy: np.ndarray, scale: float, pad: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Letterboxed xyxy boxes -> [x, y, w, h] in original image pixels, clipped to the image."""
    if len(xyxy) == 0:
        return np.zeros((0, 4))
    boxes = (np.asarray(xyxy, dtype=np.float64) - [pad[0], pad[1], pad[0], pad[1]]) / scale
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, size[0])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, size[1])
    return xyxy_to_xywh(boxes)


# Pill against backdrop, the one segmentation of the package: single mode's locate_pill on whole photos and the
# imprint reader on crops. AI Hub photos put pills on a plain backdrop, and the frame of a photo or of a crop (grown
# by a margin around the pill) shows only backdrop.
BORDER_PX = 2  # the frame taken as backdrop
MIN_CONTRAST = 30.0  # RGB distance from the backdrop below which a pixel is backdrop, whatever the rest
# A pill pixel is at least this share of the strongest contrasts (the 95th percentile, robust to specks) away from
# the backdrop: on a crop, where the pill is much of the picture, it drops the shadow around the pill; on a whole
# photo the percentile falls on the backdrop and MIN_CONTRAST rules.
CONTRAST_SHARE, CONTRAST_PERCENTILE = 0.5, 95
MIN_PILL_PIXELS = 4  # fewer pixels standing out are noise, not a pill


def backdrop_distance(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the RGB distance from the backdrop, a per-channel plane fit to the frame: it follows the lamp's
    falloff across a photo (a flat colour does not), and unlike a curved surface it cannot bulge inside a crop,
    whose frame is close to the pill."""
    arr = np.asarray(rgb, dtype=np.float32)
    h, w, _ = arr.shape
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), dtype=bool)
    border[:BORDER_PX], border[-BORDER_PX:], border[:, :BORDER_PX], border[:, -BORDER_PX:] = True, True, True, True
    design = np.stack([np.ones((h, w)), xs / max(w - 1, 1), ys / max(h - 1, 1)], -1)
    coef, *_ = np.linalg.lstsq(design[border], arr[border], rcond=None)
    return np.linalg.norm(arr - design @ coef, axis=-1)


def pill_mask(rgb: np.ndarray) -> np.ndarray:
    """HxW bool: the pixels of the pill(s) in an RGB photo or crop on a plain backdrop."""
    distance = backdrop_distance(rgb)
    return distance > max(MIN_CONTRAST, CONTRAST_SHARE * float(np.percentile(distance, CONTRAST_PERCENTILE)))


def locate_pill(image: Image.Image, work_px: int = 160,
                min_fraction: float = 0.001) -> tuple[int, int, int, int] | None:
    """[x, y, w, h] of what stands out from the plain background (AI Hub photos: one pill on a plain backdrop),
    or None when nothing does (fewer than `min_fraction` of the pixels). Cheap (no detector, the photo shrunk to
    `work_px`): lets single mode crop like the training crops."""
    small = image.copy()
    small.thumbnail((work_px, work_px))
    mask = pill_mask(np.asarray(small))
    if mask.sum() < max(MIN_PILL_PIXELS, min_fraction * mask.size):
        return None
    ys, xs = np.nonzero(mask)
    # Percentiles, not min/max, so that a few noisy pixels do not stretch the box.
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    sx, sy = image.width / small.width, image.height / small.height
    return int(x0 * sx), int(y0 * sy), max(1, int((x1 - x0 + 1) * sx)), max(1, int((y1 - y0 + 1) * sy))
