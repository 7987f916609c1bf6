"""T5 / Flan-T5 encoder-decoder language model, with transformers' parameter names.

The encoder reads `inputs_embeds` (InstructBLIP's query outputs followed by the prompt embeddings);
the decoder runs on token ids with a self-attention KV cache and cross-attention keys/values that are
computed once from the encoder output.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .attention import attend_eager
from .configs import GenerationConfig, T5Config
from .errors import ModelError
from .kv_cache import KVCache
from .outputs import Collector

EMBEDDING_ALIASES = {
    "encoder.embed_tokens.weight": "shared.weight",
    "decoder.embed_tokens.weight": "shared.weight",
}


def head_is_tied(config: T5Config) -> bool:
    """Whether lm_head shares `shared`'s weight (and the decoder output is scaled by d_model**-0.5).

    transformers 5.x always writes tie_word_embeddings=true and records the caller's real choice as
    `scale_decoder_outputs`; false there means the model was built untied (real Flan-T5 checkpoints).
    """
    return bool(config.tie_word_embeddings) and config.extra.get("scale_decoder_outputs", True) is not False


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Bucket of each (key - query) offset: exact for short distances, log-spaced up to max_distance.

    Bidirectional attention splits the buckets between keys before and after the query; causal
    attention only sees keys before it, so later offsets fall into bucket 0 (they are masked anyway).
    """
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # The same float32 arithmetic as the reference, so bucket boundaries agree exactly.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


def _clamp_fp16(x: Tensor) -> Tensor:
    # transformers keeps fp16 activations finite after every sub-layer; a no-op for other dtypes.
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm, accumulated in fp32 and cast back to a half-precision weight's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; block 0 also owns the relative position bias."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, S, d_kv] of `x` [B, S, d_model]."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, attentions: list[Tensor] | None = None
    ) -> Tensor:
        """`attentions`: a list to append the probabilities to (output_attentions), else None."""
        q = self._heads(self.q(x))
        if bias is not None:
            bias = bias.to(q.dtype)
        if attentions is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        else:
            out, probs = attend_eager(q, k, v, bias, scale=1.0)
            attentions.append(probs)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self,
        x: Tensor,
        bias: Tensor | None,
        cache: KVCache | None,
        layer: int,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        h = self.layer_norm(x)
        k, v = self.SelfAttention.project_kv(h)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return x + self.SelfAttention(h, k, v, bias, attentions)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, attentions: list[Tensor] | None = None
    ) -> Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), k, v, mask, attentions)


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        assert config.dense_act_fn is not None  # set by T5Config.__post_init__
        self.act = activation(config.dense_act_fn)

    def forward(self, x: Tensor) -> Tensor:
        # wo may be kept in fp32 while the rest is half precision (Flan-T5 overflows otherwise).
        return self.wo(self.act(self.wi(x)).to(self.wo.weight.dtype))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        assert config.dense_act_fn is not None  # set by T5Config.__post_init__
        self.act = activation(config.dense_act_fn)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """layer[0] self-attention, layer[1] cross-attention (decoder only), layer[-1] feed-forward."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(
        self,
        x: Tensor,
        self_bias: Tensor | None,
        cross: tuple[Tensor, Tensor, Tensor | None] | None = None,
        cache: KVCache | None = None,
        index: int = 0,
        collect: Collector | None = None,
    ) -> Tensor:
        self_probs = collect.attentions if collect is not None else None
        x = _clamp_fp16(self.layer[0](x, self_bias, cache, index, self_probs))
        if cross is not None:
            cross_probs = collect.cross_attentions if collect is not None else None
            x = _clamp_fp16(self.layer[1](x, *cross, cross_probs))
        return _clamp_fp16(self.layer[-1](x))

    @property
    def self_attention(self) -> T5Attention:
        """The block's own attention (layer[0])."""
        return cast(T5LayerSelfAttention, self.layer[0]).SelfAttention

    @property
    def cross_attention(self) -> T5Attention:
        """The decoder's attention to the encoder output (layer[1]; decoder blocks only)."""
        return cast(T5LayerCrossAttention, self.layer[1]).EncDecAttention


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, num_layers: int, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.block = nn.ModuleList(
            [T5Block(config, is_decoder, has_relative_attention_bias=i == 0) for i in range(num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def first_block(self) -> T5Block:
        return cast(T5Block, self.block[0])

    def position_bias(self, q_length: int, k_length: int, past: int = 0) -> Tensor:
        """Relative position bias [1, H, q_length, k_length] for queries at positions past .. past+q_length."""
        table = self.first_block().self_attention.relative_attention_bias
        q_pos = torch.arange(q_length, device=table.weight.device)[:, None] + past
        k_pos = torch.arange(k_length, device=table.weight.device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, not self.is_decoder, self.num_buckets, self.max_distance)
        return table(buckets).permute(2, 0, 1).unsqueeze(0)


def _masked(bias: Tensor, allowed: Tensor) -> Tensor:
    # The most negative finite value rather than -inf, as transformers does: a fully masked row stays finite.
    return torch.where(allowed, bias, torch.finfo(bias.dtype).min)


def _key_padding(mask: Tensor | None, batch: int, length: int, what: str) -> Tensor | None:
    """A 2D 1/0 padding mask as bool [B, 1, 1, length], after checking its shape."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ModelError(f"{what} has shape {tuple(mask.shape)}, expected ({batch}, {length})")
    return mask.bool()[:, None, None, :]


def _final_norm(stack: T5Stack, x: Tensor, collect: Collector | None) -> Tensor:
    x = stack.final_layer_norm(x)
    if collect is not None:
        collect.hidden(x)
    return x


class T5Cache:
    """Decoder state across generation steps.

    `self_attention` holds the decoder's own keys/values. The cross-attention keys/values of every
    layer, and the encoder padding mask, are computed from the encoder output on the first decode
    call and reused afterwards: later calls do not read encoder_hidden_states/encoder_attention_mask.
    """

    def __init__(self, self_attention: KVCache) -> None:
        self.self_attention = self_attention
        self.cross_keys: list[Tensor] = []
        self.cross_values: list[Tensor] = []
        self.cross_mask: Tensor | None = None

    @property
    def length(self) -> int:
        return self.self_attention.length

    @property
    def has_cross(self) -> bool:
        return bool(self.cross_keys)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (in that order) of every cached tensor: beam search's survivors."""
        self.self_attention.reorder(index)
        self.cross_keys = [k.index_select(0, index) for k in self.cross_keys]
        self.cross_values = [v.index_select(0, index) for v in self.cross_values]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)


class T5Model(nn.Module):
    """The T5 encoder-decoder without its head (transformers' T5Model): `decode` returns hidden states.

    `tied_weights` maps alias keys to the key they share.
    """

    tied_weights: dict[str, str]
    # Flan-T5's feed-forward output overflows in fp16, so the loader keeps these weights fp32.
    keep_in_fp32: tuple[str, ...] = ("wo",)

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.tied_weights: dict[str, str] = dict(EMBEDDING_ALIASES)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, config.num_layers, is_decoder=False)
        assert config.num_decoder_layers is not None  # set by T5Config.__post_init__
        self.decoder = T5Stack(config, config.num_decoder_layers, is_decoder=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def encode(
        self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, collect: Collector | None = None
    ) -> Tensor:
        """Encoder last hidden state [B, S, d_model] for `inputs_embeds` [B, S, d_model]; `collect` gathers
        transformers' encoder_hidden_states (the input, then every block; the last one normed) and attentions."""
        batch, length = inputs_embeds.shape[:2]
        bias = self.encoder.position_bias(length, length)
        allowed = _key_padding(attention_mask, batch, length, "attention_mask")
        if allowed is not None:
            bias = _masked(bias, allowed)
        x = inputs_embeds
        for block in self.encoder.block:
            if collect is not None:
                collect.hidden(x)
            x = block(x, bias, collect=collect)
        return _final_norm(self.encoder, x, collect)

    def _cross_states(
        self, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        batch, length = encoder_hidden_states.shape[:2]
        keys, values = [], []
        for block in self.decoder.block:
            k, v = cast(T5Block, block).cross_attention.project_kv(encoder_hidden_states)
            keys.append(k)
            values.append(v)
        allowed = _key_padding(encoder_attention_mask, batch, length, "encoder_attention_mask")
        mask = None
        if allowed is not None:
            zeros = torch.zeros((), dtype=keys[0].dtype, device=keys[0].device)
            mask = _masked(zeros, allowed)
        return keys, values, mask

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden_states: Tensor | None,
        encoder_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        cache: T5Cache | None = None,
        collect: Collector | None = None,
    ) -> Tensor:
        """Decoder last hidden state [B, T, d_model] (after the final norm) for `decoder_input_ids` [B, T].

        With a cache, the ids are the next T positions after those already cached, and
        `decoder_attention_mask` (if any) covers all cached plus new positions. `collect` gathers the decoder's
        hidden states, self-attentions and cross-attentions.
        """
        batch, length = decoder_input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and cache.has_cross:
            keys, values, cross_mask = cache.cross_keys, cache.cross_values, cache.cross_mask
        else:
            if encoder_hidden_states is None:
                raise ModelError("decode needs encoder_hidden_states unless its cache already holds them")
            keys, values, cross_mask = self._cross_states(encoder_hidden_states, encoder_attention_mask)
            if cache is not None:
                cache.cross_keys, cache.cross_values, cache.cross_mask = keys, values, cross_mask

        total = past + length
        bias = self.decoder.position_bias(length, total, past)
        q_pos = torch.arange(past, total, device=bias.device)[:, None]
        allowed = torch.arange(total, device=bias.device)[None, :] <= q_pos
        padding = _key_padding(decoder_attention_mask, batch, total, "decoder_attention_mask")
        if padding is not None:
            allowed = allowed & padding
        bias = _masked(bias, allowed)

        x = self.shared(decoder_input_ids)
        kv = cache.self_attention if cache is not None else None
        for i, block in enumerate(self.decoder.block):
            if collect is not None:
                collect.hidden(x)
            x = block(x, bias, (keys[i], values[i], cross_mask), kv, i, collect)
        if kv is not None:
            kv.advance(length)
        return _final_norm(self.decoder, x, collect)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """`decode` of the encoded `inputs_embeds`: hidden states here, logits in T5ForConditionalGeneration."""
        encoder_hidden_states = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask)

    def new_cache(self, batch_size: int, max_length: int) -> T5Cache:
        """An empty decoder cache for `max_length` decoder positions, in the attention weights' dtype."""
        weight = self.decoder.first_block().self_attention.k.weight
        kv = KVCache(
            len(self.decoder.block),
            batch_size,
            self.config.num_heads,
            self.config.d_kv,
            max_length,
            weight.dtype,
            weight.device,
        )
        return T5Cache(kv)


class T5ForConditionalGeneration(T5Model):
    """Flan-T5 with its language-model head and transformers' state_dict keys."""

    generation_config: GenerationConfig  # generate()'s base settings, set by the composite model that holds this one
    fallback_weights: dict[str, str] = {}

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        # Original T5 rescales the decoder output before its head, which it ties to the embedding matrix;
        # untied T5 v1.1 does neither. A checkpoint may still store a head of its own (loading unties it then).
        self.tied = head_is_tied(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = self.shared.weight
            self.tied_weights["lm_head.weight"] = "shared.weight"
        else:
            # transformers 5.x saves a model built with tie_word_embeddings=False without lm_head (it ties
            # in memory, unscaled): such a head is the embedding matrix.
            self.fallback_weights = {"lm_head.weight": "shared.weight"}

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden_states: Tensor | None,
        encoder_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        cache: T5Cache | None = None,
        collect: Collector | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab]; the arguments are T5Model.decode's."""
        x = super().decode(
            decoder_input_ids, encoder_hidden_states, encoder_attention_mask, decoder_attention_mask, cache, collect
        )
        if self.tied:
            x = x * self.config.d_model**-0.5
        return self.lm_head(x)
