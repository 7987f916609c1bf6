"""WebDataset tar shards, written by the `webdataset` package's ShardWriter: planning, reading, bad tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from test_pipeline import png

from blipbatch.pipeline.shards import DuplicateIdError, ShardError, discover_shards, plan_units, read_unit
from blipbatch.pipeline.webdataset import split_name
from blipbatch.schemas import ColumnMapping

WITH_ALT = ColumnMapping(passthrough=("caption", "width"))


def write_shards(folder: Path, count: int, per_shard: int, start: int = 0, **extra) -> list[bytes]:
    """`count` samples (png, txt, json) in tars of `per_shard`; returns the images in order."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with wds.ShardWriter(str(folder / "shard-%04d.tar"), maxcount=per_shard, verbose=0, start_shard=start) as sink:
        for k in range(start * per_shard, start * per_shard + count):
            images.append(png(k))
            sink.write(
                {
                    "__key__": f"s{k:05d}",
                    "png": images[-1],
                    "txt": f"text {k}",
                    "json": {"caption": f"alt {k}", "width": 40 + k},
                    **extra,
                }
            )
    return images


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_key_and_extension_split_as_webdataset_does():
    assert split_name("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_name("0001.JPG") == ("0001", "jpg")
    assert split_name("README") == (None, "")
    assert split_name("dir/.hidden") == (None, "")


def test_samples_are_units_of_rows_per_unit_with_their_columns_and_the_key_as_id(tmp_path):
    images = write_shards(tmp_path / "in", count=7, per_shard=5)
    shards = discover_shards(str(tmp_path / "in"))
    assert [Path(s).name for s in shards] == ["shard-0000.tar", "shard-0001.tar"]
    units = plan_units(shards, WITH_ALT, 2)
    assert [(u.first_row, u.num_rows) for u in units] == [(0, 2), (2, 2), (4, 1), (0, 2)]
    assert units[0].schema.names[:2] == ["__key__", "image_url"] and {"txt", "caption", "width"} <= set(
        units[0].schema.names
    )
    rows = [row for unit in units for row in read_unit(unit, WITH_ALT, ["{caption}: {txt}"])]
    assert [row.id for row in rows] == [f"s{k:05d}" for k in range(7)]
    assert [row.image for row in rows] == images
    assert rows[3].instruction == "alt 3: text 3" and rows[3].passthrough == {"caption": "alt 3", "width": 43}
    assert all(row.problem is None and row.derived_id is None for row in rows)
    # A tar renamed plans the same unit ids (they come from its content)
    (tmp_path / "in" / "shard-0001.tar").rename(tmp_path / "in" / "renamed.tar")
    assert sorted(u.unit_id for u in plan_units(discover_shards(str(tmp_path / "in")), WITH_ALT, 2)) == sorted(
        u.unit_id for u in units
    )


def test_an_id_column_from_the_json_and_a_chosen_image_extension(tmp_path):
    source = tar_of(tmp_path / "x.tar", [("a.jpg", png(1)), ("a.png", png(2)), ("a.json", b'{"uid": "A-1"}')])
    mapping = ColumnMapping(id_column="uid", image_extension="png")
    (row,) = read_unit(plan_units([source], mapping)[0], mapping, ["x"])
    assert (row.id, row.image, row.derived_id is not None, row.problem) == ("A-1", png(2), True, None)


def test_bad_samples_are_row_errors_and_the_rest_of_the_shard_goes_on(tmp_path):
    source = tar_of(
        tmp_path / "bad.tar",
        [
            ("ok.png", png(1)),
            ("ok.json", b'{"caption": "fine"}'),
            ("noimage.txt", b"just text"),
            ("two.jpg", png(2)),
            ("two.png", png(3)),
            ("list.png", png(4)),
            ("list.json", b"[1, 2]"),
            ("README", b"a member without a key"),
            ("last.png", png(5)),
        ],
    )
    (unit,) = plan_units([source], ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), ["x"])
    problems = {row.id: row.problem and (row.problem.kind, row.problem.message) for row in rows}
    assert problems["ok"] is None and problems["last"] is None
    assert problems["noimage"] == (
        "invalid_input",
        "sample 'noimage' has no image (jpg, jpeg, png, webp) member (its "
        "members: noimage.txt); [input] image_extension names another",
    )
    assert "sample 'two' has 2 images (two.jpg, two.png): set [input] image_extension" in problems["two"][1]
    assert problems["list"] == ("invalid_input", "member 'list.json' holds a JSON list, not an object")
    assert "member 'README' has no key" in problems["README"][1]
    assert [row.image for row in rows if row.id in ("ok", "last")] == [png(1), png(5)]


def test_a_truncated_tar_keeps_what_it_holds_and_says_where_it_ends(tmp_path):
    whole = Path(tar_of(tmp_path / "whole.tar", [("a.png", png(1)), ("b.png", png(2)), ("c.png", png(3))]))
    data = whole.read_bytes()
    cut = data.index(png(3)) + 20  # into c.png's data
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar").write_bytes(data[:cut])
    (unit,) = plan_units(discover_shards(str(tmp_path / "in")), ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), ["x"])
    assert [(row.id, row.problem is None) for row in rows] == [("a", True), ("b", True), ("c", False)]
    assert "member 'c.png' is cut short: the tar ends 20 bytes into its" in rows[2].problem.message
    # garbage where a header should be: the samples before it, and one row saying from which byte on
    garbage = data[: data.index(b"c.png")] + b"\x07" * 2048
    (tmp_path / "in" / "cut.tar").write_bytes(garbage)
    (unit,) = plan_units(discover_shards(str(tmp_path / "in")), ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), ["x"])
    assert [row.id for row in rows[:2]] == ["a", "b"] and rows[2].id.startswith("cut.tar@")
    assert "the tar is unreadable from byte" in rows[2].problem.message
    # cut inside a header: the same
    (tmp_path / "in" / "cut.tar").write_bytes(data[: data.index(b"c.png") + 100])
    (unit,) = plan_units(discover_shards(str(tmp_path / "in")), ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), ["x"])
    assert [row.id for row in rows[:2]] == ["a", "b"]
    assert "the tar ends inside a header at byte" in rows[2].problem.message


def test_not_a_tar_a_compressed_tar_and_a_key_in_two_tars_are_refused_at_start(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar at all" * 100)
    with pytest.raises(ShardError, match=r"junk.tar: not a tar"):
        plan_units([str(tmp_path / "junk.tar")], ColumnMapping())
    import gzip

    plain = Path(tar_of(tmp_path / "a.tar", [("k.png", png(1))]))
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ShardError, match=r"a.tar.gz: a compressed tar; .* decompress it"):
        plan_units([str(tmp_path / "a.tar.gz")], ColumnMapping())
    other = tar_of(tmp_path / "b.tar", [("k.jpg", png(2))])
    with pytest.raises(DuplicateIdError, match=r"WebDataset key 'k' is in .*a.tar and in .*b.tar"):
        plan_units([str(plain), other], ColumnMapping())
    # forced: a tar without the .tar name is read as WebDataset
    (tmp_path / "shard.bin").write_bytes(plain.read_bytes())
    mapping = ColumnMapping(format="webdataset")
    assert read_unit(plan_units([str(tmp_path / "shard.bin")], mapping)[0], mapping, ["x"])[0].image == png(1)


def test_tars_on_s3_plan_and_read_as_local_ones(s3fs_clean, tmp_path):
    images = write_shards(tmp_path / "in", count=6, per_shard=3)
    s3fs_clean.mkdir("wds")
    for tar in sorted((tmp_path / "in").glob("*.tar")):
        s3fs_clean.put(str(tar), f"wds/shards/{tar.name}")
    shards = discover_shards("s3://wds/shards/")
    assert shards == ["s3://wds/shards/shard-0000.tar", "s3://wds/shards/shard-0001.tar"]
    units = plan_units(shards, WITH_ALT, 2)
    local = plan_units(discover_shards(str(tmp_path / "in")), WITH_ALT, 2)
    assert [u.unit_id for u in units] == [u.unit_id for u in local]  # identity by content, wherever the tar lies
    rows = [row for unit in units for row in read_unit(unit, WITH_ALT, ["{caption}"])]
    assert [(row.id, row.image, row.instruction) for row in rows] == [
        (f"s{k:05d}", images[k], f"alt {k}") for k in range(6)
    ]


def test_a_tar_rewritten_after_planning_is_refused_when_its_unit_is_read(tmp_path):
    from blipbatch.pipeline.shards import ShardChanged

    source = tar_of(tmp_path / "a.tar", [("a.png", png(1)), ("b.png", png(2))])
    (unit,) = plan_units([source], ColumnMapping())
    tar_of(tmp_path / "a.tar", [("a.png", png(3)), ("b.png", png(2))])
    with pytest.raises(ShardChanged, match=r"a.tar: its content changed after planning.*is not committed"):
        read_unit(unit, ColumnMapping(), ["x"])


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_in_each_tar_format(tmp_path, tar_format):
    """Names over 100 bytes: a ustar prefix, a GNU long-name member, a pax path record (also for non-ASCII)."""
    folder = "d" * 90 + "/" + "e" * 60
    names = [f"{folder}/k1.png", f"{folder}/k1.txt"] + ([] if tar_format == tarfile.USTAR_FORMAT else ["é/k2.png"])
    with tarfile.open(tmp_path / "long.tar", "w", format=tar_format) as tar:
        for name in names:
            data = png(1) if name.endswith(".png") else b"hello"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (unit,) = plan_units([str(tmp_path / "long.tar")], ColumnMapping())
    rows = read_unit(unit, ColumnMapping(missing="empty"), ["{txt}"])
    assert rows[0].id == f"{folder}/k1" and rows[0].image == png(1) and rows[0].instruction == "hello"
    assert [row.id for row in rows] == [f"{folder}/k1"] + ([] if tar_format == tarfile.USTAR_FORMAT else ["é/k2"])


def test_a_vqa_question_from_the_json_and_the_key_named_as_the_id_column(tmp_path):
    source = tar_of(
        tmp_path / "q.tar",
        [
            ("a.png", png(1)),
            ("a.json", b'{"question": "Is it {red}?"}'),
            ("b.png", png(2)),
            ("b.json", b'{"question": null}'),
        ],
    )
    mapping = ColumnMapping(instruction_column="question", id_column="__key__")
    rows = read_unit(plan_units([source], mapping)[0], mapping)
    assert [(row.id, row.instruction) for row in rows] == [("a", "Is it {red}?"), ("b", None)]
    other = tar_of(tmp_path / "r.tar", [("a.jpg", png(3)), ("a.json", b'{"question": "Why?"}')])
    with pytest.raises(DuplicateIdError, match=r"WebDataset key 'a' is in"):
        plan_units([source, other], mapping)


def test_img2dataset_webdataset_folders_metadata_parquet_beside_each_tar_is_not_a_shard(tmp_path):
    """img2dataset's webdataset output: 00000.tar, and beside it 00000.parquet (url, caption, key, status; no image)
    and 00000_stats.json. The folder runs as it is: its tars are the shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_shards(tmp_path / "out", count=3, per_shard=3)
    tar = tmp_path / "out" / "shard-0000.tar"
    pq.write_table(pa.table({"url": ["u"] * 3, "key": ["s00000", "s00001", "s00002"]}), tar.with_suffix(".parquet"))
    (tmp_path / "out" / "shard-0000_stats.json").write_text("{}")
    pq.write_table(pa.table({"image_url": ["x"]}), tmp_path / "out" / "other.parquet")  # a shard of its own
    assert [Path(s).name for s in discover_shards(str(tmp_path / "out"))] == ["other.parquet", "shard-0000.tar"]


def test_a_cached_scan_plans_without_reading_the_tar_again(tmp_path):
    """The cache is looked up by the tar's size and first and last 256 KiB: garbage written over headers in the
    middle of a large tar (size, start and end kept) is seen by a fresh scan, not by one taken from the cache."""
    import os

    from blipbatch.pipeline.sink import write_file
    from blipbatch.pipeline.webdataset import IndexCache

    members = [(f"k{k:03d}.jpg", os.urandom(20000)) for k in range(60)]  # 1.2 MB: the middle is not sampled
    source = Path(tar_of(tmp_path / "big.tar", members))
    cache = IndexCache(str(tmp_path / "out"))
    fresh = plan_units([str(source)], ColumnMapping(), 100, cache)
    assert list(cache.new) == [f"_webdataset/{fresh[0].tar.quick_id}.json"]
    for name, data in cache.new.items():
        write_file(str(tmp_path / "out" / name), data)
    data = bytearray(source.read_bytes())
    middle = data.index(b"k030.jpg")
    data[middle : middle + 512] = b"\x07" * 512
    source.write_bytes(bytes(data))
    cached = IndexCache(str(tmp_path / "out"))
    assert [u.unit_id for u in plan_units([str(source)], ColumnMapping(), 100, cached)] == [fresh[0].unit_id]
    assert cached.new == {}  # nothing scanned
    rescanned = plan_units([str(source)], ColumnMapping(), 100)[0]
    assert rescanned.unit_id != fresh[0].unit_id and rescanned.num_rows == 31  # 30 samples, then the error row


def test_a_broken_pax_header_is_an_error_row_not_a_crash(tmp_path):
    with tarfile.open(tmp_path / "p.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("a.png", "é.png"):  # the second needs a pax header (a non-ASCII name)
            info = tarfile.TarInfo(name)
            info.size = len(png(1))
            tar.addfile(info, io.BytesIO(png(1)))
    data = bytearray((tmp_path / "p.tar").read_bytes())
    record = data.index(b" path=")
    data[record - 2 : record] = b"zz"  # the record's length is no number now
    header = record - record % 512 - 512  # the pax header block, whose checksum must still hold
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 155] = f"{sum(data[header : header + 512]):06o}\0".encode()
    (tmp_path / "p.tar").write_bytes(bytes(data))
    (unit,) = plan_units([str(tmp_path / "p.tar")], ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), ["x"])
    assert rows[0].id == "a" and rows[0].problem is None
    assert "a broken pax header" in rows[1].problem.message
