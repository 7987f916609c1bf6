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
