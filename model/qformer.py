"""The Q-Former: a post-LN BERT whose learned queries also cross-attend to the image features.

One class covers both layouts, switched by `config.use_qformer_text_input`:
- InstructBLIP (True): the instruction tokens are embedded (word + position) after the queries, the LayerNorm
  covers the concatenation, and every layer has a separate FFN for the text positions. Parameter names follow
  transformers' `InstructBlipQFormerModel`.
- BLIP-2 (False): queries only, a top-level `layernorm`, no text weights at all. Parameter names follow
  transformers' `Blip2QFormerModel` (what `Blip2ForConditionalGeneration` stores under `qformer.`).

`from_pretrained` reads a standalone Q-Former checkpoint of either kind, or the `qformer.` part of a full one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .attention import attend_eager
from .base_models import PretrainedPart
from .configs import Blip2QFormerConfig, InstructBlipQFormerConfig
from .errors import ConfigError, ProcessorError
from .outputs import BaseModelOutputWithPoolingAndCrossAttentions, Collector, collected


@dataclass
class Extras(Collector):
    """What a forward asked for beyond the last hidden state: outputs to collect and per-layer head masks [H].
    The fast path passes None instead and runs SDPA."""

    head_mask: list[Tensor | None] = field(default_factory=list)


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, kv_size: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_size, config.hidden_size)
        self.value = nn.Linear(kv_size, config.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        mask: Tensor | None,
        head_mask: Tensor | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        """`head_mask` [H] scales each head's probabilities; `attentions` collects them (output_attentions)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        if head_mask is None and attentions is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            heads = None if head_mask is None else head_mask.to(q.dtype)[None, :, None, None]
            out, probs = attend_eager(q, k, v, mask, head_mask=heads)
            if attentions is not None:
                attentions.append(probs)
        return out.transpose(1, 2).flatten(2)


class QFormerSelfOutput(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    """Attention plus its post-LN residual block; cross-attention when kv_size is the image width."""

    def __init__(self, config: InstructBlipQFormerConfig, kv_size: int) -> None:
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, kv_size)
        self.output = QFormerSelfOutput(config)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        return self.output(self.attention(x, x if context is None else context, mask, head_mask, attentions), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class QFormerOutput(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerLayer(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, index: int) -> None:
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_hidden_size)
        if config.use_qformer_text_input:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def forward(
        self,
        x: Tensor,
        image: Tensor,
        mask: Tensor | None,
        num_queries: int,
        image_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        extras: Extras | None = None,
    ) -> Tensor:
        self_probs = extras.attentions if extras is not None else None
        x = self.attention(x, mask=mask, head_mask=head_mask, attentions=self_probs)
        # Only the queries see the image, and queries and text have separate FFNs.
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.has_cross_attention:
            cross_probs = extras.cross_attentions if extras is not None else None
            queries = self.crossattention(queries, image, image_mask, head_mask, cross_probs)
        out = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1]:
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(
        self,
        x: Tensor,
        image: Tensor,
        mask: Tensor | None,
        num_queries: int,
        image_mask: Tensor | None = None,
        extras: Extras | None = None,
    ) -> Tensor:
        if extras is not None:
            extras.hidden(x)
        for i, layer in enumerate(self.layer):
            x = layer(x, image, mask, num_queries, image_mask, extras.head_mask[i] if extras else None, extras)
            if extras is not None:
                extras.hidden(x)
        return x


class QFormerEmbeddings(nn.Module):
    """Instruction token embeddings (word + absolute position) and the LayerNorm shared with the queries."""

    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, query_embeds: Tensor, input_ids: Tensor | None, position_ids: Tensor | None = None) -> Tensor:
        dtype = self.layernorm.weight.dtype
        parts = [query_embeds.to(dtype)]
        if input_ids is not None:
            length = input_ids.shape[1]
            if position_ids is None:
                if length > self.position_embeddings.num_embeddings:
                    raise ProcessorError(
                        f"the Q-Former instruction has {length} tokens, more than its "
                        f"{self.position_embeddings.num_embeddings} positions; truncate the Q-Former input"
                    )
                # Text positions start at 0 after the queries: the queries have no position embedding.
                position_ids = torch.arange(length, device=input_ids.device)
            elif int(position_ids.max()) >= self.position_embeddings.num_embeddings or int(position_ids.min()) < 0:
                raise ProcessorError(
                    f"Q-Former position_ids must lie in [0, {self.position_embeddings.num_embeddings}), "
                    f"got {int(position_ids.min())}..{int(position_ids.max())}"
                )
            positions = self.position_embeddings(position_ids.to(input_ids.device))
            parts.append((self.word_embeddings(input_ids) + positions).to(dtype))
        return self.layernorm(torch.cat(parts, dim=1))


class InstructBlipQFormerModel(PretrainedPart):
    config_key = "qformer_config"
    checkpoint_prefix = "qformer."
    standalone = {"InstructBlipQFormerModel": InstructBlipQFormerConfig, "Blip2QFormerModel": Blip2QFormerConfig}
    config: InstructBlipQFormerConfig

    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        if isinstance(config, Blip2QFormerConfig) and config.use_qformer_text_input:
            raise ConfigError(
                "a BLIP-2 Q-Former with use_qformer_text_input=True is the image-text-matching layout "
                "(Blip2ForImageTextRetrieval), which is not supported; BLIP-2 generation checkpoints have it False"
            )
        self.config = config
        self.text_input = config.use_qformer_text_input
        if self.text_input:
            self.embeddings = QFormerEmbeddings(config)
        else:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = QFormerEncoder(config)

    def forward(
        self,
        query_embeds: Tensor,
        encoder_hidden_states: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        head_mask: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        """transformers' Q-Former forward (arguments by keyword as there): last_hidden_state [B, Q + T, H],
        pooler_output (the first query's state), hidden_states (embeddings, then every layer), attentions
        (self-attention, every layer) and cross_attentions (the layers that cross-attend to the image).

        position_ids [1|B, T]: the text tokens' positions (default 0..T-1). head_mask [H] or [layers, H]: 1 keeps
        a head, 0 silences it (in self- and cross-attention, as BERT). encoder_attention_mask [B, N]: image
        positions the queries may attend to (default all).
        """
        extras = None
        if head_mask is not None or output_attentions or output_hidden_states:
            asked = Collector.asked(output_hidden_states, output_attentions) or Collector()
            extras = Extras(**vars(asked), head_mask=self._layer_head_masks(head_mask))
        last = self.run(
            query_embeds, encoder_hidden_states, input_ids, attention_mask, position_ids, encoder_attention_mask, extras
        )
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=last,
            pooler_output=last[:, 0, :],
            hidden_states=collected(extras, "hidden_states"),
            attentions=collected(extras, "attentions"),
            cross_attentions=collected(extras, "cross_attentions"),
        )
        return out if return_dict is not False else out.to_tuple()

    def run(
        self,
        query_embeds: Tensor,
        encoder_hidden_states: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        extras: Extras | None = None,
    ) -> Tensor:
        """The last hidden state [B, Q + T, H] alone: the fast path (extras None) that the composite models use.

        attention_mask [B, Q + T] marks kept (1) and padded (0) positions; None keeps all. Padded positions
        are still computed (they only stop being attended to).
        """
        batch, num_queries = query_embeds.shape[:2]
        if self.text_input:
            x = self.embeddings(query_embeds, input_ids, position_ids)
        elif input_ids is not None:
            raise ProcessorError("the BLIP-2 Q-Former takes no text input; pass input_ids=None")
        else:
            x = self.layernorm(query_embeds.to(self.layernorm.weight.dtype))

        # Bidirectional: a padded position is hidden as a key from every position, nothing else.
        mask = _key_mask(attention_mask, batch, x.shape[1], "attention_mask", "queries + text", x.device)
        # The Q-Former may run in fp32 beside a bf16/fp16 vision tower: bring the image into its dtype.
        image = encoder_hidden_states.to(self._cross_attention_dtype())
        image_mask = _key_mask(
            encoder_attention_mask, batch, image.shape[1], "encoder_attention_mask", "image", x.device
        )
        return self.encoder(x, image, mask, num_queries, image_mask, extras)

    def _layer_head_masks(self, head_mask: Tensor | None) -> list[Tensor | None]:
        """head_mask [H] (every layer) or [layers, H] -> one [H] mask (or None) per layer."""
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask is None:
            return [None] * layers
        if head_mask.dim() == 1 and head_mask.shape[0] == heads:
            return [head_mask] * layers
        if tuple(head_mask.shape) == (layers, heads):
            return list(head_mask)
        raise ProcessorError(
            f"head_mask must be [num_heads] = [{heads}] or [num_layers, num_heads] = [{layers}, {heads}], "
            f"got {list(head_mask.shape)}"
        )

    def _cross_attention_dtype(self) -> torch.dtype:
        first = cast(QFormerLayer, self.encoder.layer[0])  # layer 0 always cross-attends
        return first.crossattention.attention.key.weight.dtype


def _key_mask(
    mask: Tensor | None, batch: int, length: int, name: str, what: str, device: torch.device
) -> Tensor | None:
    """A 1/0 key-padding mask [B, length] as a boolean SDPA mask [B, 1, 1, length], after checking its shape."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ProcessorError(f"Q-Former {name} must be [batch, {what}] = [{batch}, {length}], got {list(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)[:, None, None, :]
