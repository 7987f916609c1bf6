"""The prepare stage (pipeline/prepare.py): the pixels the processor gives, a unit fetched whole (so it takes about
its slowest row), and a budget of decoded bytes that bounds memory whatever the images."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from tiny import write_tiny_checkpoint

from blipbatch.model.engine import Engine, EngineConfig
from blipbatch.model.processor import InstructBlipProcessor
from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage
from blipbatch.pipeline.shards import InputRow, discover_shards, plan_units
from blipbatch.pipeline.worker import ModelWorker, WorkerConfig
from blipbatch.schemas import ColumnMapping


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"transparency": 3} if image.mode == "P" else {}))
    return buffer.getvalue()


def varied_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (230, 310, 3), dtype=np.uint8))
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), mode="RGBA")
    gray = PIL.Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), mode="L")
    palette = rgb.resize((90, 50)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    return [
        encoded(rgb, "JPEG"),
        encoded(rgba, "PNG"),
        encoded(gray, "PNG"),
        encoded(palette, "PNG"),
        encoded(rgb.convert("CMYK"), "JPEG"),
        encoded(rgb.convert("LA"), "PNG"),
        encoded(rgb, "WEBP"),
    ]


def run_stage(processor, rows, batch_size, fetch=FetchConfig(), decode=DecodeConfig(), config=PrepareConfig()):
    with PrepareStage(Fetcher(fetch), decode, processor.image_processor, config) as stage:
        return list(stage.batches(rows, batch_size)), stage


def test_pixels_are_the_processors(checkpoint):
    """Decoded on the stage's threads, a batch's pixels are the processor's `resized` of the decoded images, and the
    engine's normalization of them equals InstructBlipProcessor's pixel_values (and transformers' within its float
    tolerance); an undecodable row is an error row and takes no pixel slot."""
    processor = InstructBlipProcessor.from_pretrained(checkpoint)
    engine = Engine(EngineConfig(model=checkpoint, device="cpu"))
    data = varied_images()
    payloads = [data[0], data[1], b"not an image at all", *data[2:], data[0]]
    rows = [InputRow(id=str(i), image=payload, instruction="what?", row_index=i) for i, payload in enumerate(payloads)]
    batches, _ = run_stage(processor, rows, 4, config=PrepareConfig(threads=3))
    assert [len(b.rows) for b in batches] == [4, 4, 1]
    theirs = transformers.BlipImageProcessorPil(
        **{k: v for k, v in processor.image_processor.to_dict().items() if k != "image_processor_type"}
    )
    for batch in batches:
        good = [p for p in batch.rows if p.error is None]
        images = [decode_image(p.row.image) for p in good]
        assert [p.image for p in good] == list(range(len(good)))
        assert batch.pixels.dtype == torch.uint8
        assert torch.equal(batch.pixels, torch.stack([processor.image_processor.resized(i) for i in images]))
        pixel_values = engine.pixel_values(batch.pixels)
        assert torch.equal(pixel_values, processor(images=images, text=["x"] * len(images))["pixel_values"])
        expected = theirs(images, return_tensors="pt")["pixel_values"]
        assert (pixel_values - expected).abs().max().item() <= 1e-6
    bad = batches[0].rows[2]
    assert bad.error is not None and bad.error.kind == "decode_error" and bad.image is None


class SlowImages(ThreadingHTTPServer):
    """/fast/N answers at once, /slow/N after `delay` seconds; both with a small JPEG."""

    daemon_threads = True
    delay = 2.0

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SlowHandler)
        self.jpeg = encoded(PIL.Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class SlowHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(self.server.delay)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.server.jpeg)))
        self.end_headers()
        self.wfile.write(self.server.jpeg)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def slow_server():
    httpd = SlowImages()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def test_unit_with_slow_rows_in_several_batches_takes_about_the_slowest(checkpoint, slow_server, tmp_path):
    """Three rows that each take 2 s, in micro-batches 1, 3 and 6 of one unit: the worker fetches the whole unit
    at once, so the unit takes about 2 s, not the 6 s of fetching one micro-batch at a time."""
    slow_rows = {1, 9, 21}
    urls = [slow_server.url(f"/{'slow' if i in slow_rows else 'fast'}/{i}") for i in range(24)]
    shard = tmp_path / "in" / "part.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"image_url": urls}), shard)
    [unit] = plan_units(discover_shards(str(shard.parent)), ColumnMapping(), 100)
    config = WorkerConfig(
        engine=EngineConfig(model=checkpoint, generation={"max_new_tokens": 2}),
        mapping=ColumnMapping(),
        output=str(tmp_path / "out"),
        instructions=("a photo of",),
        batch_size=4,
        fetch=FetchConfig(allow_hosts=("127.0.0.1",)),
    )
    worker = ModelWorker(config)
    worker.process_unit(unit, 1)  # warm-up: first calls into the model are slower
    start = time.monotonic()
    worker.process_unit(unit, 1)
    elapsed = time.monotonic() - start
    table = pq.read_table(tmp_path / "out").to_pandas()
    assert (table["status"] == "ok").all() and len(table) == 24
    assert elapsed < SlowImages.delay * 1.75, (
        f"unit took {elapsed:.1f}s: the slow rows were fetched one batch at a time"
    )


def huge_png(width: int, height: int, red: int = 0x80) -> bytes:
    """A valid RGB PNG of width x height that compresses to a few KB (one colour)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes((red, 0x40, 0x20)) * width for _ in range(height)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


PEAK_SCRIPT = r"""
import json, os, sys, threading, time
from pathlib import Path
from blipbatch.model.image_processing import BlipImageProcessor
from blipbatch.pipeline.decode import DecodeConfig
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage
from blipbatch.pipeline.shards import InputRow

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

folder, budget = Path(sys.argv[1]), int(sys.argv[2])
rows = [InputRow(id=str(i), image=p.read_bytes(), instruction="x", row_index=i)
        for i, p in enumerate(sorted(folder.glob("*.png")))]
processor = BlipImageProcessor(size={"height": 224, "width": 224})
before, peak, done = rss(), [0], threading.Event()

def sample() -> None:
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
config = PrepareConfig(threads=8, decoded_bytes=budget, processes=0)  # decoded here, where RSS is sampled
with PrepareStage(Fetcher(FetchConfig()), DecodeConfig(max_pixels=10**9), processor, config) as stage:
    [batch] = stage.batches(rows, len(rows))
done.set()
sampler.join()
print(json.dumps({"growth_mb": (peak[0] - before) / 2**20, "errors": [p.error for p in batch.rows if p.error],
                  "images": batch.pixels.shape[0]}))
"""


@pytest.mark.slow
def test_decoded_bytes_budget_bounds_a_batch_of_huge_pngs(tmp_path):
    """8 PNGs of 16 MP (a few KB each, 64 MB each decoded) in one micro-batch on 8 threads: with a 150 MB budget
    they decode one at a time and the process grows by about one image, against all eight without a budget."""
    side = 4000
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(huge_png(side, side, red=i))  # distinct: identical bytes decode once
    decoded = side * side * 4

    def growth(budget: int) -> float:
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(budget)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        result = json.loads(out.stdout.splitlines()[-1])
        assert result["errors"] == [] and result["images"] == 8
        return result["growth_mb"]

    budget = 150 * 2**20
    bounded = growth(budget)
    unbounded = growth(2**40)
    # 8 bytes a pixel: the budget holds one of these images at a time (with its RGB copy), and no more
    assert bounded < (budget + 50 * 2**20) / 2**20, f"grew {bounded:.0f} MB under a 150 MB budget"
    assert unbounded > 2 * bounded + 4 * decoded / 2**20, (bounded, unbounded)
