"""`pipeline.run`: caption or question every image of a set of Parquet shards, resumably."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import ray
from fsspec.implementations.local import LocalFileSystem

from blipbatch.model.engine import EngineConfig

from .coordinator import Progress, RunSummary, run_units
from .job import Job, PipelineError, job_from_keywords
from .lock import OutputLock
from .manifest import check_manifest, job_settings, read_manifest, record_run, record_used, write_manifest
from .preflight import check_model, check_output
from .prepare import PrepareConfig
from .redact import redact
from .resume import check_rewritten, plan_run, unfinished_shards
from .shards import WorkUnit, check_apart, check_unique_ids, discover_shards, plan_units
from .sink import committed_units, progress_records, write_file
from .template import TemplateError, check_columns, parse_all
from .webdataset import IndexCache
from .worker import FaultInjection, ModelWorker, WorkerConfig

__all__ = ["PipelineError", "connect_ray", "run", "run_job"]


MAX_TEMP_ROOT_CHARS = 24  # Ray's longest socket path adds about 80 characters to its temp folder's


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as after Ctrl-C: committed units kept, lock released."""


def _cpus_per_gpu() -> int:
    """The fewest CPUs per GPU of the cluster's live GPU nodes (8 when none is up yet: an autoscaler adds them)."""
    ratios = [
        int(node["Resources"].get("CPU", 0) // node["Resources"]["GPU"])
        for node in ray.nodes()
        if node.get("Alive") and node["Resources"].get("GPU")
    ]
    return min(ratios, default=8)


def gpu_actor_cpus(processes: int, cpus_per_gpu: int) -> int:
    """The Ray CPUs a GPU actor reserves, those it keeps busy: one per decode process, and one for the worker
    process's own fetching, hand-offs and stacking (about 1 ms of CPU an image beside a decode's 4.5:
    bench/RESULTS.md, "The feed"; a core at 1,000 images/s) where the GPU's share of its node has it."""
    return max(processes, min(processes + 1, cpus_per_gpu))


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); with neither, start Ray in-process with its own temp dir,
    removed when this process exits."""
    if ray.is_initialized():
        return
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's worker-log prefixes: no ANSI codes in log files
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray's notice that it made a token for this cluster is about a cluster of our own, on this machine and for this
    # process only: it would otherwise be the first line of every run's stderr.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    temp_dir = tempfile.mkdtemp(prefix="bb-ray-", dir=ray_temp_root())
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
        configure_logging=False,
        # Ray runs its workers at nice 15: beside any other busy process on the machine the model workers (the run's
        # whole work) got 1.8% of a core (measured): a 6-row run took 100 s at a load average of 5.
        _system_config={"worker_niceness": 0},
    )
    atexit.register(_remove_ray_temp, temp_dir)  # runs before Ray's own exit hook (atexit is last in, first out)


def ray_temp_root() -> str:
    """Where an in-process Ray's temp folder goes: $TMPDIR (Python's temp folder) when short enough, else /tmp: Ray's
    socket paths below it must fit in 107 bytes."""
    root = tempfile.gettempdir()
    return root if len(root) <= MAX_TEMP_ROOT_CHARS else "/tmp"


def _remove_ray_temp(temp_dir: str) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # at exit: a last Ctrl-C must not leave Ray running, its folder
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def run(
    job: Job | str | Sequence[str],
    output: str | None = None,
    model: str | None = None,
    *,
    force: bool = False,
    retry_failed: bool = False,
    redo_errors: Sequence[str] | None = None,
    progress: bool = True,
    **settings: Any,
) -> RunSummary:
    """Process every not-yet-committed work unit of the job's input into its output; returns what this run did.

    `job` is a Job (pipeline.job), or the input of the keyword form: `run(input, output, model, prompt=...,
    batch_size=..., ...)`, whose keywords are the fields of InputConfig, ModelConfig and RunConfig, `prompt`
    (one fixed instruction, several, or named questions {question_id: question}), `generation` (plus the shorthands
    max_new_tokens and num_beams), `fetch` and `decode`; each default is Job's.
    Running again over a finished output does nothing; resuming into an output made with other settings is refused
    unless `force`; `retry_failed` also redoes units marked failed; `redo_errors` (error kinds; empty: all) also
    redoes the error rows of those kinds of committed units, keeping their ok rows; a second run on an output
    another run holds is refused.
    """
    if isinstance(job, Job):
        if output is not None or model is not None or settings:
            raise TypeError("pipeline.run(job) takes no other settings: the Job holds them all")
    else:
        if output is None or model is None:
            raise TypeError("pipeline.run(input, output, model, ...) needs input, output and model")
        job = job_from_keywords(job, output, model, **settings)
    return run_job(job, force=force, retry_failed=retry_failed, redo_errors=redo_errors, progress=progress)


def run_job(
    job: Job,
    *,
    force: bool = False,
    retry_failed: bool = False,
    redo_errors: Sequence[str] | None = None,
    progress: bool = True,
    fault: FaultInjection | None = None,
) -> RunSummary:
    """pipeline.run for a Job; `fault` is the tests' crash hook (worker.FaultInjection)."""
    start = time.monotonic()
    output = job.output.path
    check_model(job.model.path)
    check_output(output)
    made = _folders_to_make(output)
    try:
        return _run_checked(
            job, start, force=force, retry_failed=retry_failed, redo_errors=redo_errors, progress=progress, fault=fault
        )
    except BaseException:
        _remove_if_left_empty(made)  # a run that cannot start (or is stopped while starting) leaves no folder behind
        raise


def _folders_to_make(output: str) -> list[str]:
    """The local folders, deepest first, that running into `output` makes (none on object stores)."""
    fs, root = fsspec.core.url_to_fs(output)
    if not isinstance(fs, LocalFileSystem):
        return []
    made = []
    while not os.path.exists(root):
        made.append(root)
        root = os.path.dirname(root)
    return made


def _remove_if_left_empty(made: Sequence[str]) -> None:
    """Remove the folders a run made if they hold no file (the lock is gone once released)."""
    if made and not any(files for _, _, files in os.walk(made[0])):
        shutil.rmtree(made[0], ignore_errors=True)
        for folder in made[1:]:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _run_checked(
    job: Job,
    start: float,
    *,
    force: bool,
    retry_failed: bool,
    redo_errors: Sequence[str] | None,
    progress: bool,
    fault: FaultInjection | None,
) -> RunSummary:
    output = job.output.path
    paths = job.input.paths
    check_apart(paths, output)
    tar_cache = IndexCache(output)
    units = plan_units(
        discover_shards(paths[0] if len(paths) == 1 else list(paths)),
        job.input.columns,
        job.run.rows_per_unit,
        tar_cache,
    )
    check_unique_ids(unfinished_shards(output, units), job.input.columns)
    check_template_columns(job, units)
    settings = job_settings(job).to_dict()
    started: list[bool] = []  # set once the workers are up
    with OutputLock(output) as lock:
        manifest = check_manifest(output, settings, force=force)
        plan = plan_run(output, units, retry_failed, redo_errors)
        if not force:
            check_rewritten(output, units, plan.committed)
        pending = plan.pending
        summary = RunSummary(
            output=output, units_total=len(units), units_skipped=plan.skipped, units_to_do=len(pending)
        )
        if not pending:
            print(
                f"nothing to do: all {len(units)} units of {output} are already committed or failed "
                "(--retry-failed redoes failed units, --redo-errors error rows)",
                file=sys.stderr,
            )
        else:
            config = WorkerConfig(
                engine=EngineConfig(
                    model=job.model.path,
                    dtype=job.model.dtype,
                    device=job.model.device,
                    quantize=job.model.quantize,
                    cuda_graphs=job.model.cuda_graphs,
                    generation=dict(job.generation),
                    decode_slots=job.run.decode_slots,
                ),
                mapping=job.input.columns,
                output=output,
                instructions=job.instructions,
                closed_sets=dict(job.closed_sets),
                batch_size=job.run.batch_size,
                fetch=job.fetch,
                decode=job.decode,
                fault=fault,
                max_instruction_bytes=job.run.max_instruction_bytes,
                prepare=PrepareConfig(threads=job.run.prepare_threads, decoded_bytes=job.run.decoded_bytes),
            )
            total_rows = plan.output_rows(job.rows_per_input_row)
            # The manifest is written once the workers are up, just before the first unit is handed out: a run
            # that cannot start leaves the output as it found it.

            def on_ready(used: dict[str, object]) -> None:
                if manifest != "matched":
                    write_manifest(output, settings)
                for name, data in tar_cache.new.items():  # the tars' scans, so the next run plans without them
                    write_file(f"{output.rstrip('/')}/{name}", data)
                record_used(output, used)
                started.append(True)

            run_on_ray(
                pending,
                config,
                summary,
                job,
                Progress(total_rows, sys.stderr) if progress else None,
                lock.maybe_renew,
                on_ready,
            )
            if summary.interrupted or summary.output_problem:
                recount(summary, plan.committed)
            summary.output_problem = summary.output_problem or output_losses(
                output, plan.committed | summary.committed_ids
            )
        if started:  # the report's headline time: the runs' wall time, start-up included
            wall_s = time.monotonic() - start
            try:
                record_run(output, time.time() - wall_s, wall_s, summary.rows)
            except OSError as e:  # a full disk: the summary says so already, or says this
                summary.output_problem = summary.output_problem or f"cannot record the run's time: {e.strerror or e}"
    summary.wall_s = time.monotonic() - start
    return summary


def output_losses(output: str, committed: set[str]) -> str | None:
    """What the output lost while the run wrote it (its folder deleted or moved, a lifecycle rule): its manifest, or
    units committed before or during the run; None when it has them all."""
    missing = committed - committed_units(output)
    manifest = read_manifest(output) is not None
    if not missing and manifest:
        return None
    lost = [f"{len(missing)} of its {len(committed)} committed units"] if missing else []
    lost += [] if manifest else ["its manifest"]
    return (
        f"the output lost {' and '.join(lost)} during the run (was the folder deleted or moved?): it does not hold "
        "what this summary counts; run the same command again to redo what is missing"
    )


def check_template_columns(job: Job, units: Sequence[WorkUnit]) -> None:
    """Refuse a prompt template naming a column some shard does not have, before any work."""
    templates = parse_all(job.instructions).values()
    for shard, schema in {unit.shard: unit.schema for unit in units if unit.schema is not None}.items():
        try:
            check_columns(templates, shard, schema.names)
        except TemplateError as e:
            raise PipelineError(str(e)) from None


def recount(summary: RunSummary, done_before: set[str]) -> None:
    """After an interrupt, count this run's units from the commit markers: a worker may have committed a unit
    whose answer the driver never read."""
    records = [r for r in progress_records(summary.output) if r.unit_id not in done_before]
    summary.units_done = len(records)
    summary.rows_ok = sum(r.rows_ok for r in records)
    summary.rows_error = sum(r.rows_error for r in records)
    kinds: dict[str, int] = {}
    for record in records:
        for kind, count in record.errors_by_kind.items():
            kinds[kind] = kinds.get(kind, 0) + count
    summary.errors_by_kind = kinds


@contextlib.contextmanager
def stop_signals_as_interrupt(summary: RunSummary) -> Iterator[None]:
    """While open (main thread only), the first SIGTERM raises Terminated, so a scheduler's stop ends the run as Ctrl-C
    does (summary.terminated says which), and the first SIGINT raises KeyboardInterrupt as usual; any later SIGINT or
    SIGTERM is ignored, so a second Ctrl-C cannot cut short the stopping (workers killed, Ray shut down). Entered after
    ray.init, which installs a SIGTERM handler that exits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        if signum == signal.SIGTERM:
            summary.terminated = True
            raise Terminated()
        raise KeyboardInterrupt()

    previous = {stop: signal.signal(stop, handler) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for stop, action in previous.items():
            signal.signal(stop, action)


class WorkerStartFailed(PipelineError):
    """A model worker could not start (a corrupt checkpoint, out of memory, ...); the message is the root cause."""


class StartingWorker(ModelWorker):
    """A ModelWorker whose start-up failure is the answer of ready(), not the actor's death: Ray prints a dead actor's
    creation traceback on the driver's stderr, where the run says the cause in one line instead."""

    def __init__(self, config: WorkerConfig, index: int = 0) -> None:
        self.failure: str | None = None
        try:
            super().__init__(config, index)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported by ready(), in one line
            self.failure = redact(f"{type(e).__name__}: {e}".splitlines()[0])

    def ready(self) -> str:
        if self.failure is not None:
            raise WorkerStartFailed(self.failure)
        return super().ready()


def wait_ready(handles: Sequence[Any]) -> list[str]:
    """Each worker's ready() answer; the first start-up failure as one PipelineError. Every answer is read, so Ray
    reports no error as unhandled."""
    devices, failures = [], []
    for ref in [handle.ready.remote() for handle in handles]:
        try:
            devices.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            failures.append(str(e.cause) if isinstance(e.cause, WorkerStartFailed) else _last_line(e))
        except ray.exceptions.RayActorError as e:
            failures.append(_last_line(e))
    if failures:
        raise PipelineError(f"the model workers could not start: {failures[0]}")
    return devices


def used_by(handles: Sequence[Any]) -> dict[str, object]:
    """The workers' count, and their batch size, decode slots and device: one value when all share it, else a list
    (one per worker)."""
    each = ray.get([handle.used.remote() for handle in handles])
    used: dict[str, object] = {"workers": len(each)}
    for key in ("batch_size", "decode_slots", "device"):
        values = [worker[key] for worker in each]
        used[key] = values[0] if len(set(values)) == 1 else values
    return used


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return redact(lines[-1] if lines else type(error).__name__)


def run_on_ray(
    pending: Sequence[WorkUnit],
    config: WorkerConfig,
    summary: RunSummary,
    job: Job,
    progress: Progress | None,
    heartbeat: Callable[[], None],
    on_ready: Callable[[dict[str, object]], None],
) -> None:
    """Start the model actors (one per GPU, or `workers`) and run the units on them; `on_ready` is called once
    they are up, before the first unit is handed out, with what they use (used_by). With `workers` "auto" on GPUs the
    pool is elastic: an actor more for each GPU that joins while units wait (up to `max_workers`), those on nodes
    that leave dropped."""
    connect_ray(job.run.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # device "cuda" asks for GPU actors even before any GPU node is up, so an autoscaler adds them.
    use_gpu = config.engine.device == "cuda" or (config.engine.device is None and gpus > 0)
    elastic = use_gpu and job.run.elastic
    limit = job.run.max_workers or sys.maxsize
    # not elastic: the number asked for ("auto" without GPUs: 1)
    count = min(gpus, limit) if elastic else (job.run.workers if isinstance(job.run.workers, int) else 1)
    if count < 1:
        raise PipelineError(
            "device is cuda but the cluster has no GPU yet: set --workers (run.workers) to the number of GPU actors"
        )
    if not use_gpu:
        # Ray gives a fractional-CPU actor OMP_NUM_THREADS=1, which would leave a CPU model on one core.
        cores = max(1, int(ray.cluster_resources().get("CPU", 1)) // count)
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, cpu_threads=cores))
    processes = job.run.decode_processes
    cpus: float
    if use_gpu:
        cpus_per_gpu = _cpus_per_gpu()
        processes = max(1, cpus_per_gpu - 1) if processes is None else processes
        cpus = gpu_actor_cpus(processes, cpus_per_gpu)
    else:
        processes = 1 if processes is None else processes  # on CPU the model itself uses the cores
        cpus = 0.5  # a CPU model takes a fraction of a core, so actors never starve Ray's other tasks
    config = dataclasses.replace(config, prepare=dataclasses.replace(config.prepare, processes=processes))
    actor = ray.remote(StartingWorker).options(
        num_gpus=1 if use_gpu else 0, num_cpus=cpus, max_restarts=-1, max_task_retries=0
    )
    if elastic and job.run.max_workers:
        # Ask an autoscaler (KubeRay's, the cluster launcher's) for the GPUs the run could use: the workers follow
        # the GPUs that join. Where nothing autoscales, Ray keeps the request and nothing happens.
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1, "CPU": cpus}] * min(limit, len(pending)))
    with stop_signals_as_interrupt(summary):
        handles = [actor.remote(config, index) for index in range(count)]

        def grow(live: int) -> list[Any]:
            """A model actor for each GPU that joined the cluster (within max_workers); the new ones are in
            `handles` too, so that they are stopped with the others."""
            target = min(int(ray.cluster_resources().get("GPU", 0)), limit)
            free = int(ray.available_resources().get("GPU", 0))  # GPUs another job holds are not for us to wait on
            new = [actor.remote(config, len(handles) + i) for i in range(max(min(target - live, free), 0))]
            handles.extend(new)
            return new

        try:
            devices = wait_ready(handles)
            on_ready(used_by(handles))
            if progress is not None:
                print(
                    f"{count} model worker(s) on {', '.join(sorted(set(devices)))}"
                    f"{' (more as GPUs join)' if elastic else ''}; {len(pending)} of {summary.units_total} units "
                    "to do",
                    file=sys.stderr,
                )
            run_units(
                pending,
                list(handles),
                summary,
                job.run.max_attempts,
                progress=progress,
                heartbeat=heartbeat,
                grow=grow if elastic else None,
            )
        finally:
            for handle in handles:
                ray.kill(handle)  # type: ignore[arg-type]  # ray types .remote() ActorHandle | type; it is a handle
            if elastic and job.run.max_workers:
                request_resources(bundles=[])  # the run's demand ends with it: idle GPU nodes may go
