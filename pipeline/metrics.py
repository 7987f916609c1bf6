"""What a run tells while it runs: Ray metrics and one JSON log line per settled unit.

Metrics go through `ray.util.metrics`, so Ray's metrics agent exports them on each node's metrics export port in
Prometheus format (what the Ray dashboard's Prometheus scrapes), named `ray_<name>` (counters end in `_total`):

    blipbatch_rows{status, worker}             counter    output rows committed, `ok` or `error`
    blipbatch_row_errors{error_kind, worker}   counter    error rows committed, by error_kind
    blipbatch_units{outcome}                   counter    units settled: committed, retried, failed
    blipbatch_images_per_second{worker}        gauge      images fetched and decoded per second, the worker's last unit
    blipbatch_unit_seconds{worker}             histogram  wall time of a unit, start to part written
    blipbatch_queue_depth                      gauge      units waiting for a worker
    blipbatch_units_in_flight                  gauge      units sent to workers and not yet settled
    blipbatch_batch_size{worker}               histogram  rows per model call (recorded by the workers)

Counts are recorded by the driver when a unit commits, from its commit marker, so a unit that is retried after its
worker died is counted once. The JSON lines go to the logger `blipbatch.units` (INFO), one object per line:
`{"event": "unit_committed" | "unit_retried" | "unit_failed", "unit": ..., ...}`.
"""

from __future__ import annotations

import json
import logging

from ray.util.metrics import Counter, Gauge, Histogram

from blipbatch.schemas import ProgressRecord

UNIT_LOG = logging.getLogger("blipbatch.units")

_UNKNOWN_WORKER = "?"  # a marker without timing (written by a worker of an earlier version)
_UNIT_SECONDS: list[float] = [1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
_BATCH_SIZES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _log(event: str, **fields: object) -> None:
    UNIT_LOG.info(json.dumps({"event": event, **fields}, sort_keys=False, default=str))


class RunMetrics:
    """The driver's metrics and unit log lines; the coordinator calls one method per outcome."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.rows = Counter("blipbatch_rows", "Output rows committed, by status", tag_keys=("status", "worker"))
        self.errors = Counter(
            "blipbatch_row_errors", "Error rows committed, by error_kind", tag_keys=("error_kind", "worker")
        )
        self.units = Counter("blipbatch_units", "Units settled: committed, retried or failed", tag_keys=("outcome",))
        self.images_per_s = Gauge(
            "blipbatch_images_per_second",
            "Images fetched and decoded per second over the worker's last unit",
            tag_keys=("worker",),
        )
        self.unit_seconds = Histogram(
            "blipbatch_unit_seconds",
            "Wall time of a unit, start to part written",
            boundaries=_UNIT_SECONDS,
            tag_keys=("worker",),
        )
        self.queue_depth = Gauge("blipbatch_queue_depth", "Units waiting for a worker")
        self.in_flight = Gauge("blipbatch_units_in_flight", "Units sent to workers and not yet settled")

    def committed(self, record: ProgressRecord) -> None:
        timing = record.timing
        worker = timing.worker if timing else _UNKNOWN_WORKER
        self.units.inc(tags={"outcome": "committed"})
        if record.rows_ok:
            self.rows.inc(record.rows_ok, tags={"status": "ok", "worker": worker})
        if record.rows_error:
            self.rows.inc(record.rows_error, tags={"status": "error", "worker": worker})
        for kind, count in record.errors_by_kind.items():
            self.errors.inc(count, tags={"error_kind": kind, "worker": worker})
        line: dict[str, object] = {
            "unit": record.unit_id,
            "output": self.output,
            "attempt": record.attempt,
            "rows_ok": record.rows_ok,
            "rows_error": record.rows_error,
            "errors_by_kind": record.errors_by_kind,
            "worker": worker,
        }
        if timing is not None:
            seconds = max(timing.seconds, 1e-6)
            self.images_per_s.set(timing.images_fetched / seconds, tags={"worker": worker})
            self.unit_seconds.observe(timing.seconds, tags={"worker": worker})
            line |= {
                "seconds": round(timing.seconds, 3),
                "images": timing.images_fetched,
                "images_per_s": round(timing.images_fetched / seconds, 2),
                "rows_per_s": round(record.rows / seconds, 2),
                "pid": timing.pid,
                "node": timing.node,
                "fetch_s": round(timing.fetch_s, 3),
                "decode_s": round(timing.decode_s, 3),
                "model_s": round(timing.model_s, 3),
                "reads_abandoned": timing.reads_abandoned,
            }
        _log("unit_committed", **line)

    def retried(self, unit_id: str, attempt: int, reason: str) -> None:
        self.units.inc(tags={"outcome": "retried"})
        _log("unit_retried", unit=unit_id, output=self.output, attempt=attempt, reason=reason)

    def failed(self, unit_id: str, attempt: int, reason: str) -> None:
        self.units.inc(tags={"outcome": "failed"})
        _log("unit_failed", unit=unit_id, output=self.output, attempt=attempt, reason=reason)

    def queue(self, waiting: int, in_flight: int) -> None:
        self.queue_depth.set(waiting)
        self.in_flight.set(in_flight)


class WorkerMetrics:
    """A model worker's own metrics."""

    def __init__(self, worker: str) -> None:
        self.tags = {"worker": worker}
        self.batch_size = Histogram(
            "blipbatch_batch_size", "Rows per model call", boundaries=_BATCH_SIZES, tag_keys=("worker",)
        )

    def model_call(self, rows: int) -> None:
        self.batch_size.observe(rows, tags=self.tags)
