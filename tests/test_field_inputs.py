"""The field's data on real Ray with the tiny model: content hashes, opt-outs, prompt templates, WebDataset shards."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipbatch import pipeline
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.sink import progress_records, read_output
from test_pipeline import NEW_TOKENS, PROMPTS, png
from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def local_files(tmp_path: Path) -> FetchConfig:
    return FetchConfig(local_roots=(str(tmp_path),))


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
    references = [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "copy-of-a.png"),
                  str(tmp_path / "a.png"), str(tmp_path / "missing.png")]
    pq.write_table(pa.table({"image_url": references, "key": list("vwxyz")}), tmp_path / "in.parquet")
    output = str(tmp_path / "out")
    summary = pipeline.run(str(tmp_path / "in.parquet"), output, checkpoint, prompt=PROMPTS[0], id_column="key",
                           batch_size=2, max_new_tokens=NEW_TOKENS, progress=False, fetch=local_files(tmp_path))
    assert (summary.rows_ok, summary.rows_error, summary.images_encoded) == (4, 1, 2)
    rows = {row["id"]: row for row in read_output(output).to_pylist()}
    assert {key: rows[key]["image_sha256"] for key in "vwxyz"} == {
        "v": sha(png(1)), "w": sha(png(2)), "x": sha(png(1)), "y": sha(png(1)), "z": None}
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


def test_an_opted_out_image_is_an_opted_out_row_and_the_manifest_records_the_setting(ray_local, checkpoint,
                                                                                      http_images, tmp_path):
    import json

    references = [f"{http_images}/1.png", f"{http_images}/noai/2.png"]
    pq.write_table(pa.table({"image_url": references, "key": ["kept", "refused"]}), tmp_path / "in.parquet")
    fetch = FetchConfig(allow_hosts=("127.0.0.1",))
    for honour, output in ((True, tmp_path / "honoured"), (False, tmp_path / "ignored")):
        pipeline.run(str(tmp_path / "in.parquet"), str(output), checkpoint, prompt=PROMPTS[0], id_column="key",
                     max_new_tokens=NEW_TOKENS, progress=False, fetch=FetchConfig(**{**fetch.__dict__,
                                                                                     "honour_opt_out": honour}))
        rows = {row["id"]: row for row in read_output(str(output)).to_pylist()}
        assert json.loads((output / "_manifest.json").read_text())["settings"]["fetch"]["honour_opt_out"] is honour
        assert rows["kept"]["status"] == "ok"
        if honour:
            assert (rows["refused"]["status"], rows["refused"]["error_kind"], rows["refused"]["image_sha256"]) == \
                ("error", "opted_out", None)
        else:
            assert (rows["refused"]["status"], rows["refused"]["image_sha256"]) == ("ok", sha(png(2)))


def test_templates_fill_prompts_and_questions_and_an_unknown_column_is_refused(ray_local, checkpoint, tmp_path):
    from blipbatch.pipeline.job import PipelineError

    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(png(k))
    pq.write_table(pa.table({"image_url": [str(tmp_path / f"{k}.png") for k in range(3)],
                             "alt": ["a red square", None, "a blue square"], "lang": ["en", "fr", "de"]}),
                   tmp_path / "in.parquet")
    options = dict(max_new_tokens=NEW_TOKENS, progress=False, fetch=local_files(tmp_path))
    output = str(tmp_path / "caption")
    pipeline.run(str(tmp_path / "in.parquet"), output, checkpoint, prompt="Caption it. The page said: {alt}",
                 **options)
    rows = sorted(read_output(output).to_pylist(), key=lambda row: row["image_url"])
    assert [(row["instruction"], row["status"], row["error_kind"]) for row in rows] == [
        ("Caption it. The page said: a red square", "ok", None),
        ("Caption it. The page said: {alt}", "error", "invalid_input"),
        ("Caption it. The page said: a blue square", "ok", None)]
    assert "column 'alt' is null" in rows[1]["error"]

    output = str(tmp_path / "annotate")
    questions = {"what": "What is it? ({lang})", "braces": "Answer in {{json}}"}
    pipeline.run(str(tmp_path / "in.parquet"), output, checkpoint, prompt=questions, **options)
    asked = {(row["image_url"][-5], row["question_id"]): row["instruction"] for row in read_output(output).to_pylist()}
    assert asked == {("0", "what"): "What is it? (en)", ("1", "what"): "What is it? (fr)",
                     ("2", "what"): "What is it? (de)", **{(k, "braces"): "Answer in {json}" for k in "012"}}

    with pytest.raises(PipelineError, match=r"names column\(s\) 'page_title', which the input does not have; its "
                                            r"columns: image_url, alt, lang"):
        pipeline.run(str(tmp_path / "in.parquet"), str(tmp_path / "refused"), checkpoint, prompt="{page_title}",
                     **options)
    assert not (tmp_path / "refused").exists()
