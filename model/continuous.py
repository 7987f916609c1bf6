"""Continuous batching for greedy decoding with a decoder-only language model (LLaMA, OPT).

Prompts wait in a queue and `slots` of them decode together. When a sequence ends (an eos id or its
new-token limit) its slot is refilled from the queue before the next step, so short answers do not
hold a batch for long ones: transformers' `generate` runs every row of a batch until the longest is done.

Each prompt gets the tokens that a greedy `generate` of that prompt gives (the same maths on the same
positions; only the floating-point effects of which rows share a batch differ).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import generation_position_ids
from .kv_cache import KVCache, SlotCache


@dataclass(frozen=True)
class GreedyLimits:
    max_new_tokens: int
    min_new_tokens: int = 0  # eos ids are ruled out before this many new tokens
    eos_ids: tuple[int, ...] = ()


def prefill(lm: nn.Module, prompts: Sequence[Tensor]) -> tuple[KVCache, Tensor, Tensor]:
    """Run prompts (each [T_i, D] embeddings, no padding) as one left-padded batch.

    Returns (their KV cache, the padding mask [n, T], next-token logits [n, vocab] in float32)."""
    longest = max(p.shape[0] for p in prompts)
    first = prompts[0]
    embeds = first.new_zeros((len(prompts), longest, first.shape[1]))
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=first.device)
    for row, prompt in enumerate(prompts):
        embeds[row, longest - prompt.shape[0] :] = prompt
        mask[row, longest - prompt.shape[0] :] = 1
    cache = lm.new_cache(len(prompts), longest)
    logits = lm(embeds, mask, generation_position_ids(mask), cache=cache, last_only=True)
    return cache, mask, logits[:, -1].float()


class GreedyBatcher:
    """Greedy decoding of many prompts through a fixed number of slots (one KV cache, one row per slot)."""

    def __init__(self, lm: nn.Module, prompts: Sequence[Tensor], limits: GreedyLimits, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if not prompts:
            raise ValueError("no prompts to decode")
        self.lm = lm
        self.prompts = prompts
        self.limits = limits
        self.slots = min(slots, len(prompts))
        self.refill_at = max(1, self.slots // 4)
        self.waiting = deque(range(len(prompts)))
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.holder = [-1] * self.slots  # prompt index in each slot; -1: free
        self.cache: SlotCache | None = None  # allocated like the first prefill's cache
        self.max_length = max(p.shape[0] for p in prompts) + limits.max_new_tokens
        device = prompts[0].device
        self.eos = torch.tensor(limits.eos_ids, dtype=torch.long, device=device)
        self.next_ids = torch.zeros(self.slots, dtype=torch.long, device=device)

    def run(self) -> list[list[int]]:
        """New token ids per prompt, in prompt order (an eos that ended a sequence included)."""
        while self.waiting or any(p >= 0 for p in self.holder):
            self.refill()
            if any(p >= 0 for p in self.holder):
                self.decode_step()
        return self.tokens

    def refill(self) -> None:
        free = [s for s, p in enumerate(self.holder) if p < 0]
        busy = self.slots - len(free)
        # Wait for a few free slots while others decode: a prefill of one or two prompts uses the hardware poorly.
        if not self.waiting or not free or (busy and len(free) < min(self.refill_at, len(self.waiting))):
            return
        taken = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        cache, mask, logits = prefill(self.lm, [self.prompts[i] for i in taken])
        if self.cache is None:
            self.cache = SlotCache.like(cache, self.slots, self.max_length)
        slots = free[: len(taken)]
        self.cache.fill(torch.tensor(slots, device=mask.device), cache, mask)
        for slot, prompt in zip(slots, taken):
            self.holder[slot] = prompt
        self.take_tokens(slots, logits)

    def decode_step(self) -> None:
        mask, positions = self.cache.begin_step()
        embeds = self.lm.get_input_embeddings()(self.next_ids[:, None])
        logits = self.lm(embeds, mask, positions, cache=self.cache)[:, -1].float()
        busy = [s for s, p in enumerate(self.holder) if p >= 0]
        self.take_tokens(busy, logits[torch.tensor(busy, device=logits.device)])

    def take_tokens(self, slots: list[int], logits: Tensor) -> None:
        """Pick the next token of each slot in `slots` (row i of logits is slots[i]'s); free the slots whose
        sequence ended."""
        if self.limits.min_new_tokens and self.eos.numel():
            short = torch.tensor([len(self.tokens[self.holder[s]]) < self.limits.min_new_tokens for s in slots],
                                 device=logits.device)
            logits[short[:, None] & torch.isin(torch.arange(logits.shape[1], device=logits.device), self.eos)] = -float("inf")
        chosen = logits.argmax(-1)
        self.next_ids[torch.tensor(slots, device=chosen.device)] = chosen
        ended = []
        for slot, token in zip(slots, chosen.tolist()):
            out = self.tokens[self.holder[slot]]
            out.append(token)
            if token in self.limits.eos_ids or len(out) >= self.limits.max_new_tokens:
                self.holder[slot] = -1
                ended.append(slot)
        if ended:
            self.cache.free(torch.tensor(ended, device=chosen.device))


def generate_greedy(
    model: nn.Module, image_embeds: Tensor, inputs: dict[str, Tensor], limits: GreedyLimits, slots: int
) -> list[list[int]]:
    """Greedy new ids per row of an InstructBLIP / BLIP-2 model with a decoder-only LM, `slots` rows at a time.

    image_embeds: the vision encoder's output, one row per prompt; inputs: the processor's text inputs
    (`input_ids` and `attention_mask` with the image placeholders; `qformer_*` for InstructBLIP)."""
    features = model.query_image(image_embeds, inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask"))
    embeds = model.embed_inputs(inputs["input_ids"], features)
    real = inputs["attention_mask"].bool()
    prompts = [embeds[row, real[row]] for row in range(embeds.shape[0])]  # each without its padding
    return GreedyBatcher(model.language_model, prompts, limits, slots).run()
