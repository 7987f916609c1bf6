"""Pieces shared by the decoder-only language models: padding/causal masks, positions, SDPA attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ModelError


def generation_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids that transformers' `generate` derives from a 2D padding mask (1 real, 0 pad).

    Real tokens count from 0 after the left padding; pad slots get 0 (transformers 5.x; 4.x used 1).
    Their value never reaches a real token, since pad keys are masked out.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def check_attention_mask(attention_mask: Tensor | None, batch_size: int, kv_length: int) -> None:
    if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ModelError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {kv_length}): "
            "one entry per cached plus new position"
        )


def causal_padding_mask(
    attention_mask: Tensor | None, q_length: int, kv_length: int, device: torch.device
) -> Tensor | None:
    """Boolean SDPA mask [B|1, 1, q_length, kv_length] (True = attend) for the last `q_length` positions.

    A query sees earlier non-padded keys; a query that would see none (a pad before any real token)
    sees itself, so its row stays finite: a NaN there would be written into the KV cache. Pad queries
    that do see real keys keep transformers' mask, so their logits (used by a shifted loss) match. None
    means plain causal attention, which `attend` runs without a mask tensor.
    """
    if attention_mask is None and (q_length == kv_length or q_length == 1):
        return None
    q_pos = torch.arange(kv_length - q_length, kv_length, device=device)[:, None]
    k_pos = torch.arange(kv_length, device=device)[None, :]
    allowed = k_pos <= q_pos
    if attention_mask is None:
        return allowed[None, None]
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed | ((k_pos == q_pos) & ~allowed.any(-1, keepdim=True))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """SDPA over q [B, H, T, hd] and k, v [B, KVH, S, hd]; `mask` from `causal_padding_mask`."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Expanded rather than SDPA's enable_gqa: that needs torch 2.5, and with a mask CUDA runs it slowly anyway.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    # No mask tensor: plain causal attention, or (S > T only for T == 1) a new token that sees the whole cache.
    is_causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def attend_eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float | None = None,
    causal: bool = False,
    head_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention that also returns its probabilities [B, H, T, S], for `output_attentions` (and `head_mask`).

    As transformers' eager attention: scores in the input dtype, softmax in fp32; `mask` is boolean (True = attend)
    or an additive float bias; `causal` without a mask is the plain causal mask of `attend`; `head_mask` scales each
    head's probabilities (BERT's head masking). SDPA stays the path when nobody asks for the probabilities.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None and causal and q.shape[2] > 1:
        q_len, k_len = q.shape[2], k.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = scores.float().softmax(-1).to(q.dtype)
    if head_mask is not None:
        probs = probs * head_mask
    return torch.matmul(probs, v), probs
