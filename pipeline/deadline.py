"""Deadlines that hold while a call blocks: a fetch attempt runs in a thread of its own, and its caller waits for it
at most until the deadline. Then the sockets and files the attempt holds are shut from outside, so that a server
dripping its header block one byte at a time, a stalled object store or a slow disk cannot keep a row (and so a unit)
waiting: the row gets its timeout on time, and the attempt's thread ends as soon as its blocked read returns.

An attempt registers what it holds (`hold`) through the thread-local `current()`: the guarded HTTP connections
(pipeline.guard) register themselves for each request, storage reads register their open file. A connection given
back to its pool is released first (`release`), so an expiring attempt never shuts a connection another attempt uses.
A read that closing cannot interrupt (a local file on a hung network mount, an object store's client waiting on its
own timeout) keeps its thread until it returns; the row does not wait for it. DNS resolution is such a call too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_local = threading.local()


def _shut(resource: Any) -> None:
    """Unblock whatever is reading from `resource`: a socket (or a connection's socket) is shut down, which wakes a
    blocked recv at once (close() alone does not); anything else with close() is closed."""
    sock = resource if isinstance(resource, socket.socket) else getattr(resource, "sock", None)
    try:
        if isinstance(sock, socket.socket):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's method, also for a TLS socket
        elif hasattr(resource, "close"):
            resource.close()
    except (OSError, ValueError):
        pass  # already closed or never connected


class Attempt:
    """One attempt's deadline and the resources it holds open."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._held: list[Any] = []
        self._expired = False
        self._finished = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def hold(self, resource: Any) -> None:
        """Shut `resource` when the attempt expires (at once, if it already has)."""
        with self._lock:
            if not self._expired:
                self._held.append(resource)
                return
        _shut(resource)

    def release(self, resource: Any) -> None:
        with self._lock:
            self._held = [held for held in self._held if held is not resource]

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._expired = True
            held, self._held = self._held, []
        for resource in held:
            _shut(resource)

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._held = []


def current() -> Attempt | None:
    """The attempt the calling thread runs, if any."""
    return getattr(_local, "attempt", None)


def hold(resource: Any) -> None:
    """Register `resource` with the calling thread's attempt, if it runs one."""
    if (attempt := current()) is not None:
        attempt.hold(resource)


def release(resource: Any) -> None:
    if (attempt := current()) is not None:
        attempt.release(resource)


def run_within(seconds: float, call: Callable[[], T], on_timeout: Callable[[], BaseException]) -> T:
    """call() in its own daemon thread, waited for at most `seconds`; past that, the attempt's resources are shut and
    on_timeout() is raised. What call() returns or raises is passed on when it ends in time."""
    attempt = Attempt(time.monotonic() + seconds)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        _local.attempt = attempt
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            outcome["error"] = err
        finally:
            attempt.finish()
            done.set()

    threading.Thread(target=target, name="fetch-attempt", daemon=True).start()
    if not done.wait(max(0.0, seconds)):
        attempt.expire()
        raise on_timeout()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
