"""The `blipbatch` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# Exit codes scripts can rely on.
EXIT_OK, EXIT_UNITS_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def execute(kwargs: dict[str, Any]) -> int:
    """pipeline.run(**kwargs), its summary printed, its outcome as an exit code."""
    import pipeline
    from pipeline.coordinator import WorkerLost
    from pipeline.lock import OutputLocked
    from pipeline.shards import NoShardsError, ShardError
    from pipeline.sink import ManifestMismatch
    from schemas import SchemaError

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
    "workers": "run.workers", "max_new_tokens": "generation.max_new_tokens", "num_beams": "generation.num_beams",
    "dtype": "model.dtype", "device": "model.device", "rows_per_unit": "run.rows_per_unit",
    "max_attempts": "run.max_attempts", "address": "run.address",
}
FLAG_DEFAULTS = {"image_column": "image_url", "passthrough": [], "batch_size": 8, "max_new_tokens": 30,
                 "num_beams": 1, "rows_per_unit": 1000, "max_attempts": 3}


def run_pipeline(args: argparse.Namespace) -> int:
    """`run SPEC [flags]`: the spec with the given flags overriding it; `run --input ... [flags]`: flags only."""
    from jobs.kinds import WideTableError, finish_job
    from jobs.spec import SpecError, load_spec, parse_override, run_kwargs

    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    if isinstance(flags["input"], list) and len(flags["input"]) == 1:
        flags["input"] = flags["input"][0]
    invocation = dict(force=args.force, retry_failed=args.retry_failed, progress=not args.quiet)
    if args.spec is None:
        missing = [f"--{name}" for name in ("input", "output", "model") if flags[name] is None]
        if missing or (flags["prompt"] is None) == (flags["instruction_column"] is None):
            print("blipbatch run: give a job spec file, or --input, --output, --model and one of --prompt / "
                  f"--instruction-column{' (missing: ' + ', '.join(missing) + ')' if missing else ''}", file=sys.stderr)
            return EXIT_USAGE
        if args.set:
            print("blipbatch run: --set needs a job spec file", file=sys.stderr)
            return EXIT_USAGE
        return execute({k: FLAG_DEFAULTS.get(k) if v is None else v for k, v in flags.items()} | invocation)
    try:
        overrides = {FLAG_KEYS[name]: value for name, value in flags.items() if value is not None}
        overrides |= dict(parse_override(assignment) for assignment in args.set)
        spec = load_spec(args.spec, overrides)
    except (SpecError, ValueError, OSError) as e:
        print(f"blipbatch run: {e}", file=sys.stderr)
        return EXIT_REFUSED
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
    run.set_defaults(handler=run_pipeline)


def submit_job(args: argparse.Namespace) -> int:
    from jobs.submit import SubmitError, submit

    try:
        return submit(args.spec, args.address, wait=not args.no_wait, extra=args.set)
    except SubmitError as e:
        print(f"blipbatch submit: {e}", file=sys.stderr)
        return EXIT_REFUSED


def demo(args: argparse.Namespace) -> int:
    from jobs.demo import main_demo

    return main_demo(args.output, args.model, args.max_new_tokens)


def train_demo(args: argparse.Namespace) -> int:
    from jobs.train import main_train

    return main_train(args.output, args.steps, args.seed, args.evaluate)


def show_status(args: argparse.Namespace) -> int:
    from pipeline.shards import discover_shards, plan_units
    from pipeline.sink import committed_units, failed_units, progress_records, read_manifest
    from schemas import ColumnMapping

    settings = read_manifest(args.output)
    if settings is None:
        print(f"{args.output}: no blipbatch output here (no _manifest.json)", file=sys.stderr)
        return EXIT_REFUSED
    done, failed = committed_units(args.output), failed_units(args.output)
    records = progress_records(args.output)
    print(f"output: {args.output}")
    print(f"model: {settings['model']}")
    try:
        units = plan_units(discover_shards(settings["input"]), ColumnMapping(**settings["mapping"]),
                           settings["rows_per_unit"])
        pending = len([u for u in units if u.unit_id not in done and u.unit_id not in failed])
        print(f"input: {settings['input']} ({len(units)} units)")
    except (OSError, ValueError) as e:  # the input moved or is unreachable from here: say so, show the rest
        pending = None
        print(f"input: {settings['input']} (cannot list it: {e})")
    print(f"units: {len(done)} done, {len(failed)} failed, "
          f"{'unknown' if pending is None else pending} pending")
    rows_ok = sum(r.rows_ok for r in records)
    rows_error = sum(r.rows_error for r in records)
    kinds: dict[str, int] = {}
    for record in records:
        for kind, count in record.errors_by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + count
    detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else ""
    print(f"rows: {rows_ok} ok, {rows_error} error{detail}")
    for unit_id, info in sorted(failed.items()):
        print(f"failed unit {unit_id} after {info['attempts']} attempts: {info['reason']}")
    return EXIT_UNITS_FAILED if failed else EXIT_OK


def retry_failed(args: argparse.Namespace) -> int:
    """Re-run an output's failed units with the settings recorded in its manifest."""
    from pipeline.sink import failed_units, read_manifest

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
        rows_per_unit=settings["rows_per_unit"], batch_size=args.batch_size, workers=args.workers,
        max_attempts=args.max_attempts, address=args.address, retry_failed=True, progress=not args.quiet,
    ))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipbatch", description="Batch InstructBLIP / BLIP-2 inference.")
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
                                description="Trains the small InstructBLIP of models/shapes-instructblip from a seed "
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
    retry.add_argument("--workers", type=int)
    retry.add_argument("--max-attempts", type=int, default=3)
    retry.add_argument("--address")
    retry.add_argument("--quiet", action="store_true")
    retry.set_defaults(handler=retry_failed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
