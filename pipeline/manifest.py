"""The output's manifest, `_manifest.json`: the job an output was made with, so a resume can be checked against it
and `status`, `report` and `retry-failed` can repeat it without flags.

File: {"version": 2, "fingerprint": ..., "settings": schemas.JobSettings, "written_at": ...}; files written before
versioning lack "version" and read as version 1 (schemas.manifest). Which settings a resume may change is the one
list RESUME_MAY_CHANGE; every other setting must match, unless forced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from blipbatch.errors import BlipbatchError
from blipbatch.model.candidates import ClosedSet
from blipbatch.schemas import MANIFEST_VERSION, ColumnMapping, JobSettings

from .decode import DecodeConfig
from .fetch import FetchConfig
from .job import InputConfig, Instructions, Job, ModelConfig, OutputConfig, RunConfig
from .redact import redact
from .sink import _json_bytes, _now, _open_root, _qualify, _write_whole

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"

# Settings a resume may change without --force: they decide how rows are fetched and scheduled, and whether an image
# is fetched or refused at all, but not what an ok row's text means. Every other setting (input, model, dtype,
# instructions, column mapping, generation, rows per unit) must match the manifest.
RESUME_MAY_CHANGE = frozenset({"fetch", "decode", "device", "run", "version"})
# Settings that must match but version 1 manifests did not record.
_ADDED_IN_V2 = frozenset({"dtype", "quantize"})
# Mapping fields added after version 2 (templates, WebDataset input): recorded only when not at their default.
_MAPPING_ADDED_LATER = frozenset({"missing", "format", "image_extension"})
# Run settings recorded; the Ray address is where, not what, and is left out.
_RECORDED_RUN = (
    "workers",
    "max_workers",
    "batch_size",
    "decode_slots",
    "prepare_threads",
    "decoded_bytes",
    "decode_processes",
    "max_attempts",
    "max_error_rate",
    "max_instruction_bytes",
    "max_candidates",
)


def _canonical_json(settings: Mapping) -> str:
    try:
        return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job settings must be plain JSON values (str, number, bool, None, list, dict): {exc}") from exc


def _fixed(settings: Mapping) -> dict:
    return {key: value for key, value in settings.items() if key not in RESUME_MAY_CHANGE}


def fingerprint(settings: Mapping) -> str:
    """A stable hash of the settings that must match on resume: key order and tuple-vs-list do not matter."""
    return hashlib.sha256(_canonical_json(_fixed(settings)).encode()).hexdigest()[:16]


def _recorded_mapping(columns: ColumnMapping) -> dict[str, Any]:
    """The mapping's fields, less those added after manifest version 2 while they hold their default: an output
    made before them records none, and resumes."""
    defaults = {f.name: f.default for f in dataclasses.fields(ColumnMapping)}
    return {
        name: value
        for name, value in dataclasses.asdict(columns).items()
        if name not in _MAPPING_ADDED_LATER or value != defaults[name]
    }


def job_settings(job: Job) -> JobSettings:
    """What the manifest records of `job`: plain JSON values, credentials in URLs redacted."""
    paths = [redact(p) for p in job.input.paths]
    return JobSettings(
        input=paths[0] if len(paths) == 1 else paths,
        model=redact(job.model.path),
        instructions=job.instructions
        if isinstance(job.instructions, dict)
        else (None if job.instructions is None else list(job.instructions)),
        mapping=_recorded_mapping(job.input.columns),
        generation=dict(job.generation),
        rows_per_unit=job.run.rows_per_unit,
        dtype=job.model.dtype,
        quantize=job.model.quantize,
        device=job.model.device,
        fetch=dataclasses.asdict(job.fetch),
        decode=dataclasses.asdict(job.decode),
        run={name: getattr(job.run, name) for name in _RECORDED_RUN},
        closed_sets={name: closed.to_dict() for name, closed in job.closed_sets.items()} or None,
    )


def _tuples(fields: dict[str, Any] | None) -> dict[str, Any]:
    """A config's fields as JSON read them back, arrays as the tuples the frozen configs hold."""
    return {name: tuple(value) if isinstance(value, list) else value for name, value in (fields or {}).items()}


def recorded_fetch(settings: JobSettings) -> FetchConfig:
    """How the output's images were fetched (defaults for a version 1 manifest, which did not record it)."""
    return FetchConfig(**_tuples(settings.fetch))


def recorded_job(settings: JobSettings, output: str) -> Job:
    """The Job an output was made with, from its manifest; settings a version 1 manifest lacks take their defaults."""
    run = dict(settings.run or {})
    # InputConfig and Job normalize the recorded JSON (a str or a list of paths, a list of prompts, closed sets as
    # {"candidates", "scoring"}) in __post_init__, a conversion a dataclass field's type cannot state
    return Job(
        input=InputConfig(paths=cast(tuple[str, ...], settings.input), **settings.mapping),
        output=OutputConfig(output),
        model=ModelConfig(settings.model, dtype=settings.dtype, device=settings.device, quantize=settings.quantize),
        instructions=cast(Instructions | None, settings.instructions),
        generation=settings.generation,
        fetch=recorded_fetch(settings),
        decode=DecodeConfig(**_tuples(settings.decode)),
        run=RunConfig(rows_per_unit=settings.rows_per_unit, **run),
        closed_sets=cast(dict[str, ClosedSet], settings.closed_sets or {}),
    )


class ManifestError(BlipbatchError, ValueError):
    """A manifest that exists but cannot be read as one."""


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _differences(old: object, new: object, path: str = "") -> dict[str, tuple[object, object]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, tuple[object, object]] = {}
        for key in sorted(set(old) | set(new)):
            found.update(_differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else key))
        return found
    return {} if old == new else {path or "(settings)": (old, new)}


class ManifestMismatch(BlipbatchError, RuntimeError):
    """An output folder made with other settings than the job now running."""

    def __init__(self, output_root: str, differences: dict[str, tuple[object, object]]):
        self.output_root = output_root
        self.differences = differences
        lines = [f"  {key}: was {old!r}, now {new!r}" for key, (old, new) in differences.items()]
        super().__init__(
            f"{output_root} was written with other settings:\n"
            + "\n".join(lines)
            + "\nUse a new output location, or --force to adopt the new settings (rows already committed keep the "
            "settings recorded in their model/generation columns)."
        )


def _stored(output_root: str) -> object:
    """The manifest file's "settings" as JSON; _ABSENT when there is none, {} when it cannot be read as one."""
    fs, root = _open_root(output_root)
    path = f"{root}/{MANIFEST}"
    fs.invalidate_cache(path)
    try:
        stored = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return _ABSENT
    except ValueError:  # not JSON (or not UTF-8): settings we cannot vouch for
        return {}
    return stored.get("settings", {}) if isinstance(stored, dict) else {}


def _comparable(previous: object, current: dict) -> dict:
    """The settings of `current` to compare: those a version 1 manifest did not record are unknown, not different."""
    fixed = _fixed(current)
    if isinstance(previous, dict) and "version" not in previous and "version" in current:
        fixed = {k: v for k, v in fixed.items() if k in previous or k not in _ADDED_IN_V2}
    if isinstance(previous, dict):  # a setting recorded since, unused now (None), is no difference from its absence
        fixed = {k: v for k, v in fixed.items() if k in previous or v is not None}
    return fixed


def check_manifest(output_root: str, settings: Mapping, force: bool = False) -> str:
    """How the output's manifest stands to `settings`, writing nothing: "created" (none yet), "matched",
    "updated" (only settings of RESUME_MAY_CHANGE differ) or "replaced" (force). Other differences, or a manifest
    that cannot be read, raise ManifestMismatch naming each differing setting, unless force."""
    current = json.loads(_canonical_json(settings))  # tuples -> lists, as they will read back
    previous = _stored(output_root)
    if previous is _ABSENT:
        return "created"
    if previous == current:
        return "matched"
    differences = _differences(
        _fixed(previous) if isinstance(previous, dict) else previous, _comparable(previous, current)
    )
    if not differences:
        return "updated"
    if not force:
        fs, root = _open_root(output_root)
        raise ManifestMismatch(_qualify(fs, root), differences)
    log.warning("%s: manifest replaced by force; differences: %s", output_root, differences)
    return "replaced"


def write_manifest(output_root: str, settings: Mapping) -> None:
    """Write the manifest whole (it replaces any earlier one)."""
    fs, root = _open_root(output_root)
    current = json.loads(_canonical_json(settings))
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint(current),
        "settings": current,
        "written_at": _now(),
    }
    _write_whole(fs, f"{root}/{MANIFEST}", _json_bytes(manifest))


def record_used(output_root: str, used: Mapping[str, Any]) -> None:
    """Add to the manifest what the run's workers actually use (`used`: workers, batch size, decode slots, devices;
    a default such as batch size "from memory on CUDA" resolved), beside the settings asked for; written whole."""
    fs, root = _open_root(output_root)
    path = f"{root}/{MANIFEST}"
    fs.invalidate_cache(path)
    manifest = json.loads(fs.cat_file(path))
    manifest["used"] = json.loads(_canonical_json(used))
    _write_whole(fs, path, _json_bytes(manifest))


RUNS_DIR = "_runs"  # one small JSON per run that did work: when it started, its wall time (start-up included), rows


def record_run(output_root: str, started_at: float, wall_s: float, rows: int) -> None:
    """Record a run's wall time as its summary prints it (from the call, start-up included), for the report."""
    fs, root = _open_root(output_root)
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started_at))}-{uuid.uuid4().hex[:8]}.json"
    _write_whole(
        fs, f"{root}/{RUNS_DIR}/{name}", _json_bytes({"started_at": started_at, "wall_s": wall_s, "rows": rows})
    )


def recorded_runs(output_root: str) -> list[dict[str, Any]]:
    """The runs record_run wrote, oldest first (none for outputs written before runs were recorded)."""
    fs, root = _open_root(output_root)
    folder = f"{root}/{RUNS_DIR}"
    fs.invalidate_cache(folder)
    try:
        paths = sorted(fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    runs = []
    for path in paths:
        try:
            run = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # unreadable: left out of the report's times, which say how many runs they count
        if isinstance(run, dict) and isinstance(run.get("wall_s"), (int, float)):
            runs.append(run)
    return runs


def read_used(output_root: str) -> dict[str, Any] | None:
    """What the last run's workers used, as record_used wrote it; None when not recorded."""
    fs, root = _open_root(output_root)
    try:
        manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except (FileNotFoundError, ValueError):
        return None
    return manifest.get("used") if isinstance(manifest, dict) else None


def ensure_manifest(output_root: str, settings: Mapping, force: bool = False) -> str:
    """check_manifest, then write the manifest unless it matched; returns check_manifest's answer."""
    state = check_manifest(output_root, settings, force)
    if state != "matched":
        write_manifest(output_root, settings)
    return state


def read_manifest(output_root: str) -> JobSettings | None:
    """The settings the output was made with, any manifest version; None when the output has no manifest."""
    stored = _stored(output_root)
    if stored is _ABSENT:
        return None
    try:
        return JobSettings.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{output_root}/{MANIFEST}: not a blipbatch manifest ({e})") from None
