"""One run at a time per output: a lock file with an expiry, refreshed while the run is alive.

A run that finds a live lock refuses to start. A lock whose holder died is taken over: at once when
the holder ran on this host and its process is gone, otherwise when it expires after `ttl_s` (a
scheduled run after a crash is not blocked for long). On local disk the lock is created with
O_EXCL, so two runs racing for it cannot both win. On object stores it is check-then-put: two runs
started within the same second could both take it (S3 conditional writes would close that).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .sink import retry_store_call
from blipbatch.errors import BlipbatchError

LOCK_NAME = "_lock.json"


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


class OutputLock:
    def __init__(self, output_root: str, ttl_s: float = 120.0) -> None:
        self.fs, root = fsspec.core.url_to_fs(output_root)
        self.path = f"{root.rstrip('/')}/{LOCK_NAME}"
        self.output_root = output_root
        self.ttl_s = ttl_s
        self.info = LockInfo(uuid.uuid4().hex, socket.gethostname(), os.getpid(), 0.0)

    def _read(self) -> LockInfo | None:
        self.fs.invalidate_cache()
        try:
            with self.fs.open(self.path, "rb") as f:
                return LockInfo(**json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return LockInfo("unreadable", "?", 0, 0.0)  # a torn or foreign file: treat as expired

    def _write(self, exclusive: bool) -> None:
        self.info = LockInfo(self.info.token, self.info.host, self.info.pid, time.time() + self.ttl_s)
        data = json.dumps(asdict(self.info)).encode()
        if isinstance(self.fs, LocalFileSystem) and exclusive:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            retry_store_call(f"write {self.path}", lambda: self.fs.pipe_file(self.path, data))

    def holder(self) -> LockInfo | None:
        """The lock as it stands (live or not; see LockInfo.is_live), or None when no run holds the output."""
        return self._read()

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held.is_live():
            raise OutputLocked(
                f"{self.output_root} is being written by another run ({held.describe()}); "
                f"wait for it, or remove {LOCK_NAME} there if that run is gone"
            )
        if held is not None:
            self.fs.rm_file(self.path)  # its holder is gone, or stopped renewing it
        try:
            self._write(exclusive=True)
        except FileExistsError:
            raise OutputLocked(f"{self.output_root}: another run took the lock at the same moment") from None

    def renew(self) -> None:
        """Push the expiry forward; call more often than ttl_s. Refuses if another run took over."""
        held = self._read()
        if held is None or held.token != self.info.token:
            raise OutputLocked(f"{self.output_root}: this run's lock was taken over or removed")
        self._write(exclusive=False)

    def maybe_renew(self) -> None:
        """Renew when a third of the time to live has passed since the last write."""
        if self.info.expires_at - time.time() < self.ttl_s * 2 / 3:
            self.renew()

    def release(self) -> None:
        held = self._read()
        if held is not None and held.token == self.info.token:
            self.fs.rm_file(self.path)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
