"""The prepare stage: a unit's rows -> micro-batches of checked instructions and the batch's pixel tensor.

Everything the CPU does for the model happens here, off the model's thread, so the GPU never waits on Pillow:
- fetch: every distinct image of the unit is queued at once on the fetch threads (`FetchConfig.concurrency`), so
  slow rows in different micro-batches wait together and a unit takes about its slowest row, not the sum of each
  micro-batch's slowest;
- decode, RGB conversion and resize (`BlipImageProcessor.resized`, the processor's own code), each image as soon as
  its bytes arrive: in `processes` decode processes (pipeline.decode_pool), each stopped at its row's deadline
  (`row_deadline_s`, less the time the row's fetch took: time queued behind other images is not counted), which
  also scale past one process's GIL; with `processes = 0`, on `threads` CPU threads (Pillow releases the GIL, so
  threads scale to about 8), where a decode cannot be stopped: only the header checks of pipeline.decode bound it;
- stack into one uint8 tensor per micro-batch (the processor's `resized` output), pinned when the model is on CUDA
  (so the copy to the GPU is asynchronous), `ahead` micro-batches in advance. The model's engine normalizes it
  on its device (`Engine.pixel_values`, exactly the processor's `normalize`): a quarter of the bytes to copy, and
  no CPU time spent on it here, where it cost a tenth of decoding and resizing the image.

Identical bytes within a unit are decoded once: the stage keys decodes by the bytes' SHA-256 (each row's
`sha256`), and a micro-batch stacks each distinct image once, so the engine encodes it once for all the rows naming it.

Memory: images being decoded hold at most `decoded_bytes` (counted from each image's header before decoding, at
8 bytes a pixel: Pillow's 4-byte pixels plus the RGB copy); one image larger than that decodes alone. A batch of
huge images thus decodes a few at a time however many share the batch, and their memory goes back to the OS
(`return_freed_images_to_the_os`). What the stage keeps is small: the unit's fetched bytes until decoded, and
3 x H x W bytes per decoded image (150 KB at 224 x 224), plus `ahead` stacked batches of these.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from blipbatch.model.image_processing import BlipImageProcessor

from . import deadline
from .decode import DecodeConfig, check_before_opening, decode_image, open_header
from .decode_pool import DecodePool
from .errors import RowError
from .fetch import Fetcher
from .shards import InputRow

BYTES_PER_PIXEL = 8  # Pillow's RGB/RGBA pixel (4 bytes) and the converted copy beside it
MAX_DEFAULT_THREADS = 8  # threads in one process stop gaining here (reference/gpu.md)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 4 * 2**20


def return_freed_images_to_the_os() -> None:
    """Allocations of 4 MiB and more straight from mmap, so a big decoded image's memory goes back to the OS when
    freed. Otherwise glibc raises its mmap threshold after the first big free and keeps freed image blocks in each
    thread's arena: 8 threads decoding 16 MP PNGs one at a time grew the process by 590 MB instead of 130 MB.
    Process-wide, so called when a stage is built, never at import; a no-op where the C library has no mallopt."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class PrepareConfig:
    threads: int | None = None  # decode + resize threads when processes = 0; None: this process's CPUs, at most 8
    decoded_bytes: int = 2**30  # images being decoded at once hold at most this (see the module doc)
    ahead: int = 2  # micro-batches stacked before the model asks for them
    # decode + resize processes, each stopped at its row's deadline; None: the CPUs this process may use, at most 8;
    # 0: decode on `threads` threads instead, with no time bound
    processes: int | None = None

    def __post_init__(self) -> None:
        for name in ("threads", "decoded_bytes", "ahead"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"PrepareConfig.{name} must be an integer >= 1, got {value!r}")
        if self.processes is not None and not (isinstance(self.processes, int) and self.processes >= 0):
            raise ValueError(f"PrepareConfig.processes must be an integer >= 0, got {self.processes!r}")

    def decode_processes(self) -> int:
        """The decode processes to start: `processes`, or by default the CPUs this process may use, at most 8 (a run
        on Ray sets it from the CPUs per GPU instead: pipeline.run)."""
        return self.processes if self.processes is not None else default_threads()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """The CPUs this process may run on, at most 8."""
    return max(1, min(usable_cpus(), MAX_DEFAULT_THREADS))


class ByteBudget:
    """A counting limit on bytes held at once; a request above the whole budget waits until it can go alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.held + n <= self.capacity)
            self.held += n
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()


def decoded_size(data: bytes, config: DecodeConfig) -> int:
    """Bytes that decoding `data` takes, from its header alone (read by the plugins of `config.formats` only, as
    decode_image reads it); 0 when unreadable (decode_image says why)."""
    try:
        with open_header(data, config.formats) as image:
            width, height = image.size
    except Exception:  # any header Pillow cannot read: decode_image turns it into the row's error
        return 0
    return width * height * BYTES_PER_PIXEL


@dataclass
class StageTimes:
    """What one unit spent where. fetch_s and decode_s add up the time of every image on its thread (thread
    seconds, so they can exceed the unit's wall time); model_s is the model thread's."""

    images_fetched: int = 0
    reads_abandoned: int = 0  # fetch attempts left blocked at their deadline (pipeline.deadline)
    fetch_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)


@dataclass
class PreparedRow:
    row: InputRow
    image: int | None = None  # the row's image: its index in the batch's pixel tensor
    instruction: str | None = None
    error: RowError | None = None
    sha256: str | None = None  # hex SHA-256 of the image bytes; None when no bytes were had


@dataclass(frozen=True)
class _Fetched:
    """A row's image bytes, as their SHA-256 and the (shared) decode of those bytes."""

    sha256: str
    decoded: Future


@dataclass
class PreparedBatch:
    rows: list[PreparedRow]
    pixels: torch.Tensor | None  # [distinct good images, 3, H, W] uint8, as `resized`; None when no row is ready


def instruction_as_given(row: InputRow) -> str:
    """The row's instruction unchecked (a stage of its own, a benchmark): the model's checks are the worker's."""
    return str(row.instruction)


def batches(rows: Sequence[InputRow], size: int) -> Iterator[Sequence[InputRow]]:
    """Micro-batches of about `size` rows that never split the instructions of one input row, so each
    image is fetched and encoded once however many questions it is asked."""
    start = 0
    while start < len(rows):
        end = min(start + size, len(rows))
        while end < len(rows) and rows[end].row_index == rows[end - 1].row_index:
            end += 1
        yield rows[start:end]
        start = end


class PrepareStage:
    """The prepare stage of one unit; iterate `batches()` from the model's thread. Use as a context manager: leaving
    it (also on an error) drops what is still queued."""

    def __init__(
        self,
        fetcher: Fetcher,
        decode: DecodeConfig,
        processor: BlipImageProcessor,
        config: PrepareConfig,
        check_instruction: Callable[[InputRow], str] = instruction_as_given,
        pin_memory: bool = False,
        pool: DecodePool | None = None,
    ) -> None:
        """`pool`: decode processes to use (a worker keeps one for its lifetime); None: the stage starts its own
        when `config` asks for processes, and ends them on leaving."""
        self.fetcher = fetcher
        self.decode = decode
        self.processor = processor
        self.config = config
        self.check_instruction = check_instruction  # row -> its instruction as the model takes it, or raises why not
        self.pin_memory = pin_memory
        self.times = StageTimes()
        self._abandoned_before = deadline.abandoned_total()
        self.budget = ByteBudget(config.decoded_bytes)
        return_freed_images_to_the_os()
        processes = config.decode_processes()
        self._own_pool = DecodePool(processes, decode, processor) if pool is None and processes > 0 else None
        self.pool = self._own_pool if self._own_pool is not None else pool
        # Two threads a decode process: one waits for its process while the other has the next image checked and
        # ready to send, so a process is not idle while its last result is copied out and the next is prepared.
        workers = 2 * self.pool.processes if self.pool is not None else config.threads or default_threads()
        self._fetch_pool = ThreadPoolExecutor(fetcher.config.concurrency, thread_name_prefix="fetch")
        self._cpu_pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        self._assembler = ThreadPoolExecutor(1, thread_name_prefix="assemble")
        self._decodes: dict[str, Future] = {}  # sha256 -> its decode: identical bytes are decoded once
        self._decodes_lock = threading.Lock()
        self._counted: set[str] = set()  # sha256 of the images counted in times.images_fetched

    def __enter__(self) -> PrepareStage:
        return self

    def __exit__(self, *exc: object) -> None:
        pools = (self._assembler, self._fetch_pool, self._cpu_pool)
        for pool in pools:  # drop everything queued first, then wait for what runs (fetches end by their deadlines)
            pool.shutdown(wait=False, cancel_futures=True)
        for pool in pools:
            pool.shutdown(wait=True)
        if self._own_pool is not None:
            self._own_pool.close()
        self.times.reads_abandoned = deadline.abandoned_total() - self._abandoned_before

    def batches(self, rows: Sequence[InputRow], size: int) -> Iterator[PreparedBatch]:
        """The unit's micro-batches in order; every image of the unit starts fetching at the first call."""
        images = {row.row_index: self._fetch_pool.submit(self._fetch, row.image) for row in rows}
        chunks = list(batches(rows, size))
        pending = deque(self._assembler.submit(self._assemble, chunk, images) for chunk in chunks[: self.config.ahead])
        for i in range(len(chunks)):
            if i + self.config.ahead < len(chunks):
                pending.append(self._assembler.submit(self._assemble, chunks[i + self.config.ahead], images))
            yield pending.popleft().result()  # no longer held here: the batch is the model's now

    def _fetch(self, ref: str | bytes | None) -> _Fetched | RowError:
        """Fetch on a fetch thread, then queue the decode on the CPU threads (which never wait on the network),
        unless the same bytes are decoded already."""
        start = time.perf_counter()
        try:
            data = self.fetcher.fetch(ref)
        except RowError as err:
            return err
        except Exception as err:  # noqa: BLE001 - the row boundary: nothing about one row may fail its unit
            return RowError("fetch_connection", f"{type(err).__name__}: {err}")
        finally:
            fetch_s = time.perf_counter() - start
            self.times.add("fetch_s", fetch_s)
        digest = hashlib.sha256(data).hexdigest()
        with self._decodes_lock:
            decoded = self._decodes.get(digest)
            if decoded is None:  # decoded within what the first fetch of these bytes left of its row's deadline
                decoded = self._decodes[digest] = self._cpu_pool.submit(
                    self._decode, data, self.fetcher.config.row_deadline_s - fetch_s
                )
        return _Fetched(digest, decoded)

    def _decode(self, data: bytes, seconds: float) -> torch.Tensor | RowError:
        """Decode, RGB, resize: uint8 [3, H, W], under the decoded-bytes budget; in a decode process, stopped after
        `seconds` (what the row's fetch left of its deadline)."""
        start = time.perf_counter()
        try:
            check_before_opening(data, self.decode)  # before decoded_size opens the header here
            with self.budget.hold(decoded_size(data, self.decode)):
                if self.pool is not None:
                    return self.pool.resized(data, seconds)
                image = decode_image(data, self.decode, self.processor.rgb_resize.covering)
                with image:
                    return self.processor.resized(image)
        except RowError as err:
            return err
        except Exception as err:  # anything else about one image (the processor refusing it, no memory for it)
            return RowError("decode_error", f"{type(err).__name__}: {err}")
        finally:
            self.times.add("decode_s", time.perf_counter() - start)

    def _assemble(self, rows: Sequence[InputRow], images: dict[int, Future[_Fetched | RowError]]) -> PreparedBatch:
        """Wait for the rows' images, check the instructions, stack the distinct good images: each is copied into
        the batch as soon as it is decoded, while later ones still decode, so a batch is ready right after its
        last image (a batch of 256 took 30 ms more to copy at the end)."""
        fetched = {index: images[index].result() for index in dict.fromkeys(row.row_index for row in rows)}
        distinct = {f.sha256: f.decoded for f in fetched.values() if isinstance(f, _Fetched)}
        slot: dict[str, int] = {}  # sha256 -> index in the pixel tensor
        pixels: torch.Tensor | None = None  # made at the first good image, with room for every distinct one
        prepared = []
        for row in rows:
            item = PreparedRow(row)
            fetch = fetched[row.row_index]
            if isinstance(fetch, _Fetched):
                item.sha256 = fetch.sha256
            if row.id is None:
                item.error = RowError("invalid_input", f"row {row.row_index}: the id column is null")
            elif row.problem is not None:
                item.error = row.problem
            elif isinstance(fetch, RowError):
                item.error = fetch
            elif isinstance(decoded := fetch.decoded.result(), RowError):
                item.error = decoded
            else:
                try:
                    item.instruction = self.check_instruction(row)
                except RowError as err:
                    item.error = err
                except Exception as err:  # noqa: BLE001 - the row boundary, as in _fetch
                    item.error = RowError("invalid_input", f"instruction refused: {type(err).__name__}: {err}")
                else:
                    if fetch.sha256 not in slot:
                        if pixels is None:
                            shape = (len(distinct), *decoded.shape)
                            pixels = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
                        # numpy's copy: torch's would run on its intra-op threads, which spin
                        pixels.numpy()[len(slot)] = decoded.numpy()
                        slot[fetch.sha256] = len(slot)
                    item.image = slot[fetch.sha256]
            prepared.append(item)
        good = [digest for digest, d in distinct.items() if not isinstance(d.result(), RowError)]
        new = [digest for digest in good if digest not in self._counted]
        self._counted.update(new)  # only the assembler thread touches it
        self.times.add("images_fetched", len(new))
        return PreparedBatch(prepared, None if pixels is None else pixels[: len(slot)])
