"""A key/value cache for decoder self-attention: preallocated tensors and a fill pointer."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, shaped [batch, kv_heads, max_length, head_dim].

    A forward pass over T new positions calls `update(layer, k, v)` once per layer (which writes
    positions `length .. length+T` and returns everything so far), then `advance(T)` once.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_length} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Keep rows `batch_index` (in that order): beam search's choice of surviving beams."""
        self.keys = [k.index_select(0, batch_index) for k in self.keys]
        self.values = [v.index_select(0, batch_index) for v in self.values]


class SlotCache:
    """Keys and values for continuous batching: `slots` sequences, each at its own length.

    Slot s holds one sequence in positions 0 .. lengths[s]; `valid` marks the positions that hold a real token
    (a prompt's left padding does not). A decode step writes one token per slot at that slot's own length.
    For the language model it looks like a KVCache whose `length` bounds the longest slot, so that the attention
    mask ([slots, length + 1], from `begin_step`) covers every slot's window.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros((slots, max_length), dtype=torch.bool, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.rows = torch.arange(slots, device=device)
        self.max_length = max_length
        self.length = 0

    @classmethod
    def like(cls, cache: KVCache, slots: int, max_length: int) -> SlotCache:
        """A slot cache with the layers, heads, dtype and device of `cache`."""
        key = cache.keys[0]
        _, heads, _, head_dim = key.shape
        return cls(len(cache.keys), slots, heads, head_dim, max_length, key.dtype, key.device)

    def fill(self, slots: torch.Tensor, prefill: KVCache, mask: torch.Tensor) -> None:
        """Put the sequences of a finished prefill (its rows, padding `mask` [rows, T]) into `slots`."""
        length = prefill.length
        for layer, (k, v) in enumerate(zip(prefill.keys, prefill.values)):
            self.keys[layer][slots, :, :length] = k[:, :, :length]
            self.values[layer][slots, :, :length] = v[:, :, :length]
        self.valid[slots] = False
        self.valid[slots, :length] = mask.bool()
        self.lengths[slots] = length
        self.active[slots] = True

    def release(self, slots: torch.Tensor, ended: torch.Tensor) -> None:
        """Empty those of `slots` whose `ended` (bool, one per slot given) is set: until filled again they decode
        a dummy token at position 0 that attends to itself only. Masks, not a list of slots: no host sync."""
        keep = ~ended
        self.valid[slots] &= keep[:, None]
        self.lengths[slots] *= keep
        self.active[slots] &= keep

    def reset(self) -> None:
        """Every slot empty (a cache reused by another call)."""
        self.valid.fill_(False)
        self.lengths.zero_()
        self.active.fill_(False)

    def begin_step(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a decode step over a window of `length` cached positions plus the new one; `length` is the
        caller's bound on the longest slot (known on the host, so no sync), or max_length - 1 for a fixed shape.

        Returns (mask [slots, length + 1] over each slot's real tokens and its new one, the new token's position
        id per slot [slots, 1], counting real tokens only)."""
        if length >= self.max_length:
            raise RuntimeError(f"KV cache overflow: {length + 1} positions needed, {self.max_length} allocated")
        self.length = length
        # scatter_ with a scalar, not `valid[rows, lengths] = True`: on CUDA that indexing copies a host scalar to
        # the device, which CUDA graph capture refuses (found on an H100 by bench/gpu_check.py).
        self.valid.scatter_(1, self.lengths[:, None], True)
        mask = self.valid[:, : self.length + 1]
        return mask, mask.sum(-1, keepdim=True) - 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new position per slot (k, v [slots, heads, 1, head_dim]); return every slot's window."""
        self.keys[layer][self.rows, :, self.lengths] = k[:, :, 0]
        self.values[layer][self.rows, :, self.lengths] = v[:, :, 0]
        window = self.length + 1
        return self.keys[layer][:, :, :window], self.values[layer][:, :, :window]

    def advance(self, num_positions: int) -> None:
        self.lengths += self.active * num_positions
