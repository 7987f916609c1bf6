"""ModelWorker: one Ray actor per GPU (or a share of the CPU), holding the whole model.

For each work unit it reads the unit's rows, hands them to the prepare stage (pipeline.prepare: fetch, decode and
resize on CPU threads and processes, ahead of the model), runs the model on each prepared micro-batch (the engine
normalizes its pixels on the device), writes the unit's output part whole and then its commit marker. Every input
row yields exactly one output row per instruction, `ok` or `error`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import pyarrow as pa
import pyarrow.compute as pc
import torch

from blipbatch.model.candidates import ClosedSet
from blipbatch.model.engine import Engine, EngineConfig, Generated, InvalidInstruction
from blipbatch.model.errors import ProcessorError
from blipbatch.schemas import (
    STATUS_ERROR,
    STATUS_OK,
    ColumnMapping,
    ProgressRecord,
    UnitTiming,
    image_reference,
    output_schema,
)

from .decode import DecodeConfig
from .decode_pool import DecodePool
from .errors import RowError
from .fetch import FetchConfig, Fetcher
from .job import PipelineError, RunConfig, instruction_size_problem
from .metrics import WorkerMetrics
from .prepare import PrepareConfig, PreparedBatch, PreparedRow, PrepareStage
from .redact import redact
from .shards import InputRow, WorkUnit, read_unit
from .sink import commit_unit, record_for, whole_output, write_part

# What a row asks of which image bytes: (image sha256, instruction, closed set); rows asking the same share an answer.
Question = tuple[str | None, str | None, ClosedSet | None]


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
    closed_sets: dict[str, ClosedSet] = field(default_factory=dict)  # question_id -> candidates to rank
    batch_size: int | None = None  # rows per model call; None: the engine's default (8 on CPU, from memory on CUDA)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    max_instruction_bytes: int = RunConfig.max_instruction_bytes
    fault: FaultInjection | None = None


class ModelWorker:
    """Wrapped with ray.remote by the coordinator; usable in-process too. `index` names it in metrics and timing."""

    def __init__(self, config: WorkerConfig, index: int = 0, engine: Engine | None = None) -> None:
        """`engine`: one already built (a bench's in-memory model); by default the worker loads config.engine."""
        self.config = config
        self.index = str(index)
        self.metrics = WorkerMetrics(self.index)
        self.engine = engine or Engine(config.engine)
        if self.engine.max_prompt_tokens is not None and self.engine.max_prompt_tokens < 1:
            # The spec checks this at load where it can read the checkpoint's config; a remote one is known only here.
            raise PipelineError(
                f"generation: max_new_tokens {config.engine.generation.get('max_new_tokens')} leaves "
                "no room for a prompt in this model's positions; lower it"
            )
        self.fetcher = Fetcher(config.fetch)
        self.generation_json = json.dumps(config.engine.generation, sort_keys=True)
        self.multiple_texts = config.engine.generation.get("num_return_sequences", 1) > 1
        self.question_ids = isinstance(config.instructions, dict)
        self.batch_size = config.batch_size or self.engine.default_rows[0]
        self._tokenize_candidates()
        processes = config.prepare.decode_processes()
        # Started once: the units' prepare stages share them (each would otherwise fork its own).
        self.decode_pool = (
            DecodePool(processes, config.decode, self.engine.processor.image_processor) if processes else None
        )

    def _tokenize_candidates(self) -> None:
        """Each closed set's candidates, tokenized once: one the model's tokenizer reduces to nothing stops the worker
        before any unit. (Whether a row's prompt and candidates fit the model is checked per row: a question can be
        a template over the row's columns.)"""
        for name, closed in self.config.closed_sets.items():
            try:
                self.engine.candidate_targets(closed)
            except ProcessorError as e:
                raise ProcessorError(f"question {name!r}: {e}") from None

    def ready(self) -> str:
        """Where the model runs, for the start-up line: "cuda:0", or "cpu (4 threads)"."""
        if self.engine.device.type == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return str(self.engine.device)

    def used(self) -> dict[str, object]:
        """What this worker runs with, its defaults resolved: the manifest records it."""
        return {"device": self.ready(), "batch_size": self.batch_size, "decode_slots": self.engine.decode_slots}

    def process_unit(self, unit: WorkUnit, attempt: int) -> ProgressRecord:
        """Run one unit end to end; returns its commit record."""
        started = time.time()
        rows = read_unit(unit, self.config.mapping, self.config.instructions)
        encoded_before = self.engine.images_encoded
        output: list[dict] = []
        stage = PrepareStage(
            self.fetcher,
            self.config.decode,
            self.engine.processor.image_processor,
            self.config.prepare,
            self.check_instruction,
            pin_memory=self.engine.device.type == "cuda",
            pool=self.decode_pool,
        )
        answered: dict[tuple[str | None, str | None, ClosedSet | None], Generated | RowError] = {}
        with stage:
            for batch in stage.batches(rows, self.batch_size):
                model_start = time.perf_counter()
                output.extend(self.run_model(batch, answered))
                stage.times.model_s += time.perf_counter() - model_start
                if self.config.fault is not None:
                    self.config.fault.maybe_crash(unit.unit_id, len(output))
        schema = output_schema(
            unit.schema, self.config.mapping, self.multiple_texts, self.question_ids, bool(self.config.closed_sets)
        )
        table = whole_output(self.config.output, unit, pa.Table.from_pylist(output, schema=schema))
        write_part(self.config.output, unit, table)
        times = stage.times
        timing = UnitTiming(
            started=started,
            finished=time.time(),
            worker=self.index,
            pid=os.getpid(),
            node=socket.gethostname(),
            images_fetched=times.images_fetched,
            fetch_s=times.fetch_s,
            decode_s=times.decode_s,
            model_s=times.model_s,
            reads_abandoned=times.reads_abandoned,
        )
        record = replace(
            record_for(unit, table, attempt),
            images_encoded=self.engine.images_encoded - encoded_before,
            duplicate_images=duplicate_images(table, unit.num_rows),
            timing=timing,
        )
        commit_unit(self.config.output, record)
        return record

    def check_instruction(self, row: InputRow) -> str:
        """The row's instruction as the model takes it; a RowError says why not. A closed-set question's rows need
        room for their longest candidate, the others for max_new_tokens."""
        instruction = row.instruction
        if isinstance(instruction, str):
            problem = instruction_size_problem(instruction, self.config.max_instruction_bytes)
            if problem is not None:
                raise RowError("invalid_input", problem)
        closed = self.closed_set_of(row)
        try:
            return self.engine.check_instruction(instruction, closed)
        except InvalidInstruction as e:
            raise RowError("invalid_input", f"question {row.question_id!r}: {e}" if closed else str(e)) from None

    def run_model(self, batch: PreparedBatch, answered: dict) -> list[dict]:
        """The batch's output rows. A row asking what an earlier row of the unit asked of the same image bytes takes
        that row's answer (`answered`: (sha256, instruction, closed set) -> Generated or RowError, kept across the
        unit's batches), so identical bytes are encoded and answered once."""
        ready = [p for p in batch.rows if p.error is None]
        asked: dict[Question, PreparedRow] = {}
        for item in ready:
            if self.question_of(item) not in answered:
                asked.setdefault(self.question_of(item), item)
        todo = list(asked.values())
        if batch.pixels is not None:  # None: no row of the batch is ready
            # a row without error has its image (and instruction) set by the prepare stage
            pixels, images = _only_images(batch.pixels, [cast(int, p.image) for p in todo])
            answered.update(zip(asked, self.generate(pixels, todo, images)))
        results = {}
        for item in ready:
            answer = answered[self.question_of(item)]
            if isinstance(answer, RowError):
                item.error = answer
            results[id(item)] = answer
        return [self.output_row(p, None if p.error else results[id(p)]) for p in batch.rows]

    def question_of(self, item: PreparedRow) -> Question:
        """What a row asks of which image bytes: two rows with the same answer this."""
        return item.sha256, item.instruction, self.closed_set_of(item.row)

    def closed_set_of(self, row: InputRow) -> ClosedSet | None:
        """The candidates a row's question ranks; None for a question answered freely, or a row's own instruction."""
        return None if row.question_id is None else self.config.closed_sets.get(row.question_id)

    def generate(self, pixels: torch.Tensor, ready: list[PreparedRow], images: list[int]) -> list:
        """Generated texts and scores (or RowErrors) of the `ready` rows, row i about image images[i] of `pixels`:
        in one call; if it fails, row by row, so that only the rows that fail are errors."""
        if not ready:
            return []
        self.metrics.model_call(len(ready))
        try:
            return self.engine.generate_scored(
                pixels,
                images,
                [cast(str, p.instruction) for p in ready],  # set on every row without error
                [self.closed_set_of(p.row) for p in ready],
            )
        except Exception as e:  # any model failure: isolate it below
            if len(ready) == 1:
                return [RowError("model_error", f"{type(e).__name__}: {e}")]
        return [self.generate(pixels[i : i + 1], [item], [0])[0] for item, i in zip(ready, images)]

    def output_row(self, item: PreparedRow, generated: Generated | None) -> dict:
        row = item.row
        instruction = row.instruction if isinstance(row.instruction, str) else None
        reference = image_reference(row.image)
        out = {
            "id": None if row.id is None else str(row.id),
            # The reference as given, less any credential in it (a presigned URL's signature): outputs are shared.
            self.config.mapping.image_column: None if reference is None else redact(reference),
            "image_sha256": item.sha256,
            "instruction": instruction,
            **({"question_id": row.question_id} if self.question_ids else {}),
            **self.answer_columns(generated),
            "status": STATUS_ERROR if item.error else STATUS_OK,
            "error_kind": item.error.kind if item.error else None,
            "error": item.error.message if item.error else None,
            "model": self.config.engine.model,
            "generation": self.generation_json,
            "derived_id": row.derived_id,  # written only with an id column (see output_schema)
        }
        out.update(row.passthrough)
        return out

    def answer_columns(self, generated: Generated | None) -> dict:
        """text and score (and candidate_logprobs in jobs with closed-set questions); null on error rows."""
        columns: dict[str, object]
        if generated is None:
            columns = {"text": None, "score": None, "candidate_logprobs": None}
        elif generated.candidate_logprobs is not None and self.multiple_texts:  # one answer, in the list columns
            columns = {
                "text": [generated.text],
                "score": [generated.score],
                "candidate_logprobs": generated.candidate_logprobs,
            }
        else:
            columns = {
                "text": generated.text,
                "score": generated.score,
                "candidate_logprobs": generated.candidate_logprobs,
            }
        if not self.config.closed_sets:
            del columns["candidate_logprobs"]
        return columns


def _only_images(pixels: torch.Tensor, images: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The rows of `pixels` that `images` index, and the indexes into them: images whose rows all took an earlier
    answer are not encoded."""
    used = sorted(set(images))
    if len(used) == pixels.shape[0]:
        return pixels, images
    where = {image: k for k, image in enumerate(used)}
    return pixels[used], [where[image] for image in images]


def duplicate_images(table: pa.Table, num_rows: int) -> int:
    """Input rows of a unit's part whose image bytes (image_sha256) another of its rows had first."""
    if "image_sha256" not in table.column_names or not num_rows or not table.num_rows:
        return 0
    digests = table.column("image_sha256")
    per_input_row = table.num_rows // num_rows  # output rows per input row: one per instruction, same image
    return (len(digests) - digests.null_count) // per_input_row - pc.count_distinct(digests).as_py()
