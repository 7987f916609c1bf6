"""Checkpoint formats and locations: safetensors (single, sharded), .bin, file:// and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_tiny_checkpoint

from blipbatch.model import InstructBlipForConditionalGeneration, InstructBlipProcessor


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


def test_s3_url(checkpoint, reference, tmp_path, monkeypatch, s3fs_clean):
    fs = s3fs_clean
    if not fs.exists("models"):
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


def test_missing_s3_folder(tmp_path, monkeypatch, s3fs_clean):
    from blipbatch.model import CheckpointError

    monkeypatch.setenv("BLIPBATCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="s3://nowhere/model"):
        InstructBlipForConditionalGeneration.from_pretrained("s3://nowhere/model")


def test_save_pretrained_omits_tied_aliases(tmp_path):
    from blipbatch.model import InstructBlipConfig
    from tests.oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, QFORMER, TEXT, VISION

    config = InstructBlipConfig.from_dict(
        dict(
            vision_config=VISION,
            qformer_config=QFORMER,
            text_config=TEXT["opt"],
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_TOKEN,
        )
    )
    InstructBlipForConditionalGeneration(config).save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "language_model.lm_head.weight" not in keys
    assert "language_model.model.decoder.embed_tokens.weight" in keys
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    assert model.language_model.lm_head.weight is model.language_model.model.decoder.embed_tokens.weight
    assert os.path.exists(tmp_path / "generation_config.json")
