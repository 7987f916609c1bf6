"""InstructBLIP and BLIP-2: vision encoder -> Q-Former -> projection -> language model.

The module trees and parameter names follow transformers' `InstructBlipForConditionalGeneration`,
`InstructBlipModel` (the language model without its head), `Blip2ForConditionalGeneration` and
`Blip2Model`, so their checkpoints load as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base_models import PretrainedModel
from .configs import BaseConfig, Blip2Config, GenerationConfig, InstructBlipConfig
from .errors import ConfigError, ProcessorError
from .generation import generate_ids
from .llama import LlamaForCausalLM, LlamaModel
from .opt import OPTForCausalLM, OPTModel
from .processor import check_placeholders
from .qformer import InstructBlipQFormerModel
from .sessions import DecoderOnlySession, EncoderDecoderSession
from .t5 import T5ForConditionalGeneration, T5Model
from .vision import InstructBlipVisionModel

LANGUAGE_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "opt": OPTForCausalLM,
    "t5": T5ForConditionalGeneration,
}
# What transformers' AutoModel builds: the same trunks without the head.
BASE_LANGUAGE_MODELS: dict[str, type[nn.Module]] = {"llama": LlamaModel, "opt": OPTModel, "t5": T5Model}
# Kept in fp32 when the rest is cast to fp16/bf16, as transformers does.
KEEP_IN_FP32 = ("query_tokens",)
# New tokens when neither max_new_tokens nor max_length is set (transformers' default).
DEFAULT_NEW_TOKENS = 20
GENERATION_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def language_model_width(text_config: BaseConfig) -> int:
    return text_config.d_model if text_config.model_type == "t5" else text_config.hidden_size


@dataclass
class InstructBlipOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    language_model_inputs: torch.Tensor | None = None  # projected Q-Former outputs, [B, num_query_tokens, width]


@dataclass
class InstructBlipModelOutput:
    last_hidden_state: torch.Tensor  # the language model's (T5: its decoder's), after the final norm
    encoder_last_hidden_state: torch.Tensor | None = None  # T5's encoder output
    language_model_inputs: torch.Tensor | None = None  # projected Q-Former outputs, [B, num_query_tokens, width]


class InstructBlipBase(PretrainedModel):
    """What the composite models share: the image path, the placeholder merge and checkpoint I/O.
    Subclasses pick the language-model classes (with or without the head) and what forward returns."""

    config_class: ClassVar[type[InstructBlipConfig]] = InstructBlipConfig
    language_models: ClassVar[dict[str, type[nn.Module]]]

    def __init__(self, config: InstructBlipConfig) -> None:
        super().__init__()
        self.config = config
        qformer_width = config.qformer_config.hidden_size
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.qformer = InstructBlipQFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(qformer_width, language_model_width(config.text_config))
        self.language_model = self.language_models[config.text_config.model_type](config.text_config)

    @property
    def uses_qformer_text(self) -> bool:
        return self.config.qformer_config.use_qformer_text_input

    @property
    def tied_weights(self) -> dict[str, str]:
        aliases = getattr(self.language_model, "tied_weights", {})
        return {f"language_model.{k}": f"language_model.{v}" for k, v in aliases.items()}

    @property
    def fallback_weights(self) -> dict[str, str]:
        fallbacks = getattr(self.language_model, "fallback_weights", {})
        return {f"language_model.{k}": f"language_model.{v}" for k, v in fallbacks.items()}

    def keep_in_fp32(self, name: str) -> bool:
        if name in KEEP_IN_FP32:
            return True
        if not self.uses_qformer_text and name.startswith("qformer."):
            return True  # transformers keeps BLIP-2's Q-Former in fp32
        fragments = getattr(self.language_model, "keep_in_fp32", ())
        return name.startswith("language_model.") and any(f".{f}." in name for f in fragments)

    # ---- image side -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Vision encoder output [B, 1 + patches, vision width]; computed once per image."""
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def query_image(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former over image embeddings (and the instruction) -> LM-space features [B, Q, LM width]."""
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        if self.uses_qformer_text:
            if qformer_input_ids is None:
                raise ProcessorError(
                    "InstructBLIP needs qformer_input_ids (the instruction tokenized for the Q-Former); "
                    "build the inputs with InstructBlipProcessor"
                )
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
            mask = torch.cat([query_mask, qformer_attention_mask.to(queries.device)], dim=1)
            hidden = self.qformer(queries, image_embeds, input_ids=qformer_input_ids, attention_mask=mask)
        else:
            hidden = self.qformer(queries, image_embeds)
        query_output = hidden[:, : self.config.num_query_tokens]
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        image_embeds = self.encode_images(pixel_values, interpolate_pos_encoding)
        return self.query_image(image_embeds, qformer_input_ids, qformer_attention_mask)

    # ---- language side ----------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by the projected queries."""
        token = self.config.image_token_index
        if token is None:
            raise ConfigError(
                "config.json has no image_token_index: this is a checkpoint revision from before "
                "transformers 4.47; use the current Hub revision, or add the id of the '<image>' token "
                "as image_token_index to config.json"
            )
        check_placeholders(input_ids, token, self.config.num_query_tokens)
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = (input_ids == token).unsqueeze(-1)
        return embeds.masked_scatter(mask, image_features.to(embeds.device, embeds.dtype))

    def build_lm_inputs(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None,
        qformer_attention_mask: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        interpolate_pos_encoding: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A forward's LM input: (merged embeddings, attention mask, projected image features)."""
        if input_ids is None:
            raise ProcessorError("forward needs input_ids (with the image placeholders); use the processor")
        features = self.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding)
        embeds = self.embed_inputs(input_ids, features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return embeds, attention_mask, features


class InstructBlipForConditionalGeneration(InstructBlipBase):
    architecture = "InstructBlipForConditionalGeneration"
    language_models = LANGUAGE_MODELS

    def __init__(self, config: InstructBlipConfig) -> None:
        super().__init__(config)
        self.generation_config = GenerationConfig.from_dict(
            {k: getattr(config.text_config, k, None) for k in GENERATION_TOKEN_FIELDS}
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> InstructBlipOutput:
        embeds, attention_mask, features = self.build_lm_inputs(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, interpolate_pos_encoding
        )
        if self.config.use_decoder_only_language_model:
            logits = self.language_model(embeds, attention_mask)
            loss = None if labels is None else causal_lm_loss(logits, labels)
        else:
            if decoder_input_ids is None:
                if labels is None:
                    raise ProcessorError("an encoder-decoder forward needs decoder_input_ids or labels")
                decoder_input_ids = self.shift_right(labels)
            logits = self.language_model(embeds, attention_mask, decoder_input_ids, decoder_attention_mask)
            loss = None if labels is None else F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device))
        return InstructBlipOutput(logits=logits, loss=loss, language_model_inputs=features)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        text = self.config.text_config
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = text.decoder_start_token_id
        return shifted.masked_fill(shifted == -100, text.pad_token_id)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        image_embeds: torch.Tensor | None = None,
        **settings: Any,
    ) -> torch.Tensor:
        """Token ids as transformers returns them: decoder-only LMs echo the prompt ids first,
        T5 starts with `decoder_start_token_id`.

        `image_embeds` (one row per prompt, from `encode_images`) replaces `pixel_values`, so that an image
        asked several questions goes through the vision encoder once."""
        config = (generation_config or self.generation_config).updated(**settings)
        if (pixel_values is None) == (image_embeds is None):
            raise ProcessorError("generate needs exactly one of pixel_values and image_embeds")
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values, interpolate_pos_encoding)
        features = self.query_image(image_embeds, qformer_input_ids, qformer_attention_mask)
        batch = features.shape[0]
        if input_ids is None:
            start = [self.config.image_token_index] * self.config.num_query_tokens + [self.config.text_config.bos_token_id]
            input_ids = torch.tensor([start] * batch, dtype=torch.long, device=features.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, features)
        if self.config.use_decoder_only_language_model:
            prefix, prefix_mask = input_ids, attention_mask
        else:
            start_id = config.decoder_start_token_id
            if start_id is None:
                start_id = self.config.text_config.decoder_start_token_id
            prefix = torch.full((batch, 1), start_id, dtype=torch.long, device=embeds.device)
            prefix_mask = None  # transformers' repetition penalty sees the decoder ids only
        if config.max_new_tokens is None and config.max_length is None:
            limit = getattr(self.config.text_config, "max_position_embeddings", None) or float("inf")
            config = config.updated(max_length=min(prefix.shape[1] + DEFAULT_NEW_TOKENS, limit))
        cache_length = max_total_length(config, prefix.shape[1])

        def make_session(expand: int) -> DecoderOnlySession | EncoderDecoderSession:
            if self.config.use_decoder_only_language_model:
                return DecoderOnlySession(self.language_model, embeds, attention_mask, cache_length, expand)
            return EncoderDecoderSession(self.language_model, embeds, attention_mask, prefix, cache_length, expand)

        return generate_ids(make_session, prefix, config, generator=generator, attention_mask=prefix_mask)

    # ---- checkpoints: the generation defaults travel with the weights ---------------------------
    def read_extra_files(self, folder: Path) -> None:
        path = folder / "generation_config.json"
        if path.exists():
            self.generation_config = GenerationConfig.from_dict(json.loads(path.read_text()))

    def write_extra_files(self, folder: Path) -> None:
        (folder / "generation_config.json").write_text(json.dumps(self.generation_config.to_dict(), indent=2))


class Blip2ForConditionalGeneration(InstructBlipForConditionalGeneration):
    """BLIP-2: the same model with a Q-Former that does not read the instruction."""

    config_class = Blip2Config
    architecture = "Blip2ForConditionalGeneration"


class Blip2Model(Blip2ForConditionalGeneration):
    """transformers' Blip2Model. Unlike InstructBlipModel it keeps the language-model head (its
    checkpoints have the same keys as Blip2ForConditionalGeneration's) and its forward returns logits."""

    architecture = "Blip2Model"


class InstructBlipModel(InstructBlipBase):
    """transformers' InstructBlipModel: the language model without its head (keys `language_model.layers.*`
    for LLaMA, `language_model.decoder.*` for OPT, `language_model.{shared,encoder,decoder}.*` for T5)."""

    architecture = "InstructBlipModel"
    language_models = BASE_LANGUAGE_MODELS

    def forward(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> InstructBlipModelOutput:
        embeds, attention_mask, features = self.build_lm_inputs(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, interpolate_pos_encoding
        )
        if self.config.use_decoder_only_language_model:
            hidden = self.language_model(embeds, attention_mask)
            return InstructBlipModelOutput(last_hidden_state=hidden, language_model_inputs=features)
        if decoder_input_ids is None:
            raise ProcessorError("an encoder-decoder forward needs decoder_input_ids")
        encoded = self.language_model.encode(embeds, attention_mask)
        hidden = self.language_model.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask)
        return InstructBlipModelOutput(hidden, encoder_last_hidden_state=encoded, language_model_inputs=features)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as transformers' ForCausalLMLoss."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)


def max_total_length(config: GenerationConfig, prefix_length: int) -> int:
    """Longest sequence (prefix + new tokens) a generate call can produce: the cache size."""
    if config.max_new_tokens is not None:
        return prefix_length + config.max_new_tokens
    return config.max_length
