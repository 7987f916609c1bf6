"""`pipeline.run`: caption or question every image of a set of Parquet shards, resumably."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray

from blipbatch.model.engine import EngineConfig
from blipbatch.schemas import ColumnMapping

from .coordinator import Progress, RunSummary, run_units
from .decode import DecodeConfig
from .fetch import FetchConfig
from .lock import OutputLock
from .shards import WorkUnit, discover_shards, plan_units
from .sink import committed_units, ensure_manifest, failed_units
from .worker import FaultInjection, ModelWorker, WorkerConfig
from blipbatch.errors import BlipbatchError


class PipelineError(BlipbatchError, ValueError):
    """A run that cannot start: contradictory or missing settings."""


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); with neither, start Ray in-process with its own temp dir."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A short path: Ray's socket names must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="bb-ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=True, configure_logging=False)


def fixed_instructions(prompt: str | Sequence[str] | Mapping[str, str] | None) -> tuple[str, ...] | dict[str, str] | None:
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


def run(
    input: str | Sequence[str],
    output: str,
    model: str,
    *,
    prompt: str | Sequence[str] | Mapping[str, str] | None = None,
    instruction_column: str | None = None,
    image_column: str = "image_url",
    id_column: str | None = None,
    passthrough: Sequence[str] = (),
    batch_size: int = 8,
    decode_slots: int = 32,
    workers: int | None = None,
    max_new_tokens: int = 30,
    num_beams: int = 1,
    generation: dict[str, Any] | None = None,
    dtype: str | None = None,
    device: str | None = None,
    rows_per_unit: int = 1000,
    max_attempts: int = 3,
    fetch: FetchConfig | None = None,
    decode: DecodeConfig | None = None,
    address: str | None = None,
    force: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    fault: FaultInjection | None = None,
) -> RunSummary:
    """Process every not-yet-committed work unit of `input` into `output`; returns what this run did.

    Exactly one of `prompt` (one fixed instruction, several, or named questions {question_id: question}
    asked of every image; named ones add a `question_id` column) and `instruction_column` (one
    instruction per row) says what to ask. Several questions about one image share its vision pass.
    Running again over a finished output does nothing; resuming into an output made with other
    settings is refused unless `force`; a second run on an output another run holds is refused.
    """
    start = time.monotonic()
    if (prompt is None) == (instruction_column is None):
        raise PipelineError("give exactly one of prompt (a fixed instruction) and instruction_column")
    instructions = fixed_instructions(prompt)
    if min(batch_size, decode_slots, rows_per_unit, max_attempts) < 1:
        raise PipelineError("batch_size, decode_slots, rows_per_unit and max_attempts must be at least 1")
    settings = {"max_new_tokens": max_new_tokens, "num_beams": num_beams} | (generation or {})
    mapping = ColumnMapping(image_column=image_column, id_column=id_column,
                            instruction_column=instruction_column, passthrough=tuple(passthrough))

    units = plan_units(discover_shards(input), mapping, rows_per_unit)
    with OutputLock(output) as lock:
        ensure_manifest(output, {
            "input": input, "model": model, "instructions": instructions,
            "mapping": dataclasses.asdict(mapping), "generation": settings, "rows_per_unit": rows_per_unit,
        }, force=force)
        done = committed_units(output)
        skip = done if retry_failed else done | set(failed_units(output))
        pending = [unit for unit in units if unit.unit_id not in skip]
        summary = RunSummary(output=output, units_total=len(units), units_skipped=len(units) - len(pending))
        if not pending:
            print(f"nothing to do: all {len(units)} units of {output} are already committed or failed "
                  "(use retry_failed to redo failed units)", file=sys.stderr)
        else:
            config = WorkerConfig(
                engine=EngineConfig(model=model, dtype=dtype, device=device, generation=settings,
                                    decode_slots=decode_slots),
                mapping=mapping, output=output, instructions=instructions, batch_size=batch_size,
                fetch=fetch or FetchConfig(), decode=decode or DecodeConfig(), fault=fault,
            )
            total_rows = sum(u.num_rows for u in pending) * (len(instructions) if instructions else 1)
            run_on_ray(pending, config, summary, workers, address, max_attempts,
                       Progress(total_rows) if progress else None, lock.maybe_renew)
    summary.wall_s = time.monotonic() - start
    return summary


def run_on_ray(
    pending: Sequence[WorkUnit],
    config: WorkerConfig,
    summary: RunSummary,
    workers: int | None,
    address: str | None,
    max_attempts: int,
    progress: Progress | None,
    heartbeat: Callable[[], None],
) -> None:
    """Start the model actors (one per GPU, or `workers`) and run the units on them."""
    connect_ray(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # device "cuda" asks for GPU actors even before any GPU node is up, so an autoscaler adds them.
    use_gpu = config.engine.device == "cuda" or (config.engine.device is None and gpus > 0)
    count = workers or (gpus if use_gpu else 1)
    if count < 1:
        raise PipelineError("device is cuda but the cluster has no GPU yet: set workers to the number of GPU actors")
    if not use_gpu:
        # Ray gives a fractional-CPU actor OMP_NUM_THREADS=1, which would leave a CPU model on one core.
        cores = max(1, int(ray.cluster_resources().get("CPU", 1)) // count)
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, cpu_threads=cores))
    # One GPU per actor; on CPU a fraction of a core, so actors never starve Ray's other tasks.
    actor = ray.remote(ModelWorker).options(
        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 0.5, max_restarts=-1, max_task_retries=0
    )
    handles = [actor.remote(config, index) for index in range(count)]
    try:
        try:
            devices = ray.get([handle.ready.remote() for handle in handles])
        except ray.exceptions.RayActorError as e:
            raise PipelineError(f"the model workers could not start: {e}") from e
        if progress is not None:
            print(f"{count} model worker(s) on {', '.join(sorted(set(devices)))}; {len(pending)} of "
                  f"{summary.units_total} units to do", file=sys.stderr)
        run_units(pending, handles, summary, max_attempts, progress=progress, heartbeat=heartbeat)
    finally:
        for handle in handles:
            ray.kill(handle)
