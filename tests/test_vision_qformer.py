"""Parity of our vision tower and Q-Former with transformers' modules (tiny, all parameters re-drawn)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from blipbatch.model.activations import activation
from blipbatch.model.configs import Blip2QFormerConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from blipbatch.model.errors import ConfigError, ProcessorError
from blipbatch.model.qformer import InstructBlipQFormerModel
from blipbatch.model.vision import InstructBlipVisionModel

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=2
)
QFORMER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    encoder_hidden_size=48,
)
NUM_QUERIES = 6
TOL = 1e-5


def redraw(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter so that no path is negligible (default inits zero many of them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    return module.eval()


def ours_from(hf: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_pair():
    hf = redraw(transformers.InstructBlipVisionModel(transformers.InstructBlipVisionConfig(**VISION)))
    return hf, ours_from(hf, InstructBlipVisionModel(InstructBlipVisionConfig.from_dict(VISION)))


def test_vision_keys_match(vision_pair):
    hf, ours = vision_pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "encoder.layers.0.self_attn.qkv.bias" in ours.state_dict()


def test_blip2_vision_keys_match():
    hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VISION))
    ours = InstructBlipVisionModel(InstructBlipVisionConfig.from_dict(VISION))
    assert set(ours.state_dict()) == set(hf.state_dict())


@torch.no_grad()
def test_vision_parity(vision_pair):
    hf, ours = vision_pair
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    expected = hf(pixel_values=pixels).last_hidden_state
    got = ours(pixels).last_hidden_state
    assert got.shape == (2, 1 + 15 * 15, 32)
    assert max_diff(got, expected) < TOL


@torch.no_grad()
@pytest.mark.parametrize("size", [(24, 36), (40, 30), (30, 30)])
def test_vision_interpolate_pos_encoding(vision_pair, size):
    hf, ours = vision_pair
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    expected = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    got = ours(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert got.shape == (2, 1 + (size[0] // 2) * (size[1] // 2), 32)
    assert max_diff(got, expected) < TOL


def test_vision_size_mismatch_is_refused(vision_pair):
    _, ours = vision_pair
    with pytest.raises(ProcessorError, match=r"30x30.*24x36.*interpolate_pos_encoding=True"):
        ours(torch.zeros(1, 3, 24, 36))


@torch.no_grad()
def test_vision_bf16_model_takes_fp32_pixels(vision_pair):
    hf, ours = vision_pair
    model = InstructBlipVisionModel(InstructBlipVisionConfig.from_dict(VISION))
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16).eval()
    pixels = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    got = model(pixels).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert max_diff(got, ours(pixels).last_hidden_state) < 0.15  # bf16 rounding only


# ---------------------------------------------------------------- InstructBLIP Q-Former


def instructblip_qformer_pair(frequency: int):
    cfg = dict(QFORMER, cross_attention_frequency=frequency)
    hf = redraw(transformers.InstructBlipQFormerModel(transformers.InstructBlipQFormerConfig(**cfg)), seed=frequency)
    return hf, ours_from(hf, InstructBlipQFormerModel(InstructBlipQFormerConfig.from_dict(cfg)))


def qformer_inputs(batch: int = 3, text: int = 5):
    gen = torch.Generator().manual_seed(4)
    queries = torch.randn(batch, NUM_QUERIES, 32, generator=gen)
    image = torch.randn(batch, 17, 48, generator=gen)
    ids = torch.randint(1, 99, (batch, text), generator=gen)
    mask = torch.ones(batch, NUM_QUERIES + text, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    mask[2, NUM_QUERIES : NUM_QUERIES + 3] = 0  # left padding
    ids[mask[:, NUM_QUERIES:] == 0] = 0
    return queries, image, ids, mask


@pytest.mark.parametrize("frequency", [1, 2])
def test_instructblip_qformer_keys_match(frequency):
    hf, ours = instructblip_qformer_pair(frequency)
    assert set(ours.state_dict()) == set(hf.state_dict())
    cross = {k.split(".")[2] for k in ours.state_dict() if ".crossattention." in k}
    assert cross == {str(i) for i in range(3) if i % frequency == 0}


@torch.no_grad()
@pytest.mark.parametrize("frequency", [1, 2])
def test_instructblip_qformer_parity(frequency):
    hf, ours = instructblip_qformer_pair(frequency)
    queries, image, ids, mask = qformer_inputs()
    expected = hf(
        input_ids=ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image
    ).last_hidden_state
    got = ours(queries, image, input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.shape == (3, NUM_QUERIES + 5, 32)
    finite = torch.isfinite(expected)
    assert finite[:, :NUM_QUERIES].all()
    assert max_diff(got[finite], expected[finite]) < TOL
    # No mask is the same as an all-ones mask.
    expected = hf(input_ids=ids, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    assert max_diff(ours(queries, image, input_ids=ids).last_hidden_state, expected) < TOL


@torch.no_grad()
def test_instructblip_qformer_padding_is_masked():
    _, ours = instructblip_qformer_pair(2)
    queries, image, ids, mask = qformer_inputs()
    full = ours(queries, image, input_ids=ids, attention_mask=mask).last_hidden_state
    # Changing a padded token must not move any kept position.
    ids2 = ids.clone()
    ids2[1, -1] = 42
    moved = ours(queries, image, input_ids=ids2, attention_mask=mask).last_hidden_state
    assert max_diff(moved[1, :-2], full[1, :-2]) == 0.0


def test_instructblip_qformer_mask_shape_is_checked():
    _, ours = instructblip_qformer_pair(2)
    queries, image, ids, mask = qformer_inputs()
    with pytest.raises(ProcessorError, match="attention_mask"):
        ours(queries, image, input_ids=ids, attention_mask=mask[:, NUM_QUERIES:])


# ---------------------------------------------------------------- BLIP-2 Q-Former


@pytest.fixture(scope="module")
def blip2_qformer_pair():
    cfg = dict(QFORMER, cross_attention_frequency=2)
    hf = redraw(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**cfg)), seed=7)
    return hf, ours_from(hf, InstructBlipQFormerModel(Blip2QFormerConfig.from_dict(cfg)))


def test_blip2_qformer_keys_match(blip2_qformer_pair):
    hf, ours = blip2_qformer_pair
    keys = set(ours.state_dict())
    assert keys == set(hf.state_dict())
    assert "layernorm.weight" in keys and not any(k.startswith("embeddings.") for k in keys)
    assert not any(re.match(r"encoder\.layer\.\d+\.(intermediate|output)\.", k) for k in keys)  # no text FFN


@torch.no_grad()
def test_blip2_qformer_parity(blip2_qformer_pair):
    hf, ours = blip2_qformer_pair
    queries, image, _, _ = qformer_inputs()
    expected = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    got = ours(queries, image).last_hidden_state
    assert got.shape == (3, NUM_QUERIES, 32)
    assert max_diff(got, expected) < TOL
    with pytest.raises(ProcessorError, match="no text input"):
        ours(queries, image, input_ids=torch.ones(3, 2, dtype=torch.long))


@torch.no_grad()
def test_blip2_fp32_qformer_takes_bf16_image_features(blip2_qformer_pair):
    hf, ours = blip2_qformer_pair
    queries, image, _, _ = qformer_inputs()
    image = image.to(torch.bfloat16)
    expected = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    got = ours(queries, image).last_hidden_state
    assert got.dtype == torch.float32
    assert max_diff(got, expected) < TOL


def test_blip2_itm_layout_is_refused():
    with pytest.raises(ConfigError, match="use_qformer_text_input"):
        InstructBlipQFormerModel(Blip2QFormerConfig.from_dict(dict(QFORMER, use_qformer_text_input=True)))


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_activation_matches_transformers(name):
    x = torch.linspace(-6, 6, 1001)
    assert max_diff(activation(name)(x), transformers.activations.ACT2FN[name](x)) < 1e-6


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="not supported"):
        activation("mystery")
