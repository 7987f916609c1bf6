"""The `blipbatch` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

# Exit codes scripts can rely on.
EXIT_OK, EXIT_UNITS_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def execute(kwargs: dict[str, Any]) -> int:
    """pipeline.run(**kwargs), its summary printed, its outcome as an exit code."""
    from blipbatch import pipeline
    from blipbatch.pipeline.coordinator import WorkerLost
    from blipbatch.pipeline.lock import OutputLocked
    from blipbatch.pipeline.shards import NoShardsError, ShardError
    from blipbatch.pipeline.sink import ManifestMismatch
    from blipbatch.schemas import SchemaError

    try:
        summary = pipeline.run(**kwargs)
    except (ManifestMismatch, OutputLocked, SchemaError, NoShardsError, ShardError, pipeline.PipelineError) as e:
        print(f"blipbatch: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except WorkerLost as e:
        print(f"blipbatch: {e}; committed units are kept, run the same command again to resume", file=sys.stderr)
        return EXIT_UNITS_FAILED
    print(summary)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_UNITS_FAILED if summary.units_failed else EXIT_OK


# `blipbatch run` flags -> the job-spec key they override.
FLAG_KEYS = {
    "input": "input.path", "output": "output.path", "model": "model.path", "prompt": "prompt.text",
    "instruction_column": "input.instruction_column", "image_column": "input.image_column",
    "id_column": "input.id_column", "passthrough": "input.passthrough", "batch_size": "run.batch_size",
    "decode_slots": "run.decode_slots", "workers": "run.workers", "max_new_tokens": "generation.max_new_tokens", "num_beams": "generation.num_beams",
    "dtype": "model.dtype", "device": "model.device", "rows_per_unit": "run.rows_per_unit",
    "max_attempts": "run.max_attempts", "address": "run.address",
}
FLAG_DEFAULTS = {"image_column": "image_url", "passthrough": [], "batch_size": 8, "decode_slots": 32, "max_new_tokens": 30,
                 "num_beams": 1, "rows_per_unit": 1000, "max_attempts": 3}


def run_pipeline(args: argparse.Namespace) -> int:
    """`run SPEC [flags]`: the spec with the given flags overriding it; `run --input ... [flags]`: flags only."""
    from blipbatch.jobs.kinds import WideTableError, finish_job
    from blipbatch.jobs.spec import SpecError, load_spec, parse_override, run_kwargs

    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    if isinstance(flags["input"], list) and len(flags["input"]) == 1:
        flags["input"] = flags["input"][0]
    # The progress line redraws itself with "\r": it would garble the JSON lines on the same stream.
    invocation = dict(force=args.force, retry_failed=args.retry_failed, progress=not (args.quiet or args.log_json))
    if args.spec is None:
        missing = [f"--{name}" for name in ("input", "output", "model") if flags[name] is None]
        if missing or (flags["prompt"] is None) == (flags["instruction_column"] is None):
            print("blipbatch run: give a job spec file, or --input, --output, --model and one of --prompt / "
                  f"--instruction-column{' (missing: ' + ', '.join(missing) + ')' if missing else ''}", file=sys.stderr)
            return EXIT_USAGE
        if args.set:
            print("blipbatch run: --set needs a job spec file", file=sys.stderr)
            return EXIT_USAGE
        with units_logged_to_stderr(args.log_json):
            return execute({k: FLAG_DEFAULTS.get(k) if v is None else v for k, v in flags.items()} | invocation)
    try:
        overrides = {FLAG_KEYS[name]: value for name, value in flags.items() if value is not None}
        overrides |= dict(parse_override(assignment) for assignment in args.set)
        spec = load_spec(args.spec, overrides)
    except (SpecError, ValueError, OSError) as e:
        print(f"blipbatch run: {e}", file=sys.stderr)
        return EXIT_REFUSED
    with units_logged_to_stderr(args.log_json):
        code = execute(run_kwargs(spec) | invocation)
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
        "run", help="caption / question every image of Parquet shards, resumably",
        description="Process every work unit of the input not yet committed in the output, as a job spec file "
        "says (flags override it), or as the flags alone say. Running the same command again resumes. Exit codes: "
        "0 all done, 1 some units failed, 2 usage, 3 refused (bad spec or input, settings that differ from the "
        "output's, output held by another run), 130 interrupted.",
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
    run.add_argument("--passthrough", nargs="*", help="input columns copied to the output")
    run.add_argument("--batch-size", type=int, help="rows per model call (default 8)")
    run.add_argument("--decode-slots", type=int, help="greedy: sequences decoded together (default 32)")
    run.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    run.add_argument("--max-new-tokens", type=int, help="default 30")
    run.add_argument("--num-beams", type=int, help="default 1")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--rows-per-unit", type=int, help="rows per work unit, the unit of retry and commit (default 1000)")
    run.add_argument("--max-attempts", type=int, help="tries before a unit is marked failed (default 3)")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray in-process)")
    run.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                     help="override any spec key, e.g. --set generation.repetition_penalty=1.5")
    run.add_argument("--force", action="store_true", help="resume even if the output was made with other settings")
    run.add_argument("--retry-failed", action="store_true", help="also redo units marked failed")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.add_argument("--log-json", action="store_true",
                     help="one JSON line per unit committed, retried or failed on stderr, instead of the progress line")
    run.set_defaults(handler=run_pipeline)


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


def show_status(args: argparse.Namespace) -> int:
    from blipbatch.jobs.report import planned_units, totals
    from blipbatch.pipeline.sink import committed_units, failed_units, progress_records, read_manifest

    settings = read_manifest(args.output)
    if settings is None:
        print(f"{args.output}: no blipbatch output here (no _manifest.json)", file=sys.stderr)
        return EXIT_REFUSED
    done, failed = committed_units(args.output), failed_units(args.output)
    records = progress_records(args.output)
    print(f"output: {args.output}")
    print(f"model: {settings['model']}")
    try:
        units = planned_units(settings)
        pending = len([u for u in units if u.unit_id not in done and u.unit_id not in failed])
        print(f"input: {settings['input']} ({len(units)} units)")
    except (OSError, ValueError) as e:  # the input moved or is unreachable from here: say so, show the rest
        pending = None
        print(f"input: {settings['input']} (cannot list it: {e})")
    print(f"units: {len(done)} done, {len(failed)} failed, "
          f"{'unknown' if pending is None else pending} pending")
    total = totals(records)
    kinds = total.errors_by_kind
    detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else ""
    print(f"rows: {total.rows_ok} ok, {total.rows_error} error{detail}")
    for unit_id, info in sorted(failed.items()):
        print(f"failed unit {unit_id} after {info['attempts']} attempts: {info['reason']}")
    return EXIT_UNITS_FAILED if failed else EXIT_OK


def retry_failed(args: argparse.Namespace) -> int:
    """Re-run an output's failed units with the settings recorded in its manifest."""
    from blipbatch.pipeline.sink import failed_units, read_manifest

    settings = read_manifest(args.output)
    if settings is None:
        print(f"{args.output}: no blipbatch output here (no _manifest.json)", file=sys.stderr)
        return EXIT_REFUSED
    if not failed_units(args.output):
        print(f"{args.output}: no failed units")
        return EXIT_OK
    mapping, generation = settings["mapping"], settings["generation"]
    return execute(dict(
        input=settings["input"], output=args.output, model=settings["model"], prompt=settings["instructions"],
        instruction_column=mapping["instruction_column"], image_column=mapping["image_column"],
        id_column=mapping["id_column"], passthrough=mapping["passthrough"],
        max_new_tokens=generation["max_new_tokens"], num_beams=generation["num_beams"], generation=generation,
        rows_per_unit=settings["rows_per_unit"], batch_size=args.batch_size, decode_slots=args.decode_slots,
        workers=args.workers, max_attempts=args.max_attempts, address=args.address, retry_failed=True, progress=not args.quiet,
    ))


def make_report(args: argparse.Namespace) -> int:
    """Write the HTML report of an output; thumbnails are fetched under the spec's [fetch] and the flags' hosts/roots."""
    from blipbatch.jobs.report import ReportError, write_report
    from blipbatch.jobs.spec import SpecError, load_spec
    from blipbatch.pipeline.fetch import FetchConfig

    try:
        base = load_spec(args.spec).fetch if args.spec else FetchConfig()
        fetch = dataclasses.replace(base, allow_hosts=base.allow_hosts + tuple(args.allow_host),
                                    local_roots=base.local_roots + tuple(os.path.abspath(r) for r in args.local_root))
    except (SpecError, ValueError, OSError) as e:
        print(f"blipbatch report: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = write_report(args.output, args.html, sample=args.sample, fetch=fetch, seed=args.seed)
    except ReportError as e:
        print(f"blipbatch report: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"report of {args.output}: {path}")
    return EXIT_OK


def add_report_command(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="one self-contained HTML page about a run: summary, throughput, errors, a gallery",
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
    report.add_argument("--spec", help="job spec whose [fetch] settings fetch the thumbnails")
    report.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                        help="trust this private host or network for thumbnails, as [fetch] allow_hosts (repeatable)")
    report.add_argument("--local-root", action="append", default=[], metavar="DIR",
                        help="read local image files inside DIR, as [fetch] local_roots (repeatable)")
    report.set_defaults(handler=make_report)


def build_parser() -> argparse.ArgumentParser:
    from blipbatch import __version__

    parser = argparse.ArgumentParser(prog="blipbatch", description="Batch InstructBLIP / BLIP-2 inference.")
    parser.add_argument("--version", action="version", version=f"blipbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_command(commands)
    sub = commands.add_parser("submit", help="run a job spec on a Ray cluster through its Jobs API",
                              description="Upload the project as the job's working_dir, run `blipbatch run SPEC` "
                              "there, print the job id and follow its logs. Exit code: the job's (0 succeeded).")
    sub.add_argument("spec", help="job spec (TOML) inside the project folder")
    sub.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sub.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="spec overrides")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sub.set_defaults(handler=submit_job)
    demo_cmd = commands.add_parser("demo", help="a caption and an annotate job over the sample images",
                                   description="Runs on local Ray with a small model; writes Parquet to --output "
                                   "and prints a few rows.")
    demo_cmd.add_argument("--output", default="blipbatch-demo", help="where the demo writes (default ./blipbatch-demo)")
    demo_cmd.add_argument("--model", help="checkpoint to use instead of the built-in small model")
    demo_cmd.add_argument("--max-new-tokens", type=int, default=12)
    demo_cmd.set_defaults(handler=demo)
    train = commands.add_parser("train-demo", help="train the demo's small model on synthetic shapes (minutes on CPU)",
                                description="Trains the demo's small InstructBLIP (jobs/demo_data/shapes-instructblip) from a seed "
                                "on freshly drawn pictures of shapes, saves it (Hub layout) to --output and prints its "
                                "accuracy on new pictures.")
    train.add_argument("--output", default="shapes-instructblip", help="where to save (default ./shapes-instructblip)")
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--evaluate", type=int, default=200, help="pictures to measure accuracy on afterwards (0: none)")
    train.set_defaults(handler=train_demo)
    status = commands.add_parser("status", help="units done, failed and pending, and rows ok and in error, of an output",
                                 description="Exit code 0 when no unit failed, 1 when some did, 3 when OUTPUT is "
                                 "not a blipbatch output.")
    status.add_argument("output")
    status.set_defaults(handler=show_status)
    retry = commands.add_parser("retry-failed", help="re-run the failed units of an output with its recorded settings")
    retry.add_argument("output")
    retry.add_argument("--batch-size", type=int, default=8)
    retry.add_argument("--decode-slots", type=int, default=32)
    retry.add_argument("--workers", type=int)
    retry.add_argument("--max-attempts", type=int, default=3)
    retry.add_argument("--address")
    retry.add_argument("--quiet", action="store_true")
    retry.set_defaults(handler=retry_failed)
    add_report_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
