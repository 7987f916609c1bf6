"""The driver side: hand work units to ModelWorker actors, survive their deaths, report progress.

Each worker gets a few units at a time (Ray runs an actor's tasks one after another, so the oldest
unit in flight on a worker is the one it is working on). When a worker dies, Ray restarts it; the
unit it was running is charged an attempt and re-queued, the units queued behind it are re-queued
free of charge. A unit that fails `max_attempts` times is marked failed and the run goes on. A worker
not serving again within RESTART_TIMEOUT_S is given up on; the run stops only when every worker is.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from ray.exceptions import RayActorError, RayTaskError

from blipbatch.schemas import ProgressRecord

from .lock import OutputLocked
from .metrics import RunMetrics
from .redact import redact
from .shards import ShardChanged, WorkUnit
from .sink import mark_failed, rows_at
from blipbatch.errors import BlipbatchError


# A worker that died and is not serving again within this long (Ray cannot place it, or it keeps failing to start)
# is given up on; the run goes on with the others, and stops only when none is left.
RESTART_TIMEOUT_S = 300.0
logger = logging.getLogger(__name__)


class WorkerLost(BlipbatchError, RuntimeError):
    """Every model worker died and Ray could not restart any of them."""


class OutputUnwritable(BlipbatchError, OSError):
    """The output cannot take more writes (a full disk or quota, a read-only mount, its lock lost): the run stops."""


# A unit that fails with one of these cannot be helped by another try, nor can any other unit: the output's disk is
# full, over quota or read-only.
OUTPUT_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _output_full(error: BaseException | None) -> OSError | None:
    while error is not None:
        if isinstance(error, OSError) and error.errno in OUTPUT_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


@dataclass
class RunSummary:
    output: str
    units_total: int = 0
    units_skipped: int = 0  # committed by an earlier run
    units_done: int = 0  # committed by this run
    units_failed: int = 0
    rows_ok: int = 0  # this run's rows
    rows_error: int = 0
    images_encoded: int = 0  # vision-encoder passes this run
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # unit id -> last reason
    wall_s: float = 0.0
    interrupted: bool = False  # by Ctrl-C (SIGINT) or SIGTERM
    terminated: bool = False  # the interrupt was SIGTERM
    workers_lost: int = 0  # died and did not come back within RESTART_TIMEOUT_S
    # Why the run stopped early or its output is not whole (a full disk, the folder deleted); None: it is whole.
    output_problem: str | None = None
    committed_ids: set[str] = field(default_factory=set, repr=False)  # units this run committed
    reads_abandoned: int = 0  # fetch reads still blocked at their row's deadline (UnitTiming.reads_abandoned)

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_error

    def __str__(self) -> str:
        rate = self.rows / self.wall_s if self.wall_s > 0 else 0.0
        lines = [
            f"output: {self.output}",
            f"units: {self.units_total} total, {self.units_done} done now, {self.units_skipped} already done, "
            f"{self.units_failed} failed",
            f"rows: {self.rows_ok} ok, {self.rows_error} error"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(self.errors_by_kind.items()))})" if self.errors_by_kind else ""),
            f"time: {self.wall_s:.1f}s, {rate:.1f} rows/s",
        ]
        lines += [f"failed unit {unit}: {reason}" for unit, reason in sorted(self.failed.items())]
        if self.reads_abandoned:
            lines.append(f"reads: {self.reads_abandoned} blocked past their rows' deadlines and were abandoned (a hung "
                         "mount or store?); their rows are fetch_timeout errors, at most [fetch] max_abandoned_reads "
                         "are left blocked per worker")
        if self.workers_lost:
            lines.append(f"workers: {self.workers_lost} died and did not come back within {RESTART_TIMEOUT_S:.0f}s; "
                         "the others took their units")
        if self.interrupted:
            lines.append("interrupted: committed units are kept; run the same command again to resume")
        if self.output_problem:
            lines.append(f"output problem: {self.output_problem}")
        return "\n".join(lines)


class Progress:
    """One status line on a terminal (rows/s, errors, ETA), redrawn at most every `interval` seconds; where the
    stream is not a terminal (a log file), one plain line at most every LOG_INTERVAL_S seconds instead."""

    LOG_INTERVAL_S = 30.0

    def __init__(self, total_rows: int, stream: TextIO | None = sys.stderr, interval: float = 1.0) -> None:
        self.total_rows = total_rows
        self.stream = stream
        self.terminal = stream is not None and stream.isatty()
        self.interval = interval if self.terminal else max(interval, self.LOG_INTERVAL_S)
        self.start = time.monotonic()
        self.last = 0.0
        self.printed = ""

    def update(self, summary: RunSummary, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.last < self.interval):
            return
        self.last = now
        elapsed = now - self.start
        rate = summary.rows / elapsed if elapsed > 0 else 0.0
        left = max(self.total_rows - summary.rows, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        line = (f"[{summary.units_done + summary.units_failed}/{summary.units_total - summary.units_skipped} units] "
                f"{summary.rows}/{self.total_rows} rows, {summary.rows_error} errors, {rate:.1f} rows/s, ETA {eta}")
        if self.terminal:
            self.stream.write(f"\r{line}   ")
        elif line != self.printed:  # a log file gets each state once
            self.stream.write(f"{line}\n")
        self.printed = line
        self.stream.flush()

    def close(self, summary: RunSummary) -> None:
        self.update(summary, force=True)
        if self.stream is not None and self.terminal:
            self.stream.write("\n")


class Dispatcher:
    """Hands units to workers and settles each outcome: committed, re-queued, or failed."""

    def __init__(self, workers: Sequence[Any], summary: RunSummary, max_attempts: int, in_flight_per_worker: int):
        self.workers = workers
        self.summary = summary
        self.max_attempts = max_attempts
        self.in_flight_per_worker = in_flight_per_worker
        self.queue: deque[tuple[WorkUnit, int]] = deque()
        self.assigned: list[list[Any]] = [[] for _ in workers]  # per worker: refs in submission order
        self.in_flight: dict[Any, tuple[int, WorkUnit, int]] = {}  # ref -> (worker, unit, attempt)
        # A worker that died gets no work until Ray has restarted it: a task sent meanwhile would fail too.
        self.probes: dict[Any, tuple[int, float]] = {}  # ready() ref -> (worker, when it died)
        self.lost: set[int] = set()  # workers given up on: never sent work again
        self.errors = Counter(summary.errors_by_kind)
        self.metrics = RunMetrics(summary.output)

    def waiting_on(self) -> list[Any]:
        return list(self.in_flight) + list(self.probes)

    def submit(self) -> None:
        idle = {w for w, _ in self.probes.values()} | self.lost
        for w, worker in enumerate(self.workers):
            while w not in idle and self.queue and len(self.assigned[w]) < self.in_flight_per_worker:
                unit, attempt = self.queue.popleft()
                ref = worker.process_unit.remote(unit, attempt)
                self.in_flight[ref] = (w, unit, attempt)
                self.assigned[w].append(ref)

    def settle(self, ref: Any) -> None:
        if ref in self.probes:
            self.probed(ref)
            return
        if ref not in self.in_flight:
            return  # settled already, with the other units of its dead worker
        w, unit, attempt = self.in_flight[ref]
        try:
            record = ray.get(ref)
        except RayActorError:
            self.worker_died(w)
            return
        except RayTaskError as e:  # the unit raised; its worker lives on
            self.forget(ref)
            if (full := _output_full(e.cause)) is not None:
                raise OutputUnwritable(f"unit {unit.unit_id} could not be written: {redact(_strerror(full))}")
            # A shard rewritten since planning stays rewritten: another try would only read it again.
            final = isinstance(e.cause, ShardChanged)
            self.charge(unit, max(attempt, self.max_attempts) if final else attempt, _reason(e))
            return
        self.forget(ref)
        self.committed(record, unit)

    def worker_died(self, w: int) -> None:
        """All units on a dead worker fail with it, but only the one it was running (the oldest that had
        not finished: an actor runs its tasks in order) is charged an attempt; the rest go back free."""
        refs = list(self.assigned[w])
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        charged = False
        for ref in refs:
            _, unit, attempt = self.forget(ref)
            record = _result(ref) if ref in finished else None
            if record is not None:
                self.committed(record, unit)
            elif charged:
                self.queue.append((unit, attempt))
            else:
                charged = True
                self.charge(unit, attempt, "worker died while running it")
        self.probes[self.workers[w].ready.remote()] = (w, time.monotonic())

    def probed(self, ref: Any) -> None:
        w, died_at = self.probes.pop(ref)
        if _result(ref) is not None:
            return  # restarted: it takes work again
        time.sleep(0.2)
        self.probes[self.workers[w].ready.remote()] = (w, died_at)

    def give_up_on_late_restarts(self) -> None:
        """Stop waiting for workers dead longer than RESTART_TIMEOUT_S (a probe may never answer: Ray cannot place
        the actor while its node is gone); WorkerLost once no worker is left."""
        now = time.monotonic()
        for ref, (w, died_at) in list(self.probes.items()):
            if now - died_at > RESTART_TIMEOUT_S:
                del self.probes[ref]
                self.lost.add(w)
                self.summary.workers_lost = len(self.lost)
                logger.warning("model worker %d did not come back within %.0fs of dying; going on without it",
                               w, RESTART_TIMEOUT_S)
        if len(self.lost) == len(self.workers):
            raise WorkerLost(f"every model worker died and none came back within {RESTART_TIMEOUT_S:.0f}s")

    def forget(self, ref: Any) -> tuple[int, WorkUnit, int]:
        entry = self.in_flight.pop(ref)
        self.assigned[entry[0]].remove(ref)
        return entry

    def charge(self, unit: WorkUnit, attempt: int, reason: str) -> None:
        if attempt < self.max_attempts:
            self.queue.append((unit, attempt + 1))
            self.metrics.retried(unit.unit_id, attempt, reason)
            return
        try:
            mark_failed(self.summary.output, unit.unit_id, reason, attempt)
        except OSError as e:
            raise OutputUnwritable(f"cannot record that unit {unit.unit_id} failed: {redact(_strerror(e))}") from None
        self.metrics.failed(unit.unit_id, attempt, reason)
        self.summary.units_failed += 1
        self.summary.failed[unit.unit_id] = reason

    def committed(self, record: ProgressRecord, unit: WorkUnit) -> None:
        # A redo counts the rows it did again, not those its unit kept.
        ok, error, kinds = ((record.rows_ok, record.rows_error, record.errors_by_kind) if unit.redo is None
                            else rows_at(self.summary.output, record, unit.redo))
        self.summary.units_done += 1
        self.summary.committed_ids.add(record.unit_id)
        self.summary.rows_ok += ok
        self.summary.rows_error += error
        self.summary.images_encoded += record.images_encoded
        self.summary.reads_abandoned += record.timing.reads_abandoned if record.timing else 0
        self.errors.update(kinds)
        self.summary.errors_by_kind = dict(self.errors)
        self.metrics.committed(record)


def run_units(
    units: Sequence[WorkUnit],
    workers: Sequence[Any],
    summary: RunSummary,
    max_attempts: int,
    in_flight_per_worker: int = 2,
    progress: Progress | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> RunSummary:
    """Process `units` on `workers` (Ray actor handles of ModelWorker) until each is committed or failed.

    `heartbeat` is called about once a second (the run renews its output lock with it)."""
    dispatcher = Dispatcher(workers, summary, max_attempts, in_flight_per_worker)
    dispatcher.queue.extend((unit, 1) for unit in units)
    try:
        while dispatcher.queue or dispatcher.in_flight:
            dispatcher.submit()
            ready, _ = ray.wait(dispatcher.waiting_on(), num_returns=1, timeout=1.0)
            for ref in ready:
                dispatcher.settle(ref)
            dispatcher.give_up_on_late_restarts()
            dispatcher.metrics.queue(len(dispatcher.queue), len(dispatcher.in_flight))
            if progress is not None:
                progress.update(summary)
            if heartbeat is not None:
                try:
                    heartbeat()
                except OSError as e:  # the lock could not be renewed: the disk is full, or the folder is gone
                    raise OutputUnwritable(f"cannot renew the run's lock: {redact(_strerror(e))}") from None
    except KeyboardInterrupt:
        # Parts are written whole and committed after: nothing half-written is left behind.
        summary.interrupted = True
    except (OutputUnwritable, OutputLocked) as e:  # committed units stay; nothing more can be written
        summary.output_problem = (f"{e}; the run stopped (committed units are kept): make room or fix the output, "
                                  "then run the same command again")
    if progress is not None:
        progress.close(summary)
    return summary


def _result(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except (RayActorError, RayTaskError):
        return None


def _strerror(error: OSError) -> str:
    """An OSError in one line: its message, the file when it names one."""
    text = error.strerror or str(error) or type(error).__name__
    return f"{text}: {error.filename}" if error.filename else text


def _reason(error: RayTaskError) -> str:
    cause = error.cause if error.cause is not None else error
    return redact(f"{type(cause).__name__}: {cause}")  # printed and written to the failed marker
