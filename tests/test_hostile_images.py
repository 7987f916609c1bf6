"""Crafted images that cost far more than their pixels to decode are refused from their header, each with its own
error kind and setting; what no check foresees is stopped at the row's deadline (tests/test_decode_pool.py).

Every hostile file is made here, small enough to be fast, and each refusal is timed: it must come before decoding."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import PIL.Image
import pytest

from blipbatch.model.image_processing import BlipImageProcessor
from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage
from blipbatch.pipeline.shards import InputRow


def refused(data: bytes, config: DecodeConfig = DecodeConfig(), within_s: float = 0.5) -> RowError:
    start = time.monotonic()
    with pytest.raises(RowError) as caught:
        decode_image(data, config)
    assert time.monotonic() - start < within_s, "refused only after decoding"
    return caught.value


def progressive_jpeg(size: tuple[int, int] = (256, 192), repeats: int = 0) -> bytes:
    """A progressive JPEG whose last scan is repeated `repeats` more times (libjpeg decodes each one)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG", progressive=True, quality=90
    )
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]  # up to the end-of-image marker
    return data[:-2] + last_scan * repeats + b"\xff\xd9"


def test_a_progressive_jpeg_with_its_last_scan_repeated_is_refused_by_scan_count():
    plain = progressive_jpeg()
    assert decode_image(plain).size == (256, 192)  # about 10 scans: decoded
    err = refused(progressive_jpeg(repeats=400))
    assert err.kind == "too_many_scans" and "max_jpeg_scans" in err.message and "JPEG of 4" in err.message
    assert decode_image(progressive_jpeg(repeats=400), DecodeConfig(max_jpeg_scans=1000)).size == (256, 192)


def test_scans_in_an_exif_thumbnail_are_not_counted():
    """A JPEG thumbnail in the APP1 segment has scans of its own, before the image's first scan."""
    thumb = io.BytesIO()
    PIL.Image.new("RGB", (16, 16), (9, 9, 9)).save(thumb, "JPEG", progressive=True)
    exif = PIL.Image.Exif()
    exif[0x010F] = "camera"
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (1, 2, 3)).save(buffer, "JPEG", exif=exif.tobytes() + thumb.getvalue() * 10)
    assert decode_image(buffer.getvalue(), DecodeConfig(max_jpeg_scans=1)).size == (64, 48)


def test_a_strip_bomb_tiff_is_refused_by_strip_count():
    """One-pixel strips: each costs a decoder call (3.9 M of them decoded for minutes), and Pillow's open alone walks
    them all, so they are counted from the TIFF's directory before Pillow opens it."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (1, 70_000), 7).save(buffer, "TIFF", tiffinfo={278: 1})  # RowsPerStrip = 1
    err = refused(buffer.getvalue(), within_s=0.05)
    assert err.kind == "too_many_strips" and "TIFF of 70000 strips" in err.message
    for compression in ("raw", "tiff_lzw"):  # Pillow's own decoder, and libtiff's
        strips = io.BytesIO()
        PIL.Image.new("L", (100, 2000), 7).save(strips, "TIFF", compression=compression, tiffinfo={278: 1})
        assert refused(strips.getvalue(), DecodeConfig(max_tiff_strips=1000)).kind == "too_many_strips"
        assert decode_image(strips.getvalue(), DecodeConfig(max_tiff_strips=2000)).size == (100, 2000)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk(kind: bytes, body: bytes, after_pixels: bool = False) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "PNG")
    data = buffer.getvalue()
    at = data.index(b"IEND" if after_pixels else b"IDAT") - 4
    return data[:at] + chunk(kind, body) + data[at:]


def huge_exif(entries: int, padding: int = 0) -> bytes:
    """A big-endian TIFF header and one IFD of `entries` entries (Pillow parses each one), then `padding` bytes."""
    ifd = b"".join(struct.pack(">HHII", 0x1000 + i % 60000, 7, 4, 0) for i in range(entries))
    return b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", entries) + ifd + b"\x00" * (4 + padding)


@pytest.mark.parametrize("after_pixels", [False, True])
def test_a_png_with_a_huge_exif_chunk_is_refused_by_metadata_size(after_pixels):
    """A 2.8 MB eXIf chunk (28 MB took 48 s and +1 GB in exif_transpose), before or after the pixels."""
    err = refused(png_with_chunk(b"eXIf", huge_exif(65535, 2 * 2**20), after_pixels))
    assert err.kind == "metadata_too_large" and "PNG carries 2.8 MiB of metadata" in err.message
    assert "above the 1.0 MiB limit ([decode] max_metadata_bytes)" in err.message
    small = png_with_chunk(b"eXIf", huge_exif(10), after_pixels)
    assert decode_image(small).size == (16, 16)


def test_huge_text_chunks_count_as_metadata():
    data = png_with_chunk(b"tEXt", b"comment\x00" + b"x" * (2**20 + 1))
    assert refused(data).kind == "metadata_too_large"
    assert decode_image(data, DecodeConfig(max_metadata_bytes=2**21)).size == (16, 16)


def one_colour_png(width: int, height: int) -> bytes:
    row = b"\x00" + b"\x80" * width
    pixels = zlib.compressobj(9)
    idat = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_extreme_aspect_ratio_is_refused_before_the_resize():
    """1 x 39,000,000 pixels is under the pixel limit, but its resize to the model's square takes gigabytes; the
    header says so (the IDAT here is only the first rows: nothing is decoded)."""
    header = one_colour_png(1, 100)
    tall = header.replace(struct.pack(">II", 1, 100), struct.pack(">II", 1, 39_000_000), 1)
    ihdr_end = 8 + 8 + 13
    tall = tall[:ihdr_end] + struct.pack(">I", zlib.crc32(tall[12:ihdr_end])) + tall[ihdr_end + 4 :]
    err = refused(tall)
    assert err.kind == "extreme_aspect_ratio" and "1x39000000" in err.message and "max_aspect_ratio" in err.message
    assert refused(one_colour_png(5000, 40)).kind == "extreme_aspect_ratio"
    assert decode_image(one_colour_png(5000, 40), DecodeConfig(max_aspect_ratio=200)).size == (5000, 40)
    assert decode_image(one_colour_png(1000, 10)).size == (1000, 10)  # 100:1 is allowed


def test_a_gif_whose_first_frame_is_beyond_pillows_bomb_limit_is_too_large():
    """The logical screen says 10 x 10, the first frame 15000 x 15000: Pillow refuses it while opening."""
    buffer = io.BytesIO()
    PIL.Image.new("P", (100, 100)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 10, 10)
    descriptor = data.index(b",")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 15000, 15000)
    err = refused(bytes(data))
    assert (err.kind, err.message) == ("too_large", "image is 225 MP, above the 40 MP limit")


def test_settings_are_checked():
    for name in ("max_aspect_ratio", "max_jpeg_scans", "max_tiff_strips", "max_metadata_bytes"):
        with pytest.raises(ValueError, match=name):
            DecodeConfig(**{name: 0})
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        DecodeConfig(max_aspect_ratio=0.5)


def test_fast_jpeg_decodes_at_the_smallest_scale_that_covers_the_model_input():
    """[decode] fast_jpeg: a 2000 x 1500 JPEG for a 224 x 224 model decodes at 1/4 (500 x 375; 1/8 would leave 187
    rows); off by default, and nothing else is reduced."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (2000, 1500), (10, 200, 30)).save(buffer, "JPEG")
    fast = DecodeConfig(fast_jpeg=True)
    assert decode_image(buffer.getvalue(), fast, covering=224).size == (500, 375)
    assert decode_image(buffer.getvalue(), DecodeConfig(), covering=224).size == (2000, 1500)
    assert decode_image(buffer.getvalue(), fast).size == (2000, 1500)  # no model size given: nothing to cover
    assert decode_image(one_colour_png(2000, 1500), fast, covering=224).size == (2000, 1500)


def test_a_strip_bomb_costs_the_prepare_stage_no_header_read(tmp_path):
    """The stage reads each header for its memory budget before decoding: a strip bomb is refused before that read,
    which would walk its strips in the worker process itself, out of the decode process's deadline."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (1, 300_000), 7).save(buffer, "TIFF", tiffinfo={278: 1})
    rows = [InputRow(id="0", image=buffer.getvalue(), instruction="x", row_index=0)]
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    with PrepareStage(Fetcher(FetchConfig()), DecodeConfig(), processor, PrepareConfig(processes=0)) as stage:
        start = time.monotonic()
        [batch] = list(stage.batches(rows, 1))
        assert time.monotonic() - start < 0.5
    assert batch.rows[0].error.kind == "too_many_strips"
