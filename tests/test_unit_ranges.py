"""`rows_per_unit` is a cap: a row group larger than a unit (pandas writes a shard as one) is cut into row ranges,
each a unit of its own; an output begun when such a row group was one unit resumes with it whole. Real Parquet
written by pandas; the run on real Ray (in-process) with the tiny checkpoint."""

from __future__ import annotations

import dataclasses
import io

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_output_dataset import unit_output
from tiny import write_tiny_checkpoint

from blipbatch import pipeline
from blipbatch.pipeline.resume import plan_run, unmatched_units
from blipbatch.pipeline.shards import plan_units, read_unit
from blipbatch.pipeline.sink import commit_unit, committed_units, read_output, record_for, write_part
from blipbatch.schemas import ColumnMapping

MAPPING = ColumnMapping(image_column="image_url", id_column="key", passthrough=("lang",))


def pandas_shard(path, rows: int, start: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "image_url": [f"/img/{i}.png" for i in range(start, start + rows)],
            "key": [str(i) for i in range(start, start + rows)],
            "lang": ["en"] * rows,
        }
    ).to_parquet(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return str(path)


def test_a_pandas_shard_of_100_rows_makes_10_units_of_10(tmp_path):
    shard = pandas_shard(tmp_path / "in" / "s.parquet", 100)
    units = plan_units([shard], MAPPING, max_rows_per_unit=10)
    assert len(units) == 10 and len({u.unit_id for u in units}) == 10
    assert [(u.first_row, u.num_rows) for u in units] == [(10 * i, 10) for i in range(10)]
    keys = [[row.id for row in read_unit(unit, MAPPING, ["caption"])] for unit in units]
    assert keys == [[str(i) for i in range(10 * k, 10 * k + 10)] for k in range(10)]
    assert all(u.whole_group_id == units[0].whole_group_id != u.unit_id for u in units)
    # The same content elsewhere: the same units; a cap that divides unevenly leaves a short last range.
    copy = pandas_shard(tmp_path / "moved" / "t.parquet", 100)
    assert [u.unit_id for u in plan_units([copy], MAPPING, max_rows_per_unit=10)] == [u.unit_id for u in units]
    assert [u.num_rows for u in plan_units([shard], MAPPING, max_rows_per_unit=30)] == [30, 30, 30, 10]


def test_the_default_cuts_a_100000_row_group_into_100_units(tmp_path):
    shard = pandas_shard(tmp_path / "big.parquet", 100_000)
    units = plan_units([shard], MAPPING)
    assert len(units) == 100 and sum(u.num_rows for u in units) == 100_000
    last = read_unit(units[-1], MAPPING, ["caption"])
    assert [row.id for row in last] == [str(i) for i in range(99_000, 100_000)]


def test_small_row_groups_still_join_and_a_large_one_among_them_is_cut(tmp_path):
    path = tmp_path / "mixed.parquet"
    table = pd.DataFrame(
        {"image_url": [f"/img/{i}.png" for i in range(30)], "key": [str(i) for i in range(30)], "lang": ["en"] * 30}
    )
    with pq.ParquetWriter(path, pq.read_schema(pandas_shard(tmp_path / "schema.parquet", 1))) as writer:
        import pyarrow as pa

        whole = pa.Table.from_pandas(table)
        for start, stop in ((0, 3), (3, 6), (6, 26), (26, 30)):  # row groups of 3, 3, 20 and 4 rows
            writer.write_table(whole.slice(start, stop - start))
    units = plan_units([str(path)], MAPPING, max_rows_per_unit=8)
    assert [(u.row_groups, u.first_row, u.num_rows, u.group_range) for u in units] == [
        ((0, 1), 0, 6, None),
        ((2,), 6, 8, (0, 8)),
        ((2,), 14, 8, (8, 16)),
        ((2,), 22, 4, (16, 20)),
        ((3,), 26, 4, None),
    ]
    rows = [row.id for unit in units for row in read_unit(unit, MAPPING, ["caption"])]
    assert rows == [str(i) for i in range(30)]


def test_an_output_that_committed_a_row_group_whole_resumes_with_it_whole(tmp_path):
    """Before row groups were cut, a shard of one row group was one unit: an output that committed it keeps it (no row
    is done twice), and a shard it had not reached yet is cut."""
    done = pandas_shard(tmp_path / "in" / "a.parquet", 30)
    new = pandas_shard(tmp_path / "in" / "b.parquet", 30, start=30)
    planned = plan_units([done, new], MAPPING, max_rows_per_unit=10)
    assert len(planned) == 6
    old = dataclasses.replace(planned[0], unit_id=planned[0].whole_group_id, num_rows=30, group_range=None)
    assert old.unit_id == f"{old.shard_id}-rg00000-00000"  # the id the code before the cut gave the shard
    output = str(tmp_path / "out")
    write_part(output, old, unit_output(old, "old"))
    commit_unit(output, record_for(old, unit_output(old, "old"), attempt=1))
    plan = plan_run(output, planned)
    assert [u.unit_id for u in plan.units] == [old.unit_id] + [u.unit_id for u in planned[3:]]
    assert [u.unit_id for u in plan.pending] == [u.unit_id for u in planned[3:]]
    assert plan.skipped == 1 and plan.output_rows(1) == 30
    assert unmatched_units(plan.committed, planned) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + index, 32), (40 * index % 255, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_run_commits_each_range_once_and_resumes(ray_local, tmp_path, checkpoint):
    source = tmp_path / "in" / "s.parquet"
    source.parent.mkdir()
    pd.DataFrame({"image": [png(i) for i in range(12)], "key": [f"k{i}" for i in range(12)]}).to_parquet(source)
    output = str(tmp_path / "out")
    options = dict(
        image_column="image",
        id_column="key",
        prompt="A caption:",
        rows_per_unit=5,
        batch_size=4,
        max_new_tokens=2,
        device="cpu",
        progress=False,
    )
    summary = pipeline.run(str(source), output, checkpoint, **options)
    assert (summary.units_total, summary.units_done, summary.rows_ok) == (3, 3, 12)
    assert len(committed_units(output)) == 3
    table = read_output(output)
    assert sorted(table.column("id").to_pylist()) == sorted(f"k{i}" for i in range(12))
    again = pipeline.run(str(source), output, checkpoint, **options)
    assert (again.units_done, again.units_skipped) == (0, 3)
