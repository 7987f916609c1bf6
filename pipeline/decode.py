"""Decode fetched bytes into an RGB PIL image, refusing what is not a raster image or is too large to decode safely.

Order of the checks: empty input; the header read by the Pillow plugin of one of `formats` (lazy: no pixel decoded);
then, from the header alone, refusals of what would cost far more than its pixels to decode: more pixels than
`max_pixels` (`too_large`), a side more than `max_aspect_ratio` times the other (`extreme_aspect_ratio`: the resize
of a 1 x 39,000,000 picture to the model's square takes gigabytes), a JPEG of more than `max_jpeg_scans` scans
(`too_many_scans`: libjpeg decodes every progressive scan over the whole image, so a last scan repeated a thousand
times costs a thousand decodes), a TIFF of more than `max_tiff_strips` strips or tiles (`too_many_strips`: each
costs a decoder call), metadata (EXIF, ICC profile, XMP, text chunks) over `max_metadata_bytes`
(`metadata_too_large`: EXIF is parsed for the orientation; checked again after load(), which reads the chunks that
follow a PNG's pixels). Then load() of the first frame, EXIF orientation, 16-bit samples scaled to 8 bits, and RGB
conversion as the model's processor does it (transparent pixels onto white). What these checks cannot foresee is
bounded in time by decoding in a process that is stopped at the row's deadline (pipeline.decode_pool).

The pixel limit is ours, applied per call: Pillow's process-wide guard (PIL.Image.MAX_IMAGE_PIXELS) is neither read
nor changed, so a program that imports blipbatch keeps its own Pillow settings.
Errors: `decode_error` (empty, not an image, SVG, unsupported format, truncated or corrupt data), `too_large` (also
a first frame over Pillow's own bomb limit, which a GIF's frame can be beyond its declared screen), and the kinds of
the shape checks above.
A `not an image` message names the detected type and the size, never the file's bytes (the file may be a secret).
"""

from __future__ import annotations

import io
import re
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
_SIGNATURES = (
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"\x00\x00\x00\x18ftypmp4", "an MP4 video"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
)


_JPEG_SOS = b"\xff\xda"  # start of scan; never inside entropy-coded data, where 0xFF is followed by 0x00 or RSTn
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RST0-7, SOI
_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS = 273, 324
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")  # in Pillow's DecompressionBombError message


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    max_aspect_ratio: float = 100.0  # longer side / shorter side
    max_jpeg_scans: int = 100  # scans of a (progressive) JPEG; encoders write about 10
    max_tiff_strips: int = 65536  # strips or tiles of a TIFF
    max_metadata_bytes: int = 2**20  # EXIF, ICC profile, XMP and text chunks together
    # JPEGs decoded at a reduced DCT scale still covering the model's input (Pillow's draft mode): faster, but the
    # pixels then differ from the processor's (README, Performance)
    fast_jpeg: bool = False

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_aspect_ratio", "max_jpeg_scans", "max_tiff_strips", "max_metadata_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DecodeConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"DecodeConfig.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        PIL.Image.init()  # registers every plugin, so PIL.Image.OPEN lists the formats this Pillow can read
        unknown = [f for f in self.formats if f.upper() not in PIL.Image.OPEN]
        if not self.formats or unknown:
            raise ValueError(
                f"DecodeConfig.formats: {unknown or 'empty'} not readable by Pillow "
                f"(readable: {', '.join(sorted(PIL.Image.OPEN))})"
            )


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
        text = head[: err.start].decode("utf-8")
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


def open_header(data: bytes, formats: tuple[str, ...]) -> PIL.ImageFile.ImageFile:
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


def _jpeg_scans(data: bytes) -> int:
    """The scans of a JPEG: its segments are walked up to the first start of scan (an EXIF thumbnail before it holds
    scans of its own), then every later start-of-scan marker is counted."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker == 0xDA:
            return 1 + data.count(_JPEG_SOS, pos + 2)
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return 0


def _tiff_strips(data: bytes) -> int:
    """The strips or tiles of a TIFF's first image, from the counts of its StripOffsets/TileOffsets tags, read
    before Pillow opens it (Pillow's open alone takes seconds over millions of strips). 0 when not a TIFF."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return 0
    version = struct.unpack_from(order + "H", data, 2)[0]
    if version == 42:  # classic TIFF: 4-byte offsets, 12-byte entries
        offset, count_fmt, entry_fmt, entry_size = struct.unpack_from(order + "I", data, 4)[0], "H", "HHI", 12
    elif version == 43:  # BigTIFF: 8-byte offsets, 20-byte entries
        offset, count_fmt, entry_fmt, entry_size = struct.unpack_from(order + "Q", data, 8)[0], "Q", "HHQ", 20
    else:
        return 0
    try:
        entries = struct.unpack_from(order + count_fmt, data, offset)[0]
        first = offset + struct.calcsize(count_fmt)
        counts = [
            count
            for tag, _type, count in (
                struct.unpack_from(order + entry_fmt, data, first + i * entry_size)
                for i in range(min(entries, (len(data) - first) // entry_size))
            )
            if tag in (_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS)
        ]
    except struct.error:  # a truncated header: Pillow says what is wrong with it
        return 0
    return max(counts, default=0)


def _metadata_bytes(image: PIL.Image.Image) -> int:
    """Bytes of metadata Pillow has read: EXIF, ICC profile, XMP, comments and text chunks."""
    return sum(len(value) for value in image.info.values() if isinstance(value, (bytes, str)))


def _check_metadata(image: PIL.Image.Image, config: DecodeConfig) -> None:
    if (size := _metadata_bytes(image)) > config.max_metadata_bytes:
        raise RowError(
            "metadata_too_large",
            f"{image.format} carries {format_size(size)} of metadata (EXIF, ICC, XMP, "
            f"text), above the {format_size(config.max_metadata_bytes)} limit "
            "([decode] max_metadata_bytes)",
        )


def _check_shape(image: PIL.ImageFile.ImageFile, data: bytes, config: DecodeConfig) -> None:
    """The refusals from the header alone (module doc), cheapest first."""
    width, height = image.size
    if width * height > config.max_pixels:  # before load(): never allocate the bitmap
        raise _too_large(width * height, f"{width}x{height} = ", config.max_pixels)
    if max(width, height) > config.max_aspect_ratio * max(1, min(width, height)):
        raise RowError(
            "extreme_aspect_ratio",
            f"image is {width}x{height}, one side more than "
            f"{config.max_aspect_ratio:g} times the other ([decode] "
            "max_aspect_ratio)",
        )
    _check_metadata(image, config)
    if image.format == "JPEG" and (scans := _jpeg_scans(data)) > config.max_jpeg_scans:
        raise RowError(
            "too_many_scans",
            f"JPEG of {scans} scans, above the {config.max_jpeg_scans} limit ([decode] "
            "max_jpeg_scans): each scan is decoded over the whole image",
        )


def _bomb(err: Exception, config: DecodeConfig) -> RowError:
    """Pillow's own bomb refusal (a GIF's first frame may be larger than its declared screen) as our too_large."""
    match = _BOMB_PIXELS.search(str(err))
    if match is None:
        return RowError("too_large", f"image refused as a decompression bomb: {err}")
    return _too_large(int(match.group(1)), "", config.max_pixels)


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


def check_before_opening(data: bytes, config: DecodeConfig) -> None:
    """The refusals that must come before Pillow even opens `data` (its open of a TIFF walks every strip): RowError.
    decode_image runs it; so does anything else that opens the header first (the prepare stage's budget)."""
    if not data:
        raise RowError("decode_error", "empty file (0 bytes)")
    if (strips := _tiff_strips(data)) > config.max_tiff_strips:
        raise RowError(
            "too_many_strips",
            f"TIFF of {strips} strips or tiles, above the {config.max_tiff_strips} limit "
            "([decode] max_tiff_strips): each costs a decoder call",
        )


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig(), covering: int | None = None) -> PIL.Image.Image:
    """The first frame of the image in `data`, EXIF orientation applied, 16-bit samples scaled to 8 bits, as RGB.
    With `config.fast_jpeg`, a JPEG is decoded at the smallest DCT scale (1/2 to 1/8) whose sides are still at least
    `covering` pixels (the larger side of the model's input, so either orientation covers it). Raises RowError."""
    check_before_opening(data, config)
    try:
        image = open_header(data, config.formats)
    except PIL.UnidentifiedImageError:
        raise RowError("decode_error", _not_an_image(data, config.formats)) from None
    except PIL.Image.DecompressionBombError as err:
        raise _bomb(err, config) from None
    except _CORRUPT_DATA_ERRORS as err:
        raise RowError("decode_error", f"corrupt image header: {type(err).__name__}: {err}") from None
    with image:
        _check_shape(image, data, config)
        if config.fast_jpeg and covering and image.format == "JPEG":
            image.draft(image.mode, (covering, covering))
        try:
            image.load()  # the first frame: open() leaves animations on frame 0
            _check_metadata(image, config)  # a PNG's chunks after its pixels are read by load()
            PIL.ImageOps.exif_transpose(image, in_place=True)
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
            raise _bomb(err, config) from None
        except _CORRUPT_DATA_ERRORS as err:
            raise RowError("decode_error", f"truncated or corrupt {image.format}: {err}") from None
        try:
            return to_rgb(_to_eight_bits(image))
        except ValueError as err:
            raise RowError("decode_error", f"cannot convert {image.format} mode {image.mode!r} to RGB: {err}") from None
