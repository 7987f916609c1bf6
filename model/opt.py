"""OPT causal language model with transformers' OPTForCausalLM parameter names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .activations import activation
from .attention import attend, attend_eager, causal_padding_mask, check_attention_mask
from .configs import GenerationConfig, OPTConfig
from .kv_cache import KVCache
from .outputs import Collector

# OPT's learned position table starts 2 rows in (a fairseq leftover); checkpoints store those rows.
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        dim, bias = config.hidden_size, config.enable_bias
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, collect: Collector | None = None
    ) -> Tensor:
        batch, length, _ = x.shape
        # OPT scales the query before the dot product (not the scores); same rounding as transformers.
        q = (self.q_proj(x) * self.scale).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if collect is None or collect.attentions is None:
            out = attend(q, k, v, mask, scale=1.0)
        else:
            out, probs = attend_eager(q, k, v, mask, scale=1.0, causal=True)
            collect.attentions.append(probs)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, layer_idx: int) -> None:
        super().__init__()
        dim, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.fc1 = nn.Linear(dim, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, dim, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.act = activation(config.activation_function)
        # Pre-LN for every released size except opt-350m, which normalises after each residual add.
        self.pre_norm = config.do_layer_norm_before

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, collect: Collector | None = None
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, collect)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache, collect))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        dim, word_dim = config.hidden_size, config.word_embed_proj_dim
        assert word_dim is not None  # set by OPTConfig.__post_init__
        # No padding_idx: it only matters for training.
        self.embed_tokens = nn.Embedding(config.vocab_size, word_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, dim)
        # opt-350m embeds words in 512 dims and projects to and from its 1024-dim trunk.
        self.project_in = nn.Linear(word_dim, dim, bias=False) if word_dim != dim else None
        self.project_out = nn.Linear(dim, word_dim, bias=False) if word_dim != dim else None
        # Checkpoints fine-tuned before transformers 4.20.1 may set `_remove_final_layer_norm`.
        has_final_norm = config.do_layer_norm_before and not config.extra.get("_remove_final_layer_norm", False)
        self.final_layer_norm = (
            nn.LayerNorm(dim, elementwise_affine=config.layer_norm_elementwise_affine) if has_final_norm else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        weight = self.decoder.embed_tokens.weight
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_attention_heads, head_dim, max_length, weight.dtype, weight.device
        )

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        collect: Collector | None = None,
    ) -> Tensor:
        """Last hidden state [B, T, word_embed_proj_dim] (after the final norm and project_out) for
        inputs_embeds [B, T, word_embed_proj_dim].

        attention_mask [B, past + T] (1 real, 0 pad) covers the cached and the new positions.
        Without position_ids, positions count real tokens of the mask (pads get -1), as transformers does.
        `collect` gathers transformers' hidden_states (each layer's input, then the final output) and attentions.
        """
        decoder = self.decoder
        batch, length, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        check_attention_mask(attention_mask, batch, past + length)
        device = inputs_embeds.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + length, device=device)[None]
            else:
                real = attention_mask.long()
                position_ids = (real.cumsum(-1) * real - 1)[:, past:]
        mask = causal_padding_mask(attention_mask, length, past + length, device)
        h = inputs_embeds if decoder.project_in is None else decoder.project_in(inputs_embeds)
        h = h + decoder.embed_positions(position_ids + POSITION_OFFSET)
        for layer in decoder.layers:
            if collect is not None:
                collect.hidden(h)
            h = layer(h, mask, cache, collect)
        if cache is not None:
            cache.advance(length)
        if decoder.final_layer_norm is not None:
            h = decoder.final_layer_norm(h)
        if decoder.project_out is not None:
            h = decoder.project_out(h)
        if collect is not None:
            collect.hidden(h)
        return h


class OPTForCausalLM(nn.Module):
    generation_config: GenerationConfig  # generate()'s base settings, set by the composite model that holds this one

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        assert config.word_embed_proj_dim is not None  # set by OPTConfig.__post_init__
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.tied_weights: dict[str, str] = {}
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
            self.tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

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
        """Logits [B, T, vocab] for inputs_embeds [B, T, word_embed_proj_dim] ([B, 1, vocab] with
        `last_only`, for a prefill). The other arguments are OPTModel.forward's.
        """
        h = self.model(inputs_embeds, attention_mask, position_ids, cache, collect)
        return self.lm_head(h[:, -1:] if last_only else h)
