"""A model worker that dies for good (its node gone, or it fails every restart): the run goes on with the others,
and stops with WorkerLost, in bounded time, only when no worker is left. Real in-process Ray actors stand in for
ModelWorker (they commit nothing: the coordinator's bookkeeping is what is checked)."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import ray.cloudpickle

from blipbatch.pipeline import coordinator
from blipbatch.pipeline.coordinator import RunSummary, WorkerLost, run_units
from blipbatch.pipeline.shards import WorkUnit
from blipbatch.schemas import ProgressRecord


class Healthy:
    """Answers like ModelWorker: ready() once up, process_unit() a commit record after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def ready(self) -> str:
        return "cpu"

    def process_unit(self, unit: WorkUnit, attempt: int) -> ProgressRecord:
        time.sleep(self.seconds)
        return ProgressRecord(
            unit_id=unit.unit_id,
            shard=unit.shard,
            first_row=unit.first_row,
            num_rows=unit.num_rows,
            rows=unit.num_rows,
            rows_ok=unit.num_rows,
            rows_error=0,
            attempt=attempt,
        )


class DiesOnFirstUnit(Healthy):
    def process_unit(self, unit: WorkUnit, attempt: int) -> ProgressRecord:
        ray.actor.exit_actor()


# The actors' processes cannot import this test module: send its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
# max_restarts=0: a dead one never answers ready() again, as when Ray cannot restart it.
StandIn, Dying = (ray.remote(num_cpus=0, max_restarts=0)(cls) for cls in (Healthy, DiesOnFirstUnit))


def units(count: int) -> list[WorkUnit]:
    return [
        WorkUnit(unit_id=f"u{i:02d}", shard="s.parquet", row_groups=(i,), first_row=10 * i, num_rows=10)
        for i in range(count)
    ]


@pytest.fixture
def short_restart_wait(monkeypatch):
    monkeypatch.setattr(coordinator, "RESTART_TIMEOUT_S", 2.0)


def test_a_worker_that_never_comes_back_is_dropped_and_the_others_finish(ray_local, tmp_path, short_restart_wait):
    workers = [StandIn.remote(0.3), Dying.remote(0.0)]  # the run outlasts the 2 s wait
    summary = RunSummary(output=str(tmp_path / "out"), units_total=12)
    started = time.monotonic()
    run_units(units(12), workers, summary, max_attempts=3)
    assert summary.units_done == 12 and summary.units_failed == 0
    assert summary.rows_ok == 120
    assert summary.workers_lost == 1
    assert "1 died and did not come back within 2s" in str(summary)
    assert time.monotonic() - started < 30


def test_the_run_stops_when_no_worker_is_left(ray_local, tmp_path, short_restart_wait):
    workers = [Dying.remote(0.0), Dying.remote(0.0)]
    summary = RunSummary(output=str(tmp_path / "out"), units_total=6)
    started = time.monotonic()
    with pytest.raises(WorkerLost, match="every model worker died and none came back within 2s"):
        run_units(units(6), workers, summary, max_attempts=3)
    assert time.monotonic() - started < 30
    assert summary.units_done == 0
