"""Deadlines that hold while a call blocks: a fetch attempt runs in a thread of its own, and its caller waits for it
at most until the deadline. Then the sockets and files the attempt holds are shut from outside, so that a server
dripping its header block one byte at a time, a stalled object store or a slow disk cannot keep a row (and so a unit)
waiting: the row gets its timeout on time, and the attempt's thread is free again as soon as its blocked read
returns.

An attempt registers what it holds (`hold`) through the thread-local `current()`: the guarded HTTP connections
(pipeline.guard) register themselves for each request, storage reads register their open file. A connection given
back to its pool is released first (`release`), so an expiring attempt never shuts a connection another attempt uses.
A read that closing cannot interrupt (a local file on a hung network mount, an object store's client waiting on its
own timeout) keeps its thread until it returns; the row does not wait for it. DNS resolution is such a call too.
Shutting runs on a thread of its own, since closing may block as well (a buffered file's close() waits for the lock
its blocked read() holds), so the waiter always returns at the deadline.

An attempt still running at its deadline is counted as abandoned until its call returns (one whose socket was shut
returns at once; a read that closing cannot interrupt stays counted). At most `max_abandoned` of them may exist in a
process (threads and their stacks are finite): past that, new attempts fail at once with a `fetch_timeout` saying
why, instead of piling up more threads on a mount that is hung. `abandoned_total()` counts every attempt abandoned
so far, for the unit's timing and the run summary.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import RowError

T = TypeVar("T")

_local = threading.local()
_abandoned_lock = threading.Lock()
_abandoned_now = 0  # attempt threads past their deadline whose call has not returned yet
_abandoned_total = 0  # every attempt abandoned in this process so far
IDLE_RUNNER_S = 30.0  # an attempt thread given nothing to run for this long ends


def abandoned_now() -> int:
    """Attempt threads left behind at their deadline and still blocked in their call."""
    return _abandoned_now


def abandoned_total() -> int:
    """Attempts abandoned at their deadline in this process so far."""
    return _abandoned_total


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
        """Leave the attempt's thread behind, counted as abandoned until its call returns, and shut what it holds
        on a thread of its own (closing may block too: a buffered file's close() waits for its blocked read())."""
        global _abandoned_now, _abandoned_total
        with self._lock:
            if self._finished:
                return
            self._expired = True
            held, self._held = self._held, []
            with _abandoned_lock:
                _abandoned_now += 1
                _abandoned_total += 1
        if held:

            def shut_held() -> None:
                for resource in held:
                    _shut(resource)

            threading.Thread(target=shut_held, name="deadline-shut", daemon=True).start()

    def finish(self) -> None:
        """The attempt's call returned, in time or not."""
        global _abandoned_now
        with self._lock:
            self._finished = True
            self._held = []
            if self._expired:
                with _abandoned_lock:
                    _abandoned_now -= 1


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


class _Runner:
    """A daemon thread that runs attempts one at a time. Between them it waits among the idle runners, so that an
    attempt is handed to a waiting thread instead of starting one: a thread start cost as much CPU as reading a
    100 KB local file. A runner left blocked past its deadline rejoins the idle ones when its call returns; one
    given nothing to run for IDLE_RUNNER_S ends, so the threads kept follow the recent number of attempts at once."""

    def __init__(self) -> None:
        # None: end (the interpreter exits)
        self.jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Lock] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="fetch-attempt", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                item = self.jobs.get(timeout=IDLE_RUNNER_S)
            except queue.Empty:
                with _idle_lock:
                    if self in _idle:
                        _idle.remove(self)
                        return
                continue  # taken from the idle ones just now: its job is on the way
            if item is None:
                return
            job, done = item
            job()
            with _idle_lock:
                _idle.append(self)
            done.release()  # once idle again, so that the caller's next attempt finds this thread


_idle: list[_Runner] = []  # the last to become idle is taken first
_idle_lock = threading.Lock()
os.register_at_fork(after_in_child=_idle.clear)  # a forked child has none of these threads


@atexit.register
def _end_idle_runners() -> None:
    """At exit, the idle runners end, so that no attempt thread waits on into the interpreter's finalization, as
    none did when each attempt had a thread of its own (one still blocked in an abandoned read cannot be ended)."""
    with _idle_lock:
        idle = list(_idle)
        _idle.clear()
    for runner in idle:
        runner.jobs.put(None)
    for runner in idle:
        runner.thread.join(timeout=1.0)


def _run_in_own_thread(job: Callable[[], None], done: threading.Lock) -> None:
    """Start job() at once on a thread that runs nothing else meanwhile (an idle runner, or a new one), which
    releases `done` when job() has returned."""
    with _idle_lock:
        runner = _idle.pop() if _idle else None
    (runner or _Runner()).jobs.put((job, done))


def run_within(seconds: float, call: Callable[[], T], on_timeout: Callable[[], BaseException], max_abandoned: int) -> T:
    """call() on a daemon thread of its own (an idle runner's), waited for at most `seconds`; past that, the
    attempt's resources are shut, its thread is left behind, and on_timeout() is raised. What call() returns or
    raises is passed on when it ends in time. With `max_abandoned` threads already left behind and still blocked,
    RowError("fetch_timeout") at once."""
    if _abandoned_now >= max_abandoned:
        raise RowError(
            "fetch_timeout",
            f"not attempted: {_abandoned_now} earlier reads of this worker are still "
            "blocked past their deadlines (a hung network mount or store?), the limit "
            "of [fetch] max_abandoned_reads; new reads start as they return",
        )
    attempt = Attempt(time.monotonic() + seconds)
    outcome: dict[str, Any] = {}
    done = threading.Lock()  # held until call() ends: a lock's timed acquire is a cheaper wait than an Event's
    done.acquire()

    def target() -> None:
        _local.attempt = attempt
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            outcome["error"] = err
        finally:
            _local.attempt = None
            attempt.finish()

    _run_in_own_thread(target, done)
    if not done.acquire(timeout=max(0.0, seconds)):
        attempt.expire()
        raise on_timeout()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
