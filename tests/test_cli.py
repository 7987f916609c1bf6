"""The `blipbatch` command line: demo, run with a spec, usage errors, submit to a real Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import write_tiny_checkpoint

from blipbatch.jobs.cli import EXIT_REFUSED, EXIT_USAGE, build_parser, main
from blipbatch.jobs.demo import SAMPLE_IMAGES
from blipbatch.jobs.submit import AGENT_WAIT_S
from blipbatch.pipeline.sink import read_output
from tests.conftest import RAY_NODE_ENV, agent_port_flags, free_port, ray_bin, stop_cluster

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted(SAMPLE_IMAGES.glob("*.png"))


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blipbatch", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_demo_runs_a_caption_and_an_annotate_job(tmp_path):
    result = cli("demo", "--output", str(tmp_path / "demo"), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "shapes-instructblip" in result.stdout and "RANDOM" not in result.stdout
    assert f"== captions job: {len(IMAGES)} rows ok, 0 in error" in result.stdout
    assert f"== annotations job: {3 * len(IMAGES)} rows ok, 0 in error" in result.stdout
    wide = pq.read_table(tmp_path / "demo" / "annotations.wide.parquet")
    assert wide.num_rows == len(IMAGES) and {"color", "shape", "count"} <= set(wide.column_names)
    # the command it suggests writes a report that knows the run is complete (the demo keeps its input)
    suggested = result.stdout.strip().splitlines()[-1].split("blipbatch ", 1)[1].split()
    page = tmp_path / "report.html"
    report = cli(*suggested, "--html", str(page))
    assert report.returncode == 0, report.stderr
    assert "Finished: all 1 units committed." in page.read_text()


def test_usage_errors(capsys):
    assert main(["run", "--input", "x"]) == EXIT_USAGE
    assert "missing: --output, --model" in capsys.readouterr().err
    assert cli("frobnicate").returncode == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("run", "submit", "status", "retry-failed", "demo"))


def test_bad_spec_is_refused_with_file_and_line(tmp_path, capsys):
    spec = tmp_path / "job.toml"
    spec.write_text(
        '[job]\nkind = "caption"\n[input]\npath = "in"\n[output]\npath = "out"\n[model]\npath = "m"\n'
        "[generation]\nnum_beam = 3\n"
    )
    assert main(["run", str(spec)]) == EXIT_REFUSED
    assert f"{spec}:10: [generation] num_beam: unknown key; did you mean num_beams?" in capsys.readouterr().err


def test_every_example_spec_parses_with_overrides(tmp_path):
    for spec in sorted((REPO / "examples").glob("*.toml")):
        args = build_parser().parse_args(["run", str(spec), "--batch-size", "4", "--set", "run.max_attempts=2"])
        assert args.spec == str(spec) and args.batch_size == 4


def write_job(tmp_path: Path, checkpoint: Path, kind: str = "annotate") -> Path:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_url": [str(p) for p in IMAGES] * 2}), tmp_path / "in" / "part.parquet")
    spec = tmp_path / "job.toml"
    spec.write_text(f"""
[job]
kind = "{kind}"
[input]
path = "{tmp_path / "in"}"
[output]
path = "{tmp_path / "out"}"
wide = true
[model]
path = "{checkpoint}"
device = "cpu"
[questions]
color = "What color is the shape?"
shape = "What shape is it?"
[generation]
max_new_tokens = 3
[run]
batch_size = 4
rows_per_unit = 6
[fetch]
local_roots = ["{SAMPLE_IMAGES}"]
""")
    return spec


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture
def ray_cluster(tmp_path):
    """A real `ray start --head` cluster on 127.0.0.1 with free ports, stopped afterwards."""
    port, dashboard = free_port(), free_port()
    env = {**os.environ, **RAY_NODE_ENV}
    temp = Path("/tmp") / f"bb-cluster-{os.getpid()}"
    start = subprocess.run(
        [
            ray_bin(),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            f"--ray-client-server-port={free_port()}",
            *agent_port_flags(),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_jobs_api(address)
        yield address
    finally:
        stop_cluster(str(temp))


def wait_for_jobs_api(address: str, timeout: float = AGENT_WAIT_S) -> None:
    """Until Ray's Jobs API answers (JobSubmissionClient checks the dashboard's version), as long as `submit` itself
    waits for a new cluster's job agent: Ray's own readiness, not a guess at how long a busy machine takes."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(address)
            return
        except ConnectionError as e:
            if time.monotonic() > deadline:
                pytest.fail(f"Ray's Jobs API at {address} did not answer within {timeout:.0f} s: {e}")
            time.sleep(0.5)


def test_submit_to_a_real_cluster(tmp_path, checkpoint, ray_cluster):
    spec = write_job(tmp_path, checkpoint)
    started = time.monotonic()
    result = cli("submit", str(spec), "--address", ray_cluster, env={"RAY_AUTH_MODE": "disabled"}, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted job" in result.stdout and "SUCCEEDED" in result.stdout
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 2 * 2 * len(IMAGES) and all(row["status"] == "ok" for row in rows)
    assert (tmp_path / "out.wide.parquet").exists()
    assert time.monotonic() - started < 400


def test_run_spec_locally_then_status(tmp_path, checkpoint):
    spec = write_job(tmp_path, checkpoint, kind="annotate")
    result = cli("run", str(spec), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"rows: {4 * len(IMAGES)} ok, 0 error" in result.stdout
    assert "wide table:" in result.stdout
    status = cli("status", str(tmp_path / "out"))
    assert status.returncode == 0 and "0 failed, 0 pending" in status.stdout
