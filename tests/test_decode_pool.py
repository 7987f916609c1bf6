"""Decoding in stoppable processes (pipeline/decode_pool.py): the processor's exact pixels, a decode past the row's
deadline stopped with its process (the row a decode_timeout, the unit's other rows committed), a process that dies
costing only its row, and the pool going on with replacements."""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from test_hostile_rows import checkpoint, png_data_uri, run_unit  # noqa: F401 - checkpoint is a fixture
from test_prepare import varied_images

from blipbatch.model.processor import InstructBlipProcessor
from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.decode_pool import DecodePool
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig

LIFTED = DecodeConfig(max_jpeg_scans=10**6)  # so that only the deadline can stop the crafted JPEG


def slow_jpeg(side: int = 2048, repeats: int = 1000) -> bytes:
    """A 80 KB progressive JPEG of one colour whose last scan is repeated: libjpeg decodes every repeat over the
    whole image (about 4 s here at 2048 x 2048), though each repeat is a few bytes."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (side, side), (90, 140, 200)).save(buffer, "JPEG", progressive=True, quality=75)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * repeats + b"\xff\xd9"


def decode_processes(besides: frozenset[psutil.Process] = frozenset()) -> list[psutil.Process]:
    """This process's live children that are decode processes, seen from outside the pool, less `besides` (those of
    other pools, such as the model workers' of other tests)."""
    return [
        child
        for child in psutil.Process().children()
        if child not in besides
        and child.is_running()
        and child.status() != psutil.STATUS_ZOMBIE
        and "blipbatch.pipeline.decode_pool" in child.cmdline()
    ]


@pytest.fixture(scope="module")
def processor(checkpoint):  # noqa: F811
    return InstructBlipProcessor.from_pretrained(checkpoint).image_processor


def test_pixels_from_the_pool_are_the_processors(processor):
    others = frozenset(decode_processes())
    with DecodePool(2, DecodeConfig(), processor) as pool:
        assert len(decode_processes(others)) == 2
        for data in varied_images():
            assert torch.equal(pool.resized(data, 30), processor.resized(decode_image(data)))
        with pytest.raises(RowError) as caught:
            pool.resized(b"<html>no</html>", 30)
        assert caught.value.kind == "decode_error" and "not an image: HTML" in caught.value.message
        assert pool.replaced == 0
    assert decode_processes(others) == []  # closing ends them


def test_a_decode_past_its_deadline_is_stopped_and_its_process_replaced(processor):
    others = frozenset(decode_processes())
    with DecodePool(1, LIFTED, processor) as pool:
        [before] = decode_processes(others)
        start = time.monotonic()
        with pytest.raises(RowError) as caught:
            pool.resized(slow_jpeg(), 0.5)
        assert time.monotonic() - start < 1.5
        assert caught.value.kind == "decode_timeout" and "0.5 s left of the row's deadline" in caught.value.message
        assert not before.is_running()  # the process decoding it is gone, not burning a core in the background
        assert pool.replaced == 1 and len(decode_processes(others)) == 1
        data = varied_images()[0]
        assert torch.equal(pool.resized(data, 30), processor.resized(decode_image(data)))


def test_a_process_that_dies_costs_only_its_image(processor):
    """A decode process killed from outside (as the kernel's OOM killer does) is a decode_error and replaced."""
    others = frozenset(decode_processes())
    with DecodePool(1, LIFTED, processor) as pool:
        [process] = decode_processes(others)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)
        with pytest.raises(RowError) as caught:
            pool.resized(varied_images()[0], 30)
        assert caught.value.kind == "decode_error" and "decode process died" in caught.value.message
        data = varied_images()[1]
        assert torch.equal(pool.resized(data, 30), processor.resized(decode_image(data)))


def test_a_unit_with_a_slow_decode_ends_it_at_the_row_deadline(checkpoint, tmp_path):  # noqa: F811
    """The row whose decode would take seconds is a decode_timeout at its 1 s row deadline; the unit's other rows
    are committed (before, the row came out ok after 10 s with row_deadline_s = 5)."""
    hostile = "data:image/jpeg;base64," + base64.b64encode(slow_jpeg()).decode()
    references = [hostile if i == 2 else png_data_uri((30 * i, 0, 0)) for i in range(6)]
    start = time.monotonic()
    record, table = run_unit(checkpoint, tmp_path, references, FetchConfig(row_deadline_s=1.0), decode=LIFTED)
    assert time.monotonic() - start < 15  # the worker's start included
    assert record.rows == 6 and table.loc["2", "error_kind"] == "decode_timeout"
    assert (table.drop("2")["status"] == "ok").all()


def test_fast_jpeg_in_the_pool_is_the_threads_fast_jpeg_and_close_to_exact(processor):
    """[decode] fast_jpeg gives the same pixels in a pool process as on a thread; they differ from the exact path's
    by about a level in 255 on average (README, Performance)."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    PIL.Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((1280, 960)).save(buffer, "JPEG")
    data = buffer.getvalue()
    fast = DecodeConfig(fast_jpeg=True)
    exact = processor.resized(decode_image(data)).float()
    on_thread = processor.resized(decode_image(data, fast, processor.rgb_resize.covering))
    with DecodePool(1, fast, processor) as pool:
        assert torch.equal(pool.resized(data, 30), on_thread)
    difference = (on_thread.float() - exact).abs().mean().item()
    assert 0 < difference < 3, difference


def test_a_replacement_started_on_a_thread_that_ends_lives_on(processor):
    """Replacements start on the prepare stage's threads, which end with each unit: the process must outlive the
    thread that started it (PR_SET_PDEATHSIG would have killed it with that thread)."""
    with DecodePool(1, LIFTED, processor) as pool:
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(RowError, pool.resized, slow_jpeg(), 0.3)))
        thread.start()
        thread.join(timeout=30)
        assert pool.replaced == 1 and errors[0].value.kind == "decode_timeout"
        time.sleep(1.0)  # the starting thread is gone
        data = varied_images()[0]
        assert torch.equal(pool.resized(data, 30), processor.resized(decode_image(data)))


WORKER_THAT_DIES = """
import sys, time
from blipbatch.model.image_processing import BlipImageProcessor
from blipbatch.pipeline.decode import DecodeConfig
from blipbatch.pipeline.decode_pool import DecodePool
pool = DecodePool(1, DecodeConfig(max_jpeg_scans=10**6), BlipImageProcessor(size={"height": 32, "width": 32}))
print("ready", flush=True)
pool.resized(sys.stdin.buffer.read(), 600)
"""


def test_decode_processes_end_with_their_worker_even_mid_decode(tmp_path):
    """A worker killed (as Ray kills an actor) while its decode process is busy: the process ends within seconds
    instead of decoding on, orphaned."""
    worker = subprocess.Popen([sys.executable, "-c", WORKER_THAT_DIES], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert worker.stdout.readline() == b"ready\n"
        worker.stdin.write(slow_jpeg(repeats=20000))  # minutes of decoding
        worker.stdin.close()
        [child] = psutil.Process(worker.pid).children()
        time.sleep(0.5)
        assert child.status() in (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING)
        worker.kill()
        worker.wait(timeout=10)
        child.wait(timeout=5)  # psutil.TimeoutExpired if it decodes on
    finally:
        worker.kill()
