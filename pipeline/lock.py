"""One run at a time per output: a lock file with an expiry, refreshed while the run is alive.

A run that finds a live lock refuses to start. A lock whose holder died is taken over: at once when the holder ran on
this host and its process is gone, otherwise when it expires after `ttl_s` (a scheduled run after a crash is not
blocked for long). Every change to the lock is a compare-and-swap on the lock as it was read, so two runs racing for
it (to create it, or to take over the same stale lock) cannot both win:
- local disk: read, decide and write under an exclusive flock of the output folder (released by the kernel if the
  process dies), the write a rename of a whole temp file (a filesystem without flock: check, then write);
- S3: conditional writes: create with If-None-Match "*", replace and delete with If-Match on the ETag read, so the
  store refuses a write over a lock that changed since it was read;
- other object stores: check, then write (two runs started within the same second could both take the lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from blipbatch.errors import BlipbatchError

from .sink import retry_store_call

log = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
FLOCK_WAIT_S = 10.0  # a critical section is a read and a write: this long means a stuck process


class OutputLocked(BlipbatchError, RuntimeError):
    """Another run holds the output."""


@dataclass(frozen=True)
class LockInfo:
    token: str
    host: str
    pid: int
    expires_at: float  # seconds since the epoch

    def is_live(self) -> bool:
        if self.expires_at <= time.time():
            return False
        if self.host != socket.gethostname():
            return True  # another machine's process: only its expiry tells
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        left = max(self.expires_at - time.time(), 0)
        return f"held by pid {self.pid} on {self.host}, expires in {left:.0f}s unless renewed"


@dataclass(frozen=True)
class _Read:
    data: bytes
    version: str  # what a conditional write compares: the ETag on S3, the bytes themselves on local disk


class _Store:
    """The lock file, with writes conditional on what was read (this base class: on other stores, unconditional)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield

    def read(self) -> _Read | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return _Read(data, "")

    def create(self, data: bytes) -> bool:
        """Write the lock if there is none; False if there is one."""
        if self.read() is not None:
            return False
        self.fs.pipe_file(self.path, data)
        return True

    def replace(self, data: bytes, seen: _Read) -> bool:
        """Write the lock over `seen`; False if the lock is no longer what was seen."""
        self.fs.pipe_file(self.path, data)
        return True

    def delete(self, seen: _Read) -> bool:
        self.fs.rm_file(self.path)
        return True


class _LocalStore(_Store):
    """Every read-decide-write under an exclusive flock of the output folder, so each one is a compare-and-swap."""

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            deadline = time.monotonic() + FLOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OutputLocked(
                            f"{folder}: another process kept the lock file busy for {FLOCK_WAIT_S:.0f}s"
                        ) from None
                    time.sleep(0.005)
                except OSError as err:  # a filesystem without flock (some network and FUSE mounts)
                    if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                        raise
                    log.warning("%s: no flock on this filesystem; taking the lock is check-then-write", folder)
                    break
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> _Read | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return _Read(data, data.hex())

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def replace(self, data: bytes, seen: _Read) -> bool:
        current = self.read()
        if current is None or current.version != seen.version:
            return False
        temp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, self.path)  # whole: a reader never sees a torn lock
        return True

    def delete(self, seen: _Read) -> bool:
        current = self.read()
        if current is None or current.version != seen.version:
            return False
        os.remove(self.path)
        return True


class _S3Store(_Store):
    """Conditional writes: the store itself refuses a write over a lock that changed since it was read."""

    def read(self) -> _Read | None:
        self.fs.invalidate_cache(self.path)
        try:
            # The ETag first: content newer than its ETag only makes a later conditional write fail, never pass.
            etag = self.fs.info(self.path)["ETag"]
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return _Read(data, etag)

    def _conditional(self, what: str, call: Callable[[], object]) -> bool:
        """`call()`; False when the store refused it for its condition (412, or 404 for If-Match on no object)."""
        try:
            retry_store_call(f"{what} {self.path}", call)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as err:
            if err.errno == errno.EINVAL and "pre-condition" in str(err):
                return False
            raise
        return True

    def create(self, data: bytes) -> bool:
        return self._conditional("create", lambda: self.fs.pipe_file(self.path, data, mode="create"))

    def replace(self, data: bytes, seen: _Read) -> bool:
        return self._conditional("replace", lambda: self.fs.pipe_file(self.path, data, IfMatch=seen.version))

    def delete(self, seen: _Read) -> bool:
        bucket, key, _ = self.fs.split_path(self.path)
        deleted = self._conditional(
            "delete", lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=seen.version)
        )
        self.fs.invalidate_cache(self.path)
        return deleted


def _store(fs: fsspec.AbstractFileSystem, path: str) -> _Store:
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _S3Store(fs, path)
    return _Store(fs, path)


def _parse(read: _Read | None) -> LockInfo | None:
    if read is None:
        return None
    try:
        return LockInfo(**json.loads(read.data))
    except (ValueError, TypeError):
        return LockInfo("unreadable", "?", 0, 0.0)  # a torn or foreign file: treat as expired


class OutputLock:
    def __init__(self, output_root: str, ttl_s: float = 120.0) -> None:
        fs, root = fsspec.core.url_to_fs(output_root)
        self.store = _store(fs, f"{root.rstrip('/')}/{LOCK_NAME}")
        self.output_root = output_root
        self.ttl_s = ttl_s
        self.info = LockInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), 0.0)

    def _next(self) -> bytes:
        """The lock this run writes next: its token, a fresh expiry."""
        self.info = LockInfo(self.info.token, self.info.host, self.info.pid, time.time() + self.ttl_s)
        return json.dumps(asdict(self.info)).encode()

    def holder(self) -> LockInfo | None:
        """The lock as it stands (live or not; see LockInfo.is_live), or None when no run holds the output."""
        return _parse(self.store.read())

    def acquire(self) -> None:
        with self.store.exclusive():
            seen = self.store.read()
            held = _parse(seen)
            if held is not None and held.is_live():
                raise OutputLocked(
                    f"{self.output_root} is being written by another run ({held.describe()}); "
                    f"wait for it, or remove {LOCK_NAME} there if that run is gone"
                )
            # No lock: create one. A stale lock (its holder gone or silent): replace exactly the one read.
            won = self.store.create(self._next()) if seen is None else self.store.replace(self._next(), seen)
            if not (won or self._written()):
                raise OutputLocked(f"{self.output_root}: another run took the lock at the same moment")

    def _written(self) -> bool:
        # A conditional write refused may be the retry of one that was applied, its answer lost: look.
        return _parse(self.store.read()) == self.info

    def renew(self) -> None:
        """Push the expiry forward; call more often than ttl_s. Refuses if another run took over."""
        with self.store.exclusive():
            seen = self.store.read()
            held = _parse(seen)
            mine = held is not None and held.token == self.info.token
            if not (seen is not None and mine and (self.store.replace(self._next(), seen) or self._written())):
                raise OutputLocked(f"{self.output_root}: this run's lock was taken over or removed")

    def maybe_renew(self) -> None:
        """Renew when a third of the time to live has passed since the last write."""
        if self.info.expires_at - time.time() < self.ttl_s * 2 / 3:
            self.renew()

    def release(self) -> None:
        with self.store.exclusive():
            seen = self.store.read()
            held = _parse(seen)
            if seen is not None and held is not None and held.token == self.info.token:
                self.store.delete(seen)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
