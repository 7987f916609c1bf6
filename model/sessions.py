"""Decode sessions: a language model plus its KV cache, driven one token at a time by `generation`.

A session owns one prefill (the whole prompt, image embeddings included) and then single-token
decode steps; beam search reorders its rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import generation_position_ids


class DecoderOnlySession:
    """LLaMA / OPT: the prompt embeddings go through the decoder once, then one token per step."""

    def __init__(self, lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_length: int):
        self.lm = lm
        self.inputs_embeds = inputs_embeds
        self.attention_mask = attention_mask
        self.cache = lm.new_cache(inputs_embeds.shape[0], max_length)

    def prefill(self) -> torch.Tensor:
        position_ids = generation_position_ids(self.attention_mask)
        logits = self.lm(self.inputs_embeds, self.attention_mask, position_ids, cache=self.cache)
        self.inputs_embeds = None  # only needed once
        return logits[:, -1].float()

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
    """T5: the prompt is encoded once; the decoder starts from `decoder_start_token_id`."""

    def __init__(
        self,
        lm: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_start_ids: torch.Tensor,
        max_length: int,
    ):
        self.lm = lm
        self.encoder_mask = attention_mask
        self.encoder_states = lm.encode(inputs_embeds, attention_mask)
        self.decoder_start_ids = decoder_start_ids
        self.cache = lm.new_cache(inputs_embeds.shape[0], max_length)

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm.decode(ids, self.encoder_states, self.encoder_mask, cache=self.cache)
        return logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        return self._decode(self.decoder_start_ids)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self._decode(next_ids[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.encoder_states = self.encoder_states.index_select(0, index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
