"""Image I/O shared by training data, inference and serving: raw bytes of a file or a `zip:` member, and the one
decoder (size limits checked before any pixel is decoded, EXIF orientation applied, every PIL mode made RGB).

Kept torch-free (PIL, numpy and the standard library only) so that the HTTP app and the data scan can read images
without paying for torch.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import struct
import sys
import threading
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pillsnap.utils.zips import ZipIndex

LOGGER = logging.getLogger(__name__)

# Everything a missing, truncated or corrupt image (or zip member) can raise while being read or decoded.
DECODE_ERRORS = (OSError, UnidentifiedImageError, zipfile.BadZipFile, KeyError, ValueError, EOFError)
# What PIL's format plugins raise on damaged bytes besides OSError: the AVIF and WebP decoders raise RuntimeError
# ("Failed to decode frame 0"), header parsers SyntaxError, struct.error, IndexError, TypeError or an arithmetic
# error on nonsense fields. Each is "this file is not a readable photo", never a server fault.
PIL_DECODE_ERRORS = (*DECODE_ERRORS, RuntimeError, SyntaxError, struct.error, IndexError, TypeError,
                     ZeroDivisionError, OverflowError)

# Formats a photo arrives in. Naming them keeps PIL from handing an upload to a plugin that shells out
# (EPS runs Ghostscript) or parses exotic containers nobody photographs pills with.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "TIFF", "GIF")  # JPEG covers phones' multi-picture MPO
# HEIC, the format iPhones save photos in, is read by pillow-heif, loaded only when a file's header says HEIF
HEIF_FORMAT = "HEIF"
# The ISO media brands of HEIF stills and sequences (HEVC-coded); "mif1"/"msf1" are shared with AVIF, whose own
# plugin is tried first
SHARED_BRANDS = (b"mif1", b"msf1")
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", *SHARED_BRANDS)
# File names of those formats (a folder given to `pillsnap predict` is read for these)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".avif", ".heic", ".heif", ".bmp", ".tif", ".tiff", ".gif")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
TRANSPARENT_BACKDROP = (255, 255, 255)  # transparent pixels become white, as a browser shows them on a page
# Training pixels kept as JPEGs (the crop cache, the detector's resized photos): quality 95 with colour at full
# resolution (no 4:2:0 subsampling), since a pill's colour and the thin strokes of its imprint tell drugs apart. It
# changes a crop by 0.7 grey levels on average (bench/bench_data_cache.py), less than training's colour jitter does.
JPEG_QUALITY = 95

_ZIPS: dict[str, ZipIndex] = {}
_ZIPS_LOCK = threading.Lock()
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class ImageError(OSError):
    """An image that cannot be used: undecodable, of an unsupported format or mode. An OSError, so that callers
    that drop unreadable samples (DECODE_ERRORS) keep doing so."""


class ImageTooLarge(ImageError):
    """More pixels than the limit: refused from the header, before the pixels are decoded."""


class ImageTooSmall(ImageError):
    """Too few pixels to hold a recognisable pill."""


@dataclass(frozen=True)
class ImageLimits:
    """What the decoder accepts and how it turns photos. max_pixels bounds the decoded memory (about 3 bytes a pixel,
    12 for 16-bit images while they are rescaled); min_side refuses thumbnails in which no pill can be seen;
    upright applies the EXIF orientation (photos from people), which labelled data must not get: its boxes are in
    the stored pixel frame."""

    max_pixels: int = 50_000_000
    min_side: int = 1
    upright: bool = True


DEFAULT_LIMITS = ImageLimits()


def _zip_index(path: str) -> ZipIndex:
    # One compact index per zip and process (reads use os.pread, so one inherited through fork stays correct);
    # built under a lock, since the HTTP server's threads may ask for the same zip at once.
    index = _ZIPS.get(path)
    if index is None:
        with _ZIPS_LOCK:
            index = _ZIPS.get(path)
            if index is None:
                index = _ZIPS[path] = ZipIndex(path)
    return index


def split_zip_path(path: str) -> tuple[str, str]:
    """`zip:<zip path>!<member>` -> (zip path, member)."""
    body = path[len("zip:"):]
    zip_path, sep, member = body.partition(".zip!")
    if not sep or not member:
        raise ValueError(f"Bad zip image path {path!r}: expected zip:<file>.zip!<member>")
    return zip_path + ".zip", member


def read_bytes(path: str) -> bytes:
    """Raw bytes of a file or of a `zip:<zip>!<member>` entry."""
    if path.startswith("zip:"):
        zip_path, member = split_zip_path(path)
        return _zip_index(zip_path).read(member)
    with open(path, "rb") as fh:
        return fh.read()


def is_heif(head: bytes) -> bool:
    """Whether bytes start like a HEIF file (an ISO media `ftyp` box with a HEIF brand)."""
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


@functools.cache
def _heif_plugin() -> bool:
    """Register pillow-heif's opener once per process; False when it is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    # a photo's thumbnails, depth maps and auxiliary images are never used: not decoded
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    return True


def _formats_for(head: bytes) -> tuple[str, ...]:
    if not is_heif(head):
        return PHOTO_FORMATS
    if not _heif_plugin():
        if head[8:12] in SHARED_BRANDS:  # may be an AVIF, which Pillow reads itself
            return PHOTO_FORMATS
        raise ImageError("it is a HEIC/HEIF photo, and pillow-heif, which reads them, is not installed: "
                         "pip install pillow-heif, or convert the photo to JPEG")
    return (*PHOTO_FORMATS, HEIF_FORMAT)


def _pil_open(fp: io.BytesIO) -> Image.Image:
    # ultralytics replaces PIL.Image.open with a wrapper that tries to pip-install pi-heif when a file is not
    # identified; a corrupt pill photo must simply fail (and be dropped), so use PIL's own opener.
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) or Image.open
    return opener(fp, formats=_formats_for(fp.getbuffer()[:12].tobytes()))


def _clean(err: BaseException) -> str:
    # PIL names the buffer it read ("<_io.BytesIO object at 0x7f...>"); a client has no use for an address.
    return _OBJECT_REPR.sub("the data", str(err)) or type(err).__name__


def jpeg_bytes(image: Image.Image) -> bytes:
    """`image` as the JPEG that training pixels are kept in (JPEG_QUALITY, colour at full resolution)."""
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def check_image_size(size: tuple[int, int], name: str, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Raise ImageTooLarge / ImageTooSmall when a (width, height) falls outside `limits`."""
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"Image {name} is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the "
                            f"{limits.max_pixels / 1e6:g} megapixel limit; send it resized (e.g. 4000 px on the long "
                            f"side) or raise serving.max_image_pixels")
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(f"Image {name} is {width}x{height}: too small to hold a pill (the shorter side must be "
                            f"at least {limits.min_side} px); send the original photo, not a thumbnail")


def upright(image: Image.Image, name: str = "<image>", in_place: bool = False) -> Image.Image:
    """The image turned the way the camera's EXIF orientation says (Image.open does not), so that boxes are in the
    frame people see: `image` itself when `in_place` (no copy of a large photo without the tag; a photo we decoded),
    else a copy, the caller's image left as it was. One already turned (exif_transpose drops the tag) is not turned
    again; an unreadable EXIF block is ignored, with a warning."""
    try:
        turned = ImageOps.exif_transpose(image, in_place=in_place)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error) as err:  # a corrupt EXIF block
        LOGGER.warning("ignoring the unreadable EXIF orientation of %s: %s", name, _clean(err))
        return image
    return image if in_place else turned


def _rescale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """High bit-depth grey -> 0..255. 16-bit modes use their full range; 32-bit int and float images have no
    declared range, so 8-bit-looking values are kept and anything else is stretched from min to max."""
    values = array.astype(np.float32)
    if mode.startswith("I;16"):
        return (values / 257.0).round().astype(np.uint8)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return (values * 255.0).round().astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return values.round().astype(np.uint8)
    if low >= 0.0 and high <= 65535.0:
        return (values / 257.0).round().astype(np.uint8)
    return ((values - low) / max(high - low, 1e-12) * 255.0).round().astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. PIL's own convert("RGB") clips 16-bit grey to white and drops alpha onto
    black; here 16-bit and float images are rescaled and transparent pixels are laid on a white backdrop."""
    mode = image.mode
    if mode in HIGH_DEPTH_MODES:
        return Image.fromarray(_rescale_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKDROP, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _decode(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    try:
        image = _pil_open(io.BytesIO(data))
    except ImageError as err:
        raise ImageError(f"Cannot read image {name}: {err}") from err
    check_image_size(image.size, name, limits)  # from the header: nothing is decoded yet
    image.load()
    return to_rgb(upright(image, name, in_place=True) if limits.upright else image)


def decode_image(data: bytes, name: str = "<bytes>", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode encoded image bytes as upright 8-bit RGB.

    Raises ImageTooLarge / ImageTooSmall outside `limits` (checked before decoding), else ImageError naming
    `name` for anything that is not a readable photo."""
    if not data:  # a zero-byte file (an interrupted copy or download) is not an unknown format
        raise ImageError(f"Cannot read image {name}: the file is empty (0 bytes)")
    try:
        return _decode(data, name, limits)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own ceiling, above any sane max_pixels
        raise ImageTooLarge(f"Image {name} is too large to decode: {_clean(err)}") from err
    except UnidentifiedImageError as err:
        if is_heif(data[:12]):  # the header says HEIF, the body is not readable
            raise ImageError(f"Cannot read image {name}: a damaged HEIC/HEIF file") from err
        raise ImageError(f"Cannot read image {name}: not a supported image file "
                         f"({', '.join((*PHOTO_FORMATS, 'HEIC'))}); "
                         f"convert it, e.g. to JPEG") from err
    except PIL_DECODE_ERRORS as err:
        raise ImageError(f"Cannot read image {name}: {_clean(err)}") from err


def read_image(path: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode an image (plain path or `zip:<zip>!<member>`) as upright RGB; errors name the path."""
    try:
        data = read_bytes(str(path))
    except DECODE_ERRORS as err:
        raise ImageError(f"Cannot read image {path}: {_clean(err)}") from err
    return decode_image(data, str(path), limits)
