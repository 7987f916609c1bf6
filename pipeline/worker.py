"""ModelWorker: one Ray actor per GPU (or a share of the CPU), holding the whole model.

For each work unit it reads the unit's rows, fetches and decodes the next micro-batch while the
model runs the current one, writes the unit's output part whole and then its commit marker. Every
input row yields exactly one output row per instruction, `ok` or `error`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from blipbatch.model.engine import Engine, EngineConfig, InvalidInstruction
from blipbatch.schemas import STATUS_ERROR, STATUS_OK, ColumnMapping, UnitTiming, image_reference, output_schema

from .decode import DecodeConfig, decode_image
from .errors import RowError
from .fetch import FetchConfig, Fetcher
from .metrics import WorkerMetrics
from .redact import redact
from .shards import InputRow, WorkUnit, read_unit
from .sink import commit_unit, record_for, write_part


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: the actor process exits (as if killed) after `after_rows` rows of a matching unit.

    With `once_marker`, only the first time (a file records it, so a restarted actor goes on)."""

    unit_ids: tuple[str, ...]
    after_rows: int = 0
    once_marker: str | None = None

    def maybe_crash(self, unit_id: str, rows_done: int) -> None:
        if unit_id not in self.unit_ids or rows_done < self.after_rows:
            return
        if self.once_marker is not None:
            marker = Path(self.once_marker)
            if marker.exists():
                return
            marker.write_text(unit_id)
        os._exit(17)


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineConfig
    mapping: ColumnMapping
    output: str
    # The job's fixed prompt(s), or named questions (question_id -> question); None: the instruction column.
    instructions: tuple[str, ...] | dict[str, str] | None = None
    batch_size: int = 8
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    fault: FaultInjection | None = None


@dataclass
class StageTimes:
    """What one unit spent where; `prepare` (prefetch thread) and `run_model` (actor thread) add to separate fields."""

    images_fetched: int = 0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0


@dataclass
class PreparedRow:
    row: InputRow
    image: PIL.Image.Image | None = None
    instruction: str | None = None
    error: RowError | None = None


def batches(rows: Sequence[InputRow], size: int) -> Iterator[Sequence[InputRow]]:
    """Micro-batches of about `size` rows that never split the instructions of one input row, so each
    image is fetched and encoded once however many questions it is asked."""
    start = 0
    while start < len(rows):
        end = min(start + size, len(rows))
        while end < len(rows) and rows[end].row_index == rows[end - 1].row_index:
            end += 1
        yield rows[start:end]
        start = end


class ModelWorker:
    """Wrapped with ray.remote by the coordinator; usable in-process too. `index` names it in metrics and timing."""

    def __init__(self, config: WorkerConfig, index: int = 0) -> None:
        self.config = config
        self.index = str(index)
        self.metrics = WorkerMetrics(self.index)
        self.engine = Engine(config.engine)
        self.fetcher = Fetcher(config.fetch)
        self.generation_json = json.dumps(config.engine.generation, sort_keys=True)
        self.multiple_texts = config.engine.generation.get("num_return_sequences", 1) > 1
        self.question_ids = isinstance(config.instructions, dict)

    def ready(self) -> str:
        """Where the model runs, for the start-up line: "cuda:0", or "cpu (4 threads)"."""
        if self.engine.device.type == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return str(self.engine.device)

    def process_unit(self, unit: WorkUnit, attempt: int) -> dict:
        """Run one unit end to end; returns its commit record (as a dict)."""
        started = time.time()
        times = StageTimes()
        rows = read_unit(unit, self.config.mapping, self.config.instructions)
        encoded_before = self.engine.images_encoded
        output: list[dict] = []
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetcher:
            chunks = list(batches(rows, self.config.batch_size))
            pending = prefetcher.submit(self.prepare, chunks[0], times) if chunks else None
            for i in range(len(chunks)):
                prepared = pending.result()
                if i + 1 < len(chunks):
                    pending = prefetcher.submit(self.prepare, chunks[i + 1], times)
                model_start = time.perf_counter()
                output.extend(self.run_model(prepared))
                times.model_s += time.perf_counter() - model_start
                if self.config.fault is not None:
                    self.config.fault.maybe_crash(unit.unit_id, len(output))
        schema = output_schema(pq.read_schema(unit.shard), self.config.mapping, self.multiple_texts, self.question_ids)
        table = pa.Table.from_pylist(output, schema=schema)
        write_part(self.config.output, unit, table)
        timing = UnitTiming(started=started, finished=time.time(), worker=self.index, pid=os.getpid(),
                            node=socket.gethostname(), images_fetched=times.images_fetched, fetch_s=times.fetch_s,
                            decode_s=times.decode_s, model_s=times.model_s)
        record = replace(record_for(unit, table, attempt), images_encoded=self.engine.images_encoded - encoded_before,
                         timing=timing)
        commit_unit(self.config.output, record)
        return record.to_dict()

    def prepare(self, rows: Sequence[InputRow], times: StageTimes) -> list[PreparedRow]:
        """Fetch and decode each distinct image once, and check every instruction (CPU side)."""
        by_index = {row.row_index: row.image for row in rows}
        fetch_start = time.perf_counter()
        fetched = dict(zip(by_index, self.fetcher.fetch_all(list(by_index.values()))))
        decode_start = time.perf_counter()
        images: dict[int, PIL.Image.Image | RowError] = {}
        for index, data in fetched.items():
            try:
                images[index] = data if isinstance(data, RowError) else decode_image(data, self.config.decode)
            except RowError as e:
                images[index] = e
        times.fetch_s += decode_start - fetch_start
        times.decode_s += time.perf_counter() - decode_start
        times.images_fetched += sum(not isinstance(image, RowError) for image in images.values())
        prepared = []
        for row in rows:
            item = PreparedRow(row)
            image = images[row.row_index]
            if row.id is None:
                item.error = RowError("invalid_input", f"row {row.row_index}: the id column is null")
            elif isinstance(image, RowError):
                item.error = image
            else:
                try:
                    item.instruction = self.engine.check_instruction(row.instruction)
                    item.image = image
                except InvalidInstruction as e:
                    item.error = RowError("invalid_input", str(e))
            prepared.append(item)
        return prepared

    def run_model(self, prepared: list[PreparedRow]) -> list[dict]:
        ready = [p for p in prepared if p.error is None]
        texts = self.generate(ready)
        for item, text in zip(ready, texts):
            if isinstance(text, RowError):
                item.error = text
        results = dict(zip((id(p) for p in ready), texts))
        return [self.output_row(p, None if p.error else results[id(p)]) for p in prepared]

    def generate(self, ready: list[PreparedRow]) -> list[str | list[str] | RowError]:
        """The batch in one call; if it fails, row by row, so that only the rows that fail are errors."""
        if not ready:
            return []
        self.metrics.model_call(len(ready))
        try:
            return self.engine.generate([p.image for p in ready], [p.instruction for p in ready])
        except Exception as e:  # any model failure: isolate it below
            if len(ready) == 1:
                return [RowError("model_error", f"{type(e).__name__}: {e}")]
        return [result for item in ready for result in self.generate([item])]

    def output_row(self, item: PreparedRow, text: str | list[str] | None) -> dict:
        row = item.row
        instruction = row.instruction if isinstance(row.instruction, str) else None
        reference = image_reference(row.image)
        out = {
            "id": None if row.id is None else str(row.id),
            # The reference as given, less any credential in it (a presigned URL's signature): outputs are shared.
            self.config.mapping.image_column: None if reference is None else redact(reference),
            "instruction": instruction,
            **({"question_id": row.question_id} if self.question_ids else {}),
            "text": text,
            "status": STATUS_ERROR if item.error else STATUS_OK,
            "error_kind": item.error.kind if item.error else None,
            "error": item.error.message if item.error else None,
            "model": self.config.engine.model,
            "generation": self.generation_json,
        }
        out.update(row.passthrough)
        return out
