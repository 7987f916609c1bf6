"""Job spec files (jobs/spec.py) and job kinds (jobs/kinds.py): loading, the messages a user sees, overrides,
default prompts, the Job pipeline.run takes, and the wide table of an annotate job."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipbatch.jobs.kinds import KINDS, WideTableError, finish_job, write_wide_table
from blipbatch.jobs.spec import (
    GENERATION_KEYS,
    Extend,
    SpecError,
    default_prompt,
    key_lines,
    load_spec,
    model_family,
    parse_override,
)
from blipbatch.model.configs import GenerationConfig
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.job import Job, RunConfig
from blipbatch.pipeline.manifest import job_settings
from blipbatch.pipeline.shards import WorkUnit
from blipbatch.pipeline.sink import commit_unit, record_for, write_part

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BASE = """\
[job]
kind = "caption"

[input]
path = "s3://bucket/shards/"

[output]
path = "s3://bucket/out/"

[model]
path = "Salesforce/instructblip-vicuna-7b"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return str(info.value)


# --- the shipped examples ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["caption", "vqa", "annotate"])
def test_each_example_loads_as_the_job_pipeline_run_takes(kind):
    spec = load_spec(EXAMPLES / f"{kind}.toml")
    assert spec.kind == kind
    assert spec.source == EXAMPLES / f"{kind}.toml"
    assert isinstance(spec, Job)  # pipeline.run(spec) runs it
    assert (spec.instructions is None) == (kind == "vqa")


def test_example_values_are_read_as_written():
    spec = load_spec(EXAMPLES / "annotate.toml")
    assert list(spec.questions) == ["material", "category", "printed_text", "color"]  # tables follow plain keys
    assert spec.closed_sets["color"].candidates[:3] == ("black", "white", "grey")
    assert spec.output.wide is True
    assert spec.input.image_column == "image" and spec.input.id_column == "sku"
    caption = load_spec(EXAMPLES / "caption.toml")
    assert caption.fetch == FetchConfig(timeout_s=10.0, retries=3, max_bytes=32 * 2**20, concurrency=16)
    assert caption.decode.max_pixels == 40_000_000
    assert caption.generation == {
        "max_new_tokens": 40,
        "num_beams": 5,
        "length_penalty": 1.0,
        "repetition_penalty": 1.5,
    }
    assert caption.run.batch_size == 32 and caption.run.workers is None


# --- errors: the exact message a user sees ---------------------------------------------------------------------------


def test_unknown_key_names_file_line_and_the_known_keys(tmp_path):
    path = write(tmp_path, BASE + "\n[generation]\nmax_new_tokens = 20\nnum_beam = 5\n")
    assert error_of(path) == (
        f"{path}:15: [generation] num_beam: unknown key; did you mean num_beams? known: bad_words_ids, "
        "begin_suppress_tokens, do_sample, early_stopping, encoder_no_repeat_ngram_size, encoder_repetition_penalty, "
        "eos_token_id, epsilon_cutoff, eta_cutoff, exponential_decay_length_penalty, forced_bos_token_id, "
        "forced_eos_token_id, length_penalty, max_length, max_new_tokens, min_length, min_new_tokens, min_p, "
        "no_repeat_ngram_size, num_beams, num_return_sequences, remove_invalid_values, renormalize_logits, "
        "repetition_penalty, sequence_bias, suppress_tokens, temperature, top_k, top_p, typical_p, use_cache"
    )


def test_wrong_type_names_the_expected_value_and_what_was_found(tmp_path):
    path = write(tmp_path, BASE + '\n[run]\nworkers = 2\nbatch_size = "16"\n')
    assert error_of(path) == f'{path}:15: [run] batch_size: expected an integer >= 1, got "16" (a string)'
    path = write(tmp_path, BASE + "\n[output]\n", name="dup.toml")  # a duplicate table is a TOML syntax error
    assert error_of(path) == f"{path}:13: not valid TOML: Cannot declare ('output',) twice"
    path = write(tmp_path, BASE.replace('kind = "caption"', 'kind = "caption"\nname = 7'), name="name.toml")
    assert error_of(path) == f"{path}:3: [job] name: expected a non-empty string, got 7 (an integer)"
    path = write(tmp_path, BASE.replace('path = "s3://bucket/shards/"', "path = []"), name="paths.toml")
    assert error_of(path) == (
        f"{path}:5: [input] path: expected a path or URL, or a non-empty array of them, got [] (an array)"
    )
    path = write(tmp_path, BASE + "\n[model]\n", name="m.toml")
    assert "not valid TOML" in error_of(path)
    path = write(tmp_path, BASE.replace('path = "Salesforce', 'dtype = "fp16"\npath = "Salesforce'), name="d.toml")
    assert error_of(path) == (
        f'{path}:11: [model] dtype: expected one of "bfloat16", "float16", "float32", got "fp16" (a string)'
    )


def test_missing_input(tmp_path):
    no_table = write(tmp_path, BASE.replace('[input]\npath = "s3://bucket/shards/"\n', ""))
    assert error_of(no_table) == (
        f"{no_table}: [input] path: missing; the Parquet shards: a folder, a glob or an array of files, "
        'e.g. path = "s3://bucket/shards/"'
    )
    no_key = write(tmp_path, BASE.replace('path = "s3://bucket/shards/"', 'image_column = "url"'), name="nokey.toml")
    assert error_of(no_key) == (
        f"{no_key}:4: [input] path: missing; the Parquet shards: a folder, a glob or an array of files, "
        'e.g. path = "s3://bucket/shards/"'
    )


def test_annotate_needs_questions(tmp_path):
    path = write(tmp_path, BASE.replace('kind = "caption"', 'kind = "annotate"'))
    assert error_of(path) == (
        f'{path}: [questions]: missing; kind "annotate" asks every image each question of '
        'this table, e.g. [questions] color = "What color is the car?"'
    )
    empty = write(tmp_path, BASE.replace('kind = "caption"', 'kind = "annotate"') + "\n[questions]\n", name="e.toml")
    assert error_of(empty) == (
        f'{empty}:13: [questions]: empty; kind "annotate" asks every image each question '
        'of this table, e.g. [questions] color = "What color is the car?"'
    )
    blank = write(
        tmp_path, BASE.replace('kind = "caption"', 'kind = "annotate"') + '\n[questions]\ncolor = " "\n', name="b.toml"
    )
    assert error_of(blank) == (
        f"{blank}:14: [questions] color: expected a non-empty string (the question), or a "
        'table with question = "..." and candidates, got " " (a string)'
    )
    reserved = write(
        tmp_path, BASE.replace('kind = "caption"', 'kind = "annotate"') + '\n[questions]\nerrors = "?"\n', name="r.toml"
    )
    assert error_of(reserved) == (
        f"{reserved}:14: [questions] errors: reserved name (a column of the wide table: id, errors); choose another"
    )


def test_unknown_kind(tmp_path):
    path = write(tmp_path, BASE.replace('kind = "caption"', 'kind = "captions"'))
    assert error_of(path) == (
        f'{path}:2: [job] kind: expected one of "caption", "vqa", "annotate", got "captions" (a string)'
    )


def test_bad_generation_settings(tmp_path):
    path = write(tmp_path, BASE + "\n[generation]\ntop_p = 1.5\n")
    assert error_of(path) == f"{path}:14: [generation] top_p: expected a number in (0, 1], got 1.5 (a float)"
    # Settings wrong only together are checked as the engine checks them, before any worker starts.
    path = write(tmp_path, BASE + "\n[generation]\nnum_beams = 2\nnum_return_sequences = 3\n", name="x.toml")
    assert error_of(path) == f"{path}:13: [generation]: num_return_sequences (3) cannot exceed num_beams (2)"
    path = write(tmp_path, BASE + "\n[generation]\ndo_sample = 1\n", name="b.toml")
    assert error_of(path) == f"{path}:14: [generation] do_sample: expected true or false, got 1 (an integer)"


def test_generation_keys_are_transformers_names_the_model_takes():
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    assert set(GENERATION_KEYS) <= names
    assert set(GENERATION_KEYS) >= {
        "max_new_tokens",
        "num_beams",
        "length_penalty",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_new_tokens",
        "num_return_sequences",
    }


def test_fetch_and_decode_use_the_pipeline_configs_checks(tmp_path):
    path = write(tmp_path, BASE + "\n[fetch]\nretries = 2\ntimeout_s = 0\n")
    assert error_of(path) == f"{path}:15: [fetch] timeout_s: must be > 0, got 0.0"
    path = write(tmp_path, BASE + "\n[fetch]\ntimeout = 5\n", name="f.toml")
    assert error_of(path) == (
        f"{path}:14: [fetch] timeout: unknown key; did you mean timeout_s? known: allow_hosts, allowed_schemes, "
        "attempt_deadline_s, backoff_s, concurrency, honour_opt_out, local_roots, max_abandoned_reads, "
        "max_backoff_s, max_bytes, max_redirects, retries, row_deadline_s, timeout_s, user_agent"
    )
    path = write(tmp_path, BASE + '\n[decode]\nmax_pixels = 1000\nformats = ["PNG", "SVG"]\n', name="d.toml")
    assert error_of(path).startswith(f"{path}:15: [decode] formats: ['SVG'] not readable by Pillow (readable: ")
    spec = load_spec(write(tmp_path, BASE + '\n[fetch]\nallowed_schemes = ["https"]\nmax_bytes = 1024\n', "ok.toml"))
    assert spec.fetch == FetchConfig(allowed_schemes=("https",), max_bytes=1024)


def test_fetch_allow_list_and_local_roots(tmp_path, monkeypatch):
    text = BASE + '\n[fetch]\nallow_hosts = ["images.internal", "10.0.0.0/8"]\nlocal_roots = ["images", "/data/x"]\n'
    spec = load_spec(write(tmp_path, text))
    assert spec.fetch.allow_hosts == ("images.internal", "10.0.0.0/8")
    # a relative root is relative to the spec's folder, like input.path
    assert spec.fetch.local_roots == (str(tmp_path / "images"), "/data/x")
    assert job_settings(spec).fetch["local_roots"] == (str(tmp_path / "images"), "/data/x")  # the manifest keeps it
    assert load_spec(write(tmp_path, BASE)).fetch.local_roots == ()  # no local files unless roots are named
    # an override is relative to the current directory, as on any command line
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(tmp_path / "job.toml", {"fetch.local_roots": ["shared/images"], "fetch.allow_hosts": ["[::1]"]})
    assert (spec.fetch.local_roots, spec.fetch.allow_hosts) == (
        (str(tmp_path.parent / "shared" / "images"),),
        ("[::1]",),
    )
    path = write(tmp_path, BASE + '\n[fetch]\nretries = 1\nallow_hosts = ["http://images.internal:80"]\n', "a.toml")
    assert error_of(path).startswith(
        f"{path}:15: [fetch] allow_hosts: entry 'http://images.internal:80' is neither "
        "a host name nor an IP address or network"
    )
    path = write(tmp_path, BASE + '\n[fetch]\nlocal_roots = ["~/images"]\n', "r.toml")
    assert error_of(path) == (
        f"{path}:14: [fetch] local_roots: '~/images' is not an absolute path (roots are folders "
        "on the workers, so a relative one would depend on their working directory)"
    )
    path = write(tmp_path, BASE + '\n[fetch]\nallow_hosts = "10.0.0.0/8"\n', "s.toml")
    assert error_of(path) == (
        f'{path}:14: [fetch] allow_hosts: expected an array of non-empty strings, got "10.0.0.0/8" (a string)'
    )


def test_tables_and_kind_specific_keys(tmp_path):
    path = write(tmp_path, BASE + "\n[runs]\nworkers = 2\n")
    assert error_of(path) == (
        f"{path}:13: [runs]: unknown table; did you mean [run]? known: [decode], [fetch], "
        "[generation], [input], [job], [model], [output], [prompt], [questions], [run]"
    )
    path = write(tmp_path, 'kind = "caption"\n' + BASE, name="top.toml")
    assert error_of(path) == f"{path}:1: kind: a key outside any table; put it under [job]"
    path = write(tmp_path, 'path = "x"\n' + BASE, name="top2.toml")
    assert error_of(path) == f"{path}:1: path: a key outside any table; put it under [input] or [output] or [model]"
    path = write(
        tmp_path, BASE.replace('[output]\npath = "s3://bucket/out/"', 'output = "s3://bucket/out/"'), name="nt.toml"
    )
    assert error_of(path) == (
        f"{path}:7: [input] output: unknown key; [output] is a table: give it its own [output] header line"
    )
    path = write(
        tmp_path,
        'output = "s3://bucket/out/"\n' + BASE.replace('[output]\npath = "s3://bucket/out/"', ""),
        name="nt2.toml",
    )
    assert error_of(path) == f'{path}:1: [output]: expected a table, got "s3://bucket/out/" (a string)'
    vqa = BASE.replace('kind = "caption"', 'kind = "vqa"')
    path = write(tmp_path, vqa, name="vqa.toml")
    assert error_of(path) == (
        f'{path}:4: [input] instruction_column: missing; kind "vqa" reads each row\'s '
        'question from this column, e.g. instruction_column = "question"'
    )
    path = write(
        tmp_path,
        vqa.replace("[input]", '[input]\ninstruction_column = "q"') + '\n[prompt]\ntext = "Hi"\n',
        name="vqa2.toml",
    )
    assert error_of(path) == (
        f'{path}:14: [prompt]: not used by kind "vqa" (only by caption); remove it or change [job] kind'
    )
    path = write(
        tmp_path, BASE.replace('path = "s3://bucket/out/"', 'path = "s3://bucket/out/"\nwide = true'), name="wide.toml"
    )
    assert error_of(path) == (
        f'{path}:9: [output] wide: not used by kind "caption" (only by annotate); remove it or change [job] kind'
    )
    path = write(
        tmp_path,
        BASE.replace('path = "s3://bucket/shards/"', 'path = "s3://bucket/shards/"\npassthrough = ["url", "status"]'),
        name="p.toml",
    )
    assert error_of(path) == (
        f'{path}:6: [input] passthrough: "status" clashes with the output column of that name; '
        "output columns: id, image_sha256, instruction, question_id, text, score, "
        "candidate_logprobs, status, error_kind, error, model, generation, derived_id, image_url"
    )


def test_syntax_errors_and_unreadable_files(tmp_path):
    path = write(tmp_path, BASE + "\n[run]\nbatch_size = = 3\n")
    assert error_of(path) == f"{path}:14: not valid TOML: Invalid value"
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"{missing}: cannot read the job spec: No such file or directory"


def test_key_lines_follow_tables_dotted_quoted_keys_and_skip_multiline_strings():
    text = textwrap.dedent('''\
        title = "x"
        [job]
        kind = "caption"   # a comment
        [ prompt ]
        text = """
        fake = "not a key"
        """
        generation.num_beams = 3
        "quoted key" = 1
        [fetch]
        limits = { timeout_s = 1 }
        ''')
    lines = key_lines(text)
    assert lines[("title",)] == 1
    assert lines[("job", "kind")] == 3
    assert lines[("prompt",)] == 4 and lines[("prompt", "text")] == 5
    assert ("prompt", "fake") not in lines
    assert lines[("prompt", "generation", "num_beams")] == 8
    assert lines[("prompt", "quoted key")] == 9
    assert lines[("fetch", "limits")] == 11


def test_an_error_inside_an_inline_table_points_at_its_line(tmp_path):
    path = write(tmp_path, "# settings first\n\ngeneration = { num_beams = 0 }\n" + BASE)
    assert error_of(path) == f"{path}:3: [generation] num_beams: expected an integer >= 1, got 0 (an integer)"


# --- overrides -------------------------------------------------------------------------------------------------------


def test_overrides_replace_and_add_values(tmp_path):
    path = write(tmp_path, BASE + "\n[run]\nbatch_size = 4\n")
    spec = load_spec(
        path,
        {
            "run.batch_size": 16,
            "run.workers": 2,
            "model.path": "/data/other",
            "generation.num_beams": 3,
            "run.address": None,
        },
    )
    assert spec.run.batch_size == 16 and spec.run.workers == 2 and spec.run.address is None
    assert spec.model.path == "/data/other"
    assert spec.generation == {"max_new_tokens": 30, "num_beams": 3}  # the job's default for what is not set
    # Override values are validated like the file's, and the message says they came from an override.
    assert error_of(path, {"run.batch_size": 0}) == (
        f"{path} (override run.batch_size): [run] batch_size: expected an integer >= 1, got 0 (an integer)"
    )
    assert error_of(path, {"run.batchsize": 8}) == (
        f"{path} (override run.batchsize): [run] batchsize: unknown key; did you mean batch_size? known: address, "
        "batch_size, decode_processes, decode_slots, decoded_bytes, max_attempts, max_candidates, max_error_rate, "
        "max_instruction_bytes, max_workers, prepare_threads, rows_per_unit, workers"
    )
    assert error_of(path, {"runs.batch_size": 8}) == (
        f"{path} (override runs.batch_size): [runs]: unknown table; did you mean [run]? known: [decode], [fetch], "
        "[generation], [input], [job], [model], [output], [prompt], [questions], [run]"
    )
    assert error_of(path, {"batch_size": 8}) == (
        f'{path} (override batch_size): batch_size: an override names a table and a key, e.g. "run.batch_size"'
    )
    # An override can supply what the file lacks, and change the kind.
    annotate = load_spec(path, {"job.kind": "annotate", "questions.color": "What color is it?"})
    assert annotate.kind == "annotate" and annotate.questions == {"color": "What color is it?"}


def test_parse_override_reads_toml_values_and_keeps_plain_strings():
    assert parse_override("run.batch_size=16") == ("run.batch_size", 16)
    assert parse_override("output.wide=true") == ("output.wide", True)
    assert parse_override('input.passthrough=["a", "b"]') == ("input.passthrough", ["a", "b"])
    assert parse_override("model.path=/data/m=1") == ("model.path", "/data/m=1")
    assert parse_override('prompt.text="A photo of"') == ("prompt.text", "A photo of")
    with pytest.raises(ValueError, match="expected table.key=value"):
        parse_override("run.batch_size")


def test_relative_paths_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    (tmp_path / "jobs" / "models" / "mine").mkdir(parents=True)
    write(
        tmp_path / "jobs",
        BASE.replace('"s3://bucket/shards/"', '["shards/a.parquet", "/abs/b.parquet"]')
        .replace('"s3://bucket/out/"', '"out/"')
        .replace('"Salesforce/instructblip-vicuna-7b"', '"models/mine"'),
    )
    monkeypatch.chdir(tmp_path)
    spec = load_spec("jobs/job.toml")
    assert spec.input.paths == (f"{tmp_path}/jobs/shards/a.parquet", "/abs/b.parquet")
    assert spec.output.path == f"{tmp_path}/jobs/out/"
    assert spec.model.path == f"{tmp_path}/jobs/models/mine"
    hub = load_spec(write(tmp_path / "jobs", BASE, name="hub.toml"))
    assert hub.model.path == "Salesforce/instructblip-vicuna-7b"  # no such folder: a Hub id, as written
    assert load_spec("jobs/job.toml", {"output.path": "elsewhere/"}).output.path == "elsewhere/"  # as typed


# --- default prompts -------------------------------------------------------------------------------------------------


def test_default_prompt_by_name():
    assert default_prompt("Salesforce/instructblip-vicuna-7b") == "A short image caption:"
    assert default_prompt("Salesforce/instructblip-flan-t5-xl") == "A short image caption:"
    assert default_prompt("Salesforce/blip2-opt-2.7b") == ""
    assert default_prompt("s3://models/blip-2-flan-t5-xl/") == ""
    assert default_prompt("s3://blip2-models/my-model") == "A short image caption:"  # unknown family
    assert model_family("s3://blip2-models/my-model") is None


def test_default_prompt_from_a_local_config_wins_over_the_name(tmp_path):
    blip2 = tmp_path / "instructblip-looking-name"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "opt"}}))
    instruct = tmp_path / "blip2-looking-name"
    instruct.mkdir()
    (instruct / "config.json").write_text(
        json.dumps({"model_type": "instructblip", "text_config": {"model_type": "t5"}})
    )
    assert default_prompt(blip2) == "" and default_prompt(str(blip2)) == ""
    assert default_prompt(instruct) == "A short image caption:"
    assert default_prompt({"model_type": "blip-2"}) == ""


def test_a_caption_spec_without_a_prompt_gets_the_family_default(tmp_path):
    assert load_spec(write(tmp_path, BASE)).prompt == "A short image caption:"
    blip2 = load_spec(write(tmp_path, BASE), {"model.path": "Salesforce/blip2-flan-t5-xl"})
    assert blip2.prompt == ""
    given = load_spec(write(tmp_path, BASE + '\n[prompt]\ntext = "Describe the image."\n', name="p.toml"))
    assert given.prompt == "Describe the image."


# --- the Job each kind makes ----------------------------------------------------------------------------------------


def test_the_job_of_each_kind(tmp_path):
    caption = load_spec(write(tmp_path, BASE + "\n[generation]\nmax_new_tokens = 12\ntop_k = 5\n"))
    assert caption.instructions == ("A short image caption:",) and caption.input.instruction_column is None
    assert caption.input.paths == ("s3://bucket/shards/",) and caption.output.path == "s3://bucket/out/"
    assert caption.generation == {"max_new_tokens": 12, "num_beams": 1, "top_k": 5}
    assert caption.fetch == FetchConfig() and caption.run.batch_size is None and caption.input.passthrough == ()

    vqa = load_spec(
        write(
            tmp_path,
            BASE.replace('"caption"', '"vqa"').replace(
                'path = "s3://bucket/shards/"',
                'path = ["s3://b/1.parquet", "s3://b/2.parquet"]\ninstruction_column = "q"',
            ),
            name="vqa.toml",
        )
    )
    assert vqa.input.instruction_column == "q" and vqa.instructions is None
    assert vqa.input.paths == ("s3://b/1.parquet", "s3://b/2.parquet")

    annotate = load_spec(
        write(
            tmp_path,
            BASE.replace('"caption"', '"annotate"') + '\n[questions]\nsize = "How big?"\ncolor = "What color?"\n',
            name="a.toml",
        )
    )
    assert annotate.instructions == {"size": "How big?", "color": "What color?"}
    assert list(annotate.instructions) == ["size", "color"]  # the file's order is the order asked
    assert set(KINDS) == {"caption", "vqa", "annotate"}


def test_a_job_from_overrides_alone(tmp_path, monkeypatch):
    """The command line's flags-only form: the same checks and defaults as a file, "command line" as the place."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(
        None,
        {
            "job.kind": "caption",
            "input.path": "in",
            "output.path": "out",
            "model.path": "m",
            "prompt.text": "Describe:",
            "fetch.local_roots": Extend(["/data/a", "/data/b"]),
        },
    )
    assert spec.source is None and spec.instructions == ("Describe:",) and spec.input.paths == ("in",)
    assert spec.fetch.local_roots == ("/data/a", "/data/b") and spec.run == RunConfig()
    with pytest.raises(SpecError, match=r"^command line \(override run.batch_size\): \[run\] batch_size: expected"):
        load_spec(
            None,
            {"job.kind": "caption", "input.path": "in", "output.path": "out", "model.path": "m", "run.batch_size": 0},
        )


def test_an_extend_override_adds_to_the_files_array(tmp_path, monkeypatch):
    text = BASE + '\n[fetch]\nlocal_roots = ["images"]\nallow_hosts = ["a.internal"]\n'
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(
        write(tmp_path, text), {"fetch.local_roots": Extend(["/data/x"]), "fetch.allow_hosts": Extend(["b.internal"])}
    )
    # the file's relative root keeps its meaning (the spec's folder); the flag's absolute one is added
    assert spec.fetch.local_roots == (str(tmp_path / "images"), "/data/x")
    assert spec.fetch.allow_hosts == ("a.internal", "b.internal")
    alone = load_spec(write(tmp_path, BASE, "b.toml"), {"fetch.local_roots": Extend(["/d"])})
    assert alone.fetch.local_roots == ("/d",)


def test_max_error_rate_is_checked(tmp_path):
    assert load_spec(write(tmp_path, BASE + "\n[run]\nmax_error_rate = 0.25\n")).run.max_error_rate == 0.25
    assert error_of(write(tmp_path, BASE + "\n[run]\nmax_error_rate = 0\n", "z.toml")).endswith(
        "[run] max_error_rate: expected a number in (0, 1], got 0 (an integer)"
    )


# --- the wide table --------------------------------------------------------------------------------------------------


def _long_rows(image: str, url: str, width: int, answers: dict[str, str | tuple[str, str]]) -> list[dict]:
    rows = []
    for question_id, answer in answers.items():
        failed = isinstance(answer, tuple)
        rows.append(
            {
                "id": image,
                "image_url": url,
                "instruction": f"{question_id}?",
                "question_id": question_id,
                "text": None if failed else answer,
                "status": "error" if failed else "ok",
                "error_kind": answer[0] if failed else None,
                "error": answer[1] if failed else None,
                "model": "m",
                "generation": "{}",
                "width": width,
            }
        )
    return rows


def _commit(output: str, unit_id: str, rows: list[dict]) -> None:
    unit = WorkUnit(unit_id=unit_id, shard="in.parquet", row_groups=(0,), first_row=0, num_rows=len(rows))
    table = pa.Table.from_pylist(rows)
    write_part(output, unit, table)
    commit_unit(output, record_for(unit, table, attempt=1))


def test_wide_table_from_a_hand_made_output(tmp_path):
    output = str(tmp_path / "out")
    _commit(
        output,
        "u0",
        _long_rows("a", "http://x/a.jpg", 10, {"color": "red", "size": "big"})
        + _long_rows(
            "b", "http://x/b.jpg", 20, {"color": ("fetch_http", "HTTP 404"), "size": ("fetch_http", "HTTP 404")}
        ),
    )
    _commit(output, "u1", _long_rows("c", "http://x/c.jpg", 30, {"color": "blue", "size": ("model_error", "boom")}))
    # A part written without its commit marker (a crash between the two) is not part of the output.
    uncommitted = WorkUnit("u2", "in.parquet", (1,), 3, 1)
    write_part(
        output, uncommitted, pa.Table.from_pylist(_long_rows("d", "http://x/d.jpg", 40, {"color": "x", "size": "y"}))
    )
    path = write_wide_table(output)
    assert path == f"{output}.wide.parquet"
    wide = pq.read_table(path)
    assert wide.column_names == ["id", "image_url", "width", "color", "size", "errors"]
    assert wide.to_pylist() == [
        {"id": "a", "image_url": "http://x/a.jpg", "width": 10, "color": "red", "size": "big", "errors": None},
        {
            "id": "b",
            "image_url": "http://x/b.jpg",
            "width": 20,
            "color": None,
            "size": None,
            "errors": [("color", "fetch_http: HTTP 404"), ("size", "fetch_http: HTTP 404")],
        },
        {
            "id": "c",
            "image_url": "http://x/c.jpg",
            "width": 30,
            "color": "blue",
            "size": None,
            "errors": [("size", "model_error: boom")],
        },
    ]
    assert not list(Path(output).glob(".*tmp"))  # written whole: no temp file left behind


def test_wide_table_is_written_after_an_annotate_job_that_asks_for_it(tmp_path):
    output = tmp_path / "out"
    _commit(str(output), "u0", _long_rows("a", "u", 1, {"q1": "yes"}))
    text = BASE.replace('"caption"', '"annotate"').replace('"s3://bucket/out/"', '"out"') + '\n[questions]\nq1 = "?"\n'
    assert finish_job(load_spec(write(tmp_path, text))) is None  # wide not asked for
    assert not (tmp_path / "out.wide.parquet").exists()
    spec = load_spec(write(tmp_path, text.replace('path = "out"', 'path = "out"\nwide = true'), name="w.toml"))
    assert finish_job(spec) == f"{output}.wide.parquet"
    assert pq.read_table(tmp_path / "out.wide.parquet").column("q1").to_pylist() == ["yes"]


def test_wide_table_refuses_outputs_it_cannot_widen(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(WideTableError, match="no committed rows yet"):
        write_wide_table(empty)
    caption = str(tmp_path / "caption")
    rows = [{k: v for k, v in row.items() if k != "question_id"} for row in _long_rows("a", "u", 1, {"q": "t"})]
    _commit(caption, "u0", rows)
    with pytest.raises(WideTableError, match=f"^{caption}: the output has no question_id column"):
        write_wide_table(caption)
    duplicated = str(tmp_path / "dup")
    _commit(duplicated, "u0", _long_rows("a", "u", 1, {"q": "t"}) + _long_rows("a", "v", 2, {"q": "s"}))
    with pytest.raises(WideTableError, match="id 'a' has several rows for question 'q'"):
        write_wide_table(duplicated)


def test_values_in_messages_are_written_as_toml(tmp_path):
    path = write(tmp_path, BASE + '\n[run]\naddress = { host = "h", port = 1, tls = true }\n')
    assert error_of(path) == (
        f'{path}:14: [run] address: expected a non-empty string, got {{ host = "h", port = 1, tls = true }} (a table)'
    )
    path = write(tmp_path, BASE + '\n[fetch]\nallowed_schemes = ["https", 3]\n', name="l.toml")
    assert error_of(path) == (
        f'{path}:14: [fetch] allowed_schemes: expected an array of non-empty strings, got ["https", 3] (an array)'
    )


def test_a_python_api_job_checks_its_generation_settings_once_when_built():
    from blipbatch.pipeline.job import GenerationSettingsError, job_from_keywords

    job = job_from_keywords("in", "out", "m", prompt="x", num_beams=3, generation={"length_penalty": 0.5})
    assert job.generation == {"max_new_tokens": 30, "num_beams": 3, "length_penalty": 0.5}
    with pytest.raises(
        GenerationSettingsError, match="unknown generation setting 'max_new_token'; did you mean max_new_tokens?"
    ):
        job_from_keywords("in", "out", "m", prompt="x", generation={"max_new_token": 3})
    with pytest.raises(GenerationSettingsError, match="num_return_sequences"):
        job_from_keywords("in", "out", "m", prompt="x", num_beams=2, generation={"num_return_sequences": 3})


def test_every_generation_setting_from_a_spec_an_override_and_the_python_api(tmp_path):
    """The settings transformers' logits processors take reach the Job from [generation], --set and pipeline.run;
    numbers that transformers wants as floats arrive as floats; the Job stays JSON (it goes into the manifest)."""
    from blipbatch.pipeline.job import job_from_keywords

    path = write(
        tmp_path,
        BASE
        + textwrap.dedent("""
        [generation]
        bad_words_ids = [[5], [6, 7]]
        sequence_bias = [[[5], 2], [[8, 9], -1.5]]
        suppress_tokens = [3, 4]
        begin_suppress_tokens = [10]
        forced_eos_token_id = [2, 3]
        exponential_decay_length_penalty = [3, 2]
        min_p = 0.1
        typical_p = 0.8
        epsilon_cutoff = 0.01
        eta_cutoff = 0.02
        renormalize_logits = true
        use_cache = false
        encoder_repetition_penalty = 1.2
        """),
    )
    overrides = dict(
        parse_override(a)
        for a in ("generation.forced_bos_token_id=12", "generation.top_k=7", "generation.remove_invalid_values=true")
    )
    spec = load_spec(path, overrides)
    assert spec.generation["sequence_bias"] == [[[5], 2.0], [[8, 9], -1.5]]
    assert isinstance(spec.generation["sequence_bias"][0][1], float)
    assert spec.generation["exponential_decay_length_penalty"] == [3, 2.0]
    assert spec.generation["forced_bos_token_id"] == 12 and spec.generation["remove_invalid_values"] is True
    assert spec.generation["use_cache"] is False and spec.generation["min_p"] == 0.1
    json.dumps(spec.generation)
    job = job_from_keywords("in", "out", "m", prompt="x", generation={"sequence_bias": {(5,): 2.0}, "min_p": 0.2})
    assert job.generation["sequence_bias"] == [[[5], 2.0]]
    json.dumps(job.generation)
    bad = write(tmp_path, BASE + "\n[generation]\nsuppress_tokens = [-1]\n", name="bad.toml")
    assert error_of(bad) == (
        f"{bad}:14: [generation] suppress_tokens: expected an array of token ids, got [-1] (an array)"
    )


def test_model_quantize_reaches_the_job_and_its_manifest(tmp_path):
    path = write(tmp_path, BASE + 'quantize = "fp8"\n')
    spec = load_spec(path)
    assert spec.model.quantize == "fp8"
    assert job_settings(spec).quantize == "fp8"
    assert load_spec(write(tmp_path, BASE, name="plain.toml")).model.quantize is None


def test_model_cuda_graphs_reaches_the_job(tmp_path):
    assert load_spec(write(tmp_path, BASE + "cuda_graphs = false\n")).model.cuda_graphs is False
    assert load_spec(write(tmp_path, BASE, name="plain.toml")).model.cuda_graphs is True
    path = write(tmp_path, BASE + 'cuda_graphs = "no"\n', name="bad.toml")
    assert error_of(path) == f'{path}:12: [model] cuda_graphs: expected true or false, got "no" (a string)'
