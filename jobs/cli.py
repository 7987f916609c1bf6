"""The `blipbatch` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports the pipeline only when a command needs it, so `--help` stays quick
    from blipbatch.pipeline.fetch import FetchConfig
    from blipbatch.pipeline.job import Job
    from blipbatch.schemas import JobSettings

# Exit codes scripts can rely on (README "Exit codes").
EXIT_OK, EXIT_UNITS_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_ERROR_RATE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM
EXIT_BUG = 1  # an unexpected error (a bug): its traceback, as Python's own, but redacted

# What addresses each error kind: the flag, then the spec key.
ERROR_HINTS = {
    "blocked_address": "--allow-host HOST ([fetch] allow_hosts) for a private host",
    "blocked_local": "--local-root DIR ([fetch] local_roots) for local files",  # blocked_address of a local path
    "too_large": "--set decode.max_pixels=N ([decode] max_pixels)",
    "fetch_timeout": "--set fetch.timeout_s=S ([fetch] timeout_s, row_deadline_s)",
    "fetch_http": "check the URLs; then --redo-errors",
    "fetch_connection": "check that the hosts are reachable; then --redo-errors",
    "decode_error": "check the images' format; --set decode.formats=[...] ([decode] formats)",
    # decode_error by what the message says (decode_hint_kind): only a format left out is fixed by decode.formats
    "decode_empty": "the files are empty (0 bytes): replace them at their source; then --redo-errors decode_error",
    "decode_damaged": "the files are damaged (cut short or corrupt): replace them at their source; then "
    "--redo-errors decode_error",
    "decode_format": "add the format: --set decode.formats=[...] ([decode] formats)",
    "decode_not_image": "the references point to something that is not an image: fix them or their source",
    "invalid_input": "check the input column named in the message",
    "model_error": "see the message; --batch-size N ([run] batch_size) if out of memory",
    "extreme_aspect_ratio": "--set decode.max_aspect_ratio=R ([decode] max_aspect_ratio) if such images are wanted",
    "too_many_scans": "--set decode.max_jpeg_scans=N ([decode] max_jpeg_scans) if such images are wanted",
    "too_many_strips": "--set decode.max_tiff_strips=N ([decode] max_tiff_strips) if such images are wanted",
    "metadata_too_large": "--set decode.max_metadata_bytes=N ([decode] max_metadata_bytes) if such images are wanted",
    "opted_out": "the site asks not to be used for AI; [fetch] honour_opt_out = false only with its permission",
}
TOP_ERROR_KINDS = 3


def _is_local_reference(reference: str | None) -> bool:
    return reference is not None and not reference.startswith(("http://", "https://", "s3://", "gs://", "data:"))


def decode_hint_kind(message: str) -> str:
    """Which hint fits a decode_error message (pipeline.decode words them)."""
    if message.startswith("empty file"):
        return "decode_empty"
    if message.startswith(("truncated or corrupt", "corrupt image header", "cannot convert")):
        return "decode_damaged"
    if message.startswith("not an image: a ") and " image, " in message:  # a real image of a format left out
        return "decode_format"
    if message.startswith(("not an image", "SVG")):
        return "decode_not_image"
    return "decode_error"


def error_advice(output: str, image_column: str, kinds: dict[str, int]) -> list[str]:
    """The run's top error kinds, each with one example message and the flag or spec key that addresses it."""
    from blipbatch.jobs.report_facts import error_examples
    from blipbatch.pipeline.sink import progress_records

    records = [r for r in progress_records(output) if r.rows_error]
    examples = error_examples(output, records, image_column, per_kind=1)
    lines = []
    for kind, count in sorted(kinds.items(), key=lambda item: -item[1])[:TOP_ERROR_KINDS]:
        example = (examples.get(kind) or [{}])[0]
        hint_kind = kind
        if kind == "blocked_address" and _is_local_reference(example.get("reference")):
            hint_kind = "blocked_local"
        elif kind == "decode_error" and example.get("error"):
            hint_kind = decode_hint_kind(example["error"])
        lines.append(f"{kind} ({count} rows): {example.get('error') or 'no example found'}")
        lines.append(f"  fix: {ERROR_HINTS.get(hint_kind, 'see the message')}")
    return lines


def execute(job: Job, **invocation: Any) -> int:
    """pipeline.run(job), its summary printed, its outcome as an exit code."""
    from blipbatch.errors import BlipbatchError
    from blipbatch.pipeline.preflight import check_model, check_output
    from blipbatch.pipeline.resume import redo_kinds

    try:  # before torch and Ray are imported (seconds): a wrong path or error kind is refused at once
        if invocation.get("redo_errors") is not None:
            redo_kinds(invocation["redo_errors"])
        check_model(job.model.path)
        check_output(job.output.path)
    except BlipbatchError as e:
        print(f"blipbatch: {e}", file=sys.stderr)
        return EXIT_REFUSED
    from blipbatch import pipeline
    from blipbatch.pipeline.coordinator import WorkerLost
    from blipbatch.pipeline.guard import risky_local_roots
    from blipbatch.pipeline.run import Terminated

    try:
        summary = pipeline.run(job, **invocation)
    except WorkerLost as e:
        print(f"blipbatch: {e}; committed units are kept, run the same command again to resume", file=sys.stderr)
        return EXIT_UNITS_FAILED
    except BlipbatchError as e:
        print(f"blipbatch: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt as e:  # before the first unit was handed out: nothing was written
        print("blipbatch: interrupted while starting; nothing was processed", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    print(summary)
    for warning in risky_local_roots(job.fetch.local_roots):
        print(f"warning: {warning}", file=sys.stderr)
    if summary.rows_error:
        print("\n".join(error_advice(job.output.path, job.input.image_column, summary.errors_by_kind)))
    if summary.interrupted:
        return EXIT_TERMINATED if summary.terminated else EXIT_INTERRUPTED
    if summary.units_failed or summary.output_problem:
        return EXIT_UNITS_FAILED
    rows, errors, of = summary.rows, summary.rows_error, "this run's rows"
    if invocation.get("redo_errors") is not None:  # a redo is judged by the output it leaves, not the rows it redid
        from blipbatch.jobs.report_facts import totals
        from blipbatch.pipeline.sink import progress_records

        whole = totals(progress_records(job.output.path))
        rows, errors, of = whole.rows_ok + whole.rows_error, whole.rows_error, "the output's rows"
    if rows and errors / rows >= job.run.max_error_rate:
        print(
            f"error rate {errors / rows:.0%} of {of} reached [run] max_error_rate {job.run.max_error_rate:g}: "
            f"exit {EXIT_ERROR_RATE}",
            file=sys.stderr,
        )
        return EXIT_ERROR_RATE
    return EXIT_OK


# `blipbatch run` flags -> the job-spec key they override; defaults are the spec's (pipeline.job).
FLAG_KEYS = {
    "input": "input.path",
    "output": "output.path",
    "model": "model.path",
    "prompt": "prompt.text",
    "instruction_column": "input.instruction_column",
    "image_column": "input.image_column",
    "id_column": "input.id_column",
    "passthrough": "input.passthrough",
    "batch_size": "run.batch_size",
    "decode_slots": "run.decode_slots",
    "workers": "run.workers",
    "max_workers": "run.max_workers",
    "max_new_tokens": "generation.max_new_tokens",
    "num_beams": "generation.num_beams",
    "dtype": "model.dtype",
    "device": "model.device",
    "rows_per_unit": "run.rows_per_unit",
    "max_attempts": "run.max_attempts",
    "address": "run.address",
    "max_error_rate": "run.max_error_rate",
    "max_candidates": "run.max_candidates",
}
# Repeatable flags that add to the spec's array.
EXTEND_KEYS = {"local_root": "fetch.local_roots", "allow_host": "fetch.allow_hosts"}


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the flag `name`, or a --set of its spec key, was given."""
    key = FLAG_KEYS.get(name, name)
    return getattr(args, name, None) is not None or any(a.partition("=")[0].strip() == key for a in args.set)


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The spec overrides the flags and --set give, in that order (--set wins)."""
    from blipbatch.jobs.spec import Extend, parse_override

    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    if flags["input"] is not None and len(flags["input"]) == 1:
        flags["input"] = flags["input"][0]
    overrides: dict[str, object] = {FLAG_KEYS[name]: value for name, value in flags.items() if value is not None}
    if args.local_root:
        overrides["fetch.local_roots"] = Extend(os.path.abspath(root) for root in args.local_root)
    if args.allow_host:
        overrides["fetch.allow_hosts"] = Extend(args.allow_host)
    if args.spec is None:
        overrides["job.kind"] = "vqa" if given(args, "instruction_column") else "caption"
    overrides |= dict(parse_override(assignment) for assignment in args.set)
    return overrides


def run_pipeline(args: argparse.Namespace) -> int:
    """`run SPEC [flags]`: the spec with the given flags overriding it; `run --input ... [flags]`: flags only."""
    from blipbatch.errors import BlipbatchError
    from blipbatch.jobs.kinds import WideTableError, finish_job
    from blipbatch.jobs.spec import load_spec
    from blipbatch.schemas import ERROR_KINDS

    if args.spec is None and args.redo_errors and args.redo_errors[-1] not in ERROR_KINDS:
        # `run --redo-errors [KIND ...] SPEC`: argparse hands the spec to the flag; error kinds are a closed set, so
        # a last word that is none of them is the spec.
        *args.redo_errors, args.spec = args.redo_errors
    if args.spec is None:
        missing = [f"--{name.replace('_', '-')}" for name in ("input", "output", "model") if not given(args, name)]
        asks = given(args, "prompt") != given(args, "instruction_column") or given(args, "job.kind")
        if missing or not asks:
            print(
                "blipbatch run: give a job spec file, or --input, --output, --model and one of --prompt / "
                f"--instruction-column{' (missing: ' + ', '.join(missing) + ')' if missing else ''}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        spec = load_spec(args.spec, flag_overrides(args))
    except (BlipbatchError, ValueError, OSError) as e:
        print(f"blipbatch run: {e}", file=sys.stderr)
        return EXIT_REFUSED
    # The progress line redraws itself with "\r": it would garble the JSON lines on the same stream.
    invocation = dict(
        force=args.force,
        retry_failed=args.retry_failed,
        redo_errors=args.redo_errors,
        progress=not (args.quiet or args.log_json),
    )
    with units_logged_to_stderr(args.log_json):
        code = execute(spec, **invocation)
    if code == EXIT_OK:
        try:
            wide = finish_job(spec)
        except WideTableError as e:
            print(f"blipbatch run: {e}", file=sys.stderr)
            return EXIT_UNITS_FAILED
        if wide:
            print(f"wide table: {wide}")
    return code


@contextlib.contextmanager
def units_logged_to_stderr(enabled: bool) -> Iterator[None]:
    """While open, print the per-unit JSON lines (logger blipbatch.units, see pipeline.metrics) on stderr."""
    if not enabled:
        yield
        return
    from blipbatch.pipeline.metrics import UNIT_LOG

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = UNIT_LOG.level
    UNIT_LOG.addHandler(handler)
    UNIT_LOG.setLevel(logging.INFO)
    try:
        yield
    finally:  # leave the logger as found: main() may be called again in the same process
        UNIT_LOG.removeHandler(handler)
        UNIT_LOG.setLevel(level)


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="caption / question every image of Parquet shards, resumably",
        description="Process every work unit of the input not yet committed in the output, as a job spec file "
        "says (flags override it), or as the flags alone say. Running the same command again resumes. Exit codes: "
        "0 all done, 1 some units failed, 2 usage, 3 refused (bad spec, model, input or output, settings that differ "
        "from the output's, output held by another run), 4 too many rows in error ([run] max_error_rate), "
        "130 interrupted (Ctrl-C), 143 terminated (SIGTERM); committed units are kept on 130 and 143.",
    )
    run.add_argument("spec", nargs="?", help="job spec (TOML); see examples/*.toml")
    run.add_argument("--input", nargs="+", help="Parquet folder, glob or files (local, s3://, gs://)")
    run.add_argument("--output", help="output folder (local, s3://, gs://)")
    run.add_argument("--model", help="checkpoint: local folder, fsspec URL or Hub id")
    what = run.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="one instruction asked of every image")
    what.add_argument("--instruction-column", help="column holding each row's instruction")
    run.add_argument("--image-column", help="URL/path/data: URI or raw-bytes column (default image_url)")
    run.add_argument("--id-column", help="column of unique row ids (default: derived from shard and row)")
    run.add_argument(
        "--passthrough", action="append", metavar="COLUMN", help="input column copied to the output (repeatable)"
    )
    run.add_argument(
        "--batch-size",
        type=int,
        help="rows per model call (default: 8 on CPU; on CUDA what free memory holds, see README)",
    )
    run.add_argument(
        "--decode-slots",
        type=int,
        help="greedy: sequences decoded together (default: 32 on CPU; on CUDA as --batch-size)",
    )
    run.add_argument(
        "--workers",
        type=workers_count,
        help='model actors, or "auto" (the default): one per GPU, more '
        "as GPUs join the cluster while units wait; without GPUs, 1",
    )
    run.add_argument("--max-workers", type=int, help='with "auto" workers: at most this many (default: no limit)')
    run.add_argument("--max-new-tokens", type=int, help="default 30")
    run.add_argument("--num-beams", type=int, help="default 1")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument(
        "--rows-per-unit", type=int, help="rows per work unit, the unit of retry and commit (default 1000)"
    )
    run.add_argument("--max-attempts", type=int, help="tries before a unit is marked failed (default 3)")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray in-process)")
    run.add_argument(
        "--max-error-rate",
        type=float,
        help="exit 4 when this share of the run's rows ended in error (default 1.0: all of them)",
    )
    run.add_argument("--max-candidates", type=int, help="most candidates a closed-set question may list (default 256)")
    add_fetch_flags(run)
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="set any spec key, with or without a spec file, e.g. --set generation.repetition_penalty=1.5",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="resume even if the output was made with other settings, or a shard was rewritten in place "
        "after some of its units were committed",
    )
    run.add_argument("--retry-failed", action="store_true", help="also redo units marked failed")
    run.add_argument(
        "--redo-errors",
        nargs="*",
        metavar="KIND",
        help="also redo the error rows of committed units (of these error kinds; none given: every "
        "error row) with the current settings, keeping their ok rows",
    )
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.add_argument(
        "--log-json",
        action="store_true",
        help="one JSON line per unit committed, retried or failed on stderr, instead of the progress line",
    )
    run.set_defaults(handler=run_pipeline)


def workers_count(value: str) -> int | str:
    """--workers: a count, or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer or "auto", got {value!r}') from None


def add_fetch_flags(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """--allow-host and --local-root: they add to the job's [fetch] allow_hosts and local_roots."""
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help=f"trust this private host or network{purpose}, as [fetch] allow_hosts (repeatable)",
    )
    parser.add_argument(
        "--local-root",
        action="append",
        default=[],
        metavar="DIR",
        help=f"read local image files inside DIR{purpose}, as [fetch] local_roots (repeatable)",
    )


def submit_job(args: argparse.Namespace) -> int:
    from blipbatch.jobs.submit import SubmitError, submit

    try:
        return submit(args.spec, args.address, wait=not args.no_wait, extra=args.set)
    except SubmitError as e:
        print(f"blipbatch submit: {e}", file=sys.stderr)
        return EXIT_REFUSED


def demo(args: argparse.Namespace) -> int:
    from blipbatch.jobs.demo import main_demo

    return main_demo(args.output, args.model, args.max_new_tokens)


def train_demo(args: argparse.Namespace) -> int:
    from blipbatch.jobs.train import main_train

    return main_train(args.output, args.steps, args.seed, args.evaluate)


def recorded_settings(output: str, command: str) -> JobSettings | None:
    """The output's manifest (schemas.JobSettings), or None after saying why on stderr."""
    from blipbatch.pipeline.manifest import ManifestError, read_manifest

    try:
        settings = read_manifest(output)
    except ManifestError as e:
        print(f"blipbatch {command}: {e}", file=sys.stderr)
        return None
    if settings is None:
        print(f"blipbatch {command}: {output}: no blipbatch output here (no _manifest.json)", file=sys.stderr)
    return settings


def show_status(args: argparse.Namespace) -> int:
    from blipbatch.jobs.report_facts import planned_units, totals
    from blipbatch.pipeline.lock import OutputLock
    from blipbatch.pipeline.resume import known_ids, redo_hint, unmatched_units
    from blipbatch.pipeline.shards import describe_duplicates, duplicate_ids
    from blipbatch.pipeline.sink import committed_units, failed_units, progress_records
    from blipbatch.schemas import ColumnMapping

    settings = recorded_settings(args.output, "status")
    if settings is None:
        return EXIT_REFUSED
    done, failed = committed_units(args.output), failed_units(args.output)
    records = progress_records(args.output)
    print(f"output: {args.output}")
    holder = OutputLock(args.output).holder()
    if holder is not None and holder.is_live():
        print(f"running: a run holds this output ({holder.describe()})")
    print(f"model: {settings.model}")
    try:
        units = known_ids(planned_units(settings.to_dict(), args.output), done | set(failed))
        pending = len([u for u in units if u.unit_id not in done and u.unit_id not in failed])
        print(f"input: {settings.input} ({len(units)} units)")
        unmatched = unmatched_units(done, units)
        if unmatched:
            print(
                f"warning: {len(unmatched)} committed unit(s) match no unit of the input (a shard removed or "
                f"changed since): {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}"
            )
        if args.verify:
            shards = list(dict.fromkeys(u.shard for u in units))
            found = duplicate_ids(shards, ColumnMapping(**settings.mapping), across_shards=True)
            print(
                "verify: ids unique across shards"
                if not found
                else "verify: duplicate ids:\n" + describe_duplicates(found, settings.mapping["id_column"])
            )
    except (OSError, ValueError) as e:  # the input moved or is unreachable from here: say so, show the rest
        pending = None
        print(f"input: {settings.input} (cannot list it: {e})")
    print(f"units: {len(done)} done, {len(failed)} failed, {'unknown' if pending is None else pending} pending")
    total = totals(records)
    kinds = total.errors_by_kind
    detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else ""
    print(f"rows: {total.rows_ok} ok, {total.rows_error} error{detail}")
    print(
        f"duplicate images: {total.duplicate_images} input rows had the same bytes as an earlier row of their unit "
        "(decoded and encoded once; image_sha256 finds duplicates across units)"
    )
    if kinds:
        print(f"redo error rows, after fixing their cause: {redo_hint(kinds)}")
    for unit_id, info in sorted(failed.items()):
        print(f"failed unit {unit_id} after {info['attempts']} attempts: {info['reason']}")
    return EXIT_UNITS_FAILED if failed else EXIT_OK


def retry_failed(args: argparse.Namespace) -> int:
    """Re-run an output's failed units with the job its manifest recorded (fetch and decode settings included);
    the flags change only how the run is laid out."""
    from blipbatch.pipeline.manifest import recorded_job
    from blipbatch.pipeline.sink import failed_units

    settings = recorded_settings(args.output, "retry-failed")
    if settings is None:
        return EXIT_REFUSED
    if not failed_units(args.output):
        print(f"{args.output}: no failed units")
        return EXIT_OK
    job = recorded_job(settings, args.output)
    layout = {
        name: value
        for name in ("batch_size", "decode_slots", "workers", "max_attempts", "address")
        if (value := getattr(args, name)) is not None
    }
    job = dataclasses.replace(job, run=dataclasses.replace(job.run, **layout))
    return execute(job, retry_failed=True, progress=not args.quiet)


def make_report(args: argparse.Namespace) -> int:
    """Write the HTML report of an output; thumbnails are fetched under the caller's [fetch] settings (report_fetch)
    plus the flags' hosts and roots."""
    from blipbatch.errors import BlipbatchError
    from blipbatch.jobs.report import ReportError, write_report

    try:
        base, source = report_fetch(args)
        fetch = dataclasses.replace(
            base,
            allow_hosts=base.allow_hosts + tuple(args.allow_host),
            local_roots=base.local_roots + tuple(os.path.abspath(r) for r in args.local_root),
        )
    except (BlipbatchError, ValueError, OSError) as e:
        print(f"blipbatch report: {e}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(e, BlipbatchError) else EXIT_USAGE
    try:
        path = write_report(args.output, args.html, sample=args.sample, fetch=fetch, seed=args.seed)
    except ReportError as e:
        print(f"blipbatch report: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"report of {args.output}: {path}\nthumbnails fetched with {source}")
    return EXIT_OK


def report_fetch(args: argparse.Namespace) -> tuple[FetchConfig, str]:
    """The [fetch] settings thumbnails start from, and a phrase naming them: --spec's; else those the output's
    manifest recorded, only for an output on local disk that only the caller can write (elsewhere, a shared bucket
    or another's folder, anyone who can write there could widen the guard: connect to internal hosts, embed private
    files in a page meant for mailing); else the defaults."""
    from blipbatch.jobs.report_facts import owned_by_caller
    from blipbatch.jobs.spec import load_spec
    from blipbatch.pipeline.fetch import FetchConfig
    from blipbatch.pipeline.manifest import read_manifest, recorded_fetch

    if args.spec:
        return load_spec(args.spec).fetch, f"the [fetch] settings of {args.spec}"
    if owned_by_caller(args.output):
        settings = read_manifest(args.output)
        if settings is not None:
            return recorded_fetch(settings), (
                "the [fetch] settings the output's manifest recorded (a local output only you can write)"
            )
    return FetchConfig(), (
        "the default [fetch] settings (the output's recorded ones are used only for a local output "
        "only you can write; --spec SPEC, --allow-host, --local-root widen them)"
    )


def add_report_command(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page about a run: summary, throughput, errors, a gallery",
        description="Write an HTML report of OUTPUT (finished or in progress, local or on an object store): rows ok "
        "and in error, wall time and images/s, throughput over time and per worker, errors by kind with examples, a "
        "gallery of sampled images with their instructions and outputs, and the job's settings. Images are fetched "
        "as the pipeline fetches them, so private hosts and local files need --allow-host / --local-root (or --spec). "
        "Exit code 3 when OUTPUT is not a blipbatch output.",
    )
    report.add_argument("output", help="the run's output folder (local, s3://, gs://)")
    report.add_argument("--html", default="report.html", help="where to write the page (default ./report.html)")
    report.add_argument("--sample", type=int, default=24, help="images in the gallery (default 24)")
    report.add_argument("--seed", type=int, default=0, help="which images are sampled (default 0)")
    report.add_argument(
        "--spec",
        help="job spec whose [fetch] settings fetch the thumbnails (default: those the "
        "output's manifest recorded if the output is on local disk and only you can write it, else "
        "the defaults)",
    )
    add_fetch_flags(report, " for thumbnails")
    report.set_defaults(handler=make_report)


class Parser(argparse.ArgumentParser):
    """No flag taken by a prefix of its name (a misspelling must not silently become another flag); the commands'
    parsers are of this class too (add_subparsers makes them of the parent's)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, allow_abbrev=False)

    def refuse_unknown(self, words: list[str]) -> None:
        """Exit 2 with this command's usage, naming the first unknown word, and the flag it is closest to."""
        import difflib

        word = words[0].partition("=")[0]
        flags = [flag for action in self._actions for flag in action.option_strings]
        close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6) if word.startswith("-") else []
        self.error(f"unrecognized argument {word}" + (f"; did you mean {close[0]}?" if close else ""))


def build_parser() -> argparse.ArgumentParser:
    from blipbatch import __version__

    parser = Parser(prog="blipbatch", description="Batch InstructBLIP / BLIP-2 inference.")
    parser.add_argument("--version", action="version", version=f"blipbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_command(commands)
    sub = commands.add_parser(
        "submit",
        help="run a job spec on a Ray cluster through its Jobs API",
        description="Upload the project as the job's working_dir, run `blipbatch run SPEC` "
        "there, print the job id and follow its logs. Exit code: the job's (0 succeeded).",
    )
    sub.add_argument("spec", help="job spec (TOML) inside the project folder")
    sub.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sub.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="spec overrides")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub.set_defaults(handler=submit_job)
    demo_cmd = commands.add_parser(
        "demo",
        help="a caption and an annotate job over the sample images",
        description="Runs on local Ray with a small model; writes Parquet to --output and prints a few rows.",
    )
    demo_cmd.add_argument("--output", default="blipbatch-demo", help="where the demo writes (default ./blipbatch-demo)")
    demo_cmd.add_argument("--model", help="checkpoint to use instead of the built-in small model")
    demo_cmd.add_argument("--max-new-tokens", type=int, default=12)
    demo_cmd.set_defaults(handler=demo)
    train = commands.add_parser(
        "train-demo",
        help="train the demo's small model on synthetic shapes (minutes on CPU)",
        description="Trains the demo's small InstructBLIP (jobs/demo_data/shapes-instructblip) from a seed "
        "on freshly drawn pictures of shapes, saves it (Hub layout) to --output and prints its "
        "accuracy on new pictures of the training generator and of the held-out one.",
    )
    train.add_argument("--output", default="shapes-instructblip", help="where to save (default ./shapes-instructblip)")
    train.add_argument(
        "--steps", type=int, help="optimizer steps (default: the shipped model's, jobs.train.TrainConfig)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--evaluate", type=int, default=200, help="pictures to measure accuracy on afterwards (0: none)")
    train.set_defaults(handler=train_demo)
    status = commands.add_parser(
        "status",
        help="units done, failed and pending, and rows ok and in error, of an output",
        description="Exit code 0 when no unit failed, 1 when some did, 3 when OUTPUT is not a blipbatch output.",
    )
    status.add_argument("output")
    status.add_argument(
        "--verify", action="store_true", help="also read the input's id column and report ids repeated across shards"
    )
    status.set_defaults(handler=show_status)
    retry = commands.add_parser("retry-failed", help="re-run the failed units of an output with its recorded settings")
    retry.add_argument("output")
    retry.add_argument("--batch-size", type=int, help="default: the recorded one")
    retry.add_argument("--decode-slots", type=int, help="default: the recorded one")
    retry.add_argument("--workers", type=workers_count, help="default: the recorded one")
    retry.add_argument("--max-attempts", type=int, help="default: the recorded one")
    retry.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray in-process)")
    retry.add_argument("--quiet", action="store_true")
    retry.set_defaults(handler=retry_failed)
    add_report_command(commands)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)  # whose usage an unknown flag is answered with
    return parser


# Errors of the storage a location names (a bucket that does not exist, a malformed URL, a server that refuses): the
# location's fault, not ours, so one line and exit 3 rather than a traceback. By module, since each backend has its
# own types (botocore's ParamValidationError is no OSError).
STORAGE_ERROR_MODULES = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "google",
    "aiohttp",
    "fsspec",
    "requests",
    "urllib3",
)


def is_storage_error(error: BaseException) -> bool:
    """Whether `error` comes from reaching a location: an OSError, an error of a storage library or one caused by
    one, or any error raised inside a storage library (s3fs raises ValueError for a bucket it cannot create)."""

    def module(name: str) -> bool:
        return name.split(".")[0] in STORAGE_ERROR_MODULES

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) or module(type(cause).__module__):
            return True
        cause = cause.__cause__ or cause.__context__
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and module(frame.tb_frame.f_globals.get("__name__", ""))


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line (botocore's messages span several, and quote long regular expressions)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text if len(text) <= limit else text[:limit] + ' ...'}"


def main(argv: list[str] | None = None) -> int:
    from blipbatch.errors import BlipbatchError
    from blipbatch.pipeline.redact import redact_log_records, redacted_streams

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.refuse_unknown(unknown)
    redact_log_records()  # the driver's own log lines (Ray, botocore, urllib3) quote URLs too
    with redacted_streams():  # every message that names a location the command was given
        try:
            return args.handler(args)
        except BlipbatchError as e:  # every refusal of ours, in one line
            print(f"blipbatch {args.command}: {e}", file=sys.stderr)
            return EXIT_REFUSED
        except Exception as e:  # noqa: BLE001 - a location that cannot be reached: one line; else a bug: its traceback
            if is_storage_error(e):
                print(f"blipbatch {args.command}: {one_line(e)}", file=sys.stderr)
                return EXIT_REFUSED
            traceback.print_exc()  # through the redacting stream
            return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
