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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation
from .base_models import PretrainedPart
from .configs import Blip2QFormerConfig, InstructBlipQFormerConfig
from .errors import ConfigError, ProcessorError


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, kv_size: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_size, config.hidden_size)
        self.value = nn.Linear(kv_size, config.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, x if context is None else context, mask), x)


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

    def forward(self, x: Tensor, image: Tensor, mask: Tensor | None, num_queries: int) -> Tensor:
        x = self.attention(x, mask=mask)
        # Only the queries see the image, and queries and text have separate FFNs.
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.has_cross_attention:
            queries = self.crossattention(queries, context=image)
        out = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1]:
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x: Tensor, image: Tensor, mask: Tensor | None, num_queries: int) -> Tensor:
        for layer in self.layer:
            x = layer(x, image, mask, num_queries)
        return x


class QFormerEmbeddings(nn.Module):
    """Instruction token embeddings (word + absolute position) and the LayerNorm shared with the queries."""

    def __init__(self, config: InstructBlipQFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, query_embeds: Tensor, input_ids: Tensor | None) -> Tensor:
        dtype = self.layernorm.weight.dtype
        parts = [query_embeds.to(dtype)]
        if input_ids is not None:
            length = input_ids.shape[1]
            if length > self.position_embeddings.num_embeddings:
                raise ProcessorError(
                    f"the Q-Former instruction has {length} tokens, more than its "
                    f"{self.position_embeddings.num_embeddings} positions; truncate the Q-Former input"
                )
            # Text positions start at 0 after the queries: the queries have no position embedding.
            positions = torch.arange(length, device=input_ids.device)
            parts.append((self.word_embeddings(input_ids) + self.position_embeddings(positions)).to(dtype))
        return self.layernorm(torch.cat(parts, dim=1))


class InstructBlipQFormerModel(PretrainedPart):
    config_key = "qformer_config"
    checkpoint_prefix = "qformer."
    standalone = {"InstructBlipQFormerModel": InstructBlipQFormerConfig, "Blip2QFormerModel": Blip2QFormerConfig}

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
    ) -> Tensor:
        """query_embeds [B, Q, H], image features [B, N, vision H], instruction ids [B, T] -> [B, Q + T, H].

        attention_mask [B, Q + T] marks kept (1) and padded (0) positions; None keeps all. Padded positions
        are still computed (they only stop being attended to).
        """
        batch, num_queries = query_embeds.shape[:2]
        if self.text_input:
            x = self.embeddings(query_embeds, input_ids)
        elif input_ids is not None:
            raise ProcessorError("the BLIP-2 Q-Former takes no text input; pass input_ids=None")
        else:
            x = self.layernorm(query_embeds.to(self.layernorm.weight.dtype))

        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, x.shape[1]):
                raise ProcessorError(
                    f"Q-Former attention_mask must be [batch, queries + text] = [{batch}, {x.shape[1]}], "
                    f"got {list(attention_mask.shape)}"
                )
            # Bidirectional: a padded position is hidden as a key from every position, nothing else.
            mask = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]

        # The Q-Former may run in fp32 beside a bf16/fp16 vision tower: bring the image into its dtype.
        image = encoder_hidden_states.to(self._cross_attention_dtype())
        return self.encoder(x, image, mask, num_queries)

    def _cross_attention_dtype(self) -> torch.dtype:
        return self.encoder.layer[0].crossattention.attention.key.weight.dtype
