"""One hostile reference costs its own row and nothing else: whatever a reference makes the fetch or the checks raise,
and however long a read blocks, the unit goes on, every other row of it is committed, and the row ends on time."""

from __future__ import annotations

import base64
import io
import threading
import time

import fsspec
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractFileSystem
from tiny import write_tiny_checkpoint

from blipbatch.model.engine import EngineConfig
from blipbatch.model.processor import InstructBlipProcessor
from blipbatch.pipeline import deadline
from blipbatch.pipeline.decode import DecodeConfig
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage
from blipbatch.pipeline.shards import InputRow, discover_shards, plan_units
from blipbatch.pipeline.worker import ModelWorker, WorkerConfig
from blipbatch.schemas import ColumnMapping


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def png_data_uri(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (20, 16), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_unit(
    checkpoint: str, tmp_path, references: list[str], fetch: FetchConfig, decode: DecodeConfig = DecodeConfig()
):
    """One unit of `references` through a real ModelWorker; the committed output, read back by pyarrow."""
    shard = tmp_path / "in" / "part-0.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"image_url": references, "id": [str(i) for i in range(len(references))]}), shard)
    mapping = ColumnMapping(id_column="id")
    [unit] = plan_units(discover_shards(str(shard.parent)), mapping, len(references))
    config = WorkerConfig(
        engine=EngineConfig(model=checkpoint, generation={"max_new_tokens": 2}),
        mapping=mapping,
        output=str(tmp_path / "out"),
        instructions=("a photo of",),
        batch_size=4,
        fetch=fetch,
        decode=decode,
    )
    record = ModelWorker(config).process_unit(unit, 1)
    return record, pq.read_table(tmp_path / "out").to_pandas().set_index("id")


def test_malformed_references_cost_only_their_rows(checkpoint, tmp_path):
    """A host with an empty label or one over 63 characters (getaddrinfo raises UnicodeError) and a local path with
    a NUL byte (realpath raises ValueError) are their rows' invalid_input errors; the 17 good rows are committed."""
    (tmp_path / "root").mkdir()
    hostile = {
        2: "http://www..example.com/a.jpg",
        7: f"http://{'a' * 64}.example.com/a.jpg",
        11: f"{tmp_path}/root/a\0b.png",
        15: "file://" + str(tmp_path / "root" / "x\0.png"),
    }
    references = [hostile.get(i, png_data_uri((10 * i, 80, 160))) for i in range(20)]
    record, table = run_unit(
        checkpoint, tmp_path, references, FetchConfig(retries=0, local_roots=(str(tmp_path / "root"),))
    )
    assert record.rows == 20 and len(table) == 20
    errors = table[table["status"] == "error"]
    assert sorted(errors.index.astype(int)) == sorted(hostile)
    assert set(errors["error_kind"]) == {"invalid_input"}
    assert "empty or longer than 63 characters" in errors.loc["2", "error"]
    assert "NUL byte" in errors.loc["11", "error"]
    assert (table.drop(errors.index)["status"] == "ok").all()


def test_an_unforeseen_exception_in_a_row_check_is_that_rows_error(checkpoint):
    """The stage's row boundary holds for checks that raise something else than a RowError."""

    def check(row: InputRow) -> str:
        if row.instruction == "boom":
            raise KeyError("a tokenizer bug")
        return str(row.instruction)

    processor = InstructBlipProcessor.from_pretrained(checkpoint).image_processor
    rows = [
        InputRow(id=str(i), image=png_data_uri((i, i, i)), instruction="boom" if i == 1 else "ok", row_index=i)
        for i in range(3)
    ]
    with PrepareStage(Fetcher(FetchConfig()), DecodeConfig(), processor, PrepareConfig(threads=1), check) as stage:
        [batch] = list(stage.batches(rows, 4))
    assert [p.error.kind if p.error else None for p in batch.rows] == [None, "invalid_input", None]
    assert "KeyError" in batch.rows[1].error.message and batch.pixels.shape[0] == 2


class BlockingRaw(io.RawIOBase):
    """A file whose read blocks until `release` is set (bounded): a hung NFS/FUSE mount."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.release.wait(timeout=60)
        return 0


class HungFileSystem(AbstractFileSystem):
    """Opens every path as a buffered file over BlockingRaw: its close() waits for the lock its blocked read()
    holds, so closing it from outside cannot end the read."""

    protocol = "hungfs"
    release = threading.Event()

    def _open(self, path, mode="rb", **kwargs):
        return io.BufferedReader(BlockingRaw(self.release))


@pytest.fixture
def hungfs():
    fsspec.register_implementation("hungfs", HungFileSystem, clobber=True)
    HungFileSystem.release.clear()
    before = deadline.abandoned_now()
    yield "hungfs"
    HungFileSystem.release.set()  # the abandoned reads end now
    limit = time.monotonic() + 5
    while deadline.abandoned_now() > before and time.monotonic() < limit:
        time.sleep(0.02)


def test_a_read_that_close_cannot_interrupt_ends_its_row_on_time(checkpoint, tmp_path, hungfs):
    """Two rows on a 'hung mount' end as fetch_timeout at their row deadline, their threads left behind and counted
    in the unit's timing; the unit's four other rows are committed."""
    references = [png_data_uri((40 * i, 0, 0)) for i in range(6)]
    references[1], references[4] = "hungfs://mount/a.jpg", "hungfs://mount/b.jpg"
    fetch = FetchConfig(retries=0, attempt_deadline_s=1.0, row_deadline_s=1.0, allowed_schemes=("data", "hungfs"))
    start = time.monotonic()
    record, table = run_unit(checkpoint, tmp_path, references, fetch)
    assert time.monotonic() - start < 10  # the worker's set-up included; the hung reads never return here
    assert record.rows == 6 and record.timing.reads_abandoned == 2
    assert list(table.loc[["1", "4"], "error_kind"]) == ["fetch_timeout"] * 2
    assert (table.drop(["1", "4"])["status"] == "ok").all()


def test_abandoned_reads_are_bounded_and_further_ones_fail_fast(hungfs):
    """With max_abandoned_reads threads still blocked, the next attempt is refused at once, saying why."""
    bound = deadline.abandoned_now() + 2
    fetcher = Fetcher(
        FetchConfig(retries=0, attempt_deadline_s=0.3, allowed_schemes=("hungfs",), max_abandoned_reads=bound)
    )
    for name in ("a", "b"):
        with pytest.raises(RowError, match="took longer than 0.3 s"):
            fetcher.fetch(f"hungfs://mount/{name}.jpg")
    start = time.monotonic()
    with pytest.raises(RowError) as caught:
        fetcher.fetch("hungfs://mount/c.jpg")
    assert time.monotonic() - start < 0.1
    assert caught.value.kind == "fetch_timeout" and "max_abandoned_reads" in caught.value.message
    HungFileSystem.release.set()
    limit = time.monotonic() + 5
    while deadline.abandoned_now() >= bound and time.monotonic() < limit:
        time.sleep(0.02)
    assert deadline.abandoned_now() < bound  # the blocked reads returned: fetching may go on
