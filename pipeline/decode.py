"""Decode fetched bytes into an RGB PIL image, refusing what is not a raster image or is too large to decode safely.

Order of the checks: empty input; the header read by the Pillow plugin of one of `formats` (lazy: no pixel decoded);
the pixel count against `max_pixels` before any pixel is decoded; then load() of the first frame, EXIF orientation,
16-bit samples scaled to 8 bits, and RGB conversion as the model's processor does it (transparent pixels onto white).

The pixel limit is ours, applied per call: Pillow's process-wide guard (PIL.Image.MAX_IMAGE_PIXELS) is neither read
nor changed, so a program that imports blipbatch keeps its own Pillow settings.
Errors: `decode_error` (empty, not an image, SVG, unsupported format, truncated or corrupt data), `too_large`.
A `not an image` message names the detected type and the size, never the file's bytes (the file may be a secret).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import PIL.Image
import PIL.ImageFile
import PIL.ImageOps

from blipbatch.model.rgb import to_rgb

from .errors import RowError, format_size

# What Pillow raises on malformed data, in its plugins' header parsing and in load().
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# What a plugin raises when the bytes are not its format (Pillow's own open() then tries the next plugin).
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)
_TEXT_HEAD = 4096
# Modes holding 16-bit samples (I: Pillow's 32-bit integer mode, which 16-bit files also decode to).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIGNATURES = ((b"%PDF-", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip data"),
               (b"\x7fELF", "an ELF executable"), (b"MZ", "a Windows executable"),
               (b"\x00\x00\x00\x18ftypmp4", "an MP4 video"), (b"\x1aE\xdf\xa3", "a Matroska/WebM video"))


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


def _detected_type(data: bytes) -> str:
    """What the bytes look like ("HTML", "a PDF document", "a GIF image", ...), from their first bytes only."""
    for signature, what in _SIGNATURES:
        if data.startswith(signature):
            return what
    for name, (_, accept) in PIL.Image.OPEN.items():  # magic-number checks only: no plugin parses the data
        if _accepts(accept, data[:16]):
            return f"a {name} image"
    head = data[:_TEXT_HEAD].lstrip(b"\xef\xbb\xbf \t\r\n")  # UTF-8 BOM and leading whitespace
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a multi-byte character cut at the end of the head
            return "binary data of unknown type"
        text = head[:err.start].decode("utf-8")
    lowered = text[:200].lower()
    if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered:
        return "HTML"
    if lowered.startswith("<"):
        return "XML"
    if lowered.startswith(("{", "[")):
        return "JSON"
    if all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "text"
    return "binary data of unknown type"


def _not_an_image(data: bytes, formats: tuple[str, ...]) -> str:
    """Say what the bytes are instead of an image: the detected type and the size, never the bytes themselves."""
    head = data[:_TEXT_HEAD].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<") and b"<svg" in head.lower():
        return f"SVG is not supported (raster formats only: {', '.join(formats)})"
    return f"not an image: {_detected_type(data)}, {format_size(len(data))} (supported: {', '.join(formats)})"


def _too_large(pixels: int, size: str, max_pixels: int) -> RowError:
    return RowError("too_large", f"image is {size}{_megapixels(pixels)}, above the {_megapixels(max_pixels)} limit")


def _accepts(accept, prefix: bytes) -> bool:
    """A Pillow plugin's magic-number check; a str answer is its "looks like it, but unsupported" note, and a prefix
    shorter than the check reads raises (Pillow's own open() treats both as "not this format")."""
    try:
        answer = accept(prefix)
    except _NOT_THIS_FORMAT:
        return False
    return bool(answer) and not isinstance(answer, str)


def _open(data: bytes, formats: tuple[str, ...]) -> PIL.ImageFile.ImageFile:
    """PIL.Image.open(data, formats=formats) less its pixel-count check, which reads Pillow's process-wide
    MAX_IMAGE_PIXELS: decode_image applies DecodeConfig.max_pixels right after, for this call only."""
    prefix = data[:16]
    for name in formats:
        factory, accept = PIL.Image.OPEN[name.upper()]
        if accept is not None and not _accepts(accept, prefix):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except _NOT_THIS_FORMAT:
            continue
    raise PIL.UnidentifiedImageError


def _to_eight_bits(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit greyscale image (I;16 and I modes) as 8-bit L, each sample divided by 257 and rounded: the inverse of
    the 8->16 bit expansion (v * 257), so a 16-bit file made from an 8-bit picture decodes to that picture. Pillow's
    convert() would clip instead (every sample above 255 white). Other modes are returned as they are: F is read on
    Pillow's 0..255 scale, as transformers reads it."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    # point() maps I samples linearly (v * scale + offset, truncated); convert("L") then clips to 0..255, which for
    # an I image also clips its samples to the 16-bit range.
    return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> PIL.Image.Image:
    """The first frame of the image in `data`, EXIF orientation applied, 16-bit samples scaled to 8 bits, as RGB.
    Raises RowError."""
    if not data:
        raise RowError("decode_error", "empty file (0 bytes)")
    try:
        image = _open(data, config.formats)
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
            return to_rgb(_to_eight_bits(image))
        except ValueError as err:
            raise RowError("decode_error", f"cannot convert {image.format} mode {image.mode!r} to RGB: {err}") \
                from None
