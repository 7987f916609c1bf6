"""Job spec files: one TOML file says what to run, validated before anything starts.

`load_spec(path, overrides)` reads the file (Python's `tomllib`), applies command-line overrides ("run.batch_size": 16),
checks every table and key, and returns a `JobSpec`: the pipeline's typed `Job` (pipeline.job) plus what the job kind
needs, so `pipeline.run(spec)` runs it. `load_spec(None, overrides)` builds a job from overrides alone (the command
line's flags-only form). Every error is a `SpecError` naming the file and line, the table and key, what was expected
and what was found, e.g. `jobs/x.toml:12: [generation] num_beam: unknown key; did you mean num_beams? known: ...`.
A key missing from a table that is present points at the table's header line; a whole table that is missing has no
line to point at, so the message names the file alone. A value set by an override says so instead of a line.

Relative local paths in `input.path`, `output.path` and `fetch.local_roots` are relative to the folder holding the
spec file, so a spec means the same thing from any working directory; `model.path` too when that folder exists,
otherwise it is used as written (a Hub id such as "Salesforce/instructblip-vicuna-7b", or a URL). Override values are
used as written (relative to the current directory, as on any command line).

The keys, their types, defaults and meaning: the README's "Job spec reference" table (the single source; each default
is defined once, in pipeline.job and the pipeline's FetchConfig/DecodeConfig).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from blipbatch.errors import BlipbatchError
from blipbatch.model.candidates import ClosedSet, candidates_problem
from blipbatch.pipeline.decode import DecodeConfig
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.job import (
    GenerationSettingsError,
    InputConfig,
    Job,
    ModelConfig,
    OutputConfig,
    PipelineError,
    RunConfig,
    instruction_size_problem,
)
from blipbatch.pipeline.template import MISSING_CHOICES, TemplateError
from blipbatch.pipeline.template import parse as parse_template
from blipbatch.schemas import OUTPUT_COLUMNS, ColumnMapping

from .kinds import KIND_SPECIFIC_KEYS, KINDS


class SpecError(BlipbatchError, ValueError):
    """A job spec that cannot be run; the message says where (file:line), which key, and what was expected."""

    def __init__(self, where: str, key: str, problem: str):
        self.where = where
        self.key = key
        self.problem = problem
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


@dataclass(frozen=True)
class OutputSpec(OutputConfig):
    wide: bool = False  # annotate: also write the wide table (jobs.kinds)


@dataclass(frozen=True, kw_only=True)
class JobSpec(Job):
    """A Job as a spec file (or the command line) says it, with what only the jobs layer uses."""

    source: Path | None  # the spec file, absolute; None for a job from flags alone
    output: OutputSpec  # the Job's output, and whether to write the wide table
    kind: str  # a key of jobs.kinds.KINDS
    name: str | None = None
    prompt: str | None = None  # caption: [prompt] text, or default_prompt(model.path); None for the other kinds
    questions: dict[str, str] = field(default_factory=dict)  # annotate: question_id -> question, in file order


class Extend(tuple):
    """An override value that adds to the array the spec file gives (repeatable flags such as --local-root)."""


# ---------------------------------------------------------------------------------------------------------------------
# Default caption prompts per model family.

# InstructBLIP follows instructions, and its caption instruction is the same for the Vicuna and the Flan-T5 checkpoints
# (LAVIS's caption templates); BLIP-2 (OPT and Flan-T5) captions best with no prompt at all, as its published examples.
CAPTION_PROMPTS = {"instructblip": "A short image caption:", "blip-2": ""}


def model_family(model: str | os.PathLike | Mapping[str, Any]) -> str | None:
    """ "instructblip", "blip-2", or None when it cannot be told.

    `model` is a config.json as a dict, or a checkpoint location: a local folder with a config.json is decided by the
    config's model_type; anything else (a Hub id, a URL, a folder without config) by the last part of its name
    ("...instructblip..." or "...blip2..."/"...blip-2...")."""
    if isinstance(model, Mapping):
        model_type = str(model.get("model_type", "")).replace("_", "-")
        return model_type if model_type in CAPTION_PROMPTS else None
    config_path = Path(model) / "config.json"
    if config_path.is_file():
        try:
            family = model_family(json.loads(config_path.read_text()))
        except (OSError, ValueError):
            family = None  # unreadable here: the model loader will say why; the name may still tell
        if family is not None:
            return family
    name = str(model).rstrip("/").rsplit("/", 1)[-1].lower()
    if "instructblip" in name:
        return "instructblip"
    if re.search(r"blip[-_]?2", name):
        return "blip-2"
    return None


def default_prompt(model: str | os.PathLike | Mapping[str, Any]) -> str:
    """The caption prompt for a model (see model_family): InstructBLIP "A short image caption:", BLIP-2 "".

    A model whose family cannot be told gets InstructBLIP's prompt: an instruction is harmless to a BLIP-2, while an
    empty prompt leaves an InstructBLIP without a task."""
    return CAPTION_PROMPTS[model_family(model) or "instructblip"]


# ---------------------------------------------------------------------------------------------------------------------
# Value checks.


@dataclass(frozen=True)
class _Check:
    expected: str  # completes "expected ..."
    accepts: Callable[[object], bool]
    convert: Callable[[Any], object] = lambda value: value  # applied to values `accepts` took


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_text(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.strip() != ""


def _integer(minimum: int) -> _Check:
    return _Check(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum)


def _number(expected: str, condition: Callable[[float], bool]) -> _Check:
    return _Check(expected, lambda v: _is_number(v) and condition(v), float)


def _choice(*options: str) -> _Check:
    return _Check("one of " + ", ".join(json.dumps(o) for o in options), lambda v: isinstance(v, str) and v in options)


_BOOLEAN = _Check("true or false", lambda v: isinstance(v, bool))
_TEXT = _Check("a non-empty string", _is_text)
_TEXTS = _Check("an array of non-empty strings", lambda v: isinstance(v, list) and all(map(_is_text, v)), tuple)
_PATHS = _Check(
    "a path or URL, or a non-empty array of them",
    lambda v: _is_text(v) or (isinstance(v, list) and len(v) > 0 and all(map(_is_text, v))),
    lambda v: (v,) if isinstance(v, str) else tuple(v),
)


def _is_token(value: object) -> TypeGuard[int]:
    return _is_int(value) and value >= 0


def _is_tokens(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and len(value) > 0 and all(map(_is_token, value))


_TOKEN_OR_TOKENS = _Check("a token id (an integer >= 0) or an array of them", lambda v: _is_token(v) or _is_tokens(v))

# generate() settings the spec accepts: transformers' names and meaning (model.configs.GenerationConfig). Token ids
# other than eos_token_id belong to the checkpoint, and are left out on purpose.
GENERATION_KEYS: dict[str, _Check] = {
    "max_new_tokens": _integer(1),
    "max_length": _integer(1),
    "min_length": _integer(0),
    "min_new_tokens": _integer(0),
    "do_sample": _BOOLEAN,
    "temperature": _number("a number > 0", lambda v: v > 0),
    "top_k": _integer(0),
    "top_p": _number("a number in (0, 1]", lambda v: 0 < v <= 1),
    "num_beams": _integer(1),
    "length_penalty": _number("a number", lambda v: True),
    "early_stopping": _Check('true, false or "never"', lambda v: isinstance(v, bool) or v == "never"),
    "num_return_sequences": _integer(1),
    "repetition_penalty": _number("a number > 0", lambda v: v > 0),
    "no_repeat_ngram_size": _integer(0),
    "eos_token_id": _TOKEN_OR_TOKENS,
    "min_p": _number("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "typical_p": _number("a number > 0", lambda v: v > 0),
    "epsilon_cutoff": _number("a number in [0, 1)", lambda v: 0 <= v < 1),
    "eta_cutoff": _number("a number in [0, 1)", lambda v: 0 <= v < 1),
    "encoder_repetition_penalty": _number("a number > 0", lambda v: v > 0),
    "encoder_no_repeat_ngram_size": _integer(0),
    "bad_words_ids": _Check(
        "a non-empty array of non-empty arrays of token ids",
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_tokens(w) for w in v),
    ),
    "sequence_bias": _Check(
        "a non-empty array of [[token ids...], bias] pairs",
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(p, list) and len(p) == 2 and _is_tokens(p[0]) and _is_number(p[1]) for p in v)
        ),
        lambda v: [[list(ids), float(bias)] for ids, bias in v],
    ),
    "suppress_tokens": _Check("an array of token ids", lambda v: isinstance(v, list) and all(map(_is_token, v))),
    "begin_suppress_tokens": _Check("an array of token ids", lambda v: isinstance(v, list) and all(map(_is_token, v))),
    "forced_bos_token_id": _Check("a token id (an integer >= 0)", _is_token),
    "forced_eos_token_id": _TOKEN_OR_TOKENS,
    "exponential_decay_length_penalty": _Check(
        "[start index (an integer >= 0), decay factor (a number)]",
        lambda v: isinstance(v, list) and len(v) == 2 and _is_token(v[0]) and _is_number(v[1]),
        lambda v: [v[0], float(v[1])],
    ),
    "renormalize_logits": _BOOLEAN,
    "remove_invalid_values": _BOOLEAN,
    "use_cache": _BOOLEAN,
}


def _config_checks(cls: type) -> dict[str, _Check]:
    """Type checks for the fields of a pipeline config dataclass; its own __post_init__ checks the ranges."""
    hints = typing.get_type_hints(cls)
    checks = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if hint is bool:
            checks[f.name] = _BOOLEAN
        elif hint is str:
            checks[f.name] = _TEXT
        elif hint is int:
            checks[f.name] = _Check("an integer", _is_int)
        elif hint is float:
            checks[f.name] = _number("a number", lambda v: True)
        elif hint == tuple[str, ...]:
            checks[f.name] = _TEXTS
        else:  # a new field of a type the spec cannot express yet: fail at import, in every test run
            raise TypeError(f"{cls.__name__}.{f.name}: the job spec has no check for type {hint}")
    return checks


# Per table: key -> check. [questions] takes any key (the question ids) and is checked apart.
TABLES: dict[str, dict[str, _Check]] = {
    "job": {"kind": _choice(*KINDS), "name": _TEXT},
    "input": {
        "path": _PATHS,
        "image_column": _TEXT,
        "id_column": _TEXT,
        "instruction_column": _TEXT,
        "passthrough": _TEXTS,
        "missing": _choice(*MISSING_CHOICES),
        "format": _choice("parquet", "webdataset"),
        "image_extension": _TEXT,
    },
    "output": {"path": _TEXT, "wide": _BOOLEAN},
    "model": {
        "path": _TEXT,
        "dtype": _choice("bfloat16", "float16", "float32"),
        "device": _choice("cuda", "cpu"),
        "quantize": _choice("fp8"),
        "cuda_graphs": _BOOLEAN,
    },
    "prompt": {"text": _Check("a string", lambda v: isinstance(v, str))},
    "questions": {},
    "generation": GENERATION_KEYS,
    "fetch": _config_checks(FetchConfig),
    "decode": _config_checks(DecodeConfig),
    "run": {
        "workers": _Check('an integer >= 1 or "auto"', lambda v: v == "auto" or (_is_int(v) and v >= 1)),
        "max_workers": _integer(1),
        "batch_size": _integer(1),
        "decode_slots": _integer(1),
        "prepare_threads": _integer(1),
        "decoded_bytes": _integer(1),
        "decode_processes": _integer(0),
        "rows_per_unit": _integer(1),
        "max_attempts": _integer(1),
        "max_error_rate": _number("a number in (0, 1]", lambda v: 0 < v <= 1),
        "max_instruction_bytes": _integer(1),
        "address": _TEXT,
        "max_candidates": _integer(2),
    },
}

# A question written as a table, [questions.NAME]: the question, and (closed-set) the answers it may take.
QUESTION_KEYS: dict[str, _Check] = {
    "question": _TEXT,
    "candidates": _Check("an array of at least two distinct, non-empty strings", lambda v: isinstance(v, list)),
    "scoring": _choice("sum", "mean"),
}

REQUIRED: dict[tuple[str, str], str] = {
    ("job", "kind"): 'what to do: kind = "caption", "vqa" or "annotate"',
    ("input", "path"): 'the Parquet shards: a folder, a glob or an array of files, e.g. path = "s3://bucket/shards/"',
    ("output", "path"): 'where the results go, e.g. path = "s3://bucket/captions/"',
    ("model", "path"): "the checkpoint: a local folder, an fsspec URL or a Hub id, "
    'e.g. path = "Salesforce/instructblip-vicuna-7b"',
}

# Columns of the wide table of an annotate job, besides one per question.
RESERVED_QUESTION_IDS = ("id", "errors")


# ---------------------------------------------------------------------------------------------------------------------
# Where each key is: TOML parsers report positions only for syntax errors, so the text is scanned for headers and keys.

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED})\s*=")
_KEY_PART = re.compile(_KEY)


def _key_parts(dotted: str) -> tuple[str, ...]:
    parts = []
    for match in _KEY_PART.finditer(dotted):
        part = match.group(0)
        if part.startswith('"'):
            try:
                part = json.loads(part)  # TOML's basic-string escapes are JSON's
            except ValueError:
                part = part[1:-1]
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The 1-based line of each table header and key of a TOML text, as full key paths: ("run", "batch_size")."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_string = None  # the delimiter of a multi-line string that spans this line
    for number, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if line.count(open_string) % 2 == 1:
                open_string = None
            continue
        header = _HEADER.match(line)
        assignment = None if header else _ASSIGNMENT.match(line)
        if header:
            table = _key_parts(header.group(1))
            lines.setdefault(table, number)
        elif assignment:
            lines.setdefault(table + _key_parts(assignment.group(1)), number)
        for delimiter in ('"""', "'''"):
            if line.count(delimiter) % 2 == 1:
                open_string = delimiter
    return lines


class _Locator:
    """Says where a key came from: "file:line", "file (override run.batch_size)", or "file" for what is absent."""

    def __init__(self, source: str, text: str, overridden: set[tuple[str, ...]]):
        self.source = source
        self.lines = key_lines(text)
        self.overridden = overridden

    def __call__(self, *path: str) -> str:
        for end in (2, 3):  # "table.key", or "questions.NAME.key"
            if path[:end] in self.overridden:
                return f"{self.source} (override {'.'.join(path[:end])})"
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return f"{self.source}:{self.lines[path[:end]]}"
        return self.source


# ---------------------------------------------------------------------------------------------------------------------
# Loading.

_TOML_TYPES = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml(value: object) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def _show(value: object) -> str:
    """A value as TOML writes it, and its TOML type: for "got ..." in messages."""
    kind = next((name for t, name in _TOML_TYPES if isinstance(value, t)), "a date/time")
    return f"{_toml(value)} ({kind})"


def _known(names: list[str] | tuple[str, ...], given: str) -> str:
    close = difflib.get_close_matches(given, names, n=1)
    return (f"did you mean {close[0]}? " if close else "") + "known: " + ", ".join(sorted(names))


def _read_toml(path: Path, source: str) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpecError(source, "", f"cannot read the job spec: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(source, "", f"not UTF-8 text (byte {e.start}): a job spec is a TOML file") from None
    try:
        return text, tomllib.loads(text)
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise SpecError(
            f"{source}:{_deepest_line(text)}",
            "",
            f"arrays or inline tables nested too deeply; a job spec needs at most {MAX_TOML_DEPTH} levels",
        ) from None
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        at = re.search(r"\s*\(at line (\d+), column \d+\)$|\s*\(at end of document\)$", message)
        line = int(at.group(1)) if at and at.group(1) else max(1, len(text.splitlines()))
        raise SpecError(f"{source}:{line}", "", f"not valid TOML: {message[: at.start()] if at else message}") from None


def _deepest_line(text: str) -> int:
    """The line where brackets and braces first open MAX_TOML_DEPTH deep (strings not told apart: for a message)."""
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        for ch in line:
            depth += (ch in "[{") - (ch in "]}")
            if depth > MAX_TOML_DEPTH:
                return number
    return 1


def _apply_overrides(doc: dict[str, Any], overrides: Mapping[str, object], source: str) -> set[tuple[str, str]]:
    """Apply `overrides` to the parsed document; returns the (table, key) pairs whose value they replaced (an
    Extend value adds to the file's array instead, so what the file gave keeps the meaning it had there)."""
    applied = set()
    for dotted, value in overrides.items():
        if value is None:  # a command-line flag that was not given
            continue
        table, dot, key = dotted.partition(".")
        where = f"{source} (override {dotted})"
        if not dot or not key:
            raise SpecError(where, dotted, 'an override names a table and a key, e.g. "run.batch_size"')
        if table not in TABLES:
            raise SpecError(where, f"[{table}]", f"unknown table; {_known([f'[{t}]' for t in TABLES], f'[{table}]')}")
        if not isinstance(doc.setdefault(table, {}), dict):
            raise SpecError(where, f"[{table}]", "cannot override a key of a table that is not a table in the file")
        if isinstance(value, Extend):
            given = doc[table].get(key, [])
            doc[table][key] = (given if isinstance(given, list) else [given]) + list(value)
        elif table == "questions" and "." in key:  # questions.NAME.candidates: a key of the question's table
            name, _, question_key = key.partition(".")
            question = doc[table].get(name, {})
            doc[table][name] = question = question if isinstance(question, dict) else {"question": question}
            question[question_key] = value
            applied.add((table, key))
        else:
            doc[table][key] = value
            applied.add((table, key))
    return applied


def _local_relative(path: str) -> bool:
    return "://" not in path and not os.path.isabs(path) and not path.startswith("~")


def _check_tables(doc: dict[str, Any], where: _Locator) -> dict[str, dict[str, Any]]:
    """Every table and key known and of the right type; returns the converted values by table."""
    values: dict[str, dict[str, Any]] = {}
    for table, content in doc.items():
        if table not in TABLES and isinstance(content, dict):
            raise SpecError(
                where(table), f"[{table}]", f"unknown table; {_known([f'[{t}]' for t in TABLES], f'[{table}]')}"
            )
        if table not in TABLES:
            owners = [f"[{t}]" for t, checks in TABLES.items() if table in checks]
            raise SpecError(
                where(table),
                table,
                "a key outside any table; "
                + (
                    f"put it under {' or '.join(owners)}"
                    if owners
                    else f"tables: {', '.join(f'[{t}]' for t in TABLES)}"
                ),
            )
        if not isinstance(content, dict):
            raise SpecError(where(table), f"[{table}]", f"expected a table, got {_show(content)}")
        checks = TABLES[table]
        values[table] = {}
        for key, value in content.items():
            if table == "questions" and isinstance(value, dict):
                values[table][key] = _question_table(key, value, where)
                continue
            if table == "questions":
                check = _Check(
                    'a non-empty string (the question), or a table with question = "..." and candidates', _is_text
                )
            elif key in checks:
                check = checks[key]
            elif key in TABLES:  # a table written as a key: it lands in the table above it
                raise SpecError(
                    where(table, key),
                    f"[{table}] {key}",
                    f"unknown key; [{key}] is a table: give it its own [{key}] header line",
                )
            else:
                raise SpecError(where(table, key), f"[{table}] {key}", f"unknown key; {_known(list(checks), key)}")
            if not check.accepts(value):
                raise SpecError(where(table, key), f"[{table}] {key}", f"expected {check.expected}, got {_show(value)}")
            values[table][key] = check.convert(value)
    return values


def _question_table(name: str, table: dict[str, Any], where: _Locator) -> dict[str, Any]:
    """[questions.NAME]'s keys checked (candidates' contents are checked with the run's limit, in _closed_sets)."""
    for key, value in table.items():
        label = f"[questions.{name}] {key}"
        if key not in QUESTION_KEYS:
            raise SpecError(where("questions", name, key), label, f"unknown key; {_known(list(QUESTION_KEYS), key)}")
        if not QUESTION_KEYS[key].accepts(value):
            raise SpecError(
                where("questions", name, key), label, f"expected {QUESTION_KEYS[key].expected}, got {_show(value)}"
            )
    if "question" not in table:
        raise SpecError(
            where("questions", name),
            f"[questions.{name}] question",
            'missing; the question asked of every image, e.g. question = "What color is the car?"',
        )
    if "scoring" in table and "candidates" not in table:
        raise SpecError(
            where("questions", name, "scoring"),
            f"[questions.{name}] scoring",
            "only a question with candidates is scored; add candidates = [...] or remove it",
        )
    return table


def _closed_sets(questions: dict[str, Any], limit: int, where: _Locator) -> dict[str, ClosedSet]:
    """The questions with candidates, checked: at least two, distinct, non-empty strings, at most `limit`."""
    closed = {}
    for name, question in questions.items():
        if not isinstance(question, dict) or "candidates" not in question:
            continue
        problem = candidates_problem(question["candidates"], limit)
        if problem:
            raise SpecError(where("questions", name, "candidates"), f"[questions.{name}] candidates", problem)
        closed[name] = ClosedSet(tuple(question["candidates"]), question.get("scoring", "sum"))
    return closed


def _check_candidates_tokenize(model_path: str, closed: dict[str, ClosedSet], where: _Locator) -> None:
    """With a local checkpoint, a candidate its tokenizer reduces to nothing is refused here (elsewhere the worker
    refuses it when it loads the model). The `tokenizers` library alone: no torch at spec time."""
    path = Path(os.path.expanduser(model_path)) / "tokenizer.json"
    if not closed or not path.is_file():
        return
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    for name, closed_set in closed.items():
        for candidate in closed_set.candidates:
            if not tokenizer.encode(candidate, add_special_tokens=False).ids:
                raise SpecError(
                    where("questions", name, "candidates"),
                    f"[questions.{name}] candidates",
                    f"{json.dumps(candidate, ensure_ascii=False)} tokenizes to nothing with the model's "
                    "tokenizer; give it text the tokenizer keeps",
                )


def _pipeline_config(cls: type, table: str, given: dict[str, Any], where: _Locator) -> Any:
    """Build a FetchConfig/DecodeConfig; its own range checks, key by key, so an error points at its key."""
    for key, value in given.items():
        try:
            cls(**{key: value})
        except ValueError as e:
            message = str(e)
            prefix = f"{cls.__name__}.{key}"
            message = message[len(prefix) :].lstrip(": ") if message.startswith(prefix) else message
            raise SpecError(where(table, key), f"[{table}] {key}", message) from None
    return cls(**given)


COMMAND_LINE = "command line"

# ---------------------------------------------------------------------------------------------------------------------
# Bounds: values a spec may hold that no run can use (a worker killed for memory, every row an error) are refused
# here, with the file and line, rather than found on the cluster.

MAX_TOML_DEPTH = 100  # a spec nests two levels; tomllib's recursion would end in a RecursionError traceback
MAX_NUM_BEAMS = 64  # beams x rows per call x the KV cache: 1,000,000 beams is a worker killed for memory
MAX_NEW_TOKENS = 32768  # where the checkpoint's positions do not bound it (T5): far above what any BLIP LM writes


def _text_positions(model: str) -> tuple[int, int] | None:
    """(positions of the language model, query tokens) from a local checkpoint's config.json; None when not known
    here (a Hub id or a URL, or an LM with relative positions: T5). The worker checks again once it has the model."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        positions = config["text_config"]["max_position_embeddings"]
        return int(positions), int(config.get("num_query_tokens", 32))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_bounds(
    generation: Mapping[str, Any], model: str, texts: Mapping[tuple[str, ...], str], limit: int, where: _Locator
) -> None:
    """num_beams, max_new_tokens and max_length within what the model can take; each fixed prompt or question within
    [run] max_instruction_bytes (`texts`: its key path -> text)."""

    def refuse(key: str, problem: str) -> None:
        raise SpecError(where("generation", key), f"[generation] {key}", problem)

    for key in ("num_beams", "num_return_sequences"):
        if generation.get(key, 1) > MAX_NUM_BEAMS:
            refuse(key, f"at most {MAX_NUM_BEAMS}, got {generation[key]}")
    known = _text_positions(model)
    # max_new_tokens leaves room for the image's tokens and one of prompt; max_length counts them.
    for key, longest in (
        ("max_new_tokens", MAX_NEW_TOKENS if known is None else known[0] - known[1] - 1),
        ("max_length", MAX_NEW_TOKENS if known is None else known[0]),
    ):
        if generation.get(key, 0) > longest:
            bound = (
                ""
                if known is None
                else f": the model's language model has {known[0]} positions, {known[1]} of them for the image"
            )
            refuse(key, f"at most {longest}{bound}; got {generation[key]}")
    for path, text in texts.items():
        if (problem := instruction_size_problem(text, limit)) is not None:
            raise SpecError(where(*path), f"[{path[0]}] {path[1]}", problem)


def load_spec(path: str | os.PathLike | None, overrides: Mapping[str, object] | None = None) -> JobSpec:
    """Read, override and validate a job spec; raises SpecError naming the file, line, key and what is wrong.

    `overrides` maps dotted keys to values ({"run.batch_size": 16, "model.path": "/data/m"}), applied before
    validation and checked like the file's own values; a None value is skipped (a command-line flag not given), an
    Extend value adds to the file's array. With `path` None the job is the overrides alone.
    """
    doc: dict[str, Any]
    if path is None:
        source, spec_file, text, doc = COMMAND_LINE, None, "", {}
    else:
        source, spec_file = str(path), Path(path).absolute()
        text, doc = _read_toml(spec_file, source)
    overridden = _apply_overrides(doc, overrides or {}, source)
    where = _Locator(
        source,
        text,
        {
            tuple(d.split(".", 2 if d.startswith("questions.") else 1))
            for d, v in (overrides or {}).items()
            if v is not None
        },
    )
    values = _check_tables(doc, where)

    for (table, key), hint in REQUIRED.items():
        if key not in values.get(table, {}):
            raise SpecError(where(table, key), f"[{table}] {key}", f"missing; {hint}")
    kind = KINDS[values["job"]["kind"]]
    for dotted in KIND_SPECIFIC_KEYS:
        table, _, key = dotted.partition(".")
        present = key in values.get(table, {}) if key else table in values
        at, label = ((table, key), f"[{table}] {key}") if key else ((table,), f"[{table}]")
        if dotted in kind.requires and not present:
            raise SpecError(where(*at), label, f"missing; {kind.requires[dotted]}")
        if present and dotted not in kind.requires and dotted not in kind.allows:
            users = [k.name for k in KINDS.values() if dotted in k.requires or dotted in k.allows]
            raise SpecError(
                where(*at),
                label,
                f'not used by kind "{kind.name}" (only by {", ".join(users)}); remove it or change [job] kind',
            )

    inputs, output, model, run = (values.get(t, {}) for t in ("input", "output", "model", "run"))
    base = spec_file.parent if spec_file is not None else Path.cwd()
    if ("input", "path") not in overridden:
        inputs["path"] = tuple(os.path.join(base, p) if _local_relative(p) else p for p in inputs["path"])
    if ("output", "path") not in overridden and _local_relative(output["path"]):
        output["path"] = os.path.join(base, output["path"])
    if ("model", "path") not in overridden and _local_relative(model["path"]) and (base / model["path"]).exists():
        model["path"] = os.path.join(base, model["path"])
    fetch = values.get("fetch", {})
    if "local_roots" in fetch:
        start = os.getcwd() if ("fetch", "local_roots") in overridden else base
        fetch["local_roots"] = tuple(os.path.join(start, p) if _local_relative(p) else p for p in fetch["local_roots"])

    image_column = inputs.get("image_column", ColumnMapping.image_column)  # the mapping's default
    if image_column in OUTPUT_COLUMNS:
        raise SpecError(
            where("input", "image_column"),
            "[input] image_column",
            f"{json.dumps(image_column)} clashes with the output column of that name; output columns: "
            + ", ".join(OUTPUT_COLUMNS),
        )
    for name in inputs.get("passthrough", ()):
        if name in OUTPUT_COLUMNS or name == image_column:
            raise SpecError(
                where("input", "passthrough"),
                "[input] passthrough",
                f"{json.dumps(name)} clashes with the output column of that name; output columns: "
                + ", ".join((*OUTPUT_COLUMNS, image_column)),
            )

    questions = values.get("questions", {})
    closed_sets = _closed_sets(questions, run.get("max_candidates", RunConfig.max_candidates), where)
    _check_candidates_tokenize(model["path"], closed_sets, where)
    questions = {name: q["question"] if isinstance(q, dict) else q for name, q in questions.items()}
    if kind.name == "annotate" and not questions:
        raise SpecError(where("questions"), "[questions]", f"empty; {kind.requires['questions']}")
    for name in questions:
        if name in RESERVED_QUESTION_IDS:
            raise SpecError(
                where("questions", name),
                f"[questions] {name}",
                f"reserved name (a column of the wide table: {', '.join(RESERVED_QUESTION_IDS)}); choose another",
            )

    generation = values.get("generation", {})
    prompt = None
    if kind.name == "caption":
        prompt = values.get("prompt", {}).get("text")
        prompt = default_prompt(model["path"]) if prompt is None else prompt
    templates = [(("prompt", "text"), "[prompt] text", prompt)] if "prompt" in values and prompt is not None else []
    templates += [(("questions", name), f"[questions] {name}", text) for name, text in questions.items()]
    for at, label, template in templates:
        try:
            parse_template(template)
        except TemplateError as e:
            raise SpecError(where(*at), label, str(e)) from None
    texts = {("prompt", "text"): prompt} if prompt is not None else {}
    _check_bounds(
        generation,
        model["path"],
        texts | {("questions", k): q for k, q in questions.items()},
        run.get("max_instruction_bytes", RunConfig.max_instruction_bytes),
        where,
    )
    try:
        return JobSpec(
            source=spec_file,
            kind=kind.name,
            name=values["job"].get("name"),
            prompt=prompt,
            questions=dict(questions),
            input=InputConfig(paths=inputs.pop("path"), **{**inputs, "image_column": image_column}),
            output=OutputSpec(path=output["path"], wide=output.get("wide", False)),
            model=ModelConfig(**model),  # [model]'s keys are ModelConfig's fields; unset ones keep its defaults
            instructions=kind.instructions(prompt, questions),
            generation=dict(generation),
            fetch=_pipeline_config(FetchConfig, "fetch", fetch, where),
            decode=_pipeline_config(DecodeConfig, "decode", values.get("decode", {}), where),
            run=RunConfig(**run),
            closed_sets=closed_sets,
        )
    except GenerationSettingsError as e:  # the engine's checks across keys, made by the Job
        raise SpecError(where("generation"), "[generation]", e.problem) from None
    except PipelineError as e:  # a check across tables the ones above do not make
        raise SpecError(source, "", str(e)) from None


def parse_override(assignment: str) -> tuple[str, object]:
    """A command-line "table.key=value" as (dotted key, value): the value is read as TOML ("16" -> 16, "true" ->
    True, '["a", "b"]' -> a list), and kept as a plain string when it is not TOML ("/data/model")."""
    key, equals, text = assignment.partition("=")
    if not equals or not key.strip():
        raise ValueError(f"expected table.key=value, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value
