"""Shard discovery, work units, reading units, the sink and the manifest: real Parquet, local disk and moto S3."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipbatch.pipeline.manifest import ManifestMismatch, ensure_manifest, fingerprint
from blipbatch.pipeline.shards import (
    SAMPLE_BYTES,
    DuplicateIdError,
    InputRow,
    NoShardsError,
    OverlapError,
    ShardError,
    WorkUnit,
    check_apart,
    check_unique_ids,
    discover_shards,
    duplicate_ids,
    legacy_unit_id,
    plan_units,
    read_unit,
)
from blipbatch.pipeline.sink import (
    commit_unit,
    committed_units,
    failed_units,
    mark_failed,
    progress_records,
    read_output,
    record_for,
    write_part,
)
from blipbatch.schemas import (
    ColumnMapping,
    ProgressRecord,
    SchemaError,
    derive_row_id,
    image_reference,
    output_schema,
    shard_key,
)

MAPPING = ColumnMapping(image_column="image_url", id_column="key", instruction_column="prompt", passthrough=("lang",))


def rows_table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "image_url": pa.array([f"http://127.0.0.1/img/{i}.jpg" for i in range(start, start + n)], pa.string()),
            "key": pa.array(range(start, start + n), pa.int64()),
            "prompt": pa.array([f"question {i}" for i in range(start, start + n)], pa.string()),
            "lang": pa.array([f"l{i % 3}" for i in range(start, start + n)], pa.large_string()),
        }
    )


def write_shard(target, table: pa.Table, row_group_size: int | None = None) -> str:
    """Write a real Parquet file to a local path or an fsspec URL; returns it as a string."""
    from fsspec.core import url_to_fs

    target = str(target)
    fs, path = url_to_fs(target)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)
    return target


@pytest.fixture(scope="module")
def s3(moto_endpoint):
    """The session's moto S3 endpoint with a bucket named "bucket"; yields an s3fs filesystem."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem bound to another endpoint
    fs = s3fs.S3FileSystem()
    if not fs.exists("bucket"):
        fs.mkdir("bucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def s3_prefix() -> str:
    return f"s3://bucket/{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- discovery


def test_discover_local_folder_glob_list_and_file_url(tmp_path):
    root = tmp_path / "in"
    a = write_shard(root / "a.parquet", rows_table(2))
    b = write_shard(root / "sub" / "b.parquet", rows_table(2))
    c = write_shard(root / "sub" / "deep" / "c.PARQUET", rows_table(2))
    write_shard(root / "_progress" / "x.parquet", rows_table(1))  # bookkeeping folder: not data
    write_shard(root / ".a.parquet.1234.tmp.parquet", rows_table(1))  # hidden temp file: not data
    (root / "notes.txt").write_text("not a shard")

    assert discover_shards(str(root)) == sorted([a, b, c])
    assert discover_shards(f"file://{root}") == sorted([a, b, c])
    assert discover_shards(str(root / "sub" / "*.parquet")) == [b]
    assert discover_shards(str(root / "s*")) == sorted([b, c])  # a glob matching a folder takes its shards
    assert discover_shards([c, a, c]) == [c, a]  # a list keeps its order, each shard once
    assert discover_shards(os.path.relpath(a)) == [a]  # relative paths come back absolute


def test_discover_nothing_is_an_error_naming_the_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoShardsError, match="empty"):
        discover_shards(str(tmp_path / "empty"))
    with pytest.raises(NoShardsError, match="missing"):
        discover_shards(str(tmp_path / "missing" / "*.parquet"))
    with pytest.raises(NoShardsError, match="nowhere.parquet"):
        discover_shards([write_shard(tmp_path / "a.parquet", rows_table(1)), str(tmp_path / "nowhere.parquet")])
    with pytest.raises(NoShardsError):
        discover_shards([])


def test_discover_s3(s3):
    prefix = s3_prefix()
    x = write_shard(f"{prefix}/in/x.parquet", rows_table(2))
    z = write_shard(f"{prefix}/in/y/z.parquet", rows_table(2))
    write_shard(f"{prefix}/in/_tmp/skip.parquet", rows_table(1))
    assert discover_shards(f"{prefix}/in") == [x, z]
    assert discover_shards(f"{prefix}/in/") == [x, z]
    assert discover_shards(f"{prefix}/in/*.parquet") == [x]
    # a shard added later is seen by the same process (scheduled runs over a growing prefix)
    w = write_shard(f"{prefix}/in/w.parquet", rows_table(1))
    assert discover_shards(f"{prefix}/in") == [w, x, z]
    with pytest.raises(NoShardsError, match=f"{prefix}/nothing"):
        discover_shards(f"{prefix}/nothing")


# ---------------------------------------------------------------- planning


def test_plan_units_align_to_row_groups(tmp_path):
    shard = write_shard(tmp_path / "s.parquet", rows_table(10), row_group_size=3)  # groups of 3, 3, 3, 1
    assert pq.ParquetFile(shard).metadata.num_row_groups == 4

    units = plan_units([shard], MAPPING, max_rows_per_unit=6)
    assert [(u.row_groups, u.first_row, u.num_rows) for u in units] == [((0, 1), 0, 6), ((2, 3), 6, 4)]
    units = plan_units([shard], MAPPING, max_rows_per_unit=4)
    assert [(u.row_groups, u.first_row, u.num_rows) for u in units] == [((0,), 0, 3), ((1,), 3, 3), ((2, 3), 6, 4)]
    # a group bigger than the limit is cut into row ranges of at most the limit
    units = plan_units([shard], MAPPING, max_rows_per_unit=2)
    assert [(u.row_groups, u.first_row, u.num_rows) for u in units] == [
        ((0,), 0, 2),
        ((0,), 2, 1),
        ((1,), 3, 2),
        ((1,), 5, 1),
        ((2,), 6, 2),
        ((2,), 8, 1),
        ((3,), 9, 1),
    ]
    with pytest.raises(ValueError, match="max_rows_per_unit"):
        plan_units([shard], MAPPING, max_rows_per_unit=0)


def test_unit_ids_stable_unique_and_safe(tmp_path):
    # two shards with the same basename in different folders, plus an empty shard (no unit)
    one = write_shard(tmp_path / "d=1" / "part-0.parquet", rows_table(5), row_group_size=2)
    two = write_shard(tmp_path / "d=2" / "part-0.parquet", rows_table(5, start=5), row_group_size=2)
    empty = write_shard(tmp_path / "empty.parquet", rows_table(0))
    first = plan_units([one, two, empty], MAPPING, max_rows_per_unit=2)
    again = plan_units([one, two, empty], MAPPING, max_rows_per_unit=2)
    assert first == again
    ids = [u.unit_id for u in first]
    assert len(ids) == len(set(ids)) == 6
    assert [u.unit_id.rsplit("-rg", 1)[1] for u in first[:3]] == ["00000-00000", "00001-00001", "00002-00002"]
    assert all(set(i) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for i in ids)
    with pytest.raises(ShardError, match="each shard may appear once"):
        plan_units([one, f"file://{one}"], MAPPING)


def test_unit_ids_come_from_content_not_location(tmp_path, s3):
    shard = write_shard(tmp_path / "a.parquet", rows_table(5), row_group_size=2)
    units = plan_units([shard], MAPPING, max_rows_per_unit=2)
    renamed = tmp_path / "moved" / "b.parquet"
    renamed.parent.mkdir()
    os.rename(shard, renamed)
    moved = plan_units([str(renamed)], MAPPING, max_rows_per_unit=2)
    assert [u.unit_id for u in moved] == [u.unit_id for u in units]
    assert [r.id for u in moved for r in read_unit(u, ColumnMapping(), ["?"])] == [
        r.id for u in units for r in read_unit(dataclasses.replace(u, shard=str(renamed)), ColumnMapping(), ["?"])
    ]
    uploaded = write_shard(f"{s3_prefix()}/in/c.parquet", rows_table(5), row_group_size=2)
    assert [u.unit_id for u in plan_units([uploaded], MAPPING, max_rows_per_unit=2)] == [u.unit_id for u in units]
    assert legacy_unit_id(moved[0]) == f"{shard_key(str(renamed))}-rg00000-00000"  # what older outputs named it
    # other content, other ids; the same content twice in one input is refused, naming both copies
    other = write_shard(tmp_path / "a.parquet", rows_table(5, start=1), row_group_size=2)
    assert not {u.unit_id for u in plan_units([other], MAPPING)} & {
        u.unit_id for u in plan_units([str(renamed)], MAPPING)
    }
    # the same footer (sizes, statistics) with the rows in another order: other content all the same
    rotated = rows_table(5).take([1, 2, 3, 4, 0])
    same_footer = write_shard(
        tmp_path / "rotated.parquet", rotated.set_column(1, "key", rows_table(5).column("key")), row_group_size=5
    )
    plain = write_shard(
        tmp_path / "plain.parquet", rows_table(5).set_column(1, "key", rows_table(5).column("key")), row_group_size=5
    )
    assert pq.read_metadata(same_footer).to_dict()["row_groups"] == pq.read_metadata(plain).to_dict()["row_groups"]
    assert len({u.unit_id for u in plan_units([same_footer, plain], MAPPING)}) == 2
    # a shard larger than two samples: hashed by its head and tail, still the same wherever it lies
    big = write_shard(tmp_path / "big.parquet", rows_table(30000), row_group_size=10000)
    assert os.path.getsize(big) > 2 * SAMPLE_BYTES + 10000
    big_units = plan_units([big], MAPPING, max_rows_per_unit=10000)
    uploaded_big = f"{s3_prefix()}/in/big.parquet"
    s3.put_file(big, uploaded_big)
    assert [u.unit_id for u in plan_units([uploaded_big], MAPPING, max_rows_per_unit=10000)] == [
        u.unit_id for u in big_units
    ]
    copy = write_shard(tmp_path / "copy.parquet", rows_table(5), row_group_size=2)
    with pytest.raises(ShardError, match=f"{copy}: same content as {renamed}"):
        plan_units([str(renamed), copy], MAPPING)


def test_schema_errors_name_shard_column_expected_and_found(tmp_path):
    wrong = write_shard(tmp_path / "wrong.parquet", rows_table(2).set_column(0, "image_url", pa.array([1, 2])))
    with pytest.raises(SchemaError) as info:
        plan_units([wrong], MAPPING)
    message = str(info.value)
    assert wrong in message and "'image_url'" in message and "string" in message and "int64" in message

    missing = write_shard(tmp_path / "missing.parquet", rows_table(2).drop_columns(["prompt"]))
    with pytest.raises(SchemaError, match="missing column.*'prompt'.*image_url, key, lang") as info:
        plan_units([missing], MAPPING)
    assert info.value.shard == missing

    float_ids = write_shard(tmp_path / "float_ids.parquet", rows_table(2).set_column(1, "key", pa.array([1.0, 2.0])))
    with pytest.raises(SchemaError, match="'key' should be string or integer.*found double"):
        plan_units([float_ids], MAPPING)
    all_null = write_shard(tmp_path / "all_null.parquet", rows_table(2).set_column(2, "prompt", pa.nulls(2)))
    assert len(plan_units([all_null], MAPPING)) == 1  # a column of only nulls: fine here, error rows later

    good = write_shard(tmp_path / "good.parquet", rows_table(2).append_column("text", pa.array(["a", "b"])))
    with pytest.raises(SchemaError, match="passthrough column 'text'"):
        plan_units([good], ColumnMapping(instruction_column="prompt", passthrough=("lang", "text")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match="junk.parquet.*Parquet"):
        plan_units([good, str(tmp_path / "junk.parquet")], MAPPING)


def test_output_schema():
    input_schema = rows_table(1).schema
    schema = output_schema(input_schema, MAPPING)
    assert schema.names == [
        "id",
        "image_url",
        "image_sha256",
        "instruction",
        "text",
        "score",
        "status",
        "error_kind",
        "error",
        "model",
        "generation",
        "derived_id",
        "lang",
    ]
    assert "derived_id" not in output_schema(input_schema, ColumnMapping(instruction_column="prompt")).names
    assert schema.field("text").type == pa.string()
    assert schema.field("lang").type == pa.large_string()  # passthrough keeps its input type
    assert schema.field("score").type == pa.float64()
    several = output_schema(input_schema, MAPPING, multiple_texts=True)
    assert several.field("text").type == pa.list_(pa.string())
    assert several.field("score").type == pa.list_(pa.float64())
    binary = pa.schema([("jpg", pa.binary())])
    assert output_schema(binary, ColumnMapping(image_column="jpg")).field("jpg").type == pa.string()
    assert image_reference(b"\xff\xd8\xff") == "<3 bytes>"
    assert image_reference("s3://b/x.jpg") == "s3://b/x.jpg"
    assert image_reference(None) is None


# ---------------------------------------------------------------- reading


def test_read_unit_rows_ids_and_instructions(tmp_path):
    shard = write_shard(tmp_path / "s.parquet", rows_table(7), row_group_size=3)
    units = plan_units([shard], MAPPING, max_rows_per_unit=3)
    assert [u.first_row for u in units] == [0, 3, 6]

    rows = read_unit(units[1], MAPPING)
    assert [r.row_index for r in rows] == [3, 4, 5]
    assert rows[0] == InputRow(
        id="3",
        image="http://127.0.0.1/img/3.jpg",
        instruction="question 3",
        passthrough={"lang": "l0"},
        row_index=3,
        derived_id=derive_row_id(units[1].shard_id, 3),
    )
    assert sum(len(read_unit(u, MAPPING)) for u in units) == 7

    # no id column: ids derived from the shard and the row index, stable across reads
    derived = ColumnMapping(image_column="image_url")
    rows = read_unit(units[2], derived, fixed_instructions=["A photo of"])
    assert [r.id for r in rows] == [derive_row_id(units[2].shard_id, 6)] and rows[0].derived_id is None
    assert read_unit(units[2], derived, fixed_instructions=["A photo of"]) == rows

    # fixed questions: one row per (input row, question), in order, the id staying the row's id
    rows = read_unit(units[0], ColumnMapping(id_column="key"), fixed_instructions=["What?", "Where?"])
    assert [(r.id, r.instruction) for r in rows] == [
        ("0", "What?"),
        ("0", "Where?"),
        ("1", "What?"),
        ("1", "Where?"),
        ("2", "What?"),
        ("2", "Where?"),
    ]

    with pytest.raises(ValueError, match="exactly one"):
        read_unit(units[0], MAPPING, fixed_instructions=["A photo of"])
    with pytest.raises(ValueError, match="exactly one"):
        read_unit(units[0], derived)
    with pytest.raises(ValueError, match="empty"):
        read_unit(units[0], derived, fixed_instructions=[])


def test_read_unit_binary_images_nulls_and_unvalidated_instructions(tmp_path):
    table = pa.table(
        {
            "jpg": pa.array([b"\xff\xd8abc", None, b""], pa.large_binary()),
            "uid": ["a", None, "c"],
            "ask": ["hi", None, ""],
        }
    )
    shard = write_shard(tmp_path / "b.parquet", table)
    mapping = ColumnMapping(image_column="jpg", id_column="uid", instruction_column="ask")
    (unit,) = plan_units([shard], mapping)
    rows = read_unit(unit, mapping)
    assert [r.image for r in rows] == [b"\xff\xd8abc", None, b""]
    assert [r.id for r in rows] == ["a", None, "c"]  # a null id is passed on, to become an error row
    assert [r.instruction for r in rows] == ["hi", None, ""]  # validated later, per row


def test_read_unit_from_s3(s3):
    shard = write_shard(f"{s3_prefix()}/in/s.parquet", rows_table(5), row_group_size=2)
    units = plan_units(discover_shards(shard.rsplit("/", 1)[0]), MAPPING, max_rows_per_unit=2)
    assert [u.num_rows for u in units] == [2, 2, 1]
    assert [r.id for u in units for r in read_unit(u, MAPPING)] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- sink


def output_for(unit: WorkUnit, text: str) -> pa.Table:
    """A unit's output table in the output schema; every third row an error row."""
    schema = output_schema(rows_table(1).schema, MAPPING)
    rows = []
    for i in range(unit.num_rows):
        bad = i % 3 == 2
        rows.append(
            {
                "id": str(unit.first_row + i),
                "image_url": f"u{i}",
                "instruction": "q",
                "text": None if bad else text,
                "status": "error" if bad else "ok",
                "error_kind": "fetch_http" if bad else None,
                "error": "HTTP 404" if bad else None,
                "model": "tiny",
                "generation": "{}",
                "lang": "en",
            }
        )
    return pa.Table.from_pylist(rows, schema=schema)


def units_for(output_root: str, n_units: int = 3) -> list[WorkUnit]:
    return [WorkUnit(f"s-abc-rg{i:05d}-{i:05d}", "s.parquet", (i,), 4 * i, 4) for i in range(n_units)]


def exercise_sink(output_root: str) -> None:
    units = units_for(output_root)
    assert committed_units(output_root) == set()
    assert read_output(output_root).num_rows == 0

    for unit in units[:2]:
        table = output_for(unit, "first")
        write_part(output_root, unit, table)
        commit_unit(output_root, record_for(unit, table, attempt=1))
    # a crash between part and marker: the part exists but does not count
    write_part(output_root, units[2], output_for(units[2], "orphan"))
    assert committed_units(output_root) == {units[0].unit_id, units[1].unit_id}
    assert read_output(output_root).num_rows == 8

    # the retry of the crashed unit overwrites its part; redoing a committed unit overwrites too: no duplicates
    for unit in (units[2], units[0]):
        table = output_for(unit, "second")
        write_part(output_root, unit, table)
        commit_unit(output_root, record_for(unit, table, attempt=2))
    out = read_output(output_root)
    assert out.num_rows == 12
    assert sorted(out.column("id").to_pylist(), key=int) == [str(i) for i in range(12)]
    assert "orphan" not in out.column("text").to_pylist()
    assert out.schema == output_schema(rows_table(1).schema, MAPPING)

    (record,) = [r for r in progress_records(output_root) if r.unit_id == units[0].unit_id]
    assert (record.rows, record.rows_ok, record.rows_error, record.errors_by_kind, record.attempt) == (
        4,
        3,
        1,
        {"fetch_http": 1},
        2,
    )
    assert (record.shard, record.first_row, record.num_rows) == ("s.parquet", 0, 4)
    assert record.part == f"part-{units[0].unit_id}.parquet"

    # failed markers: listed until the unit commits, and never counted as committed
    lost = WorkUnit("s-abc-rg00009-00009", "s.parquet", (9,), 36, 4)
    mark_failed(output_root, lost.unit_id, "worker died 3 times: SIGSEGV", attempts=3)
    mark_failed(output_root, units[1].unit_id, "stale marker", attempts=3)
    assert failed_units(output_root)[lost.unit_id]["reason"] == "worker died 3 times: SIGSEGV"
    assert failed_units(output_root)[lost.unit_id]["attempts"] == 3
    assert set(failed_units(output_root)) == {lost.unit_id}  # a committed unit is not failed
    assert lost.unit_id not in committed_units(output_root)
    with pytest.raises(FileNotFoundError, match="write the part before committing"):
        commit_unit(output_root, record_for(lost, output_for(lost, "x"), attempt=4))
    table = output_for(lost, "retried")
    write_part(output_root, lost, table)
    commit_unit(output_root, record_for(lost, table, attempt=4))
    assert failed_units(output_root) == {}
    assert read_output(output_root).num_rows == 16


def test_sink_local(tmp_path):
    output_root = str(tmp_path / "out")
    exercise_sink(output_root)
    names = sorted(os.listdir(output_root))
    assert names == ["_progress", "_staging"] + sorted(f"part-s-abc-rg{i:05d}-{i:05d}.parquet" for i in (0, 1, 2, 9))
    assert not [n for n in os.listdir(tmp_path / "out" / "_progress") if n.startswith(".")]  # no temp files left
    assert os.listdir(tmp_path / "out" / "_staging") == []  # every staged part was committed
    # the output folder, used as an input, yields the parts and not the bookkeeping
    assert len(discover_shards(output_root)) == 4


def test_sink_s3(s3):
    output_root = f"{s3_prefix()}/out"
    exercise_sink(output_root)
    assert len(s3.ls(output_root)) == 5  # four parts and _progress/


def test_record_for_rejects_unknown_status_and_kind():
    unit = units_for("unused", 1)[0]
    table = output_for(unit, "x")
    status, kind = table.schema.get_field_index("status"), table.schema.get_field_index("error_kind")
    table = output_for(unit, "x").set_column(status, "status", pa.array(["ok", "done", "ok", "error"]))
    with pytest.raises(ValueError, match="'done'"):
        record_for(unit, table, attempt=1)
    table = output_for(unit, "x").set_column(kind, "error_kind", pa.array([None, None, "oops", None], pa.string()))
    with pytest.raises(ValueError, match="oops"):
        record_for(unit, table, attempt=1)


def test_progress_record_round_trip():
    record = ProgressRecord(
        "u", "s.parquet", 0, 4, 8, 7, 1, {"decode_error": 1}, "part-u.parquet", 2, "2026-01-01T00:00:00+00:00"
    )
    assert ProgressRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(ValueError, match="rows_ok"):
        ProgressRecord.from_dict({k: v for k, v in record.to_dict().items() if k != "rows_ok"})


# ---------------------------------------------------------------- manifest

SETTINGS = {
    "model": "Salesforce/instructblip-vicuna-7b",
    "prompts": ("A short image caption:",),
    "generation": {"max_new_tokens": 30, "num_beams": 1},
    "max_rows_per_unit": 1000,
}


def test_fingerprint_is_stable():
    assert fingerprint(SETTINGS) == fingerprint(json.loads(json.dumps(SETTINGS)))  # tuple vs list
    assert fingerprint(dict(reversed(list(SETTINGS.items())))) == fingerprint(SETTINGS)  # key order
    assert fingerprint({**SETTINGS, "model": "other"}) != fingerprint(SETTINGS)
    with pytest.raises(TypeError, match="JSON"):
        fingerprint({"dtype": object()})


def test_manifest_same_different_force(tmp_path):
    output_root = str(tmp_path / "out")
    assert ensure_manifest(output_root, SETTINGS) == "created"
    assert ensure_manifest(output_root, json.loads(json.dumps(SETTINGS))) == "matched"

    changed = {**SETTINGS, "generation": {"max_new_tokens": 40, "num_beams": 1}, "prompts": ["Describe:"]}
    changed.pop("max_rows_per_unit")
    with pytest.raises(ManifestMismatch) as info:
        ensure_manifest(output_root, changed)
    assert set(info.value.differences) == {"generation.max_new_tokens", "prompts", "max_rows_per_unit"}
    assert "generation.max_new_tokens: was 30, now 40" in str(info.value)
    assert "max_rows_per_unit: was 1000, now (absent)" in str(info.value)
    assert ensure_manifest(output_root, SETTINGS) == "matched"  # the refused run changed nothing

    assert ensure_manifest(output_root, changed, force=True) == "replaced"
    assert ensure_manifest(output_root, changed) == "matched"
    stored = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert stored["fingerprint"] == fingerprint(changed)

    (tmp_path / "out" / "_manifest.json").write_text("{ truncated")
    with pytest.raises(ManifestMismatch):
        ensure_manifest(output_root, changed)
    assert ensure_manifest(output_root, changed, force=True) == "replaced"


def test_manifest_s3(s3):
    output_root = f"{s3_prefix()}/out"
    assert ensure_manifest(output_root, SETTINGS) == "created"
    assert ensure_manifest(output_root, SETTINGS) == "matched"
    with pytest.raises(ManifestMismatch, match="model"):
        ensure_manifest(output_root, {**SETTINGS, "model": "other"})


# ---------------------------------------------------------------- tables across shards


def test_passthrough_types_are_unified_across_shards_or_refused(tmp_path):
    mapping = ColumnMapping(instruction_column="prompt", passthrough=("tag",))
    base = rows_table(2).select(["image_url", "prompt"])
    null = write_shard(tmp_path / "a.parquet", base.append_column("tag", pa.nulls(2)))
    narrow = write_shard(
        tmp_path / "b.parquet",
        rows_table(2, start=2).select(["image_url", "prompt"]).append_column("tag", pa.array([1, 2], pa.int32())),
    )
    wide = write_shard(
        tmp_path / "c.parquet",
        rows_table(2, start=4).select(["image_url", "prompt"]).append_column("tag", pa.array([3, None], pa.int64())),
    )
    units = plan_units([null, narrow, wide], mapping)
    assert {u.schema.field("tag").type for u in units} == {pa.int64()}
    assert {output_schema(u.schema, mapping).field("tag").type for u in units} == {pa.int64()}

    text = write_shard(
        tmp_path / "d.parquet",
        rows_table(2, start=6).select(["image_url", "prompt"]).append_column("tag", pa.array(["x", "y"])),
    )
    with pytest.raises(ShardError) as info:
        plan_units([null, narrow, text], mapping)
    message = str(info.value)
    assert "'tag'" in message and narrow in message and text in message and "int32" in message and "string" in message

    with pytest.raises(SchemaError, match="passthrough column 'tag' is listed 2 times"):
        plan_units([null], ColumnMapping(instruction_column="prompt", passthrough=("tag", "tag")))


def test_duplicate_ids_within_a_shard_at_planning_and_across_shards(tmp_path):
    keys = rows_table(6).set_column(1, "key", pa.array([1, 2, 1, 3, None, None]))
    dup = write_shard(tmp_path / "dup.parquet", keys, row_group_size=2)
    clean = write_shard(tmp_path / "clean.parquet", rows_table(3, start=3))  # ids 3, 4, 5: 3 repeats dup's
    with pytest.raises(DuplicateIdError) as info:
        check_unique_ids([clean, dup], MAPPING)
    assert f"key '1': {dup} rows 0, 2" in str(info.value)
    assert "'3'" not in str(info.value)  # in two shards, not within one
    check_unique_ids([clean], MAPPING)
    check_unique_ids([dup], ColumnMapping(instruction_column="prompt"))  # derived ids are unique by construction
    found = duplicate_ids([clean, dup], MAPPING, across_shards=True)
    assert sorted(found) == [("1", [(dup, 0), (dup, 2)]), ("3", [(clean, 0), (dup, 3)])]


def test_output_inside_input_or_input_inside_output_is_refused(tmp_path, s3):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OverlapError, match=f"output {data}/out is inside the input {data}"):
        check_apart([str(data)], str(data / "out"))
    with pytest.raises(OverlapError, match="inside the input"):
        check_apart([f"{data}/**"], str(data / "out"))
    with pytest.raises(OverlapError, match="inside the input"):
        check_apart([f"{data}/*"], f"file://{data}/out/")
    with pytest.raises(OverlapError, match=f"input {data}/out/x.parquet is inside the output {data}/out"):
        check_apart([str(data / "out" / "x.parquet")], str(data / "out"))
    with pytest.raises(OverlapError, match="is the input"):
        check_apart([str(data)], str(data))
    check_apart([f"{data}/*.parquet"], str(data / "out"))  # the glob cannot reach the output's parts
    check_apart([str(data / "in")], str(data / "input-captions"))  # a shared name prefix is not inside
    with pytest.raises(OverlapError, match="s3://bucket/x/out is inside the input s3://bucket/x"):
        check_apart(["s3://bucket/x"], "s3://bucket/x/out")
    check_apart(["s3://bucket/x"], "s3://bucket/y")
    check_apart([str(data)], "s3://bucket" + str(data) + "/out")  # another filesystem
