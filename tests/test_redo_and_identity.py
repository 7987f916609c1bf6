"""Runs on real Ray (in-process) with the tiny checkpoint: the output read whole by pandas, pyarrow, DuckDB and Polars
(local and S3), error rows redone after their cause is fixed, units known by their content, duplicate ids reported."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs
from PIL import Image
from test_output_dataset import readme_reads
from tiny import write_tiny_checkpoint

from blipbatch import read_output
from blipbatch.jobs.cli import main
from blipbatch.pipeline.shards import plan_units
from blipbatch.pipeline.sink import PROGRESS_DIR, committed_units, part_name, progress_records, staged_name
from blipbatch.schemas import ColumnMapping

QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def png(folder: Path, index: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index}.png"
    image = Image.new("RGB", (32 + index, 32), (230, 230, 220))
    image.paste((40 * index % 255, 90, 200), (4, 4, 20, 20))
    image.save(path)
    return str(path)


def write_shard(location: str, images: list[str], keys: list[str]) -> None:
    fs, path = url_to_fs(location)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table({"image_url": images, "key": keys, "tag": [f"t{k}" for k in keys]}), f)


def write_spec(
    tmp_path: Path, checkpoint: str, input: str, output: str, roots: list[Path], name: str, wide: bool = True
) -> str:
    spec = tmp_path / name
    spec.write_text(f"""
[job]
kind = "annotate"
[input]
path = "{input}"
id_column = "key"
passthrough = ["tag"]
[output]
path = "{output}"
wide = {str(wide).lower()}
[model]
path = "{checkpoint}"
device = "cpu"
[questions]
{chr(10).join(f'{k} = "{v}"' for k, v in QUESTIONS.items())}
[generation]
max_new_tokens = 3
[run]
batch_size = 4
[fetch]
local_roots = {json.dumps([str(r) for r in roots])}
""")
    return str(spec)


def assert_whole(output: str, images: int) -> None:
    for reader, table in readme_reads(output).items():
        assert table.num_rows == images * len(QUESTIONS), reader
        assert table.column("status").null_count == 0, reader
        pairs = list(zip(table.column("id").to_pylist(), table.column("question_id").to_pylist()))
        assert len(set(pairs)) == len(pairs), reader


def part_bytes(output: str) -> dict[str, str]:
    fs, root = url_to_fs(output)
    return {
        r.unit_id: hashlib.sha256(fs.cat_file(f"{root.rstrip('/')}/{r.part}")).hexdigest()
        for r in progress_records(output)
    }


def test_blocked_images_redone_after_adding_a_root_and_read_whole(ray_local, tmp_path, checkpoint, capsys):
    allowed, later = tmp_path / "allowed", tmp_path / "later"
    inputs = tmp_path / "in"
    write_shard(str(inputs / "a.parquet"), [png(allowed, i) for i in range(3)], ["a0", "a1", "a2"])
    write_shard(str(inputs / "b.parquet"), [png(later, i) for i in range(3)], ["b0", "b1", "b2"])
    write_shard(str(inputs / "c.parquet"), [png(allowed, 5), png(later, 6)], ["c0", "c1"])
    output = str(tmp_path / "out")
    first = write_spec(tmp_path, checkpoint, str(inputs), output, [allowed], "first.toml")
    assert main(["run", first, "--quiet"]) == 0
    rows = read_output(output).to_pylist()
    assert {r["error_kind"] for r in rows if r["status"] == "error"} == {"blocked_address"}
    assert sum(r["status"] == "error" for r in rows) == 4 * len(QUESTIONS)
    assert_whole(output, 8)
    assert Path(f"{output}.wide.parquet").exists() and not Path(output, "wide.parquet").exists()
    capsys.readouterr()
    assert main(["status", output]) == 0
    status = capsys.readouterr().out
    assert "blocked_address 8" in status and "--redo-errors blocked_address" in status

    before = part_bytes(output)
    ok_before = {(r["id"], r["question_id"]): r["text"] for r in rows if r["status"] == "ok"}
    fixed = write_spec(tmp_path, checkpoint, str(inputs), output, [allowed, later], "fixed.toml")
    assert main(["run", fixed, "--quiet"]) == 0  # a plain re-run does nothing: every unit is committed
    assert part_bytes(output) == before
    assert main(["run", fixed, "--quiet", "--redo-errors", "fetch_http"]) == 0  # no row of that kind: nothing
    assert part_bytes(output) == before
    capsys.readouterr()
    assert main(["run", fixed, "--quiet", "--redo-errors", "blocked_address"]) == 0
    assert "rows: 8 ok, 0 error" in capsys.readouterr().out  # this run's rows: those it did again

    rows = read_output(output).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    assert len({(r["id"], r["question_id"]) for r in rows}) == len(rows) == 8 * len(QUESTIONS)
    assert {r["tag"] for r in rows} == {f"t{r['id']}" for r in rows}  # passthrough redone with its row
    assert all(
        ok_before[(r["id"], r["question_id"])] == r["text"] for r in rows if (r["id"], r["question_id"]) in ok_before
    )  # ok rows kept as they were
    after = part_bytes(output)
    (unit_a,) = [r.unit_id for r in progress_records(output) if r.shard.endswith("a.parquet")]
    assert after[unit_a] == before[unit_a]  # a unit without error rows is not rewritten at all
    assert {u for u in after if after[u] != before[u]} == set(after) - {unit_a}
    assert_whole(output, 8)
    wide = pq.read_table(f"{output}.wide.parquet")
    assert wide.num_rows == 8 and wide.column("errors").null_count == 8

    # A renamed shard is known by its content: no new row; a removed one is reported by status.
    os.rename(inputs / "a.parquet", inputs / "renamed.parquet")
    assert main(["run", fixed, "--quiet"]) == 0
    assert read_output(output).num_rows == 8 * len(QUESTIONS)
    os.remove(inputs / "renamed.parquet")
    capsys.readouterr()
    main(["status", output])
    assert (
        f"1 committed unit(s) match no unit of the input (a shard removed or changed since): {unit_a}"
        in capsys.readouterr().out
    )


def test_output_on_s3_read_whole_while_a_unit_is_half_written(ray_local, tmp_path, checkpoint, s3fs_clean):
    if not s3fs_clean.exists("runs"):
        s3fs_clean.mkdir("runs")
    prefix = f"s3://runs/{uuid.uuid4().hex[:8]}"
    images = tmp_path / "images"
    write_shard(f"{prefix}/in/a.parquet", [png(images, i) for i in range(3)], ["0", "1", "2"])
    write_shard(f"{prefix}/in/b.parquet", [png(images, i) for i in range(3, 5)], ["3", "4"])
    output = f"{prefix}/out"
    spec = write_spec(tmp_path, checkpoint, f"{prefix}/in", output, [images], "s3.toml")
    assert main(["run", spec, "--quiet"]) == 0
    assert_whole(output, 5)
    assert s3fs_clean.exists(f"{output}.wide.parquet")

    # A unit caught mid-commit: its part staged and its marker written, its part not yet in place.
    record = progress_records(output)[0]
    fs, root = url_to_fs(output)
    fs.copy(f"{root}/{record.part}", f"{root}/{staged_name('half')}")
    fs.pipe_file(
        f"{root}/{PROGRESS_DIR}/half.json",
        json.dumps({**record.to_dict(), "unit_id": "half", "part": part_name("half")}).encode(),
    )
    buffer = io.BytesIO()
    pq.write_table(read_output(output), buffer)
    fs.pipe_file(f"{root}/{staged_name('torn')}", buffer.getvalue()[:200])
    assert "half" not in committed_units(output)
    assert_whole(output, 5)


def test_duplicate_ids_are_refused_naming_shard_and_id(ray_local, tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    inputs = tmp_path / "in"
    write_shard(str(inputs / "a.parquet"), [png(images, i) for i in range(3)], ["x", "y", "x"])
    spec = write_spec(tmp_path, checkpoint, str(inputs), str(tmp_path / "out"), [images], "dup.toml", wide=False)
    assert main(["run", spec, "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"key 'x': {inputs / 'a.parquet'} rows 0, 2" in err
    assert not (tmp_path / "out" / "_manifest.json").exists()

    # Across shards: each shard alone is fine, so the run goes on; status --verify names both. A null id is an
    # error row that keeps the row's derived id, to join it back.
    write_shard(str(inputs / "a.parquet"), [png(images, i) for i in range(2)], ["x", "y"])
    write_shard(str(inputs / "b.parquet"), [png(images, 2), png(images, 3)], ["x", None])
    assert main(["run", spec, "--quiet"]) == 0
    capsys.readouterr()
    main(["status", str(tmp_path / "out"), "--verify"])
    out = capsys.readouterr().out
    assert f"key 'x': {inputs / 'a.parquet'} rows 0; {inputs / 'b.parquet'} rows 0" in out
    rows = read_output(str(tmp_path / "out")).to_pylist()
    (shard_b,) = {r.shard_id for r in plan_units([str(inputs / "b.parquet")], ColumnMapping(id_column="key"))}
    nulls = [r for r in rows if r["id"] is None]
    assert [(r["status"], r["error_kind"], r["derived_id"]) for r in nulls] == [
        ("error", "invalid_input", f"{shard_b}-1")
    ] * len(QUESTIONS)
    assert all(r["derived_id"] for r in rows)


def test_output_inside_its_input_is_refused_before_any_work(ray_local, tmp_path, checkpoint, capsys):
    images = tmp_path / "images"
    write_shard(str(tmp_path / "in" / "a.parquet"), [png(images, 0)], ["0"])
    spec = write_spec(tmp_path, checkpoint, str(tmp_path / "in"), str(tmp_path / "in" / "out"), [images], "in.toml")
    assert main(["run", spec, "--quiet"]) == 3
    assert f"output {tmp_path / 'in' / 'out'} is inside the input {tmp_path / 'in'}" in capsys.readouterr().err
    assert not (tmp_path / "in" / "out").exists()


def test_passthrough_of_several_types_across_shards_reads_as_one(ray_local, tmp_path, checkpoint):
    """D4: a passthrough column that is null in one shard, int32 in another and int64 in a third: one type in every
    part, so the output and its wide table read whole."""
    images = tmp_path / "images"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, keys, tags in (
        ("a", ["0", "1"], pa.nulls(2)),
        ("b", ["2"], pa.array([7], pa.int32())),
        ("c", ["3"], pa.array([None], pa.int64())),
    ):
        pq.write_table(
            pa.table({"image_url": [png(images, int(k)) for k in keys], "key": keys, "tag": tags}),
            inputs / f"{name}.parquet",
        )
    output = str(tmp_path / "out")
    assert main(["run", write_spec(tmp_path, checkpoint, str(inputs), output, [images], "d4.toml"), "--quiet"]) == 0
    assert {pq.read_schema(p).field("tag").type for p in Path(output).glob("*.parquet")} == {pa.int64()}
    assert_whole(output, 4)
    assert sorted(pq.read_table(f"{output}.wide.parquet").column("tag").to_pylist(), key=str) == [7, None, None, None]
