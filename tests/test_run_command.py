"""`blipbatch run` as a scheduler and a new user meet it: early one-line refusals, exit 4 with the fix named, SIGTERM,
flags-only runs with --local-root, and the recorded job that status, report and retry-failed reuse without flags.
Real subprocesses and in-process Ray, the shipped demo model and sample images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipbatch.jobs.cli import (
    EXIT_ERROR_RATE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TERMINATED,
    build_parser,
    flag_overrides,
    main,
)
from blipbatch.jobs.demo import DEMO_MODEL, SAMPLE_IMAGES
from blipbatch.jobs.spec import load_spec
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.job import job_from_keywords
from blipbatch.pipeline.lock import LOCK_NAME, OutputLock
from blipbatch.pipeline.manifest import read_manifest
from blipbatch.pipeline.run import gpu_actor_cpus, run_job
from blipbatch.pipeline.shards import discover_shards, plan_units
from blipbatch.pipeline.sink import failed_units, read_output
from blipbatch.pipeline.worker import FaultInjection
from blipbatch.schemas import ColumnMapping

IMAGES = sorted(str(p) for p in SAMPLE_IMAGES.glob("*.png"))
ANSI = "\x1b["


def write_input(folder: Path, copies: int = 1, row_group: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image_url": IMAGES * copies, "name": [Path(p).stem for p in IMAGES] * copies})
    pq.write_table(table, folder / "part.parquet", row_group_size=row_group)
    return folder


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blipbatch", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


def flags(source: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        str(source),
        "--output",
        str(output),
        "--model",
        str(DEMO_MODEL),
        "--prompt",
        "What color is the shape?",
        "--max-new-tokens",
        "3",
        "--quiet",
        *extra,
    ]


# --- refused before Ray starts, in one line, leaving nothing behind -------------------------------------------------


def test_wrong_model_path_is_one_line_exit_3_and_no_manifest(tmp_path, capsys):
    source, output = write_input(tmp_path / "in"), tmp_path / "out"
    started = time.monotonic()
    assert main(flags(source, output)[:5] + ["--model", str(tmp_path / "no-such-model"), "--prompt", "x"]) == 3
    assert time.monotonic() - started < 3.0
    err = capsys.readouterr().err.strip()
    assert err == f"blipbatch: model: checkpoint folder {tmp_path / 'no-such-model'} does not exist"
    assert not output.exists()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert main(flags(source, output)[:5] + ["--model", str(tmp_path / "llama"), "--prompt", "x"]) == 3
    assert "has model_type 'llama'; blipbatch runs blip-2 and instructblip checkpoints" in capsys.readouterr().err
    # the same from a fresh process, imports included: one line on stderr, no ANSI codes, no traceback, in under 3 s
    started = time.monotonic()
    result = cli(*flags(source, output)[:5], "--model", str(tmp_path / "no-such-model"), "--prompt", "x", cwd=tmp_path)
    assert time.monotonic() - started < 3.0
    assert result.returncode == EXIT_REFUSED
    assert result.stderr.strip().count("\n") == 0 and ANSI not in result.stderr, result.stderr
    assert not output.exists()


def test_the_early_checks_import_neither_torch_nor_ray(tmp_path):
    # What keeps a refusal fast (torch alone takes seconds to import on a busy machine).
    source, output = write_input(tmp_path / "in"), tmp_path / "out"
    argv = [*flags(source, output)[:5], "--model", str(tmp_path / "no-such-model"), "--prompt", "x"]
    probe = (
        "import sys; from blipbatch.jobs.cli import main; code = main(sys.argv[1:]); "
        "print(code, sorted({'torch', 'ray'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.stdout.split("\n")[0] == f"{EXIT_REFUSED} []", (result.stdout, result.stderr)


def test_output_that_is_a_file_is_one_line_exit_3(tmp_path, capsys):
    source = write_input(tmp_path / "in")
    (tmp_path / "taken").write_text("not a folder")
    assert main(flags(source, tmp_path / "taken")) == EXIT_REFUSED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blipbatch: output: {tmp_path / 'taken'} is a file; give a folder (it is made if missing)"]
    assert main(flags(source, tmp_path / "taken" / "below")) == EXIT_REFUSED
    assert "is a file, so" in capsys.readouterr().err


def test_a_worker_that_cannot_start_is_one_line_and_leaves_no_manifest(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in DEMO_MODEL.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (broken / "qformer_tokenizer").symlink_to(DEMO_MODEL / "qformer_tokenizer")
    source, output = write_input(tmp_path / "in"), tmp_path / "new" / "out"
    result = cli(*flags(source, output)[:5], "--model", str(broken), "--prompt", "x", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("blipbatch: the model workers could not start: "), result.stderr
    assert "Traceback" not in result.stderr and ANSI not in result.stderr
    assert not (tmp_path / "new").exists()  # no manifest, and no folder: the run removes the folders it made


# --- flags ----------------------------------------------------------------------------------------------------------


def test_redo_errors_before_the_spec_leaves_the_spec_a_spec(tmp_path, capsys):
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'[job]\nkind = "caption"\n[input]\npath = "{write_input(tmp_path / "in")}"\n'
        f'[output]\npath = "{tmp_path / "out"}"\n[model]\npath = "{tmp_path / "no-such-model"}"\n'
    )
    for redo in ([], ["blocked_address"], ["blocked_address", "fetch_http"]):
        # the spec was read: the refusal is about its model path, not a missing spec or an unknown error kind
        assert main(["run", "--redo-errors", *redo, str(spec)]) == EXIT_REFUSED
        assert "model: checkpoint folder" in capsys.readouterr().err
    assert main(["run", "--redo-errors", "no_such_kind", "blocked_address", str(spec)]) == EXIT_REFUSED
    assert "unknown error kind(s) no_such_kind" in capsys.readouterr().err


def test_passthrough_cannot_swallow_the_spec_and_set_needs_no_spec():
    args = build_parser().parse_args(["run", "--passthrough", "a", "job.toml", "--passthrough", "b"])
    assert args.spec == "job.toml" and args.passthrough == ["a", "b"]
    args = build_parser().parse_args(
        [
            "run",
            "--input",
            "in",
            "--output",
            "out",
            "--model",
            "m",
            "--prompt",
            "x",
            "--set",
            "run.batch_size=2",
            "--local-root",
            "imgs",
            "--allow-host",
            "h",
        ]
    )
    assert args.spec is None and args.set == ["run.batch_size=2"]
    assert (args.local_root, args.allow_host) == (["imgs"], ["h"])
    # any job from flags and --set alone, an annotate job too
    args = build_parser().parse_args(
        [
            "run",
            "--set",
            "input.path=in",
            "--output",
            "out",
            "--model",
            "m",
            "--set",
            "job.kind=annotate",
            "--set",
            'questions.color="What color?"',
        ]
    )
    job = load_spec(None, flag_overrides(args))
    assert job.kind == "annotate" and job.instructions == {"color": "What color?"} and job.input.paths == ("in",)


def test_flags_only_run_with_local_root_then_error_rate_exit_4(ray_local, tmp_path, capsys):
    source = write_input(tmp_path / "in")
    blocked = tmp_path / "blocked"
    assert main(flags(source, blocked)) == EXIT_ERROR_RATE
    out = capsys.readouterr().out
    assert f"rows: 0 ok, {len(IMAGES)} error (blocked_address {len(IMAGES)})" in out
    assert "fix: --local-root DIR ([fetch] local_roots) for local files" in out.splitlines()[-1]
    # --local-root, and --set without a spec: every row ok
    ok = tmp_path / "ok"
    assert (
        main(
            flags(source, ok, "--local-root", str(SAMPLE_IMAGES), "--passthrough", "name", "--set", "run.batch_size=2")
        )
        == EXIT_OK
    )
    rows = read_output(str(ok)).to_pylist()
    assert len(rows) == len(IMAGES) and all(r["status"] == "ok" and r["name"] for r in rows)
    recorded = read_manifest(str(ok))
    assert recorded.fetch["local_roots"] == [str(SAMPLE_IMAGES)] and recorded.run["batch_size"] == 2
    # a lower max_error_rate: half the rows in error is too many
    mixed = write_input(tmp_path / "mixed")
    pq.write_table(
        pa.table({"image_url": IMAGES + ["/etc/hostname"] * len(IMAGES), "name": ["x"] * (2 * len(IMAGES))}),
        mixed / "part.parquet",
    )
    assert main(flags(mixed, tmp_path / "m1", "--local-root", str(SAMPLE_IMAGES))) == EXIT_OK
    assert main(flags(mixed, tmp_path / "m2", "--local-root", str(SAMPLE_IMAGES), "--max-error-rate", "0.5")) == 4
    assert "error rate 50% of this run's rows reached [run] max_error_rate 0.5" in capsys.readouterr().err


# --- SIGTERM --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_a_signal_mid_run_keeps_committed_units_and_says_so(ray_local, tmp_path, stop, code):
    """SIGTERM (a scheduler) is handled as Ctrl-C: committed units kept whole, lock released, summary, 143 (130 for
    Ctrl-C); the same command again finishes the rest."""
    source, output = write_input(tmp_path / "in", copies=10, row_group=6), tmp_path / "out"
    args = flags(source, output, "--local-root", str(SAMPLE_IMAGES), "--batch-size", "2", "--rows-per-unit", "6")
    process = subprocess.Popen(
        [sys.executable, "-m", "blipbatch", *args],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    deadline = time.monotonic() + 240
    while not list((output / "_progress").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "interrupted: committed units are kept" in out and "Traceback" not in err
    committed = len(list((output / "_progress").glob("*.json")))
    assert f"{committed} done now" in out  # the summary counts what the markers say
    assert not (output / LOCK_NAME).exists()
    # no half-written output: every part file there is a whole unit's Parquet file, one per marker
    parts = list(output.glob("part-*.parquet"))
    assert len(parts) == committed and all(pq.read_table(part).num_rows == 6 for part in parts)
    # the same command again (here in this process, on the tests' Ray) finishes the rest: every row exactly once
    assert main(args) == EXIT_OK
    rows = read_output(str(output)).to_pylist()
    assert len(rows) == 10 * len(IMAGES) and all(r["status"] == "ok" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


# --- the recorded job: retry-failed and report need no fetch flags --------------------------------------------------


def test_a_local_root_of_the_whole_file_system_is_warned_about(ray_local, tmp_path, capsys):
    source = write_input(tmp_path / "in")
    assert main(flags(source, tmp_path / "out", "--local-root", "/")) == EXIT_OK
    err = capsys.readouterr().err
    assert "warning: [fetch] local_roots entry '/' is the whole file system" in err


def test_retry_failed_and_report_use_the_recorded_local_roots(ray_local, tmp_path, capsys):
    source, output = write_input(tmp_path / "in", copies=2, row_group=len(IMAGES)), str(tmp_path / "out")
    units = plan_units(discover_shards(str(source)), ColumnMapping(), len(IMAGES))
    job = job_from_keywords(
        str(source),
        output,
        str(DEMO_MODEL),
        prompt="What shape is it?",
        max_new_tokens=3,
        max_attempts=1,
        rows_per_unit=len(IMAGES),
        fetch=FetchConfig(local_roots=(str(SAMPLE_IMAGES),)),
    )
    summary = run_job(job, progress=False, fault=FaultInjection(unit_ids=(units[0].unit_id,)))
    assert summary.units_failed == 1 and summary.rows_ok == len(IMAGES)
    capsys.readouterr()
    assert main(["retry-failed", output, "--quiet"]) == EXIT_OK
    assert f"rows: {len(IMAGES)} ok, 0 error" in capsys.readouterr().out
    assert not failed_units(output)
    rows = read_output(output).to_pylist()
    assert len(rows) == 2 * len(IMAGES) and all(r["status"] == "ok" for r in rows)
    page = tmp_path / "report.html"
    assert main(["report", output, "--html", str(page), "--sample", "4"]) == EXIT_OK
    html = page.read_text()
    assert html.count('<img class="thumb"') == 4 and "blocked_address" not in html
    assert main(["status", output]) == EXIT_OK
    assert "units: 2 done, 0 failed, 0 pending" in capsys.readouterr().out


def test_status_says_a_run_holds_the_output(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    settings = {
        "input": str(tmp_path / "in"),
        "model": "m",
        "instructions": ["x"],
        "generation": {},
        "mapping": {"image_column": "image_url", "id_column": None, "instruction_column": None, "passthrough": []},
        "rows_per_unit": 1000,
    }
    (output / "_manifest.json").write_text(json.dumps({"fingerprint": "f", "settings": settings}))  # version 1
    with OutputLock(str(output)):
        main(["status", str(output)])
    out = capsys.readouterr().out
    assert f"running: a run holds this output (held by pid {os.getpid()}" in out and "model: m" in out


# --- a user's folder cannot shadow our code -------------------------------------------------------------------------


@pytest.mark.slow
def test_run_from_a_folder_with_a_users_model_and_pipeline_modules(tmp_path):
    """Ray's workers put the working directory first on sys.path: a user's model.py & co must not shadow ours."""
    poison = "raise ImportError('the user module was imported instead of blipbatch')\n"
    for name in ("model.py", "pipeline.py", "schemas.py"):
        (tmp_path / name).write_text(poison)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text(poison)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(poison)
    write_input(tmp_path / "in")
    (tmp_path / "job.toml").write_text(f"""
[job]
kind = "caption"
[input]
path = "in"
[output]
path = "out"
[model]
path = "{DEMO_MODEL}"
device = "cpu"
[generation]
max_new_tokens = 3
[fetch]
local_roots = ["{SAMPLE_IMAGES}"]
""")
    result = cli("run", "job.toml", "--quiet", cwd=tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert len(rows) == len(IMAGES) and all(r["status"] == "ok" for r in rows)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import blipbatch; from blipbatch import InstructBlipForConditionalGeneration as c; print(c.__module__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.strip().startswith("blipbatch.model"), probe.stderr


def test_log_json_stderr_is_json_lines_and_progress_off_a_terminal_has_no_carriage_returns(tmp_path):
    source = write_input(tmp_path / "in")
    base = flags(source, tmp_path / "json", "--local-root", str(SAMPLE_IMAGES))
    base.remove("--quiet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's token notice is on by default
    result = subprocess.run(
        [sys.executable, "-m", "blipbatch", *base, "--log-json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    assert result.returncode == EXIT_OK, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and [json.loads(line)["event"] for line in lines] == ["unit_committed"], result.stderr
    loud = [a for a in flags(source, tmp_path / "plain", "--local-root", str(SAMPLE_IMAGES)) if a != "--quiet"]
    plain = subprocess.run(
        [sys.executable, "-m", "blipbatch", *loud], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env
    )
    assert plain.returncode == EXIT_OK, plain.stderr
    assert "\r" not in plain.stderr and ANSI not in plain.stderr
    progress = [line for line in plain.stderr.splitlines() if line.startswith("[")]
    assert progress and len(progress) == len(set(progress)) and progress[-1].startswith("[1/1 units]")


@pytest.mark.parametrize(
    "processes, cpus_per_gpu, reserved",
    [(7, 8, 8), (3, 8, 4), (8, 8, 8), (12, 8, 12), (1, 1, 1)],
)
def test_a_gpu_actor_reserves_its_decode_processes_and_a_cpu_for_itself(processes, cpus_per_gpu, reserved):
    """The default (CPUs per GPU less one decode process) reserves the GPU's whole share of CPUs: the worker process
    spends about a core itself at full speed; never more than the share unless the processes alone ask it."""
    assert gpu_actor_cpus(processes, cpus_per_gpu) == reserved
