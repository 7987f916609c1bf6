"""`blipbatch submit`: run a job spec on a Ray cluster through the Ray Jobs API.

The job's working_dir is a staging copy of the `blipbatch` package plus the spec (as job.toml), so the
cluster runs exactly this code on exactly this spec. Paths inside a submitted spec must mean the same
on the cluster: URLs (s3://...) or absolute paths that exist there.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from blipbatch.errors import BlipbatchError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# import package -> its folder in the repository (pyproject.toml's package-dir)
PACKAGES = {
    "blipbatch": "blipbatch",
    "blipbatch/model": "model",
    "blipbatch/pipeline": "pipeline",
    "blipbatch/jobs": "jobs",
    "blipbatch/schemas": "schemas",
}
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
AGENT_WAIT_S = 180.0  # a cluster that has just started, on a busy machine, may take minutes to start its job agent


class SubmitError(BlipbatchError, RuntimeError):
    """The job could not be submitted (bad spec, cluster unreachable)."""


def stage(spec: Path, folder: Path) -> None:
    """The working_dir: the `blipbatch` package laid out as installed (without caches) and the spec."""
    for package, source in PACKAGES.items():
        shutil.copytree(PROJECT_ROOT / source, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(spec, folder / "job.toml")


def submit(spec: str, address: str, wait: bool = True, extra: list[str] | None = None) -> int:
    from ray.job_submission import JobSubmissionClient

    from blipbatch.jobs.spec import SpecError, load_spec, parse_override

    overrides = [f"--set={assignment}" for assignment in extra or []]
    try:
        load_spec(spec, dict(parse_override(a) for a in extra or []))  # refuse a bad spec here, not on the cluster
    except (SpecError, ValueError, OSError) as e:
        raise SubmitError(str(e)) from e
    entrypoint = shlex.join(
        [sys.executable if _same_machine(address) else "python", "-m", "blipbatch", "run", "job.toml", *overrides]
    )
    with tempfile.TemporaryDirectory(prefix="blipbatch-submit-") as folder:
        stage(Path(spec), Path(folder))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client = JobSubmissionClient(address)
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": folder})
                break
            except (ConnectionError, RuntimeError, ValueError) as e:
                # A cluster that has just started answers this until its job agent is up.
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise SubmitError(f"cannot submit to {address}: {e}") from e
    print(f"submitted job {job_id} to {address}", flush=True)
    if not wait:
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, poll_s: float = 1.0) -> int:
    """Print the job's log as it grows until the job ends; its exit code."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}")
            return TERMINAL[status]
        time.sleep(poll_s)


def _same_machine(address: str) -> bool:
    """A cluster on this machine runs our interpreter; elsewhere, the cluster's `python`."""
    return any(host in address for host in ("127.0.0.1", "localhost"))
