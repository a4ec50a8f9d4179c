"""The one image decoder: size limits from the header (before decoding), EXIF orientation, every PIL mode made RGB
correctly, thumbnails refused, clean errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from pillsnap.utils.images import (
    ImageError,
    ImageLimits,
    ImageTooLarge,
    ImageTooSmall,
    decode_image,
    read_image,
    to_rgb,
)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A real, decodable side x side grey PNG of zeros: a few hundred KB that would decode to side^2 bytes."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """Only the header of a huge PNG (PIL's own bomb check fires at open, before any pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fails the test if any image's pixels get decoded."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self, *args, **kwargs):
        calls.append(self.size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_is_refused_from_the_header_without_decoding(no_pixel_decoding) -> None:
    bomb = png_bomb(13000)
    assert len(bomb) < 1_000_000  # small on the wire, 169 MB decoded
    with pytest.raises(ImageTooLarge, match=r"13000x13000 \(169.0 megapixels\), over the 50 megapixel limit"):
        decode_image(bomb, "bomb.png")
    assert no_pixel_decoding == []
    decode_image(encode(Image.new("RGB", (4, 4))))
    assert set(no_pixel_decoding) == {(4, 4)}  # the spy does see a decode


def test_pil_own_bomb_error_becomes_image_too_large() -> None:
    # 30000 x 30000 is over PIL's hard ceiling: its DecompressionBombError must not escape as an unknown error.
    with pytest.raises(ImageTooLarge, match="too large to decode"):
        decode_image(png_header(30000, 30000), "huge.png", ImageLimits(max_pixels=10**12))
    with pytest.raises(ImageTooLarge):
        decode_image(png_header(30000, 30000), "huge.png")


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (40, 30)))
    assert decode_image(data, limits=ImageLimits(max_pixels=1200)).size == (40, 30)
    with pytest.raises(ImageTooLarge, match="over the 0.001199 megapixel limit"):
        decode_image(data, limits=ImageLimits(max_pixels=1199))


def test_tiny_images_are_refused_only_when_asked() -> None:
    one = encode(Image.new("RGB", (1, 1), (200, 0, 0)))
    assert decode_image(one).size == (1, 1)  # the default (data loading) accepts any size
    with pytest.raises(ImageTooSmall, match=r"1x1: too small to hold a pill .* at least 32 px"):
        decode_image(one, "dot.png", ImageLimits(min_side=32))
    with pytest.raises(ImageTooSmall):
        decode_image(encode(Image.new("RGB", (500, 20))), limits=ImageLimits(min_side=32))


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 230))
    stored.paste((230, 0, 0), (0, 0, 20, 20))  # left half red, as stored by the camera
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image = decode_image(encode(stored, "JPEG", exif=exif, quality=95), "phone.jpg")
    assert image.size == (20, 40)  # upright: portrait
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # the stored left side is now on top


def test_16_bit_grey_is_rescaled_not_clipped_to_white() -> None:
    grey16 = Image.fromarray(np.full((40, 40), 128 * 257, dtype=np.uint16))
    data = encode(grey16)
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL's own convert
    assert decode_image(data).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode,value", [("RGBA", (10, 200, 30, 0)), ("LA", (40, 0)), ("PA", (3, 0))])
def test_transparent_pixels_become_white(mode: str, value: tuple) -> None:
    image = Image.new(mode, (40, 40), value)
    if mode == "PA":
        image.putpalette([0, 0, 0] * 256)
    image.putpixel((5, 5), (10, 200, 30, 255) if mode == "RGBA" else (90, 255) if mode == "LA" else (3, 255))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((5, 5)) == {"RGBA": (10, 200, 30), "LA": (90, 90, 90), "PA": (0, 0, 0)}[mode]


def test_palette_with_transparency_and_cmyk() -> None:
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    decoded = decode_image(encode(palette, transparency=1))
    assert decoded.getpixel((0, 0)) == (255, 0, 0) and decoded.getpixel((9, 9)) == (255, 255, 255)
    cyan = decode_image(encode(Image.new("CMYK", (40, 40), (255, 0, 0, 0)), "JPEG", quality=95))
    assert np.allclose(cyan.getpixel((20, 20)), (0, 255, 255), atol=8)


def test_float_and_32_bit_images_keep_their_contrast() -> None:
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp, "F")))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    wide = np.asarray(to_rgb(Image.fromarray((np.arange(64) * 100_000).reshape(8, 8).astype(np.int32), "I")))
    assert wide[0, 0, 0] == 0 and wide[-1, -1, 0] == 255 and len(np.unique(wide)) > 32


def test_unreadable_and_unsupported_files_give_clean_errors(tmp_path) -> None:
    with pytest.raises(ImageError, match="not a supported image file") as err:
        decode_image(b"not an image at all", "junk.png")
    assert "0x" not in str(err.value)  # no buffer addresses in a message a client sees
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a supported image file"):  # never handed to Ghostscript
        decode_image(eps, "drawing.eps")
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    with pytest.raises(ImageError, match="truncated.jpg"):
        decode_image(truncated, "truncated.jpg")
    with pytest.raises(OSError, match="missing.png"):  # ImageError is an OSError: loaders keep dropping them
        read_image(str(tmp_path / "missing.png"))
    (tmp_path / "empty.jpg").write_bytes(b"")  # an interrupted copy: said as empty, not as an unknown format
    with pytest.raises(ImageError, match=r"empty.jpg: the file is empty \(0 bytes\)"):
        read_image(str(tmp_path / "empty.jpg"))


def corrupt_avif() -> bytes:
    """A tiny AVIF whose last bytes (inside the coded frame) are zeroed: PIL identifies it, then its AVIF plugin
    raises RuntimeError("Failed to decode frame 0") on load, as 14 of 580 mutated uploads did."""
    data = encode(Image.new("RGB", (64, 64), (200, 40, 120)), "AVIF")
    return data[:-16] + b"\0" * 16


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_a_corrupt_avif_is_an_image_error_naming_the_file() -> None:
    with pytest.raises(ImageError, match=r"Cannot read image broken\.avif: Failed to decode"):
        decode_image(corrupt_avif(), "broken.avif")


@pytest.mark.parametrize("raised", [RuntimeError("Failed to decode frame 0"), SyntaxError("bad header"),
                                    struct.error("unpack requires a buffer"), IndexError("list index"),
                                    TypeError("bad field"), ZeroDivisionError("division by zero")])
def test_every_plugin_failure_becomes_an_image_error(monkeypatch, raised: Exception) -> None:
    # Whatever a format plugin raises on damaged bytes, callers only ever see the decoder's ImageError.
    def broken_load(self, *args, **kwargs):
        raise raised

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageError, match="Cannot read image photo.png") as err:
        decode_image(encode(Image.new("RGB", (8, 8))), "photo.png")
    assert err.value.__cause__ is raised


def heic(image: Image.Image, **params) -> bytes:
    """`image` encoded as HEIC (HEVC), the format iPhones save photos in."""
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    pillow_heif.from_pillow(image).save(buf, quality=90, **params)
    return buf.getvalue()


def test_a_heic_photo_is_read_upright_once() -> None:
    stored = Image.new("RGB", (64, 32), (0, 0, 230))
    stored.paste((230, 0, 0), (0, 0, 32, 32))  # left half red, as stored by the camera
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": libheif turns it, the EXIF tag must not turn it again
    image = decode_image(heic(stored, exif=exif.tobytes()), "IMG_0001.HEIC")
    assert (image.mode, image.size) == ("RGB", (32, 64))
    top, bottom = np.asarray(image)[8, 16], np.asarray(image)[56, 16]
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # the stored left side is now on top


def test_a_heic_photo_over_the_limit_is_refused_before_decoding(monkeypatch) -> None:
    data = heic(Image.new("RGB", (64, 48), (10, 200, 10)))
    from pillow_heif.as_plugin import HeifImageFile

    decoded = []
    monkeypatch.setattr(HeifImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageTooLarge, match=r"IMG\.HEIC is 64x48"):
        decode_image(data, "IMG.HEIC", ImageLimits(max_pixels=64 * 48 - 1))
    assert decoded == []


def test_a_damaged_heic_and_a_missing_reader_are_named(monkeypatch) -> None:
    data = heic(Image.new("RGB", (64, 48), (10, 200, 10)))
    with pytest.raises(ImageError, match=r"Cannot read image cut\.heic: a damaged HEIC/HEIF file"):
        decode_image(data[:300], "cut.heic")
    zeroed = data[:-64] + bytes(64)
    with pytest.raises(ImageError, match=r"Cannot read image zeroed\.heic: "):
        decode_image(zeroed, "zeroed.heic")
    from pillsnap.utils import images

    monkeypatch.setattr(images, "_heif_plugin", lambda: False)  # a venv without pillow-heif
    with pytest.raises(ImageError, match=r"Cannot read image IMG\.HEIC: it is a HEIC/HEIF photo, .*pip install "
                                         r"pillow-heif"):
        decode_image(data, "IMG.HEIC")
    assert decode_image(encode(Image.new("RGB", (8, 8)))).size == (8, 8)  # other formats never ask for it
    if features.check("avif"):  # an AVIF whose main brand is the one it shares with HEIF: Pillow still reads it
        avif = encode(Image.new("RGB", (16, 16), (200, 40, 120)), "AVIF")
        assert avif[4:8] == b"ftyp"
        assert decode_image(avif[:8] + b"mif1" + avif[12:], "shared.avif").size == (16, 16)


def test_a_pil_image_given_to_inference_is_read_as_its_file_would_be() -> None:
    """Predictor.predict takes PIL images too: they went through PIL's convert("RGB") (transparency on black,
    16-bit grey clipped to white) with no EXIF turn, so the same photo answered differently by path and by image."""
    from pillsnap.infer.preprocess import load_image

    stored = Image.new("RGB", (40, 20), (0, 0, 230))
    exif = Image.Exif()
    exif[0x0112] = 6
    phone = Image.open(io.BytesIO(encode(stored, "JPEG", exif=exif, quality=95)))
    assert load_image(phone)[0].size == (20, 40) and phone.size == (40, 20)  # turned, the caller's image kept
    assert load_image(load_image(phone)[0])[0].size == (20, 40)  # an image already turned is not turned again
    grey16 = Image.open(io.BytesIO(encode(Image.fromarray(np.full((40, 40), 128 * 257, dtype=np.uint16)))))
    assert load_image(grey16)[0].getpixel((0, 0)) == (128, 128, 128)
    clear = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    assert load_image(clear)[0].getpixel((0, 0)) == (255, 255, 255)
