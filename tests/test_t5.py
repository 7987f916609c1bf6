"""T5 / Flan-T5 parity with transformers on tiny models whose parameters are all re-drawn."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from blipbatch.model.configs import T5Config
from blipbatch.model.t5 import T5ForConditionalGeneration, head_is_tied, relative_position_bucket

VOCAB = 40
# Few buckets and a short max distance, so short sequences already reach the log-spaced buckets.
BASE = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)
VARIANTS = [("gated-gelu", "gelu"), ("relu", None), ("gated-gelu", None)]  # None: the config's default activation


def redraw_(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)  # norms near 1 keep activations at a sane scale
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                param.copy_(noise * 0.5)
            else:
                param.copy_(noise * 0.2)


def build(feed_forward_proj: str = "gated-gelu", dense_act_fn: str | None = "gelu", tied: bool = False, seed: int = 0):
    """(transformers model, our model) with identical re-drawn weights."""
    kwargs = dict(BASE, feed_forward_proj=feed_forward_proj)
    if dense_act_fn is not None:
        kwargs["dense_act_fn"] = dense_act_fn
    if not tied:
        kwargs["tie_word_embeddings"] = False
    hf_config = transformers.T5Config(**kwargs)
    hf = transformers.T5ForConditionalGeneration(hf_config)
    if not tied:
        # 5.23 ties the head whatever the config says; Flan-T5 checkpoints carry their own.
        hf.lm_head = nn.Linear(hf_config.d_model, VOCAB, bias=False)
    redraw_(hf, seed)
    hf.eval()
    # The oracle must really be in the configuration under test.
    assert hf.config.scale_decoder_outputs is tied
    assert (hf.lm_head.weight is hf.shared.weight) is tied
    if dense_act_fn is not None:
        assert hf.config.dense_act_fn == dense_act_fn

    config = T5Config.from_dict(hf_config.to_dict())
    ours = T5ForConditionalGeneration(config).eval()
    assert ours.tied is tied
    ours_keys = set(ours.state_dict())
    state = {k: v for k, v in hf.state_dict().items() if k not in ours.tied_weights or k in ours_keys}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def encoder_inputs(batch: int = 2, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, BASE["d_model"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0  # right padding, as InstructBLIP-T5 batches are padded
    return embeds, mask


def decoder_ids(batch: int = 2, length: int = 5, seed: int = 2) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0  # decoder_start_token_id
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-60, 61)[None, :] - torch.arange(0, 3)[:, None]
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((8, 20), (32, 128)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            )
            got = relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
            assert torch.equal(got, expected), (bidirectional, num_buckets)


@torch.no_grad()
def test_encoder_parity_with_right_padding():
    hf, ours = build()
    embeds, mask = encoder_inputs()
    expected = hf.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    got = ours.encode(embeds, mask)
    assert expected.abs().max() > 0.1
    assert max_diff(got, expected) < 1e-5
    # The padding must matter, or the test could not see a mask bug.
    assert max_diff(ours.encode(embeds, None)[1, :6], got[1, :6]) > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("ffn,act", VARIANTS, ids=["gated-gelu-exact", "relu", "gated-gelu-default"])
@torch.no_grad()
def test_logits_parity(ffn, act, tied):
    hf, ours = build(ffn, act, tied)
    embeds, mask = encoder_inputs()
    ids = decoder_ids()
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    got = ours(embeds, mask, ids)
    assert got.shape == (2, 5, VOCAB)
    assert expected.std() > 0.1
    assert max_diff(got, expected) < 1e-4


@torch.no_grad()
def test_half_precision_keeps_wo_fp32_like_transformers():
    hf, ours = build()
    for model in (hf, ours):
        model.to(torch.bfloat16)
        for name, module in model.named_modules():
            if name.endswith(ours.keep_in_fp32):
                module.float()
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    embeds, mask = encoder_inputs()
    embeds = embeds.to(torch.bfloat16)
    ids = decoder_ids()
    expected = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits
    got = ours(embeds, mask, ids)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert max_diff(got, expected) < 2e-2 * expected.float().abs().max().item()


@torch.no_grad()
def test_incremental_decoding_and_reorder():
    _, ours = build()
    embeds, mask = encoder_inputs()
    ids = decoder_ids(length=7)
    encoded = ours.encode(embeds, mask)
    full = ours.decode(ids, encoded, mask)

    cache = ours.new_cache(batch_size=2, max_length=8)
    steps = [ours.decode(ids[:, :1], encoded, mask, cache=cache)]
    for t in range(1, 5):
        steps.append(ours.decode(ids[:, t : t + 1], encoded, mask, cache=cache))
    assert cache.length == 5
    assert max_diff(torch.cat(steps, dim=1), full[:, :5]) < 1e-5

    # Beam-style reorder: rows swapped and one duplicated; encoder rows differ in padding.
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    reordered_ids = ids.index_select(0, index)
    expected = ours.decode(reordered_ids, encoded.index_select(0, index), mask.index_select(0, index))
    got = ours.decode(reordered_ids[:, 5:7], encoded, mask, cache=cache)
    assert max_diff(got, expected[:, 5:7]) < 1e-5
    assert max_diff(got[0], got[2]) > 1e-3  # the reorder is visible


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_dict_keys_match_transformers(tied):
    hf, ours = build(tied=tied)
    hf_keys = set(hf.state_dict())
    assert set(ours.tied_weights) <= hf_keys
    assert set(ours.state_dict()) | set(ours.tied_weights) == hf_keys
    assert ("lm_head.weight" in ours.tied_weights) is tied
    assert (ours.lm_head.weight is ours.shared.weight) is tied
    assert "decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in ours.state_dict()
    assert all(v == "shared.weight" for v in ours.tied_weights.values())


def test_head_tying_follows_checkpoint_semantics():
    # Flan-T5's config.json: untied head, no rescaling.
    assert not head_is_tied(T5Config.from_dict({"tie_word_embeddings": False}))
    # Written by transformers 5.x for a model built untied: tie forced to true, the choice kept here.
    assert not head_is_tied(T5Config.from_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False}))
    assert head_is_tied(T5Config.from_dict({"tie_word_embeddings": True}))
    assert head_is_tied(T5Config.from_dict({}))


@torch.no_grad()
def test_unequal_encoder_decoder_depths():
    config = T5Config(
        **BASE, num_decoder_layers=3, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False
    )
    torch.manual_seed(0)
    ours = T5ForConditionalGeneration(config).eval()
    redraw_(ours, 3)
    assert len(ours.encoder.block) == 2 and len(ours.decoder.block) == 3
    embeds, mask = encoder_inputs()
    ids = decoder_ids(length=4)
    full = ours(embeds, mask, ids)
    assert full.shape == (2, 4, VOCAB) and torch.isfinite(full).all()

    encoded = ours.encode(embeds, mask)
    cache = ours.new_cache(batch_size=2, max_length=4)
    steps = [ours.decode(ids[:, :2], encoded, mask, cache=cache)]
    steps += [ours.decode(ids[:, t : t + 1], encoded, mask, cache=cache) for t in (2, 3)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
