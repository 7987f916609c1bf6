"""InstructBLIP and BLIP-2: vision encoder -> Q-Former -> projection -> language model.

The module trees and parameter names follow transformers' `InstructBlipForConditionalGeneration`,
`InstructBlipModel` (the language model without its head), `Blip2ForConditionalGeneration` and
`Blip2Model`, so their checkpoints load as they are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NotRequired, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import ranking
from .base_models import PretrainedModel
from .configs import Blip2Config, GenerationConfig, InstructBlipConfig, T5Config, TextConfig
from .errors import ConfigError, GenerationError, ProcessorError
from .generation import SearchScores, generate_ids, max_total_length
from .kv_cache import KVCache
from .llama import LlamaForCausalLM, LlamaModel
from .opt import OPTForCausalLM, OPTModel
from .outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    Collector,
    GenerateOutput,
    InstructBlipForConditionalGenerationModelOutput,
    ModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    collected,
)
from .processor import check_placeholder_mask, check_placeholders
from .qformer import InstructBlipQFormerModel
from .sessions import CausalLM, DecoderOnlySession, EncoderDecoderSession
from .t5 import T5Cache, T5ForConditionalGeneration, T5Model
from .tokenizer import Tokenizer
from .vision import InstructBlipVisionModel

LanguageModelWithHead = CausalLM | T5ForConditionalGeneration
# With the head or without (T5ForConditionalGeneration is a T5Model).
LanguageModel = CausalLM | LlamaModel | OPTModel | T5Model

LANGUAGE_MODELS: dict[str, type[LanguageModelWithHead]] = {
    "llama": LlamaForCausalLM,
    "opt": OPTForCausalLM,
    "t5": T5ForConditionalGeneration,
}
# What transformers' AutoModel builds: the same trunks without the head.
BASE_LANGUAGE_MODELS: dict[str, type[LanguageModel]] = {"llama": LlamaModel, "opt": OPTModel, "t5": T5Model}
# Kept in fp32 when the rest is cast to fp16/bf16, as transformers does.
KEEP_IN_FP32 = ("query_tokens",)
# New tokens when neither max_new_tokens nor max_length is set (transformers' default).
DEFAULT_NEW_TOKENS = 20
GENERATION_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class QFormerInputs(TypedDict):
    """The Q-Former's keyword arguments (`InstructBlipQFormerModel.run`); InstructBLIP adds the instruction."""

    query_embeds: torch.Tensor
    encoder_hidden_states: torch.Tensor
    input_ids: NotRequired[torch.Tensor]
    attention_mask: NotRequired[torch.Tensor]


def language_model_width(text_config: TextConfig) -> int:
    return text_config.d_model if isinstance(text_config, T5Config) else text_config.hidden_size


class InstructBlipBase(PretrainedModel):
    """What the composite models share: the image path, the placeholder merge and checkpoint I/O.
    Subclasses pick the language-model classes (with or without the head) and what forward returns."""

    config_class: ClassVar[type[InstructBlipConfig]] = InstructBlipConfig
    config: InstructBlipConfig
    language_models: ClassVar[Mapping[str, type[LanguageModel]]]
    language_model: LanguageModel
    has_head: ClassVar[bool]  # the language model ends in its LM head (logits) or not (hidden states)

    def __init__(self, config: InstructBlipConfig) -> None:
        super().__init__()
        self.config = config
        qformer_width = config.qformer_config.hidden_size
        self.vision_model = InstructBlipVisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.qformer = InstructBlipQFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(qformer_width, language_model_width(config.text_config))
        # The class of the text config's model_type takes that config (more than the mapping's type says).
        build = cast(Callable[[TextConfig], LanguageModel], self.language_models[config.text_config.model_type])
        self.language_model = build(config.text_config)

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
        return self.vision_model.encode(pixel_values, interpolate_pos_encoding)

    def qformer_inputs(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> QFormerInputs:
        """The Q-Former's keyword arguments for these image embeddings: the learned queries, then (InstructBLIP)
        the instruction with a mask over queries + instruction."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        if not self.uses_qformer_text:
            return {"query_embeds": queries, "encoder_hidden_states": image_embeds}
        if qformer_input_ids is None:
            raise ProcessorError(
                "InstructBLIP needs qformer_input_ids (the instruction tokenized for the Q-Former); "
                "build the inputs with InstructBlipProcessor"
            )
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        query_mask = torch.ones(queries.shape[:2], dtype=qformer_attention_mask.dtype, device=queries.device)
        mask = torch.cat([query_mask, qformer_attention_mask.to(queries.device)], dim=1)
        return {
            "query_embeds": queries,
            "encoder_hidden_states": image_embeds,
            "input_ids": qformer_input_ids,
            "attention_mask": mask,
        }

    def project_queries(self, qformer_hidden: torch.Tensor) -> torch.Tensor:
        """Q-Former last hidden state [B, Q (+ T), H] -> the queries in LM space [B, Q, LM width]."""
        query_output = qformer_hidden[:, : self.config.num_query_tokens]
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def query_image(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former over image embeddings (and the instruction) -> LM-space features [B, Q, LM width]."""
        inputs = self.qformer_inputs(image_embeds, qformer_input_ids, qformer_attention_mask)
        return self.project_queries(self.qformer.run(**inputs))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """The projected queries [B, Q, LM width] that replace the image placeholders."""
        image_embeds = self.encode_images(pixel_values, interpolate_pos_encoding)
        return self.query_image(image_embeds, qformer_input_ids, qformer_attention_mask)

    # ---- language side ----------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def image_token_id(self) -> int:
        token = self.config.image_token_index
        if token is None:
            raise ConfigError(
                "config.json has no image_token_index: this is a checkpoint revision from before "
                "transformers 4.47; use the current Hub revision, or add the id of the '<image>' token "
                "as image_token_index to config.json"
            )
        return token

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Boolean [B, L, 1]: the image placeholder positions, from `input_ids`, or (without ids) where
        `inputs_embeds` holds the image token's embedding, as transformers finds them."""
        token = self.image_token_id()
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))
            found = (inputs_embeds == image_embedding).all(-1)
        else:
            found = input_ids == token
        return found.unsqueeze(-1).to(inputs_embeds.device)

    def merge_image_features(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, image_features: torch.Tensor
    ) -> torch.Tensor:
        """The LM's input embeddings (from `inputs_embeds`, else embedded `input_ids`) with the image placeholders
        replaced by the projected queries; each row must hold exactly num_query_tokens placeholders."""
        num_queries = self.config.num_query_tokens
        if input_ids is not None:
            check_placeholders(input_ids, self.image_token_id(), num_queries)
        if inputs_embeds is None:
            if input_ids is None:
                raise ProcessorError("give input_ids or inputs_embeds (with the image placeholders); use the processor")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        if input_ids is None:
            token = self.image_token_id()
            need = f"inputs_embeds needs exactly {{n}} positions holding the image token's embedding (id {token})"
            check_placeholder_mask(mask[..., 0], num_queries, need)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by the projected queries."""
        return self.merge_image_features(input_ids, None, image_features)

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> InstructBlipForConditionalGenerationModelOutput | tuple:
        """transformers' forward: loss and logits (with the head), vision_outputs, qformer_outputs and
        language_model_outputs, each with hidden_states / attentions when asked (README "Using the model").

        `inputs_embeds` replaces the embedded `input_ids` (then the placeholders are found by the image token's
        embedding); `use_cache=True` returns the language model's keys and values as `past_key_values` (one tuple
        per layer: (k, v), T5 (k, v, cross k, cross v)); `return_dict=False` gives the tuple form.
        """
        if labels is not None and not self.has_head:
            raise ProcessorError(
                f"{type(self).__name__} has no LM head to score labels; use the ForConditionalGeneration class"
            )
        vision_outputs = self.vision_model(
            pixel_values,
            output_attentions,
            output_hidden_states,
            return_dict=True,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        inputs = self.qformer_inputs(vision_outputs.last_hidden_state, qformer_input_ids, qformer_attention_mask)
        qformer_outputs = self.qformer(
            **inputs, output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True
        )
        embeds = self.merge_image_features(input_ids, inputs_embeds, self.project_queries(qformer_outputs[0]))
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        asked = (output_attentions, output_hidden_states, bool(use_cache))
        lm_outputs: ModelOutput
        if self.config.use_decoder_only_language_model:
            lm_outputs = self.decoder_only_outputs(embeds, attention_mask, labels, *asked)
        else:
            lm_outputs = self.encoder_decoder_outputs(
                embeds, attention_mask, decoder_input_ids, decoder_attention_mask, labels, *asked
            )
        out = InstructBlipForConditionalGenerationModelOutput(
            loss=getattr(lm_outputs, "loss", None),
            logits=getattr(lm_outputs, "logits", None),
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
            language_model_outputs=lm_outputs,
        )
        return out if return_dict is not False else out.to_tuple()

    def decoder_only_outputs(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        use_cache: bool,
    ) -> CausalLMOutputWithPast | BaseModelOutputWithPast:
        collect = Collector.asked(output_hidden_states, output_attentions)
        cache = self.language_model.new_cache(embeds.shape[0], embeds.shape[1]) if use_cache else None
        out = self.language_model(embeds, attention_mask, cache=cache, collect=collect)
        extras = dict(
            past_key_values=legacy_cache(cache),
            hidden_states=collected(collect, "hidden_states"),
            attentions=collected(collect, "attentions"),
        )
        if not self.has_head:
            return BaseModelOutputWithPast(last_hidden_state=out, **extras)
        loss = None if labels is None else causal_lm_loss(out, labels)
        return CausalLMOutputWithPast(loss=loss, logits=out, **extras)

    def encoder_decoder_outputs(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
        use_cache: bool,
    ) -> Seq2SeqLMOutput | Seq2SeqModelOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ProcessorError("an encoder-decoder forward needs decoder_input_ids (or, with the head, labels)")
            decoder_input_ids = self.shift_right(labels)
        lm = self.language_model
        assert isinstance(lm, T5Model)  # the encoder-decoder language model
        encoder_collect = Collector.asked(output_hidden_states, output_attentions)
        decoder_collect = Collector.asked(output_hidden_states, output_attentions)
        cache = lm.new_cache(embeds.shape[0], decoder_input_ids.shape[1]) if use_cache else None
        encoded = lm.encode(embeds, attention_mask, encoder_collect)
        out = lm.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask, cache, decoder_collect)
        fields: dict[str, Any] = dict(
            past_key_values=legacy_cache(cache),
            decoder_hidden_states=collected(decoder_collect, "hidden_states"),
            decoder_attentions=collected(decoder_collect, "attentions"),
            cross_attentions=collected(decoder_collect, "cross_attentions"),
            encoder_last_hidden_state=encoded,
            encoder_hidden_states=collected(encoder_collect, "hidden_states"),
            encoder_attentions=collected(encoder_collect, "attentions"),
        )
        if not self.has_head:
            return Seq2SeqModelOutput(last_hidden_state=out, **fields)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.float().flatten(0, 1), labels.flatten().to(out.device))
        return Seq2SeqLMOutput(loss=loss, logits=out, **fields)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        text = self.config.text_config
        assert isinstance(text, T5Config)  # only the encoder-decoder forward shifts labels
        start, pad = text.decoder_start_token_id, text.pad_token_id
        if start is None or pad is None:
            raise ConfigError("shifting labels right needs decoder_start_token_id and pad_token_id in text_config")
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == -100, pad)


class InstructBlipForConditionalGeneration(InstructBlipBase):
    architecture = "InstructBlipForConditionalGeneration"
    language_models = LANGUAGE_MODELS
    language_model: LanguageModelWithHead
    has_head = True

    def __init__(self, config: InstructBlipConfig) -> None:
        super().__init__(config)
        # As in transformers 5.24, generate() hands over to the language model, whose generation settings are its
        # config's token ids; the checkpoint's generation_config.json is kept (and written back) but not applied.
        tokens = {k: getattr(config.text_config, k, None) for k in GENERATION_TOKEN_FIELDS}
        self.language_model.generation_config = GenerationConfig.from_dict(tokens)
        self.generation_config = GenerationConfig.from_dict(tokens)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        generation_config: GenerationConfig | Any | None = None,
        generator: torch.Generator | None = None,
        image_embeds: torch.Tensor | None = None,
        **settings: Any,
    ) -> torch.Tensor | GenerateOutput:
        """Token ids as transformers returns them: decoder-only LMs echo the prompt ids first (none when only
        `inputs_embeds` is given), T5 starts with `decoder_start_token_id`. With return_dict_in_generate=True a
        GenerateOutput (`sequences`, and with output_scores=True `scores` and, for beams, `sequences_scores`).

        `image_embeds` (one row per prompt, from `encode_images`) replaces `pixel_values`, so that an image
        asked several questions goes through the vision encoder once.

        Settings merge as in transformers: `generation_config` (ours, or transformers' GenerationConfig), its unset
        values filled from the language model's `generation_config` and the defaults, then `settings` on top, an
        explicit None included (README "Generation settings")."""
        config = self.language_model.generation_config.merged(generation_config, settings)
        if "max_length" in settings and config.max_length is None and config.max_new_tokens is None:
            raise GenerationError(
                "max_length=None without max_new_tokens leaves no length limit "
                "(transformers fails on it too); set max_new_tokens"
            )
        if (pixel_values is None) == (image_embeds is None):
            raise ProcessorError("generate needs exactly one of pixel_values and image_embeds")
        if image_embeds is None:
            assert pixel_values is not None  # exactly one of the two (checked above)
            image_embeds = self.encode_images(pixel_values, interpolate_pos_encoding)
        features = self.query_image(image_embeds, qformer_input_ids, qformer_attention_mask)
        batch = features.shape[0]
        if input_ids is None and inputs_embeds is None:
            start = [self.image_token_id()] * self.config.num_query_tokens + [self.config.text_config.bos_token_id]
            input_ids = torch.tensor([start] * batch, dtype=torch.long, device=features.device)
        embeds = self.merge_image_features(input_ids, inputs_embeds, features)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if self.config.use_decoder_only_language_model and input_ids is not None:
            prefix, prefix_mask = input_ids, attention_mask
        elif self.config.use_decoder_only_language_model:
            # Only embeddings: transformers returns the new tokens alone, and its lengths do not count the prompt.
            prefix, prefix_mask = embeds.new_zeros((batch, 0), dtype=torch.long), None
            config = lengths_without_prompt(config, embeds.shape[1])
        else:
            if config.use_cache is None:
                raise GenerationError(
                    "use_cache=None with a T5 language model: transformers 5.24 then feeds the whole decoder input "
                    "into a kept cache and computes other logits; give use_cache=True or False (same ids)"
                )
            start_id = config.decoder_start_token_id
            if start_id is None:
                start_id = config.bos_token_id
            if start_id is None:
                raise GenerationError("an encoder-decoder model needs decoder_start_token_id or bos_token_id")
            prefix = torch.full((batch, 1), start_id, dtype=torch.long, device=embeds.device)
            prefix_mask = None  # transformers' repetition penalty sees the decoder ids only
        if config.max_new_tokens is None and config.max_length is None:
            limit = getattr(self.config.text_config, "max_position_embeddings", None) or float("inf")
            config = config.updated(max_length=min(prefix.shape[1] + DEFAULT_NEW_TOKENS, limit))
        new_tokens = max_total_length(config, prefix.shape[1]) - prefix.shape[1]

        def make_session(expand: int) -> DecoderOnlySession | EncoderDecoderSession:
            lm = self.language_model
            if not isinstance(lm, T5ForConditionalGeneration):  # decoder-only
                cache_length = embeds.shape[1] + new_tokens
                return DecoderOnlySession(lm, embeds, attention_mask, cache_length, expand)
            cache_length = prefix.shape[1] + new_tokens
            return EncoderDecoderSession(lm, embeds, attention_mask, prefix, cache_length, expand)

        trace = SearchScores() if config.return_dict_in_generate and config.output_scores else None
        ids = generate_ids(make_session, prefix, config, generator=generator, attention_mask=prefix_mask, scores=trace)
        if not config.return_dict_in_generate:
            return ids
        if trace is None:
            return GenerateOutput(sequences=ids)
        return GenerateOutput(sequences=ids, sequences_scores=trace.sequences, scores=tuple(trace.steps))

    def score_candidates(
        self,
        candidates: Sequence[str] | Sequence[Sequence[str]],
        tokenizer: Tokenizer,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        scoring: str = "sum",
    ) -> torch.Tensor | list[torch.Tensor]:
        """Closed-set answers (LAVIS's `predict_class`): each candidate's log-likelihood given the image and prompt.

        `model.score_candidates(["red", "blue"], processor.tokenizer, **processor(images=..., text=...))`: one list
        shared by every row gives float64 [B, K]; one list per row gives a list of float64 [K_b]. `scoring="sum"`:
        the total log-probability of the candidate's tokens and then the eos; `"mean"`: per token. A candidate's
        tokens are `tokenizer.encode(candidate, add_special_tokens=False) + [eos]`, scored after the prompt ids
        (decoder-only LMs) or as the decoder's labels (T5): what `forward(..., labels=...)` scores. One vision pass per
        image, one prefill per prompt, every candidate against that prefill's cache (model/ranking.py).
        `image_embeds` (from `encode_images`, one row per prompt) replaces `pixel_values`."""
        return ranking.score_candidates(
            self,
            candidates,
            tokenizer,
            pixel_values=pixel_values,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            interpolate_pos_encoding=interpolate_pos_encoding,
            scoring=scoring,
        )

    # ---- checkpoints: the generation defaults travel with the weights ---------------------------
    def read_extra_files(self, folder: Path) -> None:
        path = folder / "generation_config.json"
        if path.exists():
            # Not applied by generate() (see __init__), so not held to the checks a generate call makes either.
            self.generation_config = GenerationConfig.from_dict(json.loads(path.read_text()), check=False)

    def write_extra_files(self, folder: Path) -> None:
        (folder / "generation_config.json").write_text(json.dumps(self.generation_config.to_dict(), indent=2))


class Blip2ForConditionalGeneration(InstructBlipForConditionalGeneration):
    """BLIP-2: the same model with a Q-Former that does not read the instruction."""

    config_class = Blip2Config
    architecture = "Blip2ForConditionalGeneration"


class Blip2Model(Blip2ForConditionalGeneration):
    """transformers' Blip2Model. Unlike InstructBlipModel it keeps the language-model head (its
    checkpoints have the same keys as Blip2ForConditionalGeneration's), so its forward also returns logits."""

    architecture = "Blip2Model"


class InstructBlipModel(InstructBlipBase):
    """transformers' InstructBlipModel: the language model without its head (keys `language_model.layers.*`
    for LLaMA, `language_model.decoder.*` for OPT, `language_model.{shared,encoder,decoder}.*` for T5); its
    forward's language_model_outputs hold the last hidden state instead of logits."""

    architecture = "InstructBlipModel"
    language_models = BASE_LANGUAGE_MODELS
    has_head = False


def legacy_cache(cache: KVCache | T5Cache | None) -> tuple | None:
    """A forward's cache as transformers' legacy past_key_values: per layer (k, v), T5 (k, v, cross k, cross v)."""
    if cache is None:
        return None
    if isinstance(cache, T5Cache):
        kv = cache.self_attention
        return tuple(
            (k[:, :, : kv.length], v[:, :, : kv.length], ck, cv)
            for k, v, ck, cv in zip(kv.keys, kv.values, cache.cross_keys, cache.cross_values)
        )
    return tuple((k[:, :, : cache.length], v[:, :, : cache.length]) for k, v in zip(cache.keys, cache.values))


def lengths_without_prompt(config: GenerationConfig, prompt_length: int) -> GenerationConfig:
    """transformers' lengths for a decoder-only generate from inputs_embeds alone: an explicit max_length or
    min_length counted the prompt, the returned ids do not."""
    changes: dict[str, Any] = {}
    if config.max_new_tokens is None and config.max_length is not None:
        changes["max_length"] = config.max_length - prompt_length
    if config.min_new_tokens is None and config.min_length is None:
        raise GenerationError(
            "min_length=None with inputs_embeds alone cannot be counted without the prompt "
            "(transformers fails on it too); leave it out or give min_new_tokens"
        )
    if config.min_new_tokens is None and config.min_length:
        changes["min_length"] = max(config.min_length - prompt_length, 0)
    return dataclasses.replace(config, **changes)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as transformers' ForCausalLMLoss."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
