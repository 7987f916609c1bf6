"""Bad checkpoints and bad inputs raise errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blipbatch.model import (
    CheckpointError,
    ConfigError,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    ProcessorError,
)
from tests.oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, QFORMER, TEXT, VISION, random_inputs


def tiny_config(lm: str = "llama") -> InstructBlipConfig:
    return InstructBlipConfig.from_dict(
        dict(
            vision_config=VISION,
            qformer_config=QFORMER,
            text_config=TEXT[lm],
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_TOKEN,
        )
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(tiny_config()).save_pretrained(folder)
    return folder


def copy_checkpoint(src, dst):
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_round_trip_same_logits(saved):
    model = InstructBlipForConditionalGeneration.from_pretrained(saved)
    again = InstructBlipForConditionalGeneration.from_pretrained(saved)
    inputs = random_inputs(2, [3, 2])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_missing_shard_is_named(saved, tmp_path):
    state = load_file(saved / "model.safetensors")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, tmp_path / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            k: ("model-00001-of-00002.safetensors" if i < len(keys) // 2 else "model-00002-of-00002.safetensors")
            for i, k in enumerate(keys)
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)


def test_unexpected_and_missing_keys_are_listed(saved, tmp_path):
    copy_checkpoint(saved, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    del state["qformer.encoder.layer.0.intermediate_query.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    message = str(info.value)
    assert "unexpected keys (1): language_model.model.layers.9.mlp.up_proj.weight" in message
    assert "missing keys (1): qformer.encoder.layer.0.intermediate_query.dense.weight" in message


def test_shape_mismatch_is_listed(saved, tmp_path):
    copy_checkpoint(saved, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["language_projection.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"language_projection.bias: checkpoint \(7,\), model \(32,\)"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)


def test_no_weights_at_all(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)


def test_unknown_language_model_type(saved, tmp_path):
    copy_checkpoint(saved, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'mistral' is not supported; supported language models: llama, opt, t5"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "nope")
    # conftest sets HF_HUB_OFFLINE=1: a Hub id cannot be fetched and the error says what to do instead
    with pytest.raises(CheckpointError, match="pass its local folder"):
        InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-vicuna-7b")


def test_image_size_mismatch_needs_interpolation(saved):
    model = InstructBlipForConditionalGeneration.from_pretrained(saved)
    inputs = random_inputs(1, [3])
    inputs["pixel_values"] = torch.randn(1, 3, 40, 40)
    with pytest.raises(ProcessorError, match="interpolate_pos_encoding"):
        model(**inputs)
    with torch.no_grad():
        assert model(**inputs, interpolate_pos_encoding=True).logits.isfinite().all()


def test_placeholder_count_mismatch(saved):
    model = InstructBlipForConditionalGeneration.from_pretrained(saved)
    inputs = random_inputs(2, [3, 3])
    inputs["input_ids"][1, 0] = 5  # row 1 now has one placeholder too few
    with pytest.raises(ProcessorError, match="row 1"):
        model.generate(**inputs, max_new_tokens=2)


def test_unknown_generation_setting(saved):
    model = InstructBlipForConditionalGeneration.from_pretrained(saved)
    with pytest.raises(ConfigError, match="num_beam"):
        model.generate(**random_inputs(1, [3]), num_beam=3)


def test_bf16_keeps_query_tokens_fp32(saved):
    model = InstructBlipForConditionalGeneration.from_pretrained(saved, dtype=torch.bfloat16)
    assert model.query_tokens.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    out = model.generate(**random_inputs(1, [3]), max_new_tokens=3)
    assert out.shape == (1, NUM_QUERY_TOKENS + 3 + 3)
