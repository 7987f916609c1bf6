"""Decode and resize in processes that can be stopped: a decode that runs past its row's deadline is killed with its
process, which is replaced, and the row is a `decode_timeout` error. Pillow's decoders cannot be interrupted inside
a thread, and no check of the header foresees every crafted file (pipeline.decode), so this is what bounds decoding
in time. It also takes decoding past one process's GIL, so the stage scales with the worker's cores.

Each process of the pool serves one request at a time over its own socket: the image's bytes go in as they are
(`send_bytes`, no pickling), the process runs `decode_image` and the processor's RGB conversion and resize
(`BlipImageProcessor.rgb_resize`, the code `resized` runs on a thread) and writes the resized image's `planes`
into a shared-memory block of its own (an anonymous memory file both map); the caller makes the uint8 [3, H, W]
tensor from them with the processor's own `chw`, so the pixels are exactly the processor's. Only the settings (once)
and a small status tuple per image are pickled.

The processes are fresh interpreters (`python -m blipbatch.pipeline.decode_pool`) importing Pillow and the decode
checks, no torch and nothing of the worker's own main module (as multiprocessing's spawn and forkserver would); each
says when it is ready, and that wait is not counted against any row's deadline. They end with the worker, also
mid-decode (each watches its parent). A process that dies (killed for memory, a crash in a decoder) costs its row a
`decode_error` and is replaced too.
"""

from __future__ import annotations

import mmap
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from blipbatch.model.rgb import planes

from .decode import DecodeConfig, decode_image
from .errors import RowError

if TYPE_CHECKING:
    import torch

    from blipbatch.model.image_processing import BlipImageProcessor
    from blipbatch.model.rgb import RgbResize

STARTUP_TIMEOUT_S = 120.0  # a process not ready by then fails the pool (a broken environment, not an image)
_READY = "ready"
PARENT_CHECK_S = 0.5


def _child_environment() -> dict[str, str]:
    """This process's environment, its import path included: a Ray worker may import blipbatch from a runtime
    environment's folder that only its own sys.path names."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))


def _memory_file(size: int) -> int:
    """A file descriptor of `size` bytes of memory that a child can map too (memfd; an unlinked temp file where
    there is none)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("blipbatch-decode", os.MFD_CLOEXEC)
    else:
        fd = os.dup(tempfile.TemporaryFile().fileno())
    os.ftruncate(fd, size)
    return fd


@dataclass
class _Process:
    process: subprocess.Popen
    conn: Connection
    block: mmap.mmap
    ready: bool = False


class DecodePool:
    """`processes` decode processes for one processor's output size. Thread-safe: each call takes an idle process,
    waiting for one when all are busy. Close it (or use it as a context manager) to end the processes."""

    def __init__(self, processes: int, decode: DecodeConfig, processor: BlipImageProcessor) -> None:
        if processes < 1:
            raise ValueError(f"DecodePool needs at least one process, got {processes}")
        self.processes = processes
        self.decode = decode
        self.processor = processor
        # The processor's output; without a resize, the largest image decode lets through (a memory file takes
        # memory only where it is written).
        self.block_bytes = 3 * (
            processor.size["height"] * processor.size["width"] if processor.do_resize else decode.max_pixels
        )
        self._settings = pickle.dumps((decode, processor.rgb_resize))
        self.replaced = 0  # processes stopped at a deadline or found dead, and started again
        self._idle: queue.Queue[_Process] = queue.Queue()
        self._all: list[_Process] = []
        self._lock = threading.Lock()
        self._closed = False
        # A pool dropped without close() (a worker object let go) still ends its processes.
        self._finalizer = weakref.finalize(self, _kill, self._all)
        started = [self._start() for _ in range(processes)]
        for worker in started:  # all start at once; a slow start is the pool's failure, not a row's
            self._await_ready(worker)
            self._idle.put(worker)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> _Process:
        ours, theirs = socket.socketpair()
        block_fd = _memory_file(self.block_bytes)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(block_fd), str(self.block_bytes)],
                pass_fds=(theirs.fileno(), block_fd),
                stdin=subprocess.DEVNULL,
                env=_child_environment(),
            )
            block = mmap.mmap(block_fd, self.block_bytes)
        finally:
            theirs.close()
            os.close(block_fd)
        conn = Connection(ours.detach())
        conn.send_bytes(self._settings)
        worker = _Process(process, conn, block)
        with self._lock:
            self._all.append(worker)
        return worker

    def _await_ready(self, worker: _Process) -> None:
        try:
            if worker.conn.poll(STARTUP_TIMEOUT_S) and worker.conn.recv() == _READY:
                worker.ready = True
                return
        except (EOFError, OSError):
            pass
        self._retire(worker)
        raise RuntimeError(
            f"a decode process did not start within {STARTUP_TIMEOUT_S:g} s (exit code "
            f"{worker.process.poll()}); its error output is in the worker's log"
        )

    def _retire(self, worker: _Process) -> None:
        worker.process.kill()
        worker.process.wait(timeout=10)
        worker.conn.close()
        worker.block.close()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def resized(self, data: bytes, seconds: float) -> torch.Tensor:
        """decode_image(data) then the processor's resize, in a pool process, as uint8 [3, H, W]; RowError as
        decode_image raises them, or `decode_timeout` when it takes more than `seconds`."""
        worker = self._idle.get()
        replaced = False  # then its replacement is what goes back to the idle queue
        try:
            if not worker.ready:
                self._await_ready(worker)  # a replacement that is still starting: its start is no row's time
            try:
                worker.conn.send_bytes(data)
                in_time = worker.conn.poll(max(0.0, seconds))
                reply = worker.conn.recv() if in_time else None
            except (EOFError, OSError):  # the process was gone, or died on this image
                code = worker.process.wait(timeout=10)
                self._replace(worker)
                replaced = True
                raise RowError(
                    "decode_error",
                    f"the decode process died decoding this image (exit code {code}; killed for memory?)",
                ) from None
            if reply is None:
                self._replace(worker)
                replaced = True
                raise RowError(
                    "decode_timeout",
                    f"decoding took longer than the {seconds:.3g} s left of the row's "
                    "deadline ([fetch] row_deadline_s); its decode process was stopped",
                )
            if reply[0] == "error":
                raise RowError(reply[1], reply[2])
            width, height = reply[1], reply[2]
            return self.processor.chw(bytearray(worker.block[: 3 * width * height]), width, height)
        finally:
            if not replaced:
                self._idle.put(worker)

    def _replace(self, worker: _Process) -> None:
        self._retire(worker)
        with self._lock:
            self.replaced += 1
            if self._closed:
                return
        self._idle.put(self._start())  # not waited for here: the next caller waits for it to be ready

    def close(self) -> None:
        """End every process (a decode still running is killed) and free the shared blocks."""
        self._finalizer.detach()
        with self._lock:
            self._closed = True
            workers = list(self._all)
        for worker in workers:
            worker.conn.close()  # the process's recv ends: it exits
        for worker in workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=10)
            worker.block.close()
        with self._lock:
            self._all.clear()


def _kill(workers: list[_Process]) -> None:
    for worker in workers:
        worker.process.kill()
        worker.process.wait(timeout=10)


def _serve(conn: Connection, block: mmap.mmap) -> None:
    """A pool process: decode and resize each image sent, its RGB bytes into the shared block, ("ok", width,
    height) or ("error", kind, message) back; ends (EOFError, OSError) when the pool closes its end."""
    decode: DecodeConfig
    rgb_resize: RgbResize
    decode, rgb_resize = pickle.loads(conn.recv_bytes())
    conn.send(_READY)
    while True:
        data = conn.recv_bytes()
        try:
            with decode_image(data, decode, rgb_resize.covering) as image:
                resized = rgb_resize(image)
                rgb = planes(resized)
            block[: len(rgb)] = rgb
            reply: tuple = ("ok", *resized.size)
        except RowError as err:
            reply = ("error", err.kind, err.message)
        except Exception as err:  # noqa: BLE001 - anything about one image (the processor refusing it, no memory)
            reply = ("error", "decode_error", f"{type(err).__name__}: {err}")
        conn.send(reply)


def _exit_with_parent(parent: int) -> None:
    """End this process, even mid-decode, once the worker that started it is gone (it is then re-parented).
    PR_SET_PDEATHSIG would fire when the worker's *thread* that started it ends, and replacements start on the
    prepare stage's threads, which end with each unit."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def main(argv: list[str]) -> None:
    """Entry of a pool process: argv = [socket fd, memory file fd, its size]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle; it closes the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    conn_fd, block_fd, size = (int(arg) for arg in argv)
    with mmap.mmap(block_fd, size) as block:
        try:
            _serve(Connection(conn_fd), block)
        except (EOFError, OSError):
            pass  # the pool closed its end (closing, or this process replaced): the normal end


if __name__ == "__main__":
    main(sys.argv[1:])
