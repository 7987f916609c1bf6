"""Decode fetched bytes into an RGB PIL image, refusing what is not a raster image or is too large to decode safely.

Order of the checks: empty input; Image.open (lazy: reads the header only) restricted to `formats`; the pixel count
against `max_pixels` before any pixel is decoded; then load() of the first frame, EXIF orientation, and RGB conversion
as the model's processor does it (transparent pixels onto white).

Pillow's own decompression-bomb guard (Image.MAX_IMAGE_PIXELS, about 89 MP to warn and 179 MP to raise) is a second
line: our check does not depend on that global, and Pillow's DecompressionBombError/Warning become `too_large` rows.
Errors: `decode_error` (empty, not an image, SVG, unsupported format, truncated or corrupt data), `too_large`.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import PIL.Image
import PIL.ImageOps

from blipbatch.model.image_processing import _to_rgb

from .errors import RowError

# Pillow's own bomb check refuses in open(), before the size can be reported, and only above twice its
# global limit. decode_image checks every image's header against DecodeConfig.max_pixels instead, before
# any pixel is decoded, so Pillow's check is switched off for the worker processes that import this.
PIL.Image.MAX_IMAGE_PIXELS = None

# What Pillow raises on malformed data, in Image.open's plugin probing and in load().
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_TEXT_HEAD = 4096


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

    def __post_init__(self) -> None:
        if not self.max_pixels > 0:
            raise ValueError(f"DecodeConfig.max_pixels must be > 0, got {self.max_pixels!r}")
        PIL.Image.init()  # registers every plugin, so PIL.Image.OPEN lists the formats this Pillow can read
        unknown = [f for f in self.formats if f.upper() not in PIL.Image.OPEN]
        if not self.formats or unknown:
            raise ValueError(f"DecodeConfig.formats: {unknown or 'empty'} not readable by Pillow "
                             f"(readable: {', '.join(sorted(PIL.Image.OPEN))})")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} MP" if pixels >= 10**6 else f"{pixels / 1e6:.2f} MP"


def _not_an_image(data: bytes, formats: tuple[str, ...]) -> str:
    """Say what the bytes look like, for a row that is not a readable image."""
    head = data[:_TEXT_HEAD].lstrip(b"\xef\xbb\xbf \t\r\n")  # UTF-8 BOM and leading whitespace
    if head.startswith(b"<") and b"<svg" in head.lower():
        return f"SVG is not supported (raster formats only: {', '.join(formats)})"
    text = head[:40].decode("utf-8", errors="replace")
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        first_line = text.splitlines()[0][:20]
        return f"not an image: starts with {first_line!r}"
    return f"not an image in a supported format ({', '.join(formats)}): starts with {data[:16]!r}"


def _too_large(pixels: int, size: str, max_pixels: int) -> RowError:
    return RowError("too_large", f"image is {size}{_megapixels(pixels)}, above the {_megapixels(max_pixels)} limit")


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> PIL.Image.Image:
    """The first frame of the image in `data`, EXIF orientation applied, as RGB. Raises RowError."""
    if not data:
        raise RowError("decode_error", "empty file (0 bytes)")
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=config.formats)
    except PIL.UnidentifiedImageError:
        raise RowError("decode_error", _not_an_image(data, config.formats)) from None
    except _CORRUPT_DATA_ERRORS as err:
        raise RowError("decode_error", f"corrupt image header: {type(err).__name__}: {err}") from None
    with image:
        width, height = image.size
        if width * height > config.max_pixels:  # before load(): never allocate the bitmap
            raise _too_large(width * height, f"{width}x{height} = ", config.max_pixels)
        try:
            image.load()  # the first frame: open() leaves animations on frame 0
            PIL.ImageOps.exif_transpose(image, in_place=True)
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
            raise RowError("too_large", f"image refused as a decompression bomb: {err}") from None
        except _CORRUPT_DATA_ERRORS as err:
            raise RowError("decode_error", f"truncated or corrupt {image.format}: {err}") from None
        try:
            return _to_rgb(image)
        except ValueError as err:
            raise RowError("decode_error", f"cannot convert {image.format} mode {image.mode!r} to RGB: {err}") \
                from None
