"""The field's data on real Ray with the tiny model: content hashes, opt-outs, prompt templates, WebDataset shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import NEW_TOKENS, PROMPTS, checkpoint, local_files, png  # noqa: F401 - checkpoint: a fixture

from blipbatch import pipeline
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.sink import progress_records, read_output


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_identical_bytes_share_one_hash_one_decode_and_one_answer(ray_local, checkpoint, tmp_path, capsys):
    """The same bytes under three references (two files, raw bytes) and a fourth distinct image: every row has the
    hex SHA-256 of its bytes, the unit encodes two images, rows with the same bytes get the same answer, and a row
    whose fetch failed has no hash."""
    from blipbatch.jobs.cli import main

    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "copy-of-a.png").write_bytes(png(1))
    (tmp_path / "b.png").write_bytes(png(2))
    references = [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        str(tmp_path / "copy-of-a.png"),
        str(tmp_path / "a.png"),
        str(tmp_path / "missing.png"),
    ]
    pq.write_table(pa.table({"image_url": references, "key": list("vwxyz")}), tmp_path / "in.parquet")
    output = str(tmp_path / "out")
    summary = pipeline.run(
        str(tmp_path / "in.parquet"),
        output,
        checkpoint,
        prompt=PROMPTS[0],
        id_column="key",
        batch_size=2,
        max_new_tokens=NEW_TOKENS,
        progress=False,
        fetch=local_files(tmp_path),
    )
    assert (summary.rows_ok, summary.rows_error, summary.images_encoded) == (4, 1, 2)
    rows = {row["id"]: row for row in read_output(output).to_pylist()}
    assert {key: rows[key]["image_sha256"] for key in "vwxyz"} == {
        "v": sha(png(1)),
        "w": sha(png(2)),
        "x": sha(png(1)),
        "y": sha(png(1)),
        "z": None,
    }
    assert rows["v"]["text"] == rows["x"]["text"] == rows["y"]["text"]
    assert [record.duplicate_images for record in progress_records(output)] == [2]
    capsys.readouterr()
    main(["status", output])
    assert "duplicate images: 2 input rows" in capsys.readouterr().out


@pytest.fixture(scope="module")
def http_images():
    """http://127.0.0.1:PORT/K.png serves png(K); /noai/K.png the same with `X-Robots-Tag: noai`."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = png(int(self.path.rsplit("/", 1)[1].split(".")[0]))
            self.send_response(200)
            if self.path.startswith("/noai/"):
                self.send_header("X-Robots-Tag", "noai")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_opted_out_image_is_an_opted_out_row_and_the_manifest_records_the_setting(
    ray_local, checkpoint, http_images, tmp_path
):
    import json

    references = [f"{http_images}/1.png", f"{http_images}/noai/2.png"]
    pq.write_table(pa.table({"image_url": references, "key": ["kept", "refused"]}), tmp_path / "in.parquet")
    fetch = FetchConfig(allow_hosts=("127.0.0.1",))
    for honour, output in ((True, tmp_path / "honoured"), (False, tmp_path / "ignored")):
        pipeline.run(
            str(tmp_path / "in.parquet"),
            str(output),
            checkpoint,
            prompt=PROMPTS[0],
            id_column="key",
            max_new_tokens=NEW_TOKENS,
            progress=False,
            fetch=FetchConfig(**{**fetch.__dict__, "honour_opt_out": honour}),
        )
        rows = {row["id"]: row for row in read_output(str(output)).to_pylist()}
        assert json.loads((output / "_manifest.json").read_text())["settings"]["fetch"]["honour_opt_out"] is honour
        assert rows["kept"]["status"] == "ok"
        if honour:
            assert (rows["refused"]["status"], rows["refused"]["error_kind"], rows["refused"]["image_sha256"]) == (
                "error",
                "opted_out",
                None,
            )
        else:
            assert (rows["refused"]["status"], rows["refused"]["image_sha256"]) == ("ok", sha(png(2)))


def test_templates_fill_prompts_and_questions_and_an_unknown_column_is_refused(ray_local, checkpoint, tmp_path):
    from blipbatch.pipeline.job import PipelineError

    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(png(k))
    pq.write_table(
        pa.table(
            {
                "image_url": [str(tmp_path / f"{k}.png") for k in range(3)],
                "alt": ["a red square", None, "a blue square"],
                "lang": ["en", "fr", "de"],
            }
        ),
        tmp_path / "in.parquet",
    )
    options = dict(max_new_tokens=NEW_TOKENS, progress=False, fetch=local_files(tmp_path))
    output = str(tmp_path / "caption")
    pipeline.run(str(tmp_path / "in.parquet"), output, checkpoint, prompt="Caption it. The page said: {alt}", **options)
    rows = sorted(read_output(output).to_pylist(), key=lambda row: row["image_url"])
    assert [(row["instruction"], row["status"], row["error_kind"]) for row in rows] == [
        ("Caption it. The page said: a red square", "ok", None),
        ("Caption it. The page said: {alt}", "error", "invalid_input"),
        ("Caption it. The page said: a blue square", "ok", None),
    ]
    assert "column 'alt' is null" in rows[1]["error"]

    output = str(tmp_path / "annotate")
    questions = {"what": "What is it? ({lang})", "braces": "Answer in {{json}}"}
    pipeline.run(str(tmp_path / "in.parquet"), output, checkpoint, prompt=questions, **options)
    asked = {(row["image_url"][-5], row["question_id"]): row["instruction"] for row in read_output(output).to_pylist()}
    assert asked == {
        ("0", "what"): "What is it? (en)",
        ("1", "what"): "What is it? (fr)",
        ("2", "what"): "What is it? (de)",
        **{(k, "braces"): "Answer in {json}" for k in "012"},
    }

    with pytest.raises(
        PipelineError,
        match=r"names column\(s\) 'page_title', which the input does not have; its "
        r"columns: image_url, alt, lang",
    ):
        pipeline.run(
            str(tmp_path / "in.parquet"), str(tmp_path / "refused"), checkpoint, prompt="{page_title}", **options
        )
    assert not (tmp_path / "refused").exists()


def webdataset_input(folder: Path, side: int | None = None) -> dict[str, bytes]:
    """3 tars of 8 samples (png, txt, json {caption, width}), written by webdataset's ShardWriter; sample 5 has a null
    caption and samples 20-23 repeat the images of 0-3. With `side`, each picture is scaled up to side x side (a few
    KB still, but ~0.1 s to decode at 3000). Returns the image of each key."""
    import io

    import webdataset as wds
    from PIL import Image

    def picture(k: int) -> bytes:
        if side is None:
            return png(k)
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png(k))).resize((side, side), Image.NEAREST).save(buffer, "PNG")
        return buffer.getvalue()

    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    with wds.ShardWriter(str(folder / "shard-%04d.tar"), maxcount=8, verbose=0) as sink:
        for k in range(24):
            key = f"s{k:04d}"
            images[key] = images[f"s{k - 20:04d}"] if k >= 20 else picture(k)
            sink.write(
                {
                    "__key__": key,
                    "png": images[key],
                    "txt": f"text {k}",
                    "json": {"caption": None if k == 5 else f"alt {k}", "width": 40 + k},
                }
            )
    return images


def run_cli(spec: Path, log: Path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "blipbatch", "run", str(spec), "--quiet"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
def test_webdataset_caption_killed_and_rerun_gives_every_sample_once(ray_local, checkpoint, tmp_path):
    """A caption job over WebDataset tars with a template reading a json field; the driver killed mid-run, the rerun
    finishes: every sample once, ids = keys, image_sha256 of the member's bytes, templates filled, and the output
    read by pandas, DuckDB and Polars."""
    import os
    import signal
    import time

    import duckdb
    import pandas as pd
    import polars as pl

    from blipbatch.pipeline.sink import committed_units

    # big pictures: a unit takes ~0.3 s to decode, so the driver is killed with units still to run (with small ones,
    # the 12 units could all commit between two polls)
    images = webdataset_input(tmp_path / "in", side=3000)
    output = tmp_path / "out"
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'[job]\nkind = "caption"\n[input]\npath = "in"\npassthrough = ["width"]\n[output]\npath = "out"\n'
        f'[model]\npath = "{checkpoint}"\n[prompt]\ntext = "Caption it. The page said: {{caption}}"\n'
        f"[generation]\nmax_new_tokens = {NEW_TOKENS}\n[run]\nrows_per_unit = 2\nbatch_size = 2\n"
    )
    first = run_cli(spec, log=tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while not committed_units(str(output)):
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no unit committed within 120 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    time.sleep(3)  # a worker outside the group may finish its unit; a rerun rewrites a part whole anyway
    assert len(committed_units(str(output))) < 12
    from blipbatch.jobs.cli import main

    assert main(["run", str(spec), "--quiet"]) == 0  # the same command again, here on the tests' Ray

    rows = read_output(str(output)).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(images)  # every sample exactly once, under its key
    by_id = {row["id"]: row for row in rows}
    assert all(by_id[key]["image_sha256"] == sha(image) for key, image in images.items())
    assert by_id["s0003"]["instruction"] == "Caption it. The page said: alt 3" and by_id["s0003"]["width"] == 43
    assert (by_id["s0005"]["error_kind"], by_id["s0005"]["instruction"]) == (
        "invalid_input",
        "Caption it. The page said: {caption}",
    )
    assert by_id["s0000"]["image_url"] == f"<{len(images['s0000'])} bytes>"
    assert len(pd.read_parquet(output)) == 24
    assert duckdb.sql(f"SELECT count(DISTINCT id) FROM '{output}/**/*.parquet'").fetchall() == [(24,)]
    assert pl.scan_parquet(f"{output}/**/*.parquet").select(pl.len()).collect().item() == 24


def test_webdataset_annotate_status_report_and_redo_errors(ray_local, checkpoint, tmp_path, capsys):
    from blipbatch.jobs.cli import main
    from blipbatch.jobs.report_facts import collect
    from blipbatch.pipeline.job import job_from_keywords
    from blipbatch.pipeline.run import run_job

    images = webdataset_input(tmp_path / "in")
    output = str(tmp_path / "out")
    questions = {"what": "What is it? The page said: {caption}", "text": "Is it {txt}?"}
    settings = dict(prompt=questions, rows_per_unit=8, batch_size=4, max_new_tokens=NEW_TOKENS)
    summary = pipeline.run(str(tmp_path / "in"), output, checkpoint, progress=False, **settings)
    assert (summary.rows_ok, summary.rows_error) == (47, 1)  # s0005's "what": its caption is null
    # samples 20-23 repeat 0-3, but in another unit: encoded there again; within a unit each image once
    assert summary.images_encoded == 24
    assert len(list((tmp_path / "out" / "_webdataset").glob("*.json"))) == 3  # each tar's scan, for the next runs
    rows = read_output(output).to_pylist()
    assert {(row["id"], row["question_id"]): row["instruction"] for row in rows}[("s0009", "text")] == "Is it text 9?"
    capsys.readouterr()
    assert main(["status", output]) == 0
    status = capsys.readouterr().out
    assert "rows: 47 ok, 1 error (invalid_input 1)" in status and "units: 3 done, 0 failed, 0 pending" in status
    data = collect(output, sample=24, fetch=local_files(tmp_path))  # the report reads local shards in the roots
    assert len(data.gallery) == 24 and all(item.thumbnail for item in data.gallery)  # read back from the tars

    # the null caption filled with "" once [input] missing = "empty": only that row is redone
    job = job_from_keywords(str(tmp_path / "in"), output, checkpoint, missing="empty", **settings)
    with pytest.raises(Exception, match="missing"):  # a setting that changes the rows' text must match
        run_job(job, redo_errors=["invalid_input"], progress=False)
    redo = run_job(job, redo_errors=["invalid_input"], progress=False, force=True)
    assert (redo.rows_ok, redo.rows_error) == (1, 0)
    rows = {(row["id"], row["question_id"]): row for row in read_output(output).to_pylist()}
    assert len(rows) == 48 and rows[("s0005", "what")]["instruction"] == "What is it? The page said: "
    assert rows[("s0005", "what")]["image_sha256"] == sha(images["s0005"])

    # the prefix grows by a tar: only its samples are done
    import webdataset as wds

    with wds.ShardWriter(str(tmp_path / "in" / "shard-%04d.tar"), maxcount=8, verbose=0, start_shard=3) as sink:
        for k in range(100, 103):
            sink.write({"__key__": f"s{k:04d}", "png": png(k), "txt": f"text {k}", "json": {"caption": f"alt {k}"}})
    more = run_job(job, progress=False)
    assert (more.units_done, more.units_skipped, more.rows_ok) == (1, 3, 6)
    assert len(read_output(output)) == 54


def test_img2dataset_parquet_with_image_bytes_runs_as_it_is(ray_local, checkpoint, tmp_path):
    """img2dataset's parquet output_format: the image bytes in a `jpg` column beside url, caption, key, status,
    sha256, ...; a failed download has status failed_to_download and no bytes."""
    import io

    from PIL import Image

    jpgs = []
    for k in range(4):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png(k))).convert("RGB").save(buffer, "JPEG")
        jpgs.append(buffer.getvalue())
    jpgs.append(None)
    table = pa.table(
        {
            "url": [f"http://images.example/{k}.jpg" for k in range(5)],
            "caption": [f"alt {k}" for k in range(5)],
            "key": [f"{k:09d}" for k in range(5)],
            "status": ["success"] * 4 + ["failed_to_download"],
            "error_message": [None] * 4 + ["HTTP 404"],
            "width": [40] * 4 + [None],
            "height": [32] * 4 + [None],
            "sha256": [sha(j) for j in jpgs[:4]] + [None],
            "jpg": pa.array(jpgs, pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    output = str(tmp_path / "out")
    summary = pipeline.run(
        str(tmp_path / "00000.parquet"),
        output,
        checkpoint,
        image_column="jpg",
        id_column="key",
        passthrough=("url", "sha256"),
        prompt="A short caption. Alt text: {caption}",
        max_new_tokens=NEW_TOKENS,
        progress=False,
    )
    assert (summary.rows_ok, summary.rows_error) == (4, 1)
    rows = {row["id"]: row for row in read_output(output).to_pylist()}
    assert all(row["image_sha256"] == row["sha256"] for key, row in rows.items() if key != "000000004")
    assert rows["000000004"]["error_kind"] == "invalid_input" and rows["000000004"]["image_sha256"] is None
    assert rows["000000002"]["instruction"] == "A short caption. Alt text: alt 2"
