"""Parity of our LLaMA and OPT decoders with transformers' LlamaForCausalLM / OPTForCausalLM (tiny, fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from blipbatch.model.attention import causal_padding_mask, generation_position_ids
from blipbatch.model.configs import LlamaConfig, OPTConfig
from blipbatch.model.errors import ModelError
from blipbatch.model.llama import LlamaForCausalLM
from blipbatch.model.opt import OPTForCausalLM

ATOL = 1e-5
VOCAB = 96

LLAMA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
OPT_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    ffn_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    dropout=0.0,
)

LLAMA_VARIANTS = {
    # GQA, rope_theta far from 10000, config read in the 5.x `rope_parameters` layout.
    "gqa": (dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}), "parameters"),
    # Biases, a head_dim that is not hidden/heads, tied head, config in the older top-level `rope_theta` layout.
    "bias_tied": (
        dict(
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
        ),
        "theta",
    ),
}
OPT_VARIANTS = {
    "pre_ln_tied": dict(),
    # opt-350m's layout: post-LN, word embeddings narrower than the trunk (project_in/out), untied head here.
    "post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=16, tie_word_embeddings=False),
}


def redraw(hf_model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter: transformers' init leaves many paths near zero or identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)


def our_config(cls, hf_config, rope_layout: str = "parameters"):
    data = hf_config.to_dict()
    if rope_layout == "theta":
        data["rope_theta"] = data.pop("rope_parameters")["rope_theta"]
    return cls.from_dict(data)


def make_llama(variant: str):
    kwargs, layout = LLAMA_VARIANTS[variant]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE, **kwargs)).eval()
    redraw(hf)
    config = our_config(LlamaConfig, hf.config, layout)
    assert config.rope_base == kwargs["rope_parameters"]["rope_theta"]
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def make_opt(variant: str):
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**OPT_BASE, **OPT_VARIANTS[variant])).eval()
    redraw(hf)
    ours = OPTForCausalLM(our_config(OPTConfig, hf.config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


ALL_MODELS = [("llama", v) for v in LLAMA_VARIANTS] + [("opt", v) for v in OPT_VARIANTS]
MAKERS = {"llama": make_llama, "opt": make_opt}


@pytest.fixture(scope="module", params=ALL_MODELS, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    family, variant = request.param
    return MAKERS[family](variant)


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return mask


def embeds_for(model, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, length, model.get_input_embeddings().weight.shape[1])


def hf_logits(hf, embeds, mask=None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return hf(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


@torch.no_grad()
def test_full_sequence_no_mask(pair):
    hf, ours = pair
    embeds = embeds_for(ours, 2, 7)
    expected = hf_logits(hf, embeds)
    got = ours(embeds)
    assert got.shape == (2, 7, VOCAB)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_full_sequence_left_padding(pair):
    hf, ours = pair
    mask = left_padded_mask([7, 4, 1], 7)
    embeds = embeds_for(ours, 3, 7)
    # position_ids left to the model: LLaMA ignores padding, OPT counts real tokens; both as transformers does.
    expected = hf_logits(hf, embeds, mask)
    got = ours(embeds, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    # Explicit generation positions too (what generate passes for padded prompts).
    positions = generation_position_ids(mask)
    expected = hf_logits(hf, embeds, mask, positions)
    got = ours(embeds, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_generation_position_ids_match_transformers(pair):
    hf, _ = pair
    mask = left_padded_mask([6, 3, 1], 6)
    expected = hf._prepare_position_ids_for_generation(torch.zeros(3, 6, dtype=torch.long), {"attention_mask": mask})
    torch.testing.assert_close(generation_position_ids(mask), expected, atol=0, rtol=0)


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(pair):
    hf, ours = pair
    prefill, steps = 5, 3
    total = prefill + steps
    # The last row is all padding in its first 4 slots: those queries only see themselves.
    mask = left_padded_mask([total, total - 2, total - 4], total)
    embeds = embeds_for(ours, 3, total)
    positions = generation_position_ids(mask)

    full = ours(embeds, attention_mask=mask, position_ids=positions)
    expected = hf_logits(hf, embeds, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(full[real], expected[real], atol=ATOL, rtol=0)

    cache = ours.new_cache(3, total + 2)
    chunks = [ours(embeds[:, :prefill], mask[:, :prefill], positions[:, :prefill], cache)]
    for t in range(prefill, total):
        chunks.append(ours(embeds[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], cache))
    assert cache.length == total
    incremental = torch.cat(chunks, dim=1)
    assert torch.isfinite(incremental).all()
    torch.testing.assert_close(incremental[real], full[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(incremental[:, prefill:], expected[:, prefill:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decoding_without_mask(pair):
    hf, ours = pair
    embeds = embeds_for(ours, 2, 6)
    expected = hf_logits(hf, embeds)
    cache = ours.new_cache(2, 6)
    chunks = [ours(embeds[:, :3], cache=cache)]
    chunks += [ours(embeds[:, t : t + 1], cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_reorder(pair):
    _, ours = pair
    prefill = 5
    mask = left_padded_mask([prefill + 1, prefill - 1, 2], prefill + 1)
    embeds = embeds_for(ours, 3, prefill + 1)
    positions = generation_position_ids(mask)
    perm = torch.tensor([2, 0, 0, 1])  # beams: drop nothing, duplicate one, reorder

    cache = ours.new_cache(3, prefill + 1)
    ours(embeds[:, :prefill], mask[:, :prefill], positions[:, :prefill], cache)
    cache.reorder(perm)
    stepped = ours(embeds[perm, prefill:], mask[perm], positions[perm, prefill:], cache)

    fresh = ours.new_cache(4, prefill + 1)
    ours(embeds[perm, :prefill], mask[perm, :prefill], positions[perm, :prefill], fresh)
    expected = ours(embeds[perm, prefill:], mask[perm], positions[perm, prefill:], fresh)
    torch.testing.assert_close(stepped, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(pair):
    """A greedy loop over our model (generation positions, growing mask) picks transformers' tokens."""
    hf, ours = pair
    new_tokens = 4
    mask = left_padded_mask([5, 3], 5)
    embeds = embeds_for(ours, 2, 5, seed=3)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    cache = ours.new_cache(2, 5 + new_tokens)
    positions = generation_position_ids(mask)
    logits = ours(embeds, mask, positions, cache)
    tokens = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        logits = ours(ours.get_input_embeddings()(token)[:, None], mask, positions, cache)
    torch.testing.assert_close(torch.stack(tokens, dim=1), expected[:, -new_tokens:], atol=0, rtol=0)


STATE_DICT_CASES = {
    "llama-untied": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        LlamaForCausalLM,
        LlamaConfig,
        dict(LLAMA_BASE, num_key_value_heads=2),
    ),
    "llama-tied": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        LlamaForCausalLM,
        LlamaConfig,
        dict(LLAMA_BASE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "opt-tied": (transformers.OPTForCausalLM, transformers.OPTConfig, OPTForCausalLM, OPTConfig, OPT_BASE),
    "opt-untied-350m": (
        transformers.OPTForCausalLM,
        transformers.OPTConfig,
        OPTForCausalLM,
        OPTConfig,
        dict(OPT_BASE, tie_word_embeddings=False, do_layer_norm_before=False, word_embed_proj_dim=16),
    ),
    "opt-no-affine-no-bias": (
        transformers.OPTForCausalLM,
        transformers.OPTConfig,
        OPTForCausalLM,
        OPTConfig,
        dict(OPT_BASE, layer_norm_elementwise_affine=False, enable_bias=False),
    ),
}


@pytest.mark.parametrize("case", list(STATE_DICT_CASES))
def test_state_dict_keys_and_tying(case):
    hf_cls, hf_config_cls, our_cls, our_config_cls, kwargs = STATE_DICT_CASES[case]
    hf = hf_cls(hf_config_cls(**kwargs))
    ours = our_cls(our_config_cls.from_dict(hf.config.to_dict()))
    hf_state = hf.state_dict()
    assert set(ours.state_dict()) == set(hf_state)
    for key, value in ours.state_dict().items():
        assert value.shape == hf_state[key].shape, key
    embedding = ours.get_input_embeddings().weight
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is embedding
        ((alias, source),) = ours.tied_weights.items()
        assert alias == "lm_head.weight" and source in hf_state
        # A checkpoint without the alias (as on the Hub) still sets the head through the embedding.
        redraw(hf)
        missing = ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != alias}, strict=False)
        assert missing.missing_keys == [alias] and not missing.unexpected_keys
        torch.testing.assert_close(ours.lm_head.weight, hf.get_input_embeddings().weight, atol=0, rtol=0)
    else:
        assert ours.tied_weights == {}
        assert ours.lm_head.weight is not embedding


def test_attention_mask_shape_is_checked():
    _, ours = make_opt("pre_ln_tied")
    with pytest.raises(ModelError, match="attention_mask has shape"):
        ours(torch.zeros(1, 3, 32), attention_mask=torch.ones(1, 4))


def test_padding_mask_lets_padded_queries_see_themselves():
    # Row 1 is padding up to its last slot: without the self entry those queries would see nothing,
    # and SDPA kernels that return NaN for empty rows would write NaN into the KV cache.
    mask = causal_padding_mask(left_padded_mask([4, 1], 4), q_length=4, kv_length=4, device=torch.device("cpu"))
    assert mask.shape == (2, 1, 4, 4)
    assert mask.any(-1).all()
    expected_row1 = torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(mask[1, 0], expected_row1)
    torch.testing.assert_close(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    # A decode step over a cache: one query row, keys masked by padding except itself.
    cache_mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    step = causal_padding_mask(cache_mask, q_length=1, kv_length=3, device=torch.device("cpu"))
    torch.testing.assert_close(step[:, 0, 0], torch.tensor([[False, True, True], [False, False, True]]))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
@torch.no_grad()
def test_bf16_parity(pair, device):
    """Same dtype handling as transformers in bf16 (fp32 RMSNorm statistics and RoPE angles, bf16 matmuls)."""
    hf, ours = (copy.deepcopy(m).to(device=device, dtype=torch.bfloat16) for m in pair)
    rotary = getattr(hf.model, "rotary_emb", None)
    if rotary is not None:
        # `.to(bfloat16)` rounds this buffer, but from_pretrained(dtype=bfloat16) keeps it fp32, as we do.
        rotary.inv_freq = pair[0].model.rotary_emb.inv_freq.to(device)
    mask = left_padded_mask([6, 3], 6).to(device)
    embeds = embeds_for(ours, 2, 6).to(device=device, dtype=torch.bfloat16)
    positions = generation_position_ids(mask)
    expected = hf_logits(hf, embeds, mask, positions)
    got = ours(embeds, attention_mask=mask, position_ids=positions)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    # Bit-exact on CPU; CUDA may choose other SDPA/matmul kernels per call, so allow about one bf16 ulp of ~10.
    atol = 0.0 if device == "cpu" else 0.07
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=0)
