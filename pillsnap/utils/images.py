"""Image I/O shared by training data, inference and serving: raw bytes of a file or a `zip:` member, and decoding.

Kept torch-free (PIL and the standard library only) so that the HTTP app and the data scan can read images
without paying for torch.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

from PIL import Image, UnidentifiedImageError

# Everything a missing, truncated or corrupt image (or zip member) can raise while being read or decoded.
DECODE_ERRORS = (OSError, UnidentifiedImageError, zipfile.BadZipFile, KeyError, ValueError, EOFError)

_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _zip_file(path: str) -> zipfile.ZipFile:
    # Keyed by pid: a ZipFile inherited through fork shares its file offset with the parent (corrupt reads).
    key = (os.getpid(), path)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


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
        return _zip_file(zip_path).read(member)
    with open(path, "rb") as fh:
        return fh.read()


def _pil_open(fp: io.BytesIO) -> Image.Image:
    # ultralytics replaces PIL.Image.open with a wrapper that tries to pip-install pi-heif when a file is not
    # identified; a corrupt pill photo must simply fail (and be dropped), so use PIL's own opener.
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) or Image.open
    return opener(fp)


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes as RGB; an undecodable image raises OSError naming `name`."""
    try:
        return _pil_open(io.BytesIO(data)).convert("RGB")
    except DECODE_ERRORS as err:
        raise OSError(f"Cannot read image {name}: {err}") from err


def read_image(path: str) -> Image.Image:
    """Decode an image (plain path or `zip:<zip>!<member>`) as RGB; errors name the path."""
    try:
        data = read_bytes(str(path))
    except DECODE_ERRORS as err:
        raise OSError(f"Cannot read image {path}: {err}") from err
    return decode_image(data, str(path))
