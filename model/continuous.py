"""Continuous batching for greedy decoding with a decoder-only language model (LLaMA, OPT).

Prompts wait in a queue and `slots` of them decode together. When a sequence ends (an eos id or its
new-token limit) its slot is refilled from the queue, so short answers do not hold a batch for long ones:
transformers' `generate` runs every row of a batch until the longest is done.

The decode loop keeps its bookkeeping on the device (which prompt each slot holds, how many tokens it has, which
slots ended), so a step launches kernels without waiting for the previous one: the host reads which slots are free
only every `sync_every` steps, to refill them. On CUDA the step itself can run as a CUDA graph (`GraphStep`).

Each prompt gets the tokens that a greedy `generate` of that prompt gives (the same maths on the same
positions; only the floating-point effects of which rows share a batch differ).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .attention import generation_position_ids
from .kv_cache import KVCache, SlotCache
from .sessions import CausalLM

if TYPE_CHECKING:
    from .instructblip import InstructBlipForConditionalGeneration

LOG = logging.getLogger(__name__)

SYNC_EVERY = 4  # decode steps between the host's reads of which slots are free


@dataclass(frozen=True)
class GreedyLimits:
    max_new_tokens: int
    min_new_tokens: int = 0  # eos ids are ruled out before this many new tokens
    eos_ids: tuple[int, ...] = ()


def prefill(lm: CausalLM, prompts: Sequence[Tensor]) -> tuple[KVCache, Tensor, Tensor]:
    """Run prompts (each [T_i, D] embeddings, no padding) as one left-padded batch.

    Returns (their KV cache, the padding mask [n, T], next-token logits [n, vocab] in float32). Prompts of one
    length need no mask: attention then runs as plain causal SDPA (flash/efficient kernels on CUDA)."""
    longest = max(p.shape[0] for p in prompts)
    first = prompts[0]
    embeds = first.new_zeros((len(prompts), longest, first.shape[1]))
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=first.device)
    for row, prompt in enumerate(prompts):
        embeds[row, longest - prompt.shape[0] :] = prompt
        mask[row, longest - prompt.shape[0] :] = 1
    cache = lm.new_cache(len(prompts), longest)
    if all(p.shape[0] == longest for p in prompts):
        logits = lm(embeds, cache=cache, last_only=True)
    else:
        logits = lm(embeds, mask, generation_position_ids(mask), cache=cache, last_only=True)
    return cache, mask, logits[:, -1].float()


def decode_logits(lm: CausalLM, cache: SlotCache, next_ids: Tensor, length: int) -> Tensor:
    """One decode step of every slot: next-token logits [slots, vocab] in float32; `length` as in begin_step."""
    mask, positions = cache.begin_step(length)
    embeds = lm.get_input_embeddings()(next_ids[:, None])
    return lm(embeds, mask, positions, cache=cache)[:, -1].float()


class GraphStep:
    """`decode_logits` over one preallocated SlotCache with a fixed window (the cache's max_length), captured as a
    CUDA graph: a step is then one graph launch instead of thousands of kernel launches from Python.

    One cache and graph are kept, for the last (slot-count bucket, length bucket), so calls of similar sizes reuse
    them and another size recaptures (a second graph would hold a second KV cache). `capture=False` runs the same
    fixed-shape step eagerly (CPU tests of everything but the capture)."""

    LENGTH_STEP = 32

    def __init__(self, lm: CausalLM, capture: bool = True) -> None:
        self.lm = lm
        self.capture = capture
        self.key: tuple[int, int] | None = None
        self.cache: SlotCache | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def slots_for(self, wanted: int, limit: int) -> int:
        """Slots to decode `wanted` sequences with: the next power of two, at most `limit` (the configured slots)."""
        return min(1 << max(0, wanted - 1).bit_length(), max(limit, wanted))

    def prepare(self, slots: int, max_length: int) -> SlotCache:
        """An empty SlotCache of `slots` rows and at least `max_length` positions, with its step captured."""
        key = (slots, -(-max_length // self.LENGTH_STEP) * self.LENGTH_STEP)
        if key != self.key or self.cache is None:
            self.forget()  # free the old graph's memory first
            self.cache = SlotCache.like(self.lm.new_cache(1, 1), slots, key[1])
            self.next_ids = torch.zeros(slots, dtype=torch.long, device=self.cache.rows.device)
            if self.capture:
                self.graph = self._capture_or_none()
            self.key = key
        self.cache.reset()
        return self.cache

    def forget(self) -> None:
        """Drop the cache and the captured graph (the model's weights were replaced: the graph points at the old)."""
        self.key, self.cache, self.graph = None, None, None

    def _capture_or_none(self) -> torch.cuda.CUDAGraph | None:
        """The captured step, or None (and no capture from now on) where capturing fails: the same fixed-shape step
        then runs eagerly, slower but with the same results, rather than the run dying on a driver or torch quirk."""
        try:
            return self._capture()
        except RuntimeError as error:
            self.capture = False
            LOG.warning(
                "CUDA graph capture of the decode step failed, decoding without graphs from now on "
                "([model] cuda_graphs = false skips the attempt): %s",
                error,
            )
            return None

    def _capture(self) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream (lazy inits, cuBLAS workspaces), as torch.cuda.graphs asks; the empty cache's
        # slots decode dummies, so warm-up and capture leave no state behind.
        assert self.cache is not None  # made by prepare, which captures
        window = self.cache.max_length - 1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_logits(self.lm, self.cache, self.next_ids, window)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the prepare stage's threads keep pinning memory while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = decode_logits(self.lm, self.cache, self.next_ids, window)
        return graph

    def __call__(self, next_ids: Tensor) -> Tensor:
        assert self.cache is not None, "prepare() comes first"
        if self.graph is None:
            return decode_logits(self.lm, self.cache, next_ids, self.cache.max_length - 1)
        self.next_ids.copy_(next_ids)
        self.graph.replay()
        return self.logits


class GreedyBatcher:
    """Greedy decoding of many prompts through a fixed number of slots (one KV cache, one row per slot).

    Device state, one entry per slot: `holder` (the prompt it decodes; n = free), `count` (its new tokens),
    `next_ids`; per prompt: `out` (its new ids), `out_lengths` and `logprob_sums` (the sum of its chosen tokens'
    log-probabilities, for `mean_logprobs`). Row n of these is where free slots write."""

    def __init__(
        self,
        lm: CausalLM,
        prompts: Sequence[Tensor],
        limits: GreedyLimits,
        slots: int,
        sync_every: int = SYNC_EVERY,
        graph: GraphStep | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if not prompts:
            raise ValueError("no prompts to decode")
        self.lm = lm
        self.prompts = prompts
        self.limits = limits
        self.sync_every = sync_every
        self.graph = graph
        wanted = min(slots, len(prompts))
        self.slots = graph.slots_for(wanted, slots) if graph is not None else wanted
        self.refill_at = max(1, self.slots // 4)
        self.waiting = deque(range(len(prompts)))
        self.free = list(range(self.slots))  # the host's view, as of the last sync
        self.max_length = max(p.shape[0] for p in prompts) + limits.max_new_tokens
        self.cache: SlotCache | None = graph.prepare(self.slots, self.max_length) if graph is not None else None
        self.bound = 0  # host bound on the longest slot's length (the attention window)
        self.steps_left = 0  # host bound on the decode steps until every filled slot has ended
        n, device = len(prompts), prompts[0].device
        self.none = n  # the holder of a free slot
        self.holder = torch.full((self.slots,), n, dtype=torch.long, device=device)
        self.count = torch.zeros(self.slots, dtype=torch.long, device=device)
        self.next_ids = torch.zeros(self.slots, dtype=torch.long, device=device)
        self.all_slots = torch.arange(self.slots, device=device)
        self.out = torch.zeros((n + 1, limits.max_new_tokens), dtype=torch.long, device=device)
        self.out_lengths = torch.zeros(n + 1, dtype=torch.long, device=device)
        self.logprob_sums = torch.zeros(n + 1, dtype=torch.float64, device=device)
        self.eos_mask: Tensor | None = None  # [vocab] bool, built from the first logits

    def run(self) -> list[list[int]]:
        """New token ids per prompt, in prompt order (an eos that ended a sequence included)."""
        while True:
            self.sync()
            if not self.waiting and len(self.free) == self.slots:
                break
            self.refill()
            for _ in range(self.sync_every):
                if self.steps_left == 0:
                    break
                self.decode_step()
        lengths = self.out_lengths[: self.none].tolist()
        return [row[:length] for row, length in zip(self.out[: self.none].tolist(), lengths)]

    def mean_logprobs(self) -> list[float]:
        """After `run`: per prompt, the mean log-probability of its new tokens (the eos that ended it included), as
        transformers' `compute_transition_scores(..., normalize_logits=True)` averaged over them."""
        sums, lengths = self.logprob_sums[: self.none], self.out_lengths[: self.none]
        return (sums / lengths.clamp(min=1)).tolist()

    def sync(self) -> None:
        """Read which slots are free and the longest slot (the loop's only host sync, every few steps)."""
        if self.cache is None:
            return
        holder, lengths = torch.stack([self.holder, self.cache.lengths]).tolist()
        self.free = [slot for slot, prompt in enumerate(holder) if prompt == self.none]
        self.bound = max(lengths)

    def refill(self) -> None:
        busy = self.slots - len(self.free)
        # Wait for a few free slots while others decode: a prefill of one or two prompts uses the hardware poorly.
        if not self.waiting or not self.free or (busy and len(self.free) < min(self.refill_at, len(self.waiting))):
            return
        taken = [self.waiting.popleft() for _ in range(min(len(self.free), len(self.waiting)))]
        cache, mask, logits = prefill(self.lm, [self.prompts[i] for i in taken])
        if self.cache is None:
            self.cache = SlotCache.like(cache, self.slots, self.max_length)
        device = mask.device
        slots = torch.tensor(self.free[: len(taken)], device=device)
        self.free = self.free[len(taken) :]
        self.cache.fill(slots, cache, mask)
        self.holder[slots] = torch.tensor(taken, device=device)
        self.count[slots] = 0
        self.bound = max(self.bound, cache.length)
        self.steps_left = max(self.steps_left, self.limits.max_new_tokens - 1)  # the first token came from prefill
        self.take(slots, logits)

    def decode_step(self) -> None:
        assert self.cache is not None  # made by the first refill, which comes before any step
        if self.graph is not None:
            logits = self.graph(self.next_ids)
        else:
            logits = decode_logits(self.lm, self.cache, self.next_ids, min(self.bound, self.max_length - 1))
        self.take(self.all_slots, logits)
        self.bound += 1
        self.steps_left -= 1

    def take(self, slots: Tensor, logits: Tensor) -> None:
        """Pick the next token of each slot in `slots` (row i of logits is slots[i]'s), record it for the slot's
        prompt, and free the slots whose sequence ended; all on the device."""
        limits = self.limits
        if self.eos_mask is None:
            self.eos_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self.eos_mask[[i for i in limits.eos_ids if 0 <= i < logits.shape[-1]]] = True
        holder, count = self.holder[slots], self.count[slots]
        if limits.min_new_tokens and limits.eos_ids:
            logits = logits.masked_fill((count < limits.min_new_tokens)[:, None] & self.eos_mask, -float("inf"))
        chosen = logits.argmax(-1)
        # log_softmax of the chosen token, from the logits after the min-length mask (the scores chosen from)
        logprob = logits.gather(-1, chosen[:, None]).squeeze(-1) - logits.logsumexp(-1)
        self.logprob_sums.index_put_((holder,), logprob.double(), accumulate=True)
        active = holder != self.none
        self.out[holder, count.clamp(max=limits.max_new_tokens - 1)] = chosen
        count = count + active
        ended = active & (self.eos_mask[chosen] | (count >= limits.max_new_tokens))
        self.out_lengths[torch.where(ended, holder, self.none)] = count
        self.count[slots] = count
        self.next_ids[slots] = chosen
        self.holder[slots] = torch.where(ended, self.none, holder)
        assert self.cache is not None  # made by the first refill
        self.cache.release(slots, ended)


def greedy_batcher(
    model: InstructBlipForConditionalGeneration,
    image_embeds: Tensor,
    inputs: dict[str, Tensor],
    limits: GreedyLimits,
    slots: int,
    graph: GraphStep | None = None,
) -> GreedyBatcher:
    """The GreedyBatcher of the rows of an InstructBLIP / BLIP-2 model with a decoder-only LM, `slots` rows at a
    time: `run()` gives their new ids, then `mean_logprobs()` their scores.

    image_embeds: the vision encoder's output, one row per prompt; inputs: the processor's text inputs
    (`input_ids` and `attention_mask` with the image placeholders; `qformer_*` for InstructBLIP)."""
    features = model.query_image(image_embeds, inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask"))
    embeds = model.embed_inputs(inputs["input_ids"], features)
    real = inputs["attention_mask"].bool().cpu()  # one transfer here, rather than a sync per row's mask
    prompts = [embeds[row, real[row]] for row in range(embeds.shape[0])]  # each without its padding
    lm = model.language_model
    assert isinstance(lm, CausalLM), "continuous batching runs decoder-only language models"
    return GreedyBatcher(lm, prompts, limits, slots, graph=graph)


def generate_greedy(
    model: InstructBlipForConditionalGeneration,
    image_embeds: Tensor,
    inputs: dict[str, Tensor],
    limits: GreedyLimits,
    slots: int,
    graph: GraphStep | None = None,
) -> list[list[int]]:
    """Greedy new ids per row (see `greedy_batcher`)."""
    return greedy_batcher(model, image_embeds, inputs, limits, slots, graph).run()
