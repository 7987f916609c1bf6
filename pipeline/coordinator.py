"""The driver side: hand work units to ModelWorker actors, survive their deaths, report progress.

Each worker gets a few units at a time (Ray runs an actor's tasks one after another, so the oldest
unit in flight on a worker is the one it is working on). When a worker dies on a node that is still alive, Ray
restarts it; the unit it was running is charged an attempt (it is the likely cause) and re-queued, the units queued
behind it are re-queued free of charge. When a worker's node is gone (Ray says so: the node is dead, or was
preempted), every unit it held is re-queued free of charge. A unit that fails `max_attempts` times is marked failed
and the run goes on. A worker not serving again within RESTART_TIMEOUT_S is given up on; the run stops only when
every worker is.

Elastic pools (`grow`): workers on a node that left are dropped (not restarted), and while units are pending the
pool asks `grow` for more as GPUs join the cluster.
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

from blipbatch.errors import BlipbatchError
from blipbatch.schemas import ProgressRecord

from .lock import OutputLocked
from .metrics import RunMetrics
from .redact import redact
from .shards import ShardChanged, WorkUnit
from .sink import mark_failed, rows_at

# A worker that died and is not serving again within this long (Ray cannot place it, or it keeps failing to start)
# is given up on; the run goes on with the others, and stops only when none is left.
RESTART_TIMEOUT_S = 300.0
# Ray may report a worker's death before its node's (the node's health checks fail later): a unit whose worker died is
# charged only once its node is still alive this long after.
NODE_DEATH_WAIT_S = 60.0
GROW_INTERVAL_S = 2.0  # an elastic pool looks for GPUs that joined the cluster this often, while units wait
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
    units_to_do: int = 0  # what this run set out to do: units not committed before, and redos of committed ones
    units_redone: int = 0  # committed units whose error rows this run did again (--redo-errors), committed again
    rows_redone: int = 0  # of those units: the error rows done again,
    rows_fixed: int = 0  # those of them now ok,
    still_failing: dict[str, int] = field(default_factory=dict)  # and those still in error, by kind
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
    workers_joined: int = 0  # started mid-run, as GPUs joined the cluster (elastic pools)
    workers_dropped: int = 0  # dropped because their node left the cluster (elastic pools)
    units_requeued_node_lost: int = 0  # re-queued free: their worker's node left (died, preempted)
    units_charged_worker_died: int = 0  # charged an attempt: their worker died running them on a live node
    reads_abandoned: int = 0  # fetch reads still blocked at their row's deadline (UnitTiming.reads_abandoned)

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_error

    def __str__(self) -> str:
        rate = self.rows / self.wall_s if self.wall_s > 0 else 0.0
        lines = [
            f"output: {self.output}",
            f"units: {self.units_total} total, {self.units_done} done now, {self.units_skipped} already done"
            + (f" ({self.units_redone} of them redone)" if self.units_redone else "")
            + f", {self.units_failed} failed",
            f"rows: {self.rows_ok} ok, {self.rows_error} error"
            + (f" ({_by_kind(self.errors_by_kind)})" if self.errors_by_kind else ""),
            f"time: {self.wall_s:.1f}s, {rate:.1f} rows/s",
        ]
        if self.units_redone:
            still = sum(self.still_failing.values())
            lines.insert(
                3,
                f"redone: {self.rows_redone} error rows of {self.units_redone} units, {self.rows_fixed} "
                f"fixed, {still} still failing" + (f" ({_by_kind(self.still_failing)})" if still else ""),
            )
        lines += [f"failed unit {unit}: {reason}" for unit, reason in sorted(self.failed.items())]
        if self.reads_abandoned:
            lines.append(
                f"reads: {self.reads_abandoned} blocked past their rows' deadlines and were abandoned (a hung "
                "mount or store?); their rows are fetch_timeout errors, at most [fetch] max_abandoned_reads "
                "are left blocked per worker"
            )
        if self.workers_joined or self.workers_dropped:
            lines.append(
                f"workers: {self.workers_joined} joined as GPUs joined the cluster, {self.workers_dropped} "
                "dropped with the node they ran on"
            )
        if self.units_requeued_node_lost or self.units_charged_worker_died:
            lines.append(
                f"units: {self.units_requeued_node_lost} re-queued free of charge (their node left), "
                f"{self.units_charged_worker_died} charged an attempt (their worker died on a live node)"
            )
        if self.workers_lost:
            lines.append(
                f"workers: {self.workers_lost} died and did not come back within {RESTART_TIMEOUT_S:.0f}s; "
                "the others took their units"
            )
        if self.interrupted:
            lines.append("interrupted: committed units are kept; run the same command again to resume")
        if self.output_problem:
            lines.append(f"output problem: {self.output_problem}")
        return "\n".join(lines)


def _by_kind(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))


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
        done = summary.units_done + summary.units_redone + summary.units_failed
        line = (
            f"[{done}/{summary.units_to_do} units] "
            f"{summary.rows}/{self.total_rows} rows, {summary.rows_error} errors, {rate:.1f} rows/s, ETA {eta}"
        )
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


@dataclass
class Suspect:
    """A worker death not settled yet: did its node leave, or did it die on a live node (charge its unit)?"""

    worker: int
    placement: Placement | None  # where it was when last seen alive
    died_at: float
    preempted: bool
    running: tuple[WorkUnit, int] | None  # the unit (and attempt) it was running, waiting on the answer


class Dispatcher:
    """Hands units to workers and settles each outcome: committed, re-queued, or failed."""

    def __init__(
        self,
        workers: Sequence[Any],
        summary: RunSummary,
        max_attempts: int,
        in_flight_per_worker: int,
        grow: Callable[[int], list[Any]] | None = None,
    ):
        self.workers = list(workers)
        self.grow = grow  # elastic pool: given the live worker count, new worker handles (none: a fixed pool)
        self.grown_at = 0.0
        self.placements: dict[int, Placement | None] = {w: _placement(worker) for w, worker in enumerate(self.workers)}
        self.dropped: set[int] = set()  # workers whose node left (elastic pools): never sent work again
        self.suspects: list[Suspect] = []  # worker deaths whose cause (its node, or its unit) is not settled yet
        self.dropped_at = 0.0
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
        idle = {w for w, _ in self.probes.values()} | self.lost | self.dropped
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
        except RayActorError as e:
            self.worker_died(w, e)
            return
        except RayTaskError as e:  # the unit raised; its worker lives on
            self.forget(ref)
            if (full := _output_full(e.cause)) is not None:
                raise OutputUnwritable(f"unit {unit.unit_id} could not be written: {redact(_strerror(full))}") from None
            if isinstance(e.cause, ShardChanged):
                # Another try would read the same new content; and no failed marker: the unit's content is gone, so
                # no later run could retry it (the next one plans the shard's new content).
                self.give_up(unit, attempt, _reason(e), mark=False)
                return
            self.charge(unit, attempt, _reason(e))
            return
        self.forget(ref)
        self.committed(record, unit)

    def worker_died(self, w: int, error: RayActorError) -> None:
        """All units on a dead worker fail with it; those queued behind the one it was running go back free. The one
        it was running (the oldest that had not finished: an actor runs its tasks in order) goes back free too when
        its node left; it is charged an attempt when its node is still alive NODE_DEATH_WAIT_S later (Ray may learn
        of a node's death after its worker's: until then the unit waits, see settle_suspects)."""
        refs = list(self.assigned[w])
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        running = None
        for ref in refs:
            _, unit, attempt = self.forget(ref)
            record = _result(ref) if ref in finished else None
            if record is not None:
                self.committed(record, unit)
            elif running is None:
                running = (unit, attempt)
            else:
                self.queue.append((unit, attempt))
        self.suspects.append(Suspect(w, self.placements.get(w), time.monotonic(), error.preempted, running))
        self.probes[self.workers[w].ready.remote()] = (w, time.monotonic())
        self.settle_suspects()

    def settle_suspects(self) -> None:
        """Decide, for each worker death not yet settled, whether its node left (the unit it was running goes back
        free; an elastic pool drops the worker) or the worker died on a live node (the unit is charged)."""
        now = time.monotonic()
        for suspect in list(self.suspects):
            before = suspect.placement
            node_left = suspect.preempted or (before is not None and not _node_alive(before.node))
            if not node_left and before is not None and now - suspect.died_at < NODE_DEATH_WAIT_S:
                # A worker that died on a live node has its death reported by that node's raylet: the actor table
                # shows it restarting, restarted or dead. Nothing reported yet: its node may be gone, Ray not yet
                # sure; wait.
                after = _placement(self.workers[suspect.worker])
                if after is not None and after.state == "ALIVE" and after.restarts == before.restarts:
                    continue
            self.suspects.remove(suspect)
            if node_left:
                if suspect.running is not None:
                    self.queue.append(suspect.running)
                    self.summary.units_requeued_node_lost += 1
                self.drop(suspect.worker)
            elif suspect.running is not None:
                self.summary.units_charged_worker_died += 1
                self.charge(*suspect.running, "worker died while running it")

    def drop(self, w: int) -> None:
        """An elastic pool lets a worker whose node left go: not restarted elsewhere (new GPUs get new workers)."""
        if self.grow is None or w in self.dropped:
            return
        for ref, (probed, _) in list(self.probes.items()):
            if probed == w:
                del self.probes[ref]
        ray.kill(self.workers[w], no_restart=True)
        self.dropped.add(w)
        self.dropped_at = time.monotonic()
        self.summary.workers_dropped = len(self.dropped)
        logger.warning("model worker %d: its node left the cluster; its units went back to the queue", w)

    def maybe_grow(self) -> None:
        """An elastic pool, with units waiting: start the workers `grow` gives (GPUs that joined), at most every
        GROW_INTERVAL_S. A new worker takes work once its ready() answers, as a restarted one does."""
        now = time.monotonic()
        if self.grow is None or not self.queue or now - self.grown_at < GROW_INTERVAL_S:
            return
        self.grown_at = now
        live = len(self.workers) - len(self.lost | self.dropped)
        for worker in self.grow(live):
            w = len(self.workers)
            self.workers.append(worker)
            self.assigned.append([])
            self.placements[w] = None  # known once it answers
            self.probes[worker.ready.remote()] = (w, now)
            self.summary.workers_joined += 1
            logger.info("model worker %d started: a GPU joined the cluster", w)

    def probed(self, ref: Any) -> None:
        w, died_at = self.probes.pop(ref)
        if _result(ref) is not None:
            self.placements[w] = _placement(self.workers[w])  # restarted (or started), maybe elsewhere: it works again
            return
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
                logger.warning(
                    "model worker %d did not come back within %.0fs of dying; going on without it", w, RESTART_TIMEOUT_S
                )
        gone = self.lost | self.dropped
        waiting_for_gpus = self.grow is not None and now - self.dropped_at <= RESTART_TIMEOUT_S
        if len(gone) == len(self.workers) and not waiting_for_gpus:
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
        self.give_up(unit, attempt, reason)

    def give_up(self, unit: WorkUnit, attempt: int, reason: str, mark: bool = True) -> None:
        """The unit failed for this run; `mark`: recorded as failed in the output, so later runs skip it."""
        try:
            if mark:
                mark_failed(self.summary.output, unit.unit_id, reason, attempt)
        except OSError as e:
            raise OutputUnwritable(f"cannot record that unit {unit.unit_id} failed: {redact(_strerror(e))}") from None
        self.metrics.failed(unit.unit_id, attempt, reason)
        self.summary.units_failed += 1
        self.summary.failed[unit.unit_id] = reason

    def committed(self, record: ProgressRecord, unit: WorkUnit) -> None:
        # A redo counts the rows it did again, not those its unit kept.
        ok, error, kinds = (
            (record.rows_ok, record.rows_error, record.errors_by_kind)
            if unit.redo is None
            else rows_at(self.summary.output, record, unit.redo)
        )
        self.summary.committed_ids.add(record.unit_id)
        if unit.redo is None:
            self.summary.units_done += 1
        else:
            self.summary.units_redone += 1
            self.summary.rows_redone += ok + error
            self.summary.rows_fixed += ok
            self.summary.still_failing = dict(Counter(self.summary.still_failing) + Counter(kinds))
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
    grow: Callable[[int], list[Any]] | None = None,
) -> RunSummary:
    """Process `units` on `workers` (Ray actor handles of ModelWorker) until each is committed or failed.

    `heartbeat` is called about once a second (the run renews its output lock with it). `grow` makes the pool
    elastic: given the number of live workers, it returns new worker handles to add (GPUs that joined)."""
    dispatcher = Dispatcher(workers, summary, max_attempts, in_flight_per_worker, grow)
    dispatcher.queue.extend((unit, 1) for unit in units)
    try:
        while dispatcher.queue or dispatcher.in_flight or dispatcher.suspects:
            dispatcher.settle_suspects()
            dispatcher.maybe_grow()
            dispatcher.submit()
            waiting = dispatcher.waiting_on()
            if waiting:
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            else:  # only deaths to settle
                ready = []
                time.sleep(0.5)
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
        summary.output_problem = (
            f"{e}; the run stopped (committed units are kept): make room or fix the output, "
            "then run the same command again"
        )
    if progress is not None:
        progress.close(summary)
    return summary


@dataclass(frozen=True)
class Placement:
    """Where Ray's actor table says a worker actor is: its node (None: not placed), state, and restarts so far."""

    node: str | None
    state: str
    restarts: int


def _placement(worker: Any) -> Placement | None:
    """The worker actor's entry in Ray's actor table (read without the dashboard's state API); None if unreadable."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=worker._actor_id.hex())
        return Placement(info["Address"]["NodeID"] or None, info["State"], int(info.get("NumRestarts", 0)))
    except Exception:  # noqa: BLE001 - unknown is an answer: a death is then charged as on a live node
        return None


def _node_alive(node: str | None) -> bool:
    """Whether the node is alive, as Ray's node table says; an unknown node counts as alive."""
    known = [info["Alive"] for info in ray.nodes() if info["NodeID"] == node] if node is not None else []
    return not known or any(known)


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
