"""LLaMA (Vicuna) causal language model with transformers' LlamaForCausalLM parameter names."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .activations import activation
from .attention import attend, attend_eager, causal_padding_mask, check_attention_mask
from .configs import GenerationConfig, LlamaConfig
from .kv_cache import KVCache
from .outputs import Collector


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale in the model dtype: transformers' exact order.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config: LlamaConfig, seq_len: Tensor | None = None) -> Tensor:
    """inv_freq [head_dim / 2] (fp32, CPU unless seq_len is elsewhere) of the config's RoPE kind, with transformers
    5.24's arithmetic (`modeling_rope_utils`); `seq_len`: the sequence length dynamic NTK scaling stretches to."""
    kind, settings, dim = config.rope_kind, config.rope_settings, config.head_dim
    assert dim is not None  # set by LlamaConfig.__post_init__
    # Explicitly on the CPU at init: models are built under a meta device context when loaded.
    device = seq_len.device if seq_len is not None else torch.device("cpu")
    if kind == "default":
        return 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float) / dim
    base, factor = config.rope_base, settings["factor"]
    if kind == "dynamic":
        positions = config.max_position_embeddings
        if seq_len is None:
            length: Tensor | int = positions
        else:
            length = torch.maximum(seq_len, torch.tensor(positions, dtype=seq_len.dtype, device=seq_len.device))
        base = base * ((factor * length / positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        old_context = settings["original_max_position_embeddings"]
        low_wavelen = old_context / settings["low_freq_factor"]
        high_wavelen = old_context / settings["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - settings["low_freq_factor"]) / (
            settings["high_freq_factor"] - settings["low_freq_factor"]
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # A plain attribute, not a buffer: `module.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_frequencies(config)
        # Dynamic NTK: transformers re-derives the frequencies whenever a forward reaches past the longest length
        # seen so far (beyond max_position_embeddings), and goes back to the original ones below it.
        self.original_inv_freq = self.inv_freq
        self.longest_seen: int | Tensor = config.max_position_embeddings

    def _dynamic_update(self, position_ids: Tensor) -> None:
        seq_len = torch.max(position_ids) + 1
        original = self.config.max_position_embeddings
        longest_before = self.longest_seen
        if seq_len > longest_before:
            self.inv_freq = rope_frequencies(self.config, seq_len)
            self.longest_seen = seq_len
        if seq_len < original and longest_before > original:
            self.inv_freq = self.original_inv_freq.to(position_ids.device)
            self.longest_seen = original

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B|1, T, head_dim] for integer positions [B|1, T]; angles computed in fp32."""
        if self.config.rope_kind == "dynamic":
            self._dynamic_update(position_ids)
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by its positions' angles (halves layout, as in the HF checkpoints)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        assert config.head_dim is not None and kv_heads is not None  # set by LlamaConfig.__post_init__
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | None,
        collect: Collector | None = None,
    ) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if collect is None or collect.attentions is None:
            out = attend(q, k, v, mask, scale=self.scale)
        else:
            out, probs = attend_eager(q, k, v, mask, scale=self.scale, causal=True)
            collect.attentions.append(probs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | None,
        collect: Collector | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, collect)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # No padding_idx: it only matters for training, and Vicuna's pad id may lie outside the vocab.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        weight = self.embed_tokens.weight
        c = self.config
        assert c.num_key_value_heads is not None and c.head_dim is not None  # set by LlamaConfig.__post_init__
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, max_length, weight.dtype, weight.device
        )

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        collect: Collector | None = None,
    ) -> Tensor:
        """Last hidden state [B, T, D] (after the final norm) for inputs_embeds [B, T, D].

        attention_mask [B, past + T] (1 real, 0 pad) covers the cached and the new positions.
        Without position_ids, positions run on from the cache length, ignoring padding (as transformers does).
        `collect` gathers transformers' hidden_states (the input, then every layer; the last one normed) and
        attentions.
        """
        batch, length, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        check_attention_mask(attention_mask, batch, past + length)
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None]
        mask = causal_padding_mask(attention_mask, length, past + length, device)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.layers:
            if collect is not None:
                collect.hidden(h)
            h = layer(h, rope, mask, cache, collect)
        if cache is not None:
            cache.advance(length)
        h = self.norm(h)
        if collect is not None:
            collect.hidden(h)
        return h


class LlamaForCausalLM(nn.Module):
    generation_config: GenerationConfig  # generate()'s base settings, set by the composite model that holds this one

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_weights: dict[str, str] = {}
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.model.new_cache(batch_size, max_length)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        collect: Collector | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab] for inputs_embeds [B, T, D] ([B, 1, vocab] with `last_only`: a prefill
        needs only the next token's, and the vocabulary projection of every position is costly).
        The other arguments are LlamaModel.forward's.
        """
        h = self.model(inputs_embeds, attention_mask, position_ids, cache, collect)
        return self.lm_head(h[:, -1:] if last_only else h)
