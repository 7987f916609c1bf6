"""Checkpoint formats and locations: safetensors (single, sharded), .bin, file:// and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from model import InstructBlipForConditionalGeneration, InstructBlipProcessor
from model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Logits of the reference load, and the inputs that produced them."""
    from PIL import Image

    processor = InstructBlipProcessor.from_pretrained(checkpoint)
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    inputs = processor(images=[image, image.rotate(90)], text=["A short image caption:", "What color?"])
    with torch.no_grad():
        logits = InstructBlipForConditionalGeneration.from_pretrained(checkpoint)(**inputs).logits
    return inputs, logits


def assert_same_model(folder, reference):
    inputs, expected = reference
    model = InstructBlipForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_sharded_safetensors(checkpoint, reference, tmp_path):
    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert_same_model(tmp_path, reference)


def test_pytorch_bin(checkpoint, reference, tmp_path):
    state = load_file(checkpoint / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    assert_same_model(tmp_path, reference)


def test_file_url(checkpoint, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPBATCH_CACHE", str(tmp_path / "cache"))
    assert_same_model(f"file://{checkpoint}", reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("moto server did not start within 30 s")
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec would reuse a filesystem bound to an earlier endpoint
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


def test_s3_url(checkpoint, reference, tmp_path, monkeypatch, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    fs.mkdir("models")
    fs.put(str(checkpoint), "models/tiny", recursive=True)
    monkeypatch.setenv("BLIPBATCH_CACHE", str(tmp_path / "cache"))
    assert_same_model("s3://models/tiny", reference)
    processor = InstructBlipProcessor.from_pretrained("s3://models/tiny")
    assert processor.qformer_tokenizer is not None
    # a second load reuses the cached copy instead of downloading again
    cached = next((tmp_path / "cache" / "remote").iterdir())
    before = {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()}
    assert_same_model("s3://models/tiny", reference)
    assert {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()} == before


def test_missing_s3_folder(tmp_path, monkeypatch, s3_endpoint):
    from model import CheckpointError

    monkeypatch.setenv("BLIPBATCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="s3://nowhere/model"):
        InstructBlipForConditionalGeneration.from_pretrained("s3://nowhere/model")


def test_save_pretrained_omits_tied_aliases(tmp_path):
    from model import InstructBlipConfig
    from tests.oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, QFORMER, TEXT, VISION

    config = InstructBlipConfig.from_dict(dict(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT["opt"],
                                               num_query_tokens=NUM_QUERY_TOKENS, image_token_index=IMAGE_TOKEN))
    InstructBlipForConditionalGeneration(config).save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "language_model.lm_head.weight" not in keys
    assert "language_model.model.decoder.embed_tokens.weight" in keys
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    assert model.language_model.lm_head.weight is model.language_model.model.decoder.embed_tokens.weight
    assert os.path.exists(tmp_path / "generation_config.json")
