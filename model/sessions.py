"""Decode sessions: a language model plus its KV cache, driven one token at a time by `generation`.

A session runs one prefill over the B prompts (image embeddings included), then repeats each row
`expand` times (beams, return sequences) by copying its cache rather than recomputing it, then
single-token decode steps; beam search reorders its rows.
"""

from __future__ import annotations

import torch

from .attention import generation_position_ids
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM
from .t5 import T5ForConditionalGeneration

# The decoder-only language models with their head, which decode sessions, ranking and continuous batching run.
CausalLM = LlamaForCausalLM | OPTForCausalLM


def expansion_index(batch: int, expand: int, device: torch.device) -> torch.Tensor:
    """Row index that repeats each of `batch` rows `expand` times consecutively (transformers' order)."""
    return torch.arange(batch, device=device).repeat_interleave(expand)


class DecoderOnlySession:
    """LLaMA / OPT: the prompt embeddings go through the decoder once, then one token per step."""

    def __init__(
        self, lm: CausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int, expand: int
    ):
        self.lm = lm
        self.inputs_embeds: torch.Tensor | None = inputs_embeds
        self.attention_mask = attention_mask
        self.expand = expand
        self.cache = lm.new_cache(inputs_embeds.shape[0], max_length)

    def prefill(self) -> torch.Tensor:
        position_ids = generation_position_ids(self.attention_mask)
        logits = self.lm(self.inputs_embeds, self.attention_mask, position_ids, cache=self.cache, last_only=True)
        index = expansion_index(logits.shape[0], self.expand, logits.device)
        self.inputs_embeds = None  # only needed once
        self.reorder(index)
        return logits[index, -1].float()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        position_ids = generation_position_ids(self.attention_mask)[:, -1:]
        embeds = self.lm.get_input_embeddings()(next_ids[:, None])
        return self.lm(embeds, self.attention_mask, position_ids, cache=self.cache)[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.attention_mask = self.attention_mask.index_select(0, index)


class EncoderDecoderSession:
    """T5: the prompt is encoded once; the decoder starts from `decoder_start_token_id`.

    The decoder's cache keeps the cross-attention keys and values after the first step, so the
    encoder output is not needed afterwards.
    """

    def __init__(
        self,
        lm: T5ForConditionalGeneration,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_start_ids: torch.Tensor,
        max_length: int,
        expand: int,
    ):
        self.lm = lm
        self.inputs_embeds: torch.Tensor | None = inputs_embeds
        self.attention_mask: torch.Tensor | None = attention_mask
        self.decoder_start_ids = decoder_start_ids
        self.expand = expand
        self.cache = lm.new_cache(inputs_embeds.shape[0], max_length)

    def prefill(self) -> torch.Tensor:
        assert self.inputs_embeds is not None, "prefill runs once, before the steps"
        encoder_states = self.lm.encode(self.inputs_embeds, self.attention_mask)
        logits = self.lm.decode(self.decoder_start_ids, encoder_states, self.attention_mask, cache=self.cache)
        index = expansion_index(logits.shape[0], self.expand, logits.device)
        self.inputs_embeds = self.attention_mask = None  # only needed once
        self.reorder(index)
        return logits[index, -1].float()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.decode(next_ids[:, None], None, cache=self.cache)[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
