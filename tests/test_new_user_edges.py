"""Edges a new user meets with `blipbatch run`: outputs that cannot be written, a redo of error rows over an output
with rows that stay broken, a misspelt flag, error advice, scores, the report's times, a second Ctrl-C (a run that
cannot start: tests/test_run_command.py). Real subprocesses and in-process Ray, the demo model."""

from __future__ import annotations

import contextlib
import os

import pytest
from test_run_command import flags, write_input

from blipbatch.jobs.cli import EXIT_REFUSED, main
from blipbatch.jobs.demo import DEMO_MODEL


@pytest.mark.parametrize("output", ["/proc/blipbatch-x", "/sys/blipbatch-x", "/proc/blipbatch-x/deeper"])
def test_an_output_in_proc_or_sys_is_one_line_exit_3(tmp_path, capsys, output):
    source = write_input(tmp_path / "in")
    assert main(flags(source, output)) == EXIT_REFUSED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"blipbatch: output: {output} cannot be written ("), err
    assert err[0].endswith("give a writable folder")


def test_a_read_only_folder_is_one_line_exit_3_and_left_as_found(tmp_path, capsys):
    source, folder = write_input(tmp_path / "in"), tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK) and os.geteuid() == 0:
            # root writes through permission bits: a read-only place for root is a read-only mount (/sys above)
            pytest.skip("running as root: permission bits do not stop root")
        assert main(flags(source, folder / "out")) == EXIT_REFUSED
        assert "cannot be written (Permission denied)" in capsys.readouterr().err
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_the_check_of_a_writable_output_leaves_nothing_behind(tmp_path):
    from blipbatch.pipeline.preflight import check_output

    check_output(str(tmp_path / "a" / "b" / "out"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "there").mkdir()
    check_output(str(tmp_path / "there"))
    assert os.listdir(tmp_path / "there") == []


def test_a_redo_with_rows_that_stay_broken_is_judged_by_the_whole_output(ray_local, tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_run_command import IMAGES

    from blipbatch.jobs.demo import SAMPLE_IMAGES

    source = tmp_path / "in"
    source.mkdir()
    broken = ["/etc/hostname", "/etc/hosts"]  # outside the local root: blocked_address, whatever is redone
    pq.write_table(pa.table({"image_url": IMAGES + broken}), source / "part.parquet")
    output = tmp_path / "out"
    args = [*flags(source, output, "--local-root", str(SAMPLE_IMAGES), "--max-error-rate", "0.5")]
    assert main(args) == 0  # 2 of 8 rows in error
    capfd.readouterr()
    args.remove("--quiet")
    assert main([*args, "--redo-errors"]) == 0  # both redone rows fail again: 2 of 8 in the output, not 2 of 2
    captured = capfd.readouterr()
    assert "units: 1 total, 0 done now, 1 already done (1 of them redone), 0 failed" in captured.out
    assert "redone: 2 error rows of 1 units, 0 fixed, 2 still failing (blocked_address 2)" in captured.out
    assert "[1/1 units]" in captured.err and "[1/0 units]" not in captured.err
    assert main([*args, "--redo-errors", "--max-error-rate", "0.25"]) == 4  # 2 of 8: a quarter of the output's rows
    assert "error rate 25% of the output's rows reached [run] max_error_rate 0.25" in capfd.readouterr().err


def test_a_misspelled_flag_gets_runs_usage_and_a_suggestion_and_no_prefix_is_taken(capsys):
    for argv, suggestion in (
        (["run", "job.toml", "--bach-size", "8"], "--batch-size"),
        (["run", "job.toml", "--batch", "8"], "--batch-size"),  # a prefix is not the flag
        (["status", "out", "--verfy"], "--verify"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: blipbatch {argv[0]} ")
        assert err.strip().splitlines()[-1] == (
            f"blipbatch {argv[0]}: error: unrecognized argument {argv[2]}; did you mean {suggestion}?"
        )


def test_the_decode_error_hint_fits_what_the_decoder_said():
    import io

    from PIL import Image

    from blipbatch.jobs.cli import ERROR_HINTS, decode_hint_kind
    from blipbatch.pipeline.decode import DecodeConfig, decode_image
    from blipbatch.pipeline.errors import RowError

    def said(data: bytes, config: DecodeConfig = DecodeConfig()) -> str:
        with pytest.raises(RowError) as caught:
            decode_image(data, config)
        return ERROR_HINTS[decode_hint_kind(caught.value.message)]

    def image(fmt: str) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 30)).save(out, fmt)
        return out.getvalue()

    assert said(b"").startswith("the files are empty (0 bytes)")
    assert said(image("JPEG")[:200]).startswith("the files are damaged")
    assert said(image("GIF"), DecodeConfig(formats=("PNG",))).startswith("add the format: --set decode.formats")
    assert said(b"<!DOCTYPE html>\n<html><body>Not found</body></html>").startswith("the references point to")
    assert "decode.formats" not in said(b"") + said(image("JPEG")[:200])


def test_a_run_over_an_empty_file_says_to_replace_it_and_records_what_it_used(ray_local, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_run_command import IMAGES

    images = tmp_path / "images"
    images.mkdir()
    (images / "empty.png").write_bytes(b"")
    (images / "ok.png").write_bytes(open(IMAGES[0], "rb").read())
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.table({"image_url": [str(images / "empty.png"), str(images / "ok.png")]}), source / "p.parquet")
    assert main(flags(source, tmp_path / "out", "--local-root", str(images))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "decode_error (1 rows): empty file (0 bytes)"
    assert (
        out[-1] == "  fix: the files are empty (0 bytes): replace them at their source; then --redo-errors decode_error"
    )
    # Nothing asked of the batch size, decode slots or workers: the manifest records what the workers used.
    from blipbatch.pipeline.manifest import read_manifest, read_used

    assert read_manifest(str(tmp_path / "out")).run["batch_size"] is None
    used = read_used(str(tmp_path / "out"))
    assert {k: used[k] for k in ("workers", "batch_size", "decode_slots")} == {
        "workers": 1,
        "batch_size": 8,
        "decode_slots": 32,
    }
    assert used["device"].startswith("cpu (")


def test_scores_in_the_wide_table_and_the_gallery_and_the_report_headline_is_the_run_wall_time(ray_local, tmp_path):
    import html
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_run_command import IMAGES

    from blipbatch import pipeline
    from blipbatch.jobs.kinds import wide_table
    from blipbatch.jobs.report import write_report
    from blipbatch.pipeline.manifest import recorded_runs
    from blipbatch.pipeline.sink import read_output

    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(
        pa.table({"image": [open(p, "rb").read() for p in IMAGES[:2]], "key": ["a", "b"]}), source / "p.parquet"
    )
    output = str(tmp_path / "out")
    questions = {"color": "What color is the shape?", "shape": "What shape is it?"}
    summary = pipeline.run(
        str(source),
        output,
        str(DEMO_MODEL),
        prompt=questions,
        image_column="image",
        id_column="key",
        max_new_tokens=3,
        progress=False,
    )
    long = read_output(output).to_pylist()
    wide = wide_table(read_output(output))
    assert wide.column_names[-5:] == ["color", "color_score", "shape", "shape_score", "errors"]  # after the image's
    for row in wide.to_pylist():
        for question in questions:
            (answer,) = [r for r in long if r["id"] == row["id"] and r["question_id"] == question]
            assert (row[question], row[f"{question}_score"]) == (answer["text"], answer["score"])

    (run,) = recorded_runs(output)
    assert run["rows"] == 4 and 0 < run["wall_s"] <= summary.wall_s
    page = html.unescape(open(write_report(output, str(tmp_path / "r.html"), sample=2), encoding="utf-8").read())
    assert "run wall time, incl. start-up" in page and "rows/s over the run wall time" in page
    assert "rows/s while units ran" in page and "time units ran" in page
    shown = re.findall(r'<span class="score"[^>]*>\((-?\d+\.\d\d)\)</span>', page)
    assert sorted(shown) == sorted(f"{r['score']:.2f}" for r in long)


@pytest.mark.slow
def test_a_second_ctrl_c_while_stopping_exits_130_without_traceback_and_leaves_no_ray(tmp_path):
    """Ctrl-C twice at a terminal: SIGINT to the whole process group (Ray's processes included), the second while the
    run is stopping (workers killed, Ray shut down); its own TMPDIR, so only this run's Ray folder is looked at."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    from blipbatch.jobs.demo import SAMPLE_IMAGES

    source, output = write_input(tmp_path / "in", copies=10, row_group=6), tmp_path / "out"
    args = flags(source, output, "--local-root", str(SAMPLE_IMAGES), "--batch-size", "2", "--rows-per-unit", "6")
    temp = tempfile.mkdtemp(prefix="bbt", dir="/tmp")  # short: Ray's socket paths below it must fit in 107 bytes
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "blipbatch", *args],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": temp},
        )
        deadline = time.monotonic() + 240
        while not list((output / "_progress").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)
        time.sleep(1.5)  # the driver is killing its workers and shutting Ray down
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 130, err
        assert "Traceback" not in err and "interrupted: committed units are kept" in out
        assert [name for name in os.listdir(temp) if name.startswith("bb-ray-")] == []
        left = [p for p in psutil.process_iter(["cmdline"]) if any(temp in part for part in p.info["cmdline"] or [])]
        assert left == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_workers_is_a_count_or_auto_in_a_spec_and_on_the_command_line(tmp_path):
    from blipbatch.jobs.cli import build_parser
    from blipbatch.jobs.spec import SpecError, load_spec
    from blipbatch.pipeline.job import RunConfig

    spec = tmp_path / "job.toml"
    base = (
        '[job]\nkind = "caption"\n[input]\npath = "in"\n[output]\npath = "out"\n[model]\npath = "m"\n'
        '[prompt]\ntext = "x"\n[run]\n'
    )
    spec.write_text(base + 'workers = "auto"\nmax_workers = 3\n')
    run = load_spec(spec).run
    assert (run.workers, run.max_workers, run.elastic) == ("auto", 3, True)
    assert RunConfig().elastic and not RunConfig(workers=2).elastic
    spec.write_text(base + 'workers = "many"\n')
    with pytest.raises(SpecError, match=r'\[run\] workers: expected an integer >= 1 or "auto", got "many"'):
        load_spec(spec)
    assert build_parser().parse_args(["run", str(spec), "--workers", "auto"]).workers == "auto"
    assert build_parser().parse_args(["run", str(spec), "--workers", "2", "--max-workers", "4"]).max_workers == 4
