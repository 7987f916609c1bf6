"""An output folder is a dataset: pandas, pyarrow, DuckDB and Polars read it whole, as the README says, and never a
part that is not committed; the annotate wide table lives beside it. Local disk and moto S3, real Parquet."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs

from blipbatch import read_output
from blipbatch.jobs.kinds import WideTableError, wide_location, write_wide_table
from blipbatch.pipeline.job import PipelineError
from blipbatch.pipeline.resume import plan_run, redo_kinds, unmatched_units
from blipbatch.pipeline.shards import WorkUnit, legacy_unit_id, plan_units
from blipbatch.pipeline.sink import (
    PROGRESS_DIR,
    commit_unit,
    committed_units,
    part_name,
    progress_records,
    record_for,
    staged_name,
    whole_output,
    write_part,
)
from blipbatch.schemas import ERROR_KINDS, ColumnMapping, output_schema

MAPPING = ColumnMapping(image_column="image_url", id_column="key", passthrough=("lang",))
SCHEMA = output_schema(
    pa.schema([("image_url", pa.string()), ("key", pa.int64()), ("lang", pa.string())]), MAPPING, question_ids=True
)
QUESTIONS = ("color", "shape")


def unit_output(unit: WorkUnit, text: str) -> pa.Table:
    rows = [
        {
            "id": str(unit.first_row + i),
            "image_url": f"http://127.0.0.1/{i}.png",
            "instruction": f"{q}?",
            "question_id": q,
            "text": text,
            "status": "ok",
            "error_kind": None,
            "error": None,
            "model": "tiny",
            "generation": "{}",
            "derived_id": f"s-{unit.first_row + i}",
            "lang": "en",
        }
        for i in range(unit.num_rows)
        for q in QUESTIONS
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def units(n: int) -> list[WorkUnit]:
    return [WorkUnit(f"abc-rg{i:05d}-{i:05d}", "s.parquet", (i,), 3 * i, 3) for i in range(n)]


def readme_reads(output: str) -> dict[str, pa.Table]:
    """The README's one-line reads ("Reading an output"), each as an Arrow table (blipbatch's own read too)."""
    con = duckdb.connect()
    if output.startswith("s3://"):
        con.register_filesystem(url_to_fs(output)[0])  # DuckDB reads s3:// through fsspec (no httpfs to download)
    return {
        "pandas": pa.Table.from_pandas(pd.read_parquet(output), preserve_index=False),
        "pyarrow": ds.dataset(output).to_table(),
        "duckdb": con.sql(f"SELECT * FROM '{output}/**/*.parquet'").to_arrow_table(),
        "polars": pl.scan_parquet(f"{output}/**/*.parquet").collect().to_arrow(),
        "blipbatch": read_output(output),
    }


def assert_reads(output: str, rows: int) -> None:
    for reader, table in readme_reads(output).items():
        assert table.num_rows == rows, reader
        assert table.column("status").null_count == 0, reader
        assert sorted(zip(table.column("id").to_pylist(), table.column("question_id").to_pylist())) == sorted(
            (str(r), q) for r in range(rows // len(QUESTIONS)) for q in QUESTIONS
        ), reader


def half_write(output: str, unit: WorkUnit) -> None:
    """A unit caught mid-commit in every way a crash can leave it: its part staged, its marker written but its part
    not yet in place, and the first bytes of a part still being written."""
    fs, root = url_to_fs(output)
    root = root.rstrip("/")
    write_part(output, unit, unit_output(unit, "uncommitted"))
    record = record_for(unit, unit_output(unit, "uncommitted"), attempt=1)
    fs.pipe_file(f"{root}/{PROGRESS_DIR}/{unit.unit_id}.json", json.dumps(record.to_dict()).encode())
    buffer = io.BytesIO()
    pq.write_table(unit_output(unit, "torn"), buffer)
    fs.pipe_file(f"{root}/{staged_name('torn')}", buffer.getvalue()[:100])


def exercise(output: str) -> None:
    done, pending = units(4), units(5)[4]
    for n, unit in enumerate(done):
        table = unit_output(unit, "first")
        write_part(output, unit, table)
        assert committed_units(output) == {u.unit_id for u in done[:n]}  # staged is not committed
        if n:
            assert_reads(output, 6 * n)  # nor read
        commit_unit(output, record_for(unit, table, attempt=1))
    half_write(output, pending)
    assert committed_units(output) == {u.unit_id for u in done}
    assert [r.unit_id for r in progress_records(output)] == [u.unit_id for u in done]
    assert_reads(output, 6 * len(done))

    # Redoing a committed unit replaces its part whole; the half-written one committed at last adds its rows once.
    table = unit_output(done[1], "second")
    write_part(output, done[1], table)
    commit_unit(output, record_for(done[1], table, attempt=2))
    table = unit_output(pending, "late")
    write_part(output, pending, table)
    commit_unit(output, record_for(pending, table, attempt=2))
    assert_reads(output, 6 * 5)
    texts = read_output(output).column("text").to_pylist()
    assert texts.count("second") == 6 and texts.count("first") == 18 and texts.count("late") == 6


def test_four_readers_local(tmp_path):
    output = str(tmp_path / "out")
    exercise(output)
    parquet = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet"))
    assert parquet == sorted(part_name(u.unit_id) for u in units(5))  # no other Parquet file anywhere below


def test_four_readers_s3(s3fs_clean):
    if not s3fs_clean.exists("datasets"):
        s3fs_clean.mkdir("datasets")
    output = f"s3://datasets/{uuid.uuid4().hex[:8]}/out"
    exercise(output)
    parquet = sorted(p.rsplit("/", 1)[-1] for p in s3fs_clean.find(output) if p.endswith(".parquet"))
    assert parquet == sorted(part_name(u.unit_id) for u in units(5))


def test_an_old_output_still_reads_and_commits(tmp_path):
    """Outputs written before parts were staged: part first, then marker; a part without its marker was a crash."""
    output = tmp_path / "old"
    (output / PROGRESS_DIR).mkdir(parents=True)
    old_units = units(3)
    for unit in old_units:
        table = unit_output(unit, "old")
        pq.write_table(table, output / part_name(unit.unit_id))
        if unit is not old_units[2]:
            record = record_for(unit, table, attempt=1)
            (output / PROGRESS_DIR / f"{unit.unit_id}.json").write_text(json.dumps(record.to_dict()))
    assert committed_units(str(output)) == {u.unit_id for u in old_units[:2]}
    assert read_output(str(output)).num_rows == 12
    table = unit_output(old_units[2], "redone")  # the next run redoes the crashed unit over its orphan part
    write_part(str(output), old_units[2], table)
    commit_unit(str(output), record_for(old_units[2], table, attempt=2))
    assert_reads(str(output), 18)
    assert os.listdir(output / "_staging") == []


def test_an_old_output_resumes_under_its_location_ids(tmp_path):
    """Units committed before ids came from content were named after the shard's location: a resume knows them."""
    shard = tmp_path / "in" / "s.parquet"
    shard.parent.mkdir()
    pq.write_table(
        pa.table(
            {"image_url": [f"/img/{i}.png" for i in range(6)], "key": [str(i) for i in range(6)], "lang": ["en"] * 6}
        ),
        shard,
        row_group_size=3,
    )
    planned = plan_units([str(shard)], MAPPING, max_rows_per_unit=3)
    output = str(tmp_path / "old")
    old = dataclasses.replace(planned[0], unit_id=legacy_unit_id(planned[0]))
    write_part(output, old, unit_output(old, "old"))
    commit_unit(output, record_for(old, unit_output(old, "old"), attempt=1))
    plan = plan_run(output, planned)
    assert [u.unit_id for u in plan.units] == [old.unit_id, planned[1].unit_id]
    assert [u.unit_id for u in plan.pending] == [planned[1].unit_id] and plan.skipped == 1
    assert unmatched_units(plan.committed, planned) == []
    assert unmatched_units(plan.committed, planned[1:]) == [old.unit_id]


def test_the_wide_table_moves_beside_an_old_output(tmp_path):
    """Outputs written before kept wide.parquet inside, where every reader took it for a part; the next write of the
    wide table puts it beside the output and removes the old one."""
    output = str(tmp_path / "out")
    for unit in units(2):
        write_part(output, unit, unit_output(unit, "x"))
        commit_unit(output, record_for(unit, unit_output(unit, "x"), attempt=1))
    pq.write_table(pa.table({"id": ["0"], "color": ["x"]}), tmp_path / "out" / "wide.parquet")
    assert write_wide_table(output) == f"{output}.wide.parquet"
    assert not (tmp_path / "out" / "wide.parquet").exists()
    assert_reads(output, 12)
    assert pq.read_table(f"{output}.wide.parquet").num_rows == 6
    with pytest.raises(WideTableError, match="beside the output folder"):
        wide_location("s3://bucket")


def test_redo_kinds_are_checked():
    assert redo_kinds([]) == frozenset(ERROR_KINDS)
    assert redo_kinds(["blocked_address"]) == {"blocked_address"}
    with pytest.raises(PipelineError, match="unknown error kind.*no_such_kind; the kinds are .*blocked_address"):
        redo_kinds(["blocked_address", "no_such_kind"])


def test_new_parts_take_the_schema_of_the_parts_there(tmp_path):
    """An output begun by an earlier version (no derived_id column): the parts committed now keep its schema, so
    every reader still reads one table; a column whose values cannot take the parts' type fails its unit clearly."""
    output = str(tmp_path / "out")
    old_schema = pa.schema([f for f in SCHEMA if f.name != "derived_id"])
    first, second = units(2)
    write_part(output, first, unit_output(first, "old").select(old_schema.names))
    commit_unit(output, record_for(first, unit_output(first, "old"), attempt=1))
    plan = plan_run(output, [first, second])
    (pending,) = plan.pending
    assert pending.part_schema == old_schema
    table = whole_output(output, pending, unit_output(second, "new"))
    assert table.schema == old_schema
    write_part(output, pending, table)
    commit_unit(output, record_for(pending, table, attempt=1))
    assert_reads(output, 12)
    wrong = unit_output(second, "new").set_column(SCHEMA.get_field_index("lang"), "lang", pa.array([[1]] * 6))
    with pytest.raises(ValueError, match="column 'lang' is list<item: int64>, but the output's parts hold string"):
        whole_output(output, pending, wrong)
