"""Closed-set scoring: each candidate answer's log-likelihood given the image and the prompt (LAVIS's predict_class).

What a candidate's score is (the README's "Closed-set questions" section states the same rule):
- its target tokens are the candidate tokenized alone, without special tokens, then the eos token:
  `tokenizer.encode(candidate, add_special_tokens=False) + [eos]` (how the demo model was trained, and how LAVIS
  forms an answer's tokens; a SentencePiece tokenizer gives the candidate the leading "▁" of a word that follows
  the prompt);
- decoder-only LMs (LLaMA, OPT): the scored sequence is the processor's prompt ids (image placeholders, BOS, prompt)
  followed by the target, i.e. what transformers' `forward(input_ids=prompt + target,
  labels=[-100] * len(prompt) + target)` scores; T5: the target is the decoder's labels, as
  `forward(..., labels=target)`;
- "sum" is the total log-probability of the target tokens, "mean" that divided by their count.

Cost: one vision pass per image, one Q-Former pass per (image, prompt), one prefill of the prompt (T5: one encoder
pass and one decoder step from the start token), then every candidate of a row is scored against that prefill's
cache at once (the cache repeated over the candidates): not one full forward per candidate. Candidates are scored
in chunks whose logits stay under LOGIT_BUDGET elements.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from .attention import generation_position_ids
from .candidates import SCORINGS
from .errors import ConfigError, ProcessorError
from .kv_cache import KVCache
from .sessions import CausalLM
from .t5 import T5Cache, T5ForConditionalGeneration
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .instructblip import InstructBlipForConditionalGeneration

# Most logit elements (candidate positions x vocabulary) held at once; more candidates are scored in chunks.
LOGIT_BUDGET = 2**25

Candidates = Sequence[str] | Sequence[Sequence[str]]


def eos_token_id(model: InstructBlipForConditionalGeneration, tokenizer: Tokenizer) -> int:
    """The eos that ends every candidate: the tokenizer's, else the language model config's (its first, if a list)."""
    eos: int | list[int] | None = tokenizer.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise ProcessorError("neither the tokenizer nor the language model config names an eos token")
    return int(eos)


def candidate_targets(tokenizer: Tokenizer, candidates: Sequence[str], eos: int) -> list[list[int]]:
    """Each candidate's target ids: its tokens alone, without special tokens, then `eos`."""
    targets = []
    for candidate in candidates:
        if not isinstance(candidate, str):
            raise ProcessorError(f"candidate {candidate!r} is not a string")
        ids = tokenizer.encode(candidate, add_special_tokens=False)
        if not ids:
            raise ProcessorError(f"candidate {candidate!r} tokenizes to nothing; give it some text the tokenizer keeps")
        targets.append([*ids, eos])
    return targets


def position_limit(model: InstructBlipForConditionalGeneration) -> int | None:
    """Positions the language model takes; None where positions are relative (T5)."""
    if not model.config.use_decoder_only_language_model:
        return None
    return getattr(model.config.text_config, "max_position_embeddings", None)


def expanded(cache: KVCache | T5Cache, rows: Tensor) -> KVCache | T5Cache:
    """A copy of `cache` holding its rows `rows` (in that order); `cache` itself is left as it is."""
    repeated = copy.copy(cache)
    if isinstance(repeated, T5Cache):
        repeated.self_attention = copy.copy(repeated.self_attention)
    repeated.reorder(rows)
    return repeated


def candidate_loglikelihoods(
    model: InstructBlipForConditionalGeneration,
    embeds: Tensor,
    attention_mask: Tensor,
    targets: Sequence[Sequence[Sequence[int]]],
) -> tuple[list[Tensor], list[Tensor]]:
    """Per prompt row: each of its candidates' summed target log-probability (float64 [K]) and target length ([K]).

    embeds [B, L, D]: the prompts' LM input embeddings with the image features merged in (left-padded for
    decoder-only LMs, as the processor pads them); attention_mask [B, L]; targets[b]: row b's candidates' target ids
    (`candidate_targets`)."""
    counts = [len(row) for row in targets]
    flat = [list(target) for row in targets for target in row]
    device = embeds.device
    width = max(len(t) for t in flat)
    ids = torch.zeros((len(flat), width), dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.bool)
    for i, target in enumerate(flat):
        ids[i, : len(target)] = torch.tensor(target)
        mask[i, : len(target)] = True
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.repeat_interleave(torch.arange(len(targets), device=device), torch.tensor(counts, device=device))
    lm = model.language_model
    if not isinstance(lm, T5ForConditionalGeneration):  # decoder-only
        logprobs = _decoder_only(lm, embeds, attention_mask, rows, ids)
    else:
        start = lm.config.decoder_start_token_id
        if start is None:
            raise ConfigError("scoring candidates with T5 needs decoder_start_token_id in text_config")
        logprobs = _encoder_decoder(lm, embeds, attention_mask, rows, ids, start)
    sums = logprobs.double().masked_fill(~mask, 0).sum(1).cpu()
    lengths = mask.sum(1).cpu()
    return list(sums.split(counts)), list(lengths.split(counts))


def _decoder_only(lm: CausalLM, embeds: Tensor, attention_mask: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
    batch, length = attention_mask.shape
    cache = lm.new_cache(batch, length + ids.shape[1] - 1)
    first = lm(embeds, attention_mask, generation_position_ids(attention_mask), cache=cache, last_only=True)[:, -1]

    def rest(part: KVCache, part_rows: Tensor, inputs: Tensor) -> Tensor:
        ones = attention_mask.new_ones(inputs.shape)
        mask = torch.cat([attention_mask.index_select(0, part_rows), ones], dim=1)
        positions = generation_position_ids(mask)[:, length:]
        return lm(lm.get_input_embeddings()(inputs), mask, positions, cache=part)

    return _score_targets(first, cache, rows, ids, rest)


def _encoder_decoder(
    lm: T5ForConditionalGeneration, embeds: Tensor, attention_mask: Tensor, rows: Tensor, ids: Tensor, start: int
) -> Tensor:
    batch = embeds.shape[0]
    cache = lm.new_cache(batch, ids.shape[1])
    encoded = lm.encode(embeds, attention_mask)
    start_ids = torch.full((batch, 1), start, dtype=torch.long, device=embeds.device)
    first = lm.decode(start_ids, encoded, attention_mask, cache=cache)[:, -1]

    def rest(part: T5Cache, part_rows: Tensor, inputs: Tensor) -> Tensor:
        return lm.decode(inputs, None, cache=part)

    return _score_targets(first, cache, rows, ids, rest)


def _score_targets(first: Tensor, cache: KVCache | T5Cache, rows: Tensor, ids: Tensor, rest) -> Tensor:
    """Log-probability [N, T] (fp32) of each target token: the first from the prefill's last logits `first` [B, V],
    the others from one forward of the targets' tokens (but the last) against the cache repeated over candidates."""
    count, width = ids.shape
    per_chunk = max(1, LOGIT_BUDGET // (width * first.shape[-1]))
    out = []
    for begin in range(0, count, per_chunk):
        part_rows, part_ids = rows[begin : begin + per_chunk], ids[begin : begin + per_chunk]
        logits = first.index_select(0, part_rows)[:, None]  # [n, 1, V]
        if width > 1:
            later = rest(expanded(cache, part_rows), part_rows, part_ids[:, :-1])  # [n, T - 1, V]
            logits = torch.cat([logits, later], dim=1)
        out.append(logits.float().log_softmax(-1).gather(-1, part_ids[..., None]).squeeze(-1))
    return torch.cat(out)


def reduce_scores(sums: Tensor, lengths: Tensor, scoring: str) -> Tensor:
    """A row's candidate scores from their summed log-probabilities: "sum" as they are, "mean" per target token."""
    if scoring not in SCORINGS:
        raise ProcessorError(f"scoring must be one of {', '.join(map(repr, SCORINGS))}, got {scoring!r}")
    return sums if scoring == "sum" else sums / lengths


def per_row_candidates(candidates: Candidates, batch: int) -> tuple[list[Sequence[str]], bool]:
    """(each row's candidates, whether one list was shared by every row)."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence) or not candidates:
        raise ProcessorError("candidates must be a non-empty list of strings, or one such list per row")
    if any(isinstance(c, str) for c in candidates):  # one list (a non-string in it is refused when tokenized)
        return [cast(Sequence[str], candidates)] * batch, True
    if len(candidates) != batch:
        raise ProcessorError(f"{len(candidates)} candidate lists for {batch} rows; give one list per row, or one list")
    for row in candidates:
        if isinstance(row, str) or not isinstance(row, Sequence) or not row:
            raise ProcessorError("each row's candidates must be a non-empty list of strings")
    return list(candidates), False


@torch.no_grad()
def score_candidates(
    model: InstructBlipForConditionalGeneration,
    candidates: Candidates,
    tokenizer: Tokenizer,
    *,
    pixel_values: Tensor | None = None,
    qformer_input_ids: Tensor | None = None,
    qformer_attention_mask: Tensor | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    image_embeds: Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    scoring: str = "sum",
) -> Tensor | list[Tensor]:
    """The model method `score_candidates` (InstructBlipForConditionalGeneration's docstring)."""
    if (pixel_values is None) == (image_embeds is None):
        raise ProcessorError("score_candidates needs exactly one of pixel_values and image_embeds")
    if input_ids is None:
        raise ProcessorError(
            "score_candidates needs input_ids (the prompts, with image placeholders: use the processor)"
        )
    per_row, shared = per_row_candidates(candidates, input_ids.shape[0])
    eos = eos_token_id(model, tokenizer)
    targets = [candidate_targets(tokenizer, row, eos) for row in per_row]
    limit = position_limit(model)
    longest = max(len(t) for row in targets for t in row)
    if limit is not None and input_ids.shape[1] + longest - 1 > limit:
        raise ProcessorError(
            f"the prompt ({input_ids.shape[1]} positions) and the longest candidate ({longest} tokens "
            f"with eos) need {input_ids.shape[1] + longest - 1} positions; the model takes {limit}"
        )
    if image_embeds is None:
        assert pixel_values is not None  # exactly one of the two (checked above)
        image_embeds = model.encode_images(pixel_values, interpolate_pos_encoding)
    features = model.query_image(image_embeds, qformer_input_ids, qformer_attention_mask)
    embeds = model.embed_inputs(input_ids, features)
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=embeds.device)
    sums, lengths = candidate_loglikelihoods(model, embeds, attention_mask.to(embeds.device), targets)
    scores = [reduce_scores(s, n, scoring) for s, n in zip(sums, lengths)]
    return torch.stack(scores) if shared else scores
