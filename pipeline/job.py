"""The job: one typed, frozen config, built from a spec file, command-line flags or the Python API.

`Job` holds what a run needs: the input (shards and columns), the output folder, the model, the instructions, the
generation settings, how images are fetched and decoded, and how the run is laid out. Each default is written here
once (the README's job-spec table documents them); `pipeline.run(job)` takes it, the worker and the engine receive
typed parts of it, and the output's manifest records it (pipeline.manifest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, cast

from blipbatch.errors import BlipbatchError
from blipbatch.model.candidates import DEFAULT_MAX_CANDIDATES, ClosedSet, closed_set
from blipbatch.model.configs import GenerationConfig
from blipbatch.model.errors import ConfigError
from blipbatch.schemas import ColumnMapping

from .decode import DecodeConfig
from .fetch import FetchConfig
from .template import MISSING_CHOICES, TemplateError, parse_all

INPUT_FORMATS = (None, "parquet", "webdataset")  # [input] format; None: by each shard's name

# What the job sets when the user sets nothing; every other generate() setting is the checkpoint's own.
DEFAULT_GENERATION: Mapping[str, Any] = MappingProxyType({"max_new_tokens": 30, "num_beams": 1})

# The fixed prompt(s), or named questions (question_id -> question). Plain dicts, not read-only views: a Job travels
# to Ray workers (pickled) and into the manifest (JSON).
Instructions = tuple[str, ...] | dict[str, str]


class PipelineError(BlipbatchError, ValueError):
    """A run that cannot start: contradictory or missing settings, an unusable model or output location."""


class GenerationSettingsError(PipelineError):
    """generate() settings that are unknown or do not go together; `problem` says which and why."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"generation: {problem}")


@dataclass(frozen=True, kw_only=True)
class InputConfig(ColumnMapping):
    """The shards (Parquet files or WebDataset tars; folders, globs or files; local or URLs) and which of their
    columns hold what."""

    paths: tuple[str, ...]

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        if not paths:
            raise PipelineError("input: give at least one Parquet folder, glob or file")
        if self.missing not in MISSING_CHOICES:
            raise PipelineError(f"input.missing must be one of {', '.join(MISSING_CHOICES)}, got {self.missing!r}")
        if self.format not in INPUT_FORMATS:
            raise PipelineError(
                f"input.format must be one of {', '.join(map(str, INPUT_FORMATS))}, got {self.format!r}"
            )

    @property
    def columns(self) -> ColumnMapping:
        """The column mapping alone, as the shards and the worker use it."""
        return ColumnMapping(**{f.name: getattr(self, f.name) for f in fields(ColumnMapping)})


@dataclass(frozen=True)
class OutputConfig:
    path: str  # output folder: local, s3://, gs://


@dataclass(frozen=True)
class ModelConfig:
    path: str  # checkpoint: local folder, fsspec URL or Hub id
    dtype: str | None = None  # "float32", "bfloat16", "float16"; None: bf16 on GPU, fp32 on CPU
    device: str | None = None  # "cuda" or "cpu"; None: cuda when the cluster has GPUs
    quantize: str | None = None  # "fp8": FP8 linear layers, Hopper GPUs only (model/fp8.py); None: the dtype's
    cuda_graphs: bool = True  # on CUDA, greedy decode steps as a CUDA graph; False: eager (slower, same results)


AUTO = "auto"  # [run] workers: one model actor per GPU, following the cluster as it grows and shrinks


@dataclass(frozen=True)
class RunConfig:
    # model actors: a number, or "auto" (None): one per GPU the cluster has, more as GPUs join while units wait, those
    # on nodes that leave dropped; without GPUs, 1
    workers: int | str | None = None
    max_workers: int | None = None  # "auto": at most this many model actors; None: no limit
    batch_size: int | None = None  # rows per model call; None: 8 on CPU, from the GPU's free memory on CUDA (Engine)
    decode_slots: int | None = None  # greedy: sequences decoded together; None: 32 on CPU, as batch_size on CUDA
    prepare_threads: int | None = None  # per worker: threads that decode and resize; None: its CPUs, at most 8
    # per worker: decode processes, each stopped at its row's deadline (pipeline.decode_pool), reserved as Ray CPUs;
    # None: on GPU workers the CPUs per GPU of the GPU nodes less one, on a CPU model 1; 0: decode on threads
    decode_processes: int | None = None
    decoded_bytes: int = 2**30  # per worker: images being decoded at once hold at most this (pipeline.prepare)
    rows_per_unit: int = 1000  # rows per work unit, the unit of retry and commit
    max_attempts: int = 3  # tries before a unit is marked failed
    max_error_rate: float = 1.0  # share of this run's rows in error at which the run exits 4
    # An instruction (a row's, a prompt, a question) longer than this in UTF-8 is refused before it is tokenized.
    max_instruction_bytes: int = 16384
    max_candidates: int = DEFAULT_MAX_CANDIDATES  # most candidates a closed-set question may list
    address: str | None = None  # Ray cluster; None: $RAY_ADDRESS, else Ray in-process

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "decode_slots",
            "prepare_threads",
            "decoded_bytes",
            "rows_per_unit",
            "max_attempts",
            "max_instruction_bytes",
            "max_candidates",
            "max_workers",
        ):
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise PipelineError(f"run.{name} must be at least 1, got {getattr(self, name)!r}")
        if self.decode_processes is not None and not self.decode_processes >= 0:
            raise PipelineError(f"run.decode_processes must be at least 0, got {self.decode_processes!r}")
        if self.workers not in (None, AUTO) and not (isinstance(self.workers, int) and self.workers >= 1):
            raise PipelineError(f'run.workers must be at least 1, or "auto", got {self.workers!r}')

    @property
    def elastic(self) -> bool:
        """Whether the count of model actors follows the cluster's GPUs ("auto", the default)."""
        return self.workers in (None, AUTO)
        if not 0.0 < self.max_error_rate <= 1.0:
            raise PipelineError(f"run.max_error_rate must be in (0, 1], got {self.max_error_rate!r}")


def instruction_size_problem(text: str, limit: int) -> str | None:
    """Why `text` is too long to be an instruction ([run] max_instruction_bytes), or None. Checked before anything
    tokenizes it: a tokenizer's time and memory grow with the text (10 MB: 1.4 GB and seconds), and no model takes
    that many tokens. A text of more characters than `limit` is not even encoded."""
    if len(text) <= limit and len(text.encode("utf-8", "surrogatepass")) <= limit:
        return None
    return (
        f"the instruction has {len(text):,} characters, over the {limit:,} bytes (UTF-8) an instruction may take "
        "([run] max_instruction_bytes); shorten it"
    )


def _instructions(prompt: str | Sequence[str] | Mapping[str, str] | None) -> Instructions | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return (prompt,)
    fixed = dict(prompt) if isinstance(prompt, Mapping) else tuple(prompt)
    texts = list(fixed.values()) if isinstance(fixed, dict) else list(fixed)
    if not texts:
        raise PipelineError("prompt is empty: give at least one instruction")
    if not all(isinstance(text, str) for text in texts):
        raise PipelineError("every prompt must be a string (BLIP-2 captions with the empty one)")
    return fixed


def _closed_sets(given: Mapping[str, object], instructions: Instructions | None, limit: int) -> dict[str, ClosedSet]:
    """question_id -> ClosedSet, from ClosedSets, candidate lists (scoring "sum") or {"candidates", "scoring"}
    mappings (as the manifest records them); each question must be one of the job's named questions."""
    if not given:
        return {}
    if not isinstance(instructions, dict):
        raise PipelineError("closed_sets name questions: give the questions as a dict, question_id -> question")
    checked = {}
    for name, value in given.items():
        if name not in instructions:
            raise PipelineError(f"closed_sets: {name!r} is not one of the questions ({', '.join(instructions)})")
        described: Mapping[str, Any]
        if isinstance(value, ClosedSet):
            described = {"candidates": value.candidates, "scoring": value.scoring}
        elif isinstance(value, Mapping):
            described = value
        else:
            described = {"candidates": value}
        try:
            checked[name] = closed_set(described.get("candidates", ()), described.get("scoring", "sum"), limit)
        except ValueError as e:
            raise PipelineError(f"closed_sets: question {name!r}: {e}") from None
    return checked


def _checked_generation(given: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULT_GENERATION with `given` over it, checked by the engine's own rules (every key, and across keys) once,
    here, before any worker starts; the language model's token ids fill in the rest there (tests/ORACLE.md)."""
    settings = {**DEFAULT_GENERATION, **given}
    if isinstance(settings.get("sequence_bias"), Mapping):  # transformers' dict form: tuple keys do not go to JSON
        settings["sequence_bias"] = [[list(ids), bias] for ids, bias in settings["sequence_bias"].items()]
    try:
        GenerationConfig().updated(**settings)
    except ConfigError as e:
        raise GenerationSettingsError(str(e)) from None
    return settings


@dataclass(frozen=True)
class Job:
    """Everything one run needs; see the module docstring. `instructions`: the fixed prompt(s), or named questions
    {question_id: question}; None when each row's instruction comes from `input.instruction_column`."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    instructions: Instructions | None = None
    # generate() settings over the LM's token ids and the defaults, transformers' names; DEFAULT_GENERATION first
    generation: dict[str, Any] = field(default_factory=dict)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Closed-set questions: question_id (a key of `instructions`) -> its candidates and scoring (model.ranking);
    # the other questions generate freely.
    closed_sets: dict[str, ClosedSet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.instructions is None) == (self.input.instruction_column is None):
            raise PipelineError("give exactly one of prompt (a fixed instruction) and instruction_column")
        object.__setattr__(self, "instructions", _instructions(self.instructions))
        try:
            parse_all(self.instructions)
        except TemplateError as e:
            raise PipelineError(f"prompt: {e}") from None
        fixed = self.instructions.values() if isinstance(self.instructions, dict) else self.instructions or ()
        for text in fixed:
            if (problem := instruction_size_problem(text, self.run.max_instruction_bytes)) is not None:
                raise PipelineError(f"prompt: {problem}")
        object.__setattr__(
            self, "closed_sets", _closed_sets(self.closed_sets or {}, self.instructions, self.run.max_candidates)
        )
        object.__setattr__(self, "generation", _checked_generation(self.generation))

    @property
    def rows_per_input_row(self) -> int:
        """Output rows per input row: one per fixed instruction, else one."""
        return len(self.instructions) if self.instructions is not None else 1


def job_from_keywords(
    input: str | Sequence[str],
    output: str,
    model: str,
    *,
    prompt: str | Sequence[str] | Mapping[str, str] | None = None,
    generation: Mapping[str, Any] | None = None,
    fetch: FetchConfig | None = None,
    decode: DecodeConfig | None = None,
    closed_sets: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Job:
    """A Job from pipeline.run's keyword form: column, model and run settings by their field names
    (image_column, dtype, batch_size, ...), max_new_tokens/num_beams as shorthands for generation; closed_sets
    maps question ids of `prompt` to their candidates (a list, or a ClosedSet with its scoring)."""
    sections: dict[type[InputConfig | ModelConfig | RunConfig], dict[str, Any]] = {
        InputConfig: {},
        ModelConfig: {},
        RunConfig: {},
    }
    gen = dict(generation or {})
    for name, value in settings.items():
        if name in ("max_new_tokens", "num_beams"):
            gen[name] = value
            continue
        owner = next((cls for cls in sections if name in cls.__dataclass_fields__ and name != "path"), None)
        if owner is None:
            raise TypeError(f"pipeline.run() got an unexpected keyword argument {name!r}")
        sections[owner][name] = value
    # InputConfig and Job normalize a str, a list or a mapping in __post_init__ (a conversion a dataclass field's
    # type cannot state)
    return Job(
        input=InputConfig(paths=cast(tuple[str, ...], input), **sections[InputConfig]),
        output=OutputConfig(output),
        model=ModelConfig(model, **sections[ModelConfig]),
        instructions=cast(Instructions | None, prompt),
        generation=gen,
        fetch=fetch or FetchConfig(),
        decode=decode or DecodeConfig(),
        run=RunConfig(**sections[RunConfig]),
        closed_sets=dict(closed_sets or {}),
    )
