"""Token search with transformers' `generate` semantics: greedy, sampling, beam search (and beam sampling).

The model side owns the forward passes: it hands `generate_ids` a factory of `DecodeSession`s, and this module only
decides which token comes next. Everything here follows transformers 5.24 (`generation/utils.py`, `_sample` and the
vectorised `_beam_search`; `generation/logits_process.py`) closely enough to reproduce its ids exactly, including its
quirks (which ids pad finished rows, how min/max lengths count the prefix, the order of the logits processors).

Tensors stay on the device of the session's logits; the loops read one flag back per step to decide whether to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from .configs import GenerationConfig, sequence_biases, token_list
from .errors import GenerationError

# What transformers' beam search adds to a score to rule a candidate out (not -inf, so sums stay finite).
RULED_OUT = -1.0e9


class DecodeSession(Protocol):
    """One generate call's forward passes over N rows (the inputs, each repeated `expand` times in a row)."""

    def prefill(self) -> Tensor:
        """Run the whole prefix; return [N, vocab] float32 logits for the next token of each row."""
        ...

    def step(self, next_ids: Tensor) -> Tensor:
        """Feed one token per row ([N] ids); return [N, vocab] float32 logits for the token after it."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Make row i continue from old row `index[i]` (beam search)."""
        ...


# (ids so far [N, T], next-token scores [N, vocab]) -> new scores; never modifies its inputs.
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


# --- logits processors (transformers' maths and order) ---------------------------------------------------------------


def repetition_penalty(ids: Tensor, scores: Tensor, penalty: float, ignore_before: Tensor | None = None) -> Tensor:
    """Divide positive (multiply negative) scores of every token already in `ids` by `penalty`, once per token.

    `ignore_before` [N]: per row, how many leading positions (left padding) do not count.
    """
    vocab = scores.shape[-1]
    if ignore_before is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(positions[None, :] < ignore_before[:, None], vocab)
    # Ids that are ignored (or beyond the head's vocab) go to a spare column that is dropped at the end.
    ids = ids.clamp(max=vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab]


def no_repeat_ngram(ids: Tensor, scores: Tensor, size: int) -> Tensor:
    """Ban every token that would complete an n-gram of `size` already present in the row."""
    length = ids.shape[1]
    if length < size:
        return scores
    suffix = ids[:, length + 1 - size :]
    windows = ids.unfold(1, size, 1)
    matches = (windows[..., :-1] == suffix[:, None, :]).all(-1)
    vocab = scores.shape[-1]
    # Windows that do not match scatter into a spare column, so they cannot unban another window's token.
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def suppress_eos(ids: Tensor, scores: Tensor, min_length: int, eos: Tensor) -> Tensor:
    """Forbid the eos ids while a row (prefix included) is shorter than `min_length`."""
    if ids.shape[1] >= min_length:
        return scores
    is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)
    return torch.where(is_eos, -float("inf"), scores)


def temperature(ids: Tensor, scores: Tensor, value: float) -> Tensor:
    return scores / value


def top_k(ids: Tensor, scores: Tensor, k: int) -> Tensor:
    """Keep the k best scores (ties with the k-th kept too)."""
    k = min(k, scores.shape[-1])
    kth_best = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth_best, -float("inf"))


def top_p(ids: Tensor, scores: Tensor, p: float, min_keep: int) -> Tensor:
    """Keep the smallest set of best tokens whose probability reaches `p` (at least `min_keep` of them)."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -float("inf"))


def sequence_bias(ids: Tensor, scores: Tensor, single: Tensor, groups: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Add `single` [vocab] to every row, and each group's biases to its last tokens where the row ends in the
    group's prefix (transformers' SequenceBiasLogitsProcessor, whose arithmetic this repeats)."""
    bias = torch.zeros_like(scores)
    bias += single
    for prefixes, last_tokens, biases in groups:
        if prefixes.shape[1] > ids.shape[1]:
            continue
        matching = (ids[:, None, -prefixes.shape[1] :] == prefixes).all(dim=-1)
        bias.index_add_(1, last_tokens, torch.where(matching, biases, 0.0).to(bias.dtype))
    return scores + bias


def force_token(ids: Tensor, scores: Tensor, at_length: int, tokens: list[int]) -> Tensor:
    """At total length `at_length` only `tokens` remain possible (forced_bos_token_id, forced_eos_token_id)."""
    if ids.shape[1] != at_length:
        return scores
    if max(tokens) >= scores.shape[-1]:  # transformers fails here too (and only here: the step may never come)
        raise GenerationError(f"forced token ids {tokens} lie beyond the vocabulary of {scores.shape[-1]} tokens")
    forced = torch.full_like(scores, -float("inf"))
    forced[:, tokens] = 0
    return forced


def remove_invalid_values(ids: Tensor, scores: Tensor) -> Tensor:
    """nan -> 0, +-inf -> the dtype's largest / smallest value."""
    out = torch.where(scores != scores, 0.0, scores)
    out = torch.where(scores == float("inf"), torch.finfo(scores.dtype).max, out)
    return torch.where(scores == -float("inf"), torch.finfo(scores.dtype).min, out)


def exponential_decay(
    ids: Tensor, scores: Tensor, start: int, factor: float, eos: Tensor, eos_in_vocab: bool
) -> Tensor:
    """Past total length `start`, raise the eos scores by |score| * (factor ** steps past - 1)."""
    if ids.shape[1] <= start:
        return scores
    if not eos_in_vocab:  # transformers fails here too, once the decay starts
        raise GenerationError(f"eos ids beyond the vocabulary of {scores.shape[-1]} tokens cannot be raised")
    eos_scores = scores[:, eos]
    penalty = torch.abs(eos_scores) * (pow(factor, ids.shape[1] - start) - 1)
    penalties = torch.zeros_like(scores)
    penalties[:, eos] = penalty.masked_fill(~torch.isfinite(eos_scores), 0.0)
    return scores + penalties


def suppress(ids: Tensor, scores: Tensor, tokens: Tensor, at_length: int | None = None) -> Tensor:
    """Forbid `tokens` (only at total length `at_length` when given: begin_suppress_tokens)."""
    if at_length is not None and ids.shape[1] != at_length:
        return scores
    return torch.where(torch.isin(torch.arange(scores.shape[-1], device=scores.device), tokens), -float("inf"), scores)


def min_p(ids: Tensor, scores: Tensor, p: float, min_keep: int) -> Tensor:
    """Drop tokens less likely than p x the likeliest one's probability."""
    probs = torch.softmax(scores, dim=-1)
    drop = probs < p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill(drop, -float("inf"))


def typical_p(ids: Tensor, scores: Tensor, mass: float, min_keep: int) -> Tensor:
    """Keep the tokens whose surprise is closest to the entropy, up to probability `mass` (locally typical)."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    ent = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=sorted_scores.shape[-1] - 1)
    drop_sorted = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
    drop_sorted[..., :min_keep] = 0
    return scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -float("inf"))


def epsilon_cutoff(ids: Tensor, scores: Tensor, epsilon: float, min_keep: int) -> Tensor:
    """Drop tokens with probability below `epsilon` (keeping the `min_keep` best)."""
    drop = scores.softmax(dim=-1) < epsilon
    drop &= scores < torch.topk(scores, min(min_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(drop, -float("inf"))


def eta_cutoff(ids: Tensor, scores: Tensor, epsilon: Tensor, min_keep: int) -> Tensor:
    """Drop tokens with probability below min(epsilon, sqrt(epsilon) * exp(-entropy))."""
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    eta = torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None]
    drop = scores.softmax(dim=-1) < eta
    drop &= scores < torch.topk(scores, min(min_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(drop, -float("inf"))


def renormalize(ids: Tensor, scores: Tensor) -> Tensor:
    return scores.log_softmax(dim=-1)


@dataclass
class _Prefix:
    """What the processors need to know about the call besides the settings."""

    length: int  # ids before the first new token (transformers' input_ids_seq_length)
    vocab: int
    device: torch.device
    ignore_before: Tensor | None  # per row, leading padding the repetition penalty skips


def _bias_groups(
    biases: dict[tuple[int, ...], float], vocab: int, device: torch.device
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """transformers' prepared sequence-bias tensors: one-token biases as a [vocab] row, longer ones grouped by
    prefix length."""
    too_large = [t for ids in biases for t in ids if t >= vocab]
    if too_large:
        raise GenerationError(f"the vocabulary has {vocab} tokens, but these biased ids are beyond it: {too_large}")
    single = torch.zeros((vocab,), dtype=torch.float, device=device)
    ones = [(ids[0], bias) for ids, bias in biases.items() if len(ids) == 1]
    if ones:
        single[[i for i, _ in ones]] = torch.tensor([b for _, b in ones], device=device)
    by_length: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for ids, bias in biases.items():
        if len(ids) > 1:
            by_length.setdefault(len(ids) - 1, []).append((ids, bias))
    groups = [
        (
            torch.tensor([ids[:-1] for ids, _ in group], device=device),
            torch.tensor([ids[-1] for ids, _ in group], device=device),
            torch.tensor([bias for _, bias in group], dtype=torch.float, device=device),
        )
        for group in by_length.values()
    ]
    return single, groups


def logits_processors(config: GenerationConfig, limits: _Limits, prefix: _Prefix) -> list[LogitsProcessor]:
    """The processors transformers 5.24 builds for `config`, in its order (`_get_logits_processor`): biases,
    penalties and bans first, then with sampling the warpers, then renormalisation. A setting that is off (or None)
    adds nothing, so the common greedy call runs no processor at all."""
    procs: list[LogitsProcessor] = []
    eos, eos_ids, device = limits.eos, limits.eos_ids, prefix.device
    if config.sequence_bias is not None:
        single, groups = _bias_groups(sequence_biases(config.sequence_bias), prefix.vocab, device)
        procs.append(partial(sequence_bias, single=single, groups=groups))
    # encoder_repetition_penalty / encoder_no_repeat_ngram_size: nothing (see GenerationConfig).
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        penalty = float(config.repetition_penalty)
        procs.append(partial(repetition_penalty, penalty=penalty, ignore_before=prefix.ignore_before))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:
        procs.append(partial(no_repeat_ngram, size=config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        bad = {tuple(word): float("-inf") for word in config.bad_words_ids if all(word != [e] for e in eos_ids)}
        single, groups = _bias_groups(bad, prefix.vocab, device)
        procs.append(partial(sequence_bias, single=single, groups=groups))
    if eos is not None and limits.min_length is not None and limits.min_length > 0:
        procs.append(partial(suppress_eos, min_length=limits.min_length, eos=eos))
    if config.forced_bos_token_id is not None:
        procs.append(partial(force_token, at_length=1, tokens=token_list(config.forced_bos_token_id)))
    if config.forced_eos_token_id is not None:
        tokens = token_list(config.forced_eos_token_id)
        procs.append(partial(force_token, at_length=limits.max_length - 1, tokens=tokens))
    if config.remove_invalid_values is True:
        procs.append(remove_invalid_values)
    if config.exponential_decay_length_penalty is not None:
        if eos is None:
            raise GenerationError("exponential_decay_length_penalty needs an eos_token_id to raise")
        start, factor = config.exponential_decay_length_penalty
        procs.append(
            partial(
                exponential_decay,
                start=start + prefix.length,
                factor=factor,
                eos=eos,
                eos_in_vocab=max(eos_ids) < prefix.vocab,
            )
        )
    if config.suppress_tokens is not None:
        suppressed = torch.tensor(list(config.suppress_tokens), device=device)
        procs.append(partial(suppress, tokens=suppressed))
    if config.begin_suppress_tokens is not None:
        begin = prefix.length
        if prefix.length <= 1 and config.forced_bos_token_id is not None:
            begin += 1  # the forced bos comes first
        suppressed = torch.tensor(list(config.begin_suppress_tokens), device=device)
        procs.append(partial(suppress, tokens=suppressed, at_length=begin))
    if config.do_sample:
        procs += _warpers(config, len(eos_ids) if eos is not None else None, device)
    if config.renormalize_logits is True:
        procs.append(renormalize)
    return procs


def _warpers(config: GenerationConfig, eos_count: int | None, device: torch.device) -> list[LogitsProcessor]:
    """Sampling's warpers, in transformers' order. Beam sampling must leave room for a non-eos continuation besides
    every eos id."""
    min_keep = (eos_count + 1 if eos_count is not None else 2) if config.num_beams > 1 else 1
    procs: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        procs.append(partial(temperature, value=config.temperature))
    if config.top_k is not None and config.top_k != 0:
        procs.append(partial(top_k, k=max(config.top_k, min_keep)))
    if config.top_p is not None and config.top_p < 1.0:
        procs.append(partial(top_p, p=float(config.top_p), min_keep=min_keep))
    if config.min_p is not None:
        procs.append(partial(min_p, p=config.min_p, min_keep=min_keep))
    if config.typical_p is not None and config.typical_p < 1.0:
        procs.append(partial(typical_p, mass=float(config.typical_p), min_keep=min_keep))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        procs.append(partial(epsilon_cutoff, epsilon=float(config.epsilon_cutoff), min_keep=min_keep))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        epsilon = torch.tensor(float(config.eta_cutoff), device=device)
        procs.append(partial(eta_cutoff, epsilon=epsilon, min_keep=min_keep))
    return procs


def _process(procs: list[LogitsProcessor], ids: Tensor, scores: Tensor) -> Tensor:
    for proc in procs:
        scores = proc(ids, scores)
    return scores


# --- settings resolved against the prefix ---------------------------------------------------------------------------


@dataclass
class _Limits:
    max_length: int  # total length, prefix included
    min_length: int | None  # eos is forbidden below this total length (None: never)
    eos_ids: list[int]
    pad: int | None  # what finished rows are padded with (transformers falls back to the first eos id)
    eos: Tensor | None = None  # eos_ids on the logits' device, once known


def max_total_length(config: GenerationConfig, prefix_len: int) -> int:
    """The one token limit: longest sequence (prefix + new tokens) a generate call may produce, the cache size.
    max_new_tokens wins over max_length, as in transformers."""
    if config.max_new_tokens is not None:
        return prefix_len + config.max_new_tokens
    if config.max_length is not None:
        return config.max_length
    raise GenerationError("set max_new_tokens or max_length")


def _resolve(config: GenerationConfig, prefix_len: int) -> _Limits:
    max_length = max_total_length(config, prefix_len)
    if prefix_len >= max_length:
        raise GenerationError(
            f"the prefix is {prefix_len} tokens long but max_length is {max_length}: nothing can be generated; "
            "set max_new_tokens (or a larger max_length, which counts the prefix)"
        )
    min_length: int | None
    if config.min_new_tokens is not None:
        min_length = prefix_len + config.min_new_tokens
    else:
        min_length = config.min_length
    eos_ids = config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    return _Limits(max_length, min_length, eos_ids, pad)


def _check(config: GenerationConfig) -> None:
    config.validate()
    if config.num_beams > 1 and config.length_penalty is None:
        raise GenerationError("length_penalty cannot be None with beam search (transformers fails on it too)")


@dataclass
class SearchScores:
    """What `output_scores` asks for, filled by the search when given (the fast path passes None).

    steps: per generated token, the processed scores [N, vocab] the search chose from (beam search: log-probabilities
    after the processors, before adding the beam's running score), as transformers' `scores`.
    sequences: beam search only, each returned hypothesis' length-normalised score (`sequences_scores`)."""

    steps: list[Tensor] = field(default_factory=list)
    sequences: Tensor | None = None


# --- the search loops -----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_ids(
    make_session: Callable[[int], DecodeSession],
    prefix_ids: Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    scores: SearchScores | None = None,
) -> Tensor:
    """Generate token ids exactly as transformers' `generate` would, around a model-side `DecodeSession`.

    make_session(expand): a session over the B inputs, each repeated `expand` times consecutively.
    prefix_ids [B, P]: the ids transformers holds as `input_ids` before the first new token (decoder-only: the
        whole prompt, pads included; encoder-decoder: the decoder start id). max_length, min_length, the repetition
        penalty and no_repeat_ngram_size all count it, and the output starts with it.
    generator: used for every random draw; None draws from torch's global RNG in the same calls and order as
        transformers, so `torch.manual_seed(s)` reproduces its samples.
    attention_mask [B, P]: the mask transformers gets with a decoder-only prompt; the repetition penalty skips each
        row's leading padding, as transformers does. Leave None for encoder-decoder models.
    scores: filled with the per-step scores (and beam search's sequence scores) when given.
    Returns [B * num_return_sequences, P + new] ids; rows that finished early are padded.
    """
    _check(config)
    limits = _resolve(config, prefix_ids.shape[1])
    if attention_mask is not None and attention_mask.shape != prefix_ids.shape:
        raise GenerationError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but prefix_ids {tuple(prefix_ids.shape)}"
        )
    expand = max(config.num_beams, config.num_return_sequences)
    session = make_session(expand)
    logits = session.prefill()
    device = logits.device
    if limits.eos_ids:
        limits.eos = torch.tensor(limits.eos_ids, dtype=torch.long, device=device)
    ids = prefix_ids.to(device).repeat_interleave(expand, 0)
    ignore_before = None
    if attention_mask is not None:
        # First attended position of each row (0 for a row with no attended position, like argmax does).
        ignore_before = (attention_mask != 0).int().argmax(1).to(device).repeat_interleave(expand, 0)
    prefix = _Prefix(prefix_ids.shape[1], logits.shape[-1], device, ignore_before)
    procs = logits_processors(config, limits, prefix)
    if config.num_beams > 1:
        return _beam_search(session, logits, ids, procs, config, limits, generator, scores)
    return _greedy_or_sample(session, logits, ids, procs, config.do_sample is True, limits, generator, scores)


def _greedy_or_sample(
    session: DecodeSession,
    logits: Tensor,
    ids: Tensor,
    procs: list[LogitsProcessor],
    do_sample: bool,
    limits: _Limits,
    generator: torch.Generator | None,
    trace: SearchScores | None = None,
) -> Tensor:
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    while True:
        scores = _process(procs, ids, logits.float())
        if trace is not None:
            trace.steps.append(scores)
        if do_sample:
            next_ids = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(-1)
        if limits.eos is not None:
            assert limits.pad is not None  # with eos ids, pad falls back to the first
            next_ids = torch.where(unfinished, next_ids, limits.pad)
            unfinished &= ~torch.isin(next_ids, limits.eos)
        ids = torch.cat([ids, next_ids[:, None]], 1)
        if ids.shape[1] >= limits.max_length:
            return ids
        if limits.eos is not None and not bool(unfinished.any()):
            return ids
        logits = session.step(next_ids)


def _gather_beams(x: Tensor, index: Tensor) -> Tensor:
    """x [B, K, ...], index [B, J] -> x[b, index[b, j], ...] as [B, J, ...]."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def _beam_search(
    session: DecodeSession,
    logits: Tensor,
    ids: Tensor,
    procs: list[LogitsProcessor],
    config: GenerationConfig,
    limits: _Limits,
    generator: torch.Generator | None,
    trace: SearchScores | None = None,
) -> Tensor:
    """transformers' vectorised beam search: per input, keep the `num_beams` best running beams and, separately,
    the `num_beams` best finished hypotheses (scores divided by generated_length ** length_penalty)."""
    beams = config.num_beams
    rows, prefix_len = ids.shape
    batch = rows // beams
    device = ids.device
    max_length, eos = limits.max_length, limits.eos
    length_penalty, early_stopping = config.length_penalty, config.early_stopping
    assert length_penalty is not None  # refused with beams by _check
    # Look at enough candidates that `beams` of them can go on even if the best ones all end in an eos id.
    candidates = max(2, 1 + (len(eos) if eos is not None else 0)) * beams
    among_top_beams = torch.arange(candidates, device=device) < beams
    batch_offset = torch.arange(batch, device=device)[:, None] * beams

    # transformers fills unused positions with pad, except that a pad id of 0 (falsy) becomes the first eos id.
    fill = (limits.pad or limits.eos_ids[0]) if limits.eos_ids else -1
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prefix_len] = ids.view(batch, beams, prefix_len)
    finished = running.clone()
    # Only the first beam starts live, so the identical copies do not pick the same tokens.
    running_scores = torch.zeros((batch, beams), device=device)
    running_scores[:, 1:] = RULED_OUT
    finished_scores = torch.full((batch, beams), RULED_OUT, device=device)
    finished_new_tokens = torch.zeros((batch, beams), dtype=torch.long, device=device)
    is_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)

    cur_len = prefix_len
    while True:
        # a. scores of every (beam, token) continuation, accumulated over the beam's tokens
        log_probs = torch.log_softmax(logits.float(), -1)
        log_probs = _process(procs, running[:, :, :cur_len].reshape(rows, cur_len), log_probs)
        if trace is not None:
            trace.steps.append(log_probs)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, beams * vocab)

        # b. the best (or sampled) `candidates` continuations per input
        if config.do_sample is True:
            flat = torch.multinomial(totals.softmax(-1), candidates, generator=generator)
            # transformers >= 5.24 ranks the drawn candidates by score before choosing beams
            cand_scores, order = totals.gather(1, flat).sort(dim=-1, descending=True)
            flat = flat.gather(1, order)
        else:
            cand_scores, flat = torch.topk(totals, candidates)
        source_beam = flat // vocab
        cand_seqs = _gather_beams(running, source_beam)
        cand_seqs[:, :, cur_len] = flat % vocab
        cand_source_row = source_beam + batch_offset

        # c. which candidates are complete: an eos id, or the length limit
        ended = torch.full_like(cand_scores, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            ended |= torch.isin(cand_seqs[:, :, cur_len], eos)

        # d. the best unfinished candidates run on
        live_scores = cand_scores + ended.to(torch.float32) * RULED_OUT
        keep = torch.topk(live_scores, beams)[1]
        running = _gather_beams(cand_seqs, keep)
        running_scores = _gather_beams(live_scores, keep)
        session.reorder(_gather_beams(cand_source_row, keep).reshape(rows))

        # e. candidates among the top `beams` that just finished compete for the finished slots
        just_finished = ended & among_top_beams[None, :]
        hyp_scores = cand_scores / ((cur_len + 1 - prefix_len) ** length_penalty)
        all_full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        hyp_scores += all_full.to(torch.float32) * RULED_OUT
        hyp_scores += (~can_improve).to(torch.float32) * RULED_OUT
        hyp_scores += (~just_finished) * RULED_OUT
        merged_scores = torch.cat([finished_scores, hyp_scores], 1)
        best = torch.topk(merged_scores, beams)[1]
        finished = _gather_beams(torch.cat([finished, cand_seqs], 1), best)
        finished_scores = _gather_beams(merged_scores, best)
        new_tokens = torch.full_like(flat, cur_len + 1 - prefix_len)
        finished_new_tokens = _gather_beams(torch.cat([finished_new_tokens, new_tokens], 1), best)
        is_finished = _gather_beams(torch.cat([is_finished, just_finished], 1), best)

        # f. stop when no input can improve, every input is full (early_stopping=True), or nothing can continue
        cur_len += 1
        can_improve = _can_improve(
            can_improve, running_scores, finished_scores, is_finished, cur_len, prefix_len, max_length, config
        )
        go_on = can_improve.any() & ~(is_finished.all() & (early_stopping is True)) & ~ended.all()
        if not bool(go_on):
            break
        logits = session.step(running[:, :, cur_len - 1].reshape(rows))

    returned = config.num_return_sequences
    if trace is not None:
        trace.sequences = finished_scores[:, :returned].reshape(batch * returned)
    out = finished[:, :returned].reshape(batch * returned, max_length)
    longest = int(finished_new_tokens[:, :returned].max())
    return out[:, : prefix_len + longest]


def _can_improve(
    can_improve: Tensor,
    running_scores: Tensor,
    finished_scores: Tensor,
    is_finished: Tensor,
    cur_len: int,
    prefix_len: int,
    max_length: int,
    config: GenerationConfig,
) -> Tensor:
    """Whether the best running beam could still beat the worst finished hypothesis (per input, sticky False).

    early_stopping=False assumes the running beam ends now; "never" with a positive length penalty assumes it
    reaches max_length (the best case then)."""
    assert config.length_penalty is not None  # refused with beams by _check
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        best_length = max_length - prefix_len
    else:
        best_length = cur_len - prefix_len
    best_running = running_scores[:, :1] / (best_length**config.length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], RULED_OUT)
    return can_improve & (best_running > worst_finished).any(-1, keepdim=True)
