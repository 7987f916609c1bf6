"""The inference engine the pipeline calls: images and instructions in, texts (and their scores) out.

It owns the processor and the model, checks each instruction before it reaches the model (so one
bad row becomes an error for that row only), runs the vision encoder once per distinct image of a
call however many instructions it gets, and halves a batch that runs out of GPU memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .candidates import ClosedSet, as_ranked
from .configs import GenerationConfig
from .continuous import GraphStep, GreedyLimits, greedy_batcher
from .errors import ConfigError, ProcessorError
from .fp8 import check_fp8_support, quantize_fp8_
from .hub import checkpoint_dir
from .instructblip import DEFAULT_NEW_TOKENS, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
from .outputs import GenerateOutput
from .processor import Blip2Processor, InstructBlipProcessor
from .ranking import candidate_loglikelihoods, candidate_targets, eos_token_id, position_limit, reduce_scores
from .sessions import CausalLM
from .t5 import T5Cache


class InvalidInstruction(ProcessorError):
    """An instruction the model cannot take (not a string, too many tokens)."""


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint: local folder, fsspec URL or Hub id
    dtype: str | None = None  # "float32", "bfloat16", "float16"; None: bf16 on GPU, fp32 on CPU
    device: str | None = None  # None: "cuda" when available, else "cpu"
    generation: dict[str, Any] = field(default_factory=dict)  # generate() settings, transformers' names
    decode_slots: int | None = None  # sequences decoded together (greedy); None: `default_rows`
    cpu_threads: int | None = None  # torch's intra-op threads on CPU; None: leave torch's setting
    cuda_graphs: bool = True  # on CUDA, greedy decode steps run as a CUDA graph
    quantize: str | None = None  # "fp8": FP8 linear layers on Hopper GPUs (model/fp8.py)


@dataclass(frozen=True)
class Generated:
    """What one (image, instruction) gives: its text and score, or with num_return_sequences > 1 a list of each.

    score: the text's mean token log-probability (beam search: transformers' sequence score). A closed-set question
    (model.ranking): text is the chosen candidate, score its probability among the candidates, and
    candidate_logprobs each candidate's score under the question's scoring, in the order the candidates are given."""

    text: str | list[str]
    score: float | list[float]
    candidate_logprobs: list[float] | None = None


# Settings continuous batching applies itself; any other setting away from its default runs the static generate().
CONTINUOUS_SETTINGS = frozenset(
    {"max_new_tokens", "min_new_tokens", "eos_token_id", "use_cache", "return_dict_in_generate", "output_scores"}
)
CPU_ROWS = (8, 32)  # CPU defaults: rows per model call, decode slots
TYPICAL_PROMPT_TOKENS = 64  # text tokens of a prompt, for the memory rule of `default_rows`


def rows_for_memory(model: InstructBlipForConditionalGeneration, free_bytes: int, max_new_tokens: int) -> int:
    """Rows per model call (and decode slots) that three quarters of `free_bytes` of GPU memory hold: a power of
    two in [8, 512]. A row costs two KV caches of (queries + 64 prompt tokens + new tokens) positions (the
    prefill's and the decode slots') plus 4 x its vision tokens x the vision MLP width in the model's dtype (the
    encoder's activations). Vicuna-7B in bf16 with 30 new tokens: 145 MB a row, so 256 on an 80 GB card."""
    kv = model.language_model.new_cache(1, 1)
    if isinstance(kv, T5Cache):
        kv = kv.self_attention  # T5: a position of the decoder's self-attention cache
    per_token = sum(t.numel() * t.element_size() for t in [*kv.keys, *kv.values])
    config = model.config
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    per_row = 2 * per_token * (config.num_query_tokens + TYPICAL_PROMPT_TOKENS + max_new_tokens)
    per_row += 4 * tokens * vision.intermediate_size * next(model.parameters()).element_size()
    rows = max(1, free_bytes * 3 // 4 // per_row)
    return max(8, min(512, 1 << (rows.bit_length() - 1)))


def mean_logprobs(new_ids: torch.Tensor, steps: Sequence[torch.Tensor], eos_ids: Sequence[int]) -> list[float]:
    """Per row of new_ids [N, S] (a search's new tokens; steps[i] [N, vocab]: the scores it chose token i from), the
    mean log-probability of its tokens up to and including the first eos: transformers'
    `compute_transition_scores(sequences, scores, normalize_logits=True)` averaged over the row's tokens."""
    chosen = torch.stack(
        [step.float().log_softmax(-1).gather(-1, new_ids[:, i, None]).squeeze(-1) for i, step in enumerate(steps)], 1
    ).double()
    is_eos = torch.isin(new_ids, torch.tensor(list(eos_ids), dtype=new_ids.dtype, device=new_ids.device))
    kept = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # not after the first eos (those are padding)
    return (chosen.masked_fill(~kept, 0).sum(1) / kept.sum(1).clamp(min=1)).tolist()


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating-point dtype (use float32, bfloat16 or float16)")
    return value


def is_blip2(folder: str | os.PathLike) -> bool:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "blip-2"


Loaded = tuple[Blip2Processor, InstructBlipForConditionalGeneration]


def load(config: EngineConfig, device: torch.device) -> Loaded:
    """The processor and the model of the checkpoint `config.model`, on `device`."""
    folder = checkpoint_dir(config.model)
    blip2 = is_blip2(folder)
    model_cls = Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration
    processor = (Blip2Processor if blip2 else InstructBlipProcessor).from_pretrained(folder)
    return processor, model_cls.from_pretrained(folder, dtype=resolve_dtype(config.dtype, device), device=device)


class Engine:
    def __init__(self, config: EngineConfig, loaded: Loaded | None = None) -> None:
        """Loads the checkpoint `config.model`, or takes `loaded` (processor, model already on config.device):
        a model built in memory, as the GPU bench does."""
        self.device = resolve_device(config.device)
        if config.quantize not in (None, "fp8"):
            raise ConfigError(f'quantize must be "fp8" or unset, got {config.quantize!r}')
        if config.quantize:
            check_fp8_support(self.device)  # before loading gigabytes for nothing
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.processor, self.model = loaded or load(config, self.device)
        if config.quantize:
            if not self.model.config.use_decoder_only_language_model:
                raise ConfigError('quantize = "fp8" supports LLaMA (Vicuna) and OPT language models, not T5')
            quantize_fp8_(self.model)
        self.settings = dict(config.generation)
        # validate the settings once, up front, rather than on the first batch. Base: the language model's generation
        # config (its token ids) and the defaults, as model.generate (and transformers 5.24) uses; the checkpoint's
        # generation_config.json is not applied (tests/ORACLE.md).
        self.base_generation = self.model.language_model.generation_config
        resolved = self.base_generation.updated(**self.settings)
        self.decoder_only = self.model.config.use_decoder_only_language_model
        self.max_prompt_tokens = self._max_prompt_tokens()
        if config.decode_slots is not None and config.decode_slots < 1:
            raise ValueError(f"decode_slots must be at least 1, got {config.decode_slots}")
        self.default_rows = self._default_rows(resolved)
        self.decode_slots = config.decode_slots or self.default_rows[1]
        self.greedy_limits = self._continuous_limits(resolved)
        self.eos_ids = tuple(resolved.eos_token_ids)
        self.vision_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        # the processor's normalize of every 8-bit value, channel after channel: uint8 pixels are looked up in it
        self._normalized = self.processor.image_processor.normalize_table().to(self.device).view(-1)
        self._channel_base = torch.tensor([0, 256, 512], dtype=torch.int32, device=self.device).view(1, 3, 1, 1)
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and self.greedy_limits is not None
        lm = self.model.language_model  # decoder-only where there are greedy_limits
        self.graph_step = GraphStep(lm) if use_graphs and isinstance(lm, CausalLM) else None
        self.images_encoded = 0  # vision-encoder passes, one per distinct image of each call
        self._targets: dict[tuple[str, ...], list[list[int]]] = {}  # candidates -> their target ids

    def _default_rows(self, config: GenerationConfig) -> tuple[int, int]:
        """(rows per model call, decode slots) when not set: CPU_ROWS on CPU; on CUDA, what the free memory
        holds after loading (`rows_for_memory`), for both."""
        if self.device.type != "cuda":
            return CPU_ROWS
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # torch's cache
        rows = rows_for_memory(self.model, free, config.max_new_tokens or DEFAULT_NEW_TOKENS)
        return rows, rows

    def _max_prompt_tokens(self) -> int | None:
        """Prompt tokens the LM can take with room for the new tokens; None where positions are relative (T5)."""
        positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if positions is None:
            return None
        new_tokens = self.settings.get("max_new_tokens") or DEFAULT_NEW_TOKENS
        return positions - self.model.config.num_query_tokens - new_tokens

    def _continuous_limits(self, config: GenerationConfig) -> GreedyLimits | None:
        """Limits for continuous batching, or None where these settings need the static `generate`: anything but
        greedy search with max_new_tokens, min_new_tokens, eos_token_id and use_cache (README "Generation
        settings"): beams, sampling and every logits processor read the whole row or the call's shape."""
        if not self.decoder_only or getattr(self.model.config.text_config, "rope_kind", None) == "dynamic":
            return None  # dynamic RoPE re-derives its frequencies from the batch's longest row, as transformers does
        free = set(CONTINUOUS_SETTINGS)
        if config.max_new_tokens is not None:
            free.add("max_length")  # max_new_tokens wins
        if config.min_new_tokens is not None:
            free.add("min_length")
        if config.max_new_tokens is None and config.max_length is not None:
            return None  # max_length counts the padded prefix
        if any(
            getattr(config, name) != getattr(self.base_generation, name)
            for name in GenerationConfig.setting_names() - free
        ):
            return None
        return GreedyLimits(
            config.max_new_tokens or DEFAULT_NEW_TOKENS, config.min_new_tokens or 0, tuple(config.eos_token_ids)
        )

    def check_instruction(self, instruction: object, closed_set: ClosedSet | None = None) -> str:
        """The instruction as the model will take it, to generate from or, with `closed_set`, to rank its candidates
        after (which needs positions for the longest candidate, not for max_new_tokens); InvalidInstruction says
        why it cannot."""
        if not isinstance(instruction, str):
            raise InvalidInstruction(f"the instruction must be a string, got {type(instruction).__name__}")
        if closed_set is not None:
            self.check_closed_set(instruction, closed_set)
        elif self.max_prompt_tokens is not None:
            length = len(self.processor.tokenizer.encode(instruction))
            if length > self.max_prompt_tokens:
                raise InvalidInstruction(
                    f"the instruction is {length} tokens; this model takes at most {self.max_prompt_tokens} "
                    f"with {self.settings.get('max_new_tokens') or DEFAULT_NEW_TOKENS} new tokens"
                )
        return instruction

    def candidate_targets(self, closed_set: ClosedSet) -> list[list[int]]:
        """The target ids of a closed set's candidates (model.ranking's rule), tokenized once; ProcessorError names
        a candidate that tokenizes to nothing."""
        key = closed_set.candidates
        if key not in self._targets:
            tokenizer = self.processor.tokenizer
            self._targets[key] = candidate_targets(tokenizer, key, eos_token_id(self.model, tokenizer))
        return self._targets[key]

    def check_closed_set(self, instruction: str, closed_set: ClosedSet) -> None:
        """InvalidInstruction when the prompt and the longest candidate need more positions than the model has."""
        limit = position_limit(self.model)
        if limit is None:
            return
        prompt = self.model.config.num_query_tokens + len(self.processor.tokenizer.encode(instruction))
        longest = max(map(len, self.candidate_targets(closed_set)))
        if prompt + longest - 1 > limit:
            raise InvalidInstruction(
                f"the instruction ({prompt} positions with the image queries) and its longest candidate ({longest} "
                f"tokens with eos) need {prompt + longest - 1} positions; this model takes {limit}"
            )

    def generate(self, images: Sequence[PIL.Image.Image], instructions: Sequence[str]) -> list[str | list[str]]:
        """One text per (image, instruction) pair, or a list of texts with num_return_sequences > 1.

        The same image object given several times (several questions about it) is encoded once."""
        distinct = list({id(image): image for image in images}.values())
        slot = {id(image): i for i, image in enumerate(distinct)}
        pixel_values = self.processor.image_processor(distinct)
        return self.generate_pixels(pixel_values, [slot[id(image)] for image in images], instructions)

    def generate_pixels(
        self, pixel_values: torch.Tensor, image_rows: Sequence[int], instructions: Sequence[str]
    ) -> list[str | list[str]]:
        """As `generate`, from preprocessed images: pixel_values [images, 3, H, W] (the processor's output, or uint8
        from its `resized` as the prepare stage sends it; on the CPU, pinned for an asynchronous copy), instruction i
        about image image_rows[i]."""
        return [generated.text for generated in self.generate_scored(pixel_values, image_rows, instructions)]

    def generate_scored(
        self,
        pixel_values: torch.Tensor,
        image_rows: Sequence[int],
        instructions: Sequence[str],
        closed_sets: Sequence[ClosedSet | None] | None = None,
    ) -> list[Generated]:
        """As `generate_pixels`, with each text's score. closed_sets[i], when given and not None, makes instruction i
        a closed-set question: its candidates are ranked (model.ranking) instead of generating; every image goes
        through the vision encoder once for both kinds. A call that runs out of GPU memory is halved and retried."""
        closed_sets = list(closed_sets) if closed_sets is not None else [None] * len(instructions)
        try:
            return self._generate(pixel_values, image_rows, instructions, closed_sets)
        except torch.cuda.OutOfMemoryError:
            if len(instructions) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(instructions) // 2
            return [
                *self._part(pixel_values, image_rows[:half], instructions[:half], closed_sets[:half]),
                *self._part(pixel_values, image_rows[half:], instructions[half:], closed_sets[half:]),
            ]

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` on the device in the vision encoder's dtype: the processor's pixel_values as they are, or uint8
        [images, 3, H, W] from `BlipImageProcessor.resized` normalized there, each value looked up in the
        processor's own `normalize` of the 256 values of its channel, so exactly its result (`normalize` works value
        by value). uint8 is what the prepare stage sends: a quarter of the bytes to copy, no CPU spent on it."""
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            index = (pixels.int() + self._channel_base).view(-1)
            pixels = self._normalized.index_select(0, index).view(pixels.shape)
        return pixels.to(self.vision_dtype)

    def _part(
        self,
        pixel_values: torch.Tensor,
        image_rows: Sequence[int],
        instructions: Sequence[str],
        closed_sets: Sequence[ClosedSet | None],
    ) -> list:
        used = list(dict.fromkeys(image_rows))
        index = {row: i for i, row in enumerate(used)}
        return self.generate_scored(pixel_values[used], [index[row] for row in image_rows], instructions, closed_sets)

    @torch.inference_mode()
    def _generate(
        self,
        pixel_values: torch.Tensor,
        image_rows: Sequence[int],
        instructions: Sequence[str],
        closed_sets: Sequence[ClosedSet | None],
    ) -> list[Generated]:
        pixels = self.pixel_values(pixel_values)
        image_embeds = self.model.encode_images(pixels)
        self.images_encoded += pixels.shape[0]
        free = [i for i, closed in enumerate(closed_sets) if closed is None]
        ranked = [i for i, closed in enumerate(closed_sets) if closed is not None]
        ranked_sets = [closed for closed in closed_sets if closed is not None]  # the closed set of each ranked row

        def embeds_of(rows: list[int]) -> torch.Tensor:
            return image_embeds.index_select(0, torch.tensor([image_rows[i] for i in rows], device=self.device))

        results: dict[int, Generated] = {}
        if free:
            results.update(zip(free, self._free(embeds_of(free), [instructions[i] for i in free])))
        if ranked:
            results.update(
                zip(
                    ranked,
                    self._ranked(embeds_of(ranked), [instructions[i] for i in ranked], ranked_sets),
                )
            )
        return [results[i] for i in range(len(instructions))]

    def _ranked(
        self, image_embeds: torch.Tensor, instructions: Sequence[str], closed_sets: Sequence[ClosedSet]
    ) -> list[Generated]:
        """Closed-set rows: each row's candidates ranked by their log-likelihood (model.ranking)."""
        inputs = {k: v.to(self.device) for k, v in self.processor.encode_prompts(instructions).items()}
        features = self.model.query_image(
            image_embeds, inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask")
        )
        embeds = self.model.embed_inputs(inputs["input_ids"], features)
        targets = [self.candidate_targets(closed) for closed in closed_sets]
        sums, lengths = candidate_loglikelihoods(self.model, embeds, inputs["attention_mask"], targets)
        out = []
        for closed, row_sums, row_lengths in zip(closed_sets, sums, lengths):
            scores = reduce_scores(row_sums, row_lengths, closed.scoring).tolist()
            best, probabilities = as_ranked(scores)
            out.append(Generated(closed.candidates[best], probabilities[best], scores))
        return out

    def _free(self, image_embeds: torch.Tensor, instructions: Sequence[str]) -> list[Generated]:
        """Free generation: image_embeds [rows, ...] (one per instruction) -> each row's text and score."""
        inputs = self.processor.encode_prompts(instructions)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        new_ids: list[list[int]] | torch.Tensor
        if self.greedy_limits is not None:
            batcher = greedy_batcher(
                self.model, image_embeds, inputs, self.greedy_limits, self.decode_slots, self.graph_step
            )
            new_ids = batcher.run()
            scores = batcher.mean_logprobs()
        else:
            # a GenerateOutput with scores, whatever the checkpoint's generation_config.json says
            arguments = inputs | self.settings | {"return_dict_in_generate": True, "output_scores": True}
            output = self.model.generate(image_embeds=image_embeds, **arguments)
            # return_dict_in_generate and output_scores: a GenerateOutput with sequences and scores
            assert isinstance(output, GenerateOutput) and output.sequences is not None and output.scores is not None
            new_ids = output.sequences[:, inputs["input_ids"].shape[1] if self.decoder_only else 1 :]
            if output.sequences_scores is not None:  # beam search: transformers' sequence scores
                scores = output.sequences_scores.double().tolist()
            else:
                scores = mean_logprobs(new_ids, output.scores, self.eos_ids)
        texts = [t.strip() for t in self.processor.batch_decode(new_ids, skip_special_tokens=True)]
        per_row = len(texts) // len(instructions)
        if per_row == 1:
            return [Generated(text, score) for text, score in zip(texts, scores)]
        return [
            Generated(texts[i * per_row : (i + 1) * per_row], scores[i * per_row : (i + 1) * per_row])
            for i in range(len(instructions))
        ]
