"""Writes to an object store that fails part of the time: a fault-injecting proxy (tests/faulty_proxy.py) in front of
the moto S3 server answers about 30% of PUT/POST requests with 500/503, a reset connection, a body cut half way, or a
reset after the write was applied. Every part and marker must end up whole, no partial or uncommitted part may ever be
visible, every marker must end with its complete part, and a pipeline run through the proxy must give every row
exactly once."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import write_tiny_checkpoint

from blipbatch import pipeline
from blipbatch.pipeline.manifest import ensure_manifest
from blipbatch.pipeline.run import connect_ray
from blipbatch.pipeline.shards import WorkUnit
from blipbatch.pipeline.sink import (
    PROGRESS_DIR,
    commit_unit,
    committed_units,
    failed_units,
    mark_failed,
    part_name,
    progress_records,
    read_output,
    record_for,
    write_part,
)
from blipbatch.schemas import ProgressRecord
from tests.faulty_proxy import FAULT_KINDS, FaultPlan, FaultyProxy

BUCKET = "faults"
FAULT_RATE = 0.3
UNITS = 24
ROWS = 150


@pytest.fixture(scope="module")
def proxy(moto_endpoint):
    with FaultyProxy(moto_endpoint, FaultPlan(rate=FAULT_RATE, seed=7)) as running:
        yield running


@pytest.fixture(scope="module")
def direct(moto_endpoint):
    """An s3fs filesystem straight on moto (no faults, no instance cache): to set up and to check."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.mkdir(BUCKET, exist_ok=True)
    return fs


def unit_table(unit: int, attempt: int) -> pa.Table:
    """A unit's output as written by one attempt: every attempt's table differs, so a reader can tell them apart."""
    ids = [f"u{unit}-r{r}" for r in range(ROWS)]
    return pa.table(
        {
            "id": ids,
            "text": [f"attempt {attempt}: {row_id} " + "x" * (r % 97) for r, row_id in enumerate(ids)],
            "status": ["ok" if r % 10 else "error" for r in range(ROWS)],
            "error_kind": [None if r % 10 else "decode_error" for r in range(ROWS)],
        }
    )


def work_unit(unit: int) -> WorkUnit:
    return WorkUnit(
        unit_id=f"unit-{unit:02d}",
        shard=f"s3://{BUCKET}/in/shard.parquet",
        row_groups=(unit,),
        first_row=unit * ROWS,
        num_rows=ROWS,
    )


class PartReader(threading.Thread):
    """Lists and reads every visible part and marker straight from moto while the writers run; records what is wrong.

    A visible part must be the committed version whole (an attempt that did not commit stays staged, unseen); a
    marker's part may be missing only while its commit is under way (check_once(final=True) allows none)."""

    def __init__(self, fs, root: str, committed_version: dict) -> None:
        super().__init__(name="part-reader", daemon=True)
        self.fs, self.root = fs, root
        self.committed_version = committed_version  # part name -> the table its marker vouches for
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.parts_read = self.markers_read = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.check_once()

    def check_once(self, final: bool = False) -> None:
        self.fs.invalidate_cache()
        try:
            markers = [
                p
                for p in self.fs.ls(f"{self.root}/{PROGRESS_DIR}", detail=False)
                if p.endswith(".json") and not p.endswith(".failed.json")
            ]
        except FileNotFoundError:
            markers = []
        parts = [p for p in self.fs.ls(self.root, detail=False) if p.endswith(".parquet")]
        for marker in markers:
            record = ProgressRecord.from_dict(json.loads(self.fs.cat_file(marker)))
            self.markers_read += 1
            self.check_part(f"{self.root}/{record.part}", final)
        for part in parts:
            self.check_part(part, final)

    def check_part(self, path: str, final: bool) -> None:
        name = path.rsplit("/", 1)[-1]
        try:
            table = pq.read_table(io.BytesIO(self.fs.cat_file(path)))
        except FileNotFoundError:
            if final:
                self.problems.append(f"{name}: has a commit marker but no part")
            return
        except (pa.ArrowInvalid, OSError) as err:
            self.problems.append(f"{name}: unreadable part ({err})")
            return
        self.parts_read += 1
        if not table.equals(self.committed_version[name]):
            self.problems.append(f"{name}: {table.num_rows} rows, not the whole table its commit wrote")


def test_sink_writes_through_faults_leave_only_whole_parts_and_markers(proxy, direct, monkeypatch, caplog):
    import s3fs

    # The sink's own retries must carry every write: botocore's and s3fs's retries are turned off.
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 0}}}
    )
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    caplog.set_level(logging.WARNING, logger="blipbatch.pipeline.sink")
    output = f"s3://{BUCKET}/sink-out"
    root = output.removeprefix("s3://")
    committed = {part_name(work_unit(u).unit_id): unit_table(u, 2) for u in range(UNITS)}
    reader = PartReader(direct, root, committed)
    before = proxy.counts.copy()

    def write_unit(u: int) -> None:
        unit = work_unit(u)
        write_part(output, unit, unit_table(u, 1))  # a first attempt that "crashed" before its commit
        if u % 3 == 0:
            mark_failed(output, unit.unit_id, "worker died while running it", attempts=1)
        table = unit_table(u, 2)
        write_part(output, unit, table)  # the retry overwrites the part whole
        commit_unit(output, record_for(unit, table, attempt=2))

    try:
        assert ensure_manifest(output, {"model": "tiny", "generation": {"max_new_tokens": 4}}) == "created"
        reader.start()
        with ThreadPoolExecutor(4) as writers:
            list(writers.map(write_unit, range(UNITS)))
    finally:
        reader.stop.set()
        reader.join(timeout=60)
        s3fs.S3FileSystem.clear_instance_cache()
    reader.check_once(final=True)  # and once more after the last write

    assert reader.problems == []
    assert reader.parts_read > UNITS and reader.markers_read >= UNITS
    counts = proxy.counts - before
    requests = counts["forwarded"] + sum(counts[kind] for kind in FAULT_KINDS)
    assert all(counts[kind] > 0 for kind in FAULT_KINDS), counts
    assert 0.2 < sum(counts[kind] for kind in FAULT_KINDS) / requests < 0.4, counts
    retries = [r for r in caplog.records if r.name == "blipbatch.pipeline.sink" and "failed" in r.getMessage()]
    assert retries, "no write needed the sink's own retry: the faults never reached it"

    # Every unit committed once, with its final part, and no failed marker left.
    expected = [unit_table(u, 2) for u in range(UNITS)]
    assert committed_units(output) == {work_unit(u).unit_id for u in range(UNITS)}
    assert failed_units(output) == {}
    assert read_output(output).equals(pa.concat_tables(expected))
    direct.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in direct.ls(root) if p.endswith(".parquet")) == sorted(committed)


# -- a whole pipeline run through the proxy --------------------------------------------------------------------------

NEW_TOKENS = 3
PROMPT = "A short image caption:"


def png(k: int) -> bytes:
    image = Image.new("RGB", (36 + k, 30), (240, 240, 230))
    image.paste((40 * k % 255, 120, 200), (4, 4, 20 + k, 24))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ray_through_proxy(proxy):
    """In-process Ray started after AWS_ENDPOINT_URL points at the proxy, so its workers read and write through it.

    The workers (which write parts and markers) also get no botocore retries (fsspec reads FSSPEC_S3 when it is
    imported there): the sink's retries must carry their writes. The driver keeps the defaults for its lock."""
    import ray
    import s3fs

    saved = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "FSSPEC_S3")}
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    os.environ["FSSPEC_S3"] = '{"config_kwargs": {"retries": {"max_attempts": 0}}}'
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        ray.shutdown()  # a Ray left running by another module would have workers on the plain endpoint
        connect_ray(None, num_cpus=2)
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()


def test_pipeline_run_to_s3_through_faults_gives_every_row_once(ray_through_proxy, proxy, direct, tmp_path: Path):
    for k in range(6):
        direct.pipe_file(f"{BUCKET}/images/{k}.png", png(k))
    expected = {}
    for s in range(2):
        ids = [f"s{s}-r{r}" for r in range(30)]
        urls = [f"s3://{BUCKET}/images/{(r + s) % 6}.png" for r in range(30)]
        expected.update(zip(ids, urls))
        (tmp_path / "in").mkdir(exist_ok=True)
        pq.write_table(
            pa.table({"key": ids, "image_url": urls}), tmp_path / "in" / f"part-{s}.parquet", row_group_size=10
        )
    output = f"s3://{BUCKET}/run-out"
    checkpoint = str(write_tiny_checkpoint(tmp_path / "model"))
    before = proxy.counts.copy()

    summary = pipeline.run(
        str(tmp_path / "in"),
        output,
        checkpoint,
        prompt=PROMPT,
        id_column="key",
        rows_per_unit=10,
        batch_size=5,
        max_new_tokens=NEW_TOKENS,
        progress=False,
    )

    faults = proxy.counts - before
    assert sum(faults[kind] for kind in FAULT_KINDS) >= 3, faults
    assert (summary.units_done, summary.units_failed, summary.rows_ok, summary.rows_error) == (6, 0, 60, 0)
    rows = read_output(output).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(expected)  # every row, each once
    assert all(row["status"] == "ok" and row["image_url"] == expected[row["id"]] for row in rows)
    # No unit had to be redone: the sink's retries carried every write of the workers.
    assert [record.attempt for record in progress_records(output)] == [1] * 6
    # Every part object in the bucket is whole, committed or not.
    direct.invalidate_cache()
    parts = [p for p in direct.ls(f"{BUCKET}/run-out", detail=False) if p.endswith(".parquet")]
    assert len(parts) == 6
    assert sum(pq.read_table(io.BytesIO(direct.cat_file(p))).num_rows for p in parts) == 60
