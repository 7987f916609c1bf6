"""Opt-in FP8 linear layers for Hopper GPUs (`EngineConfig.quantize = "fp8"`, `[model] quantize = "fp8"`).

The linear layers of the vision encoder and of the language model's decoder layers keep their weights in
float8_e4m3fn with one scale per output row; each call quantizes its input per row (token) the same way and
multiplies with `torch._scaled_mm` (FP8 tensor cores), output and bias in the model's dtype. The Q-Former, the
projection, the embeddings and the LM head stay as they are (small, or where rounding moves the argmax most).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

if TYPE_CHECKING:
    from .instructblip import InstructBlipForConditionalGeneration

FP8_MAX = 448.0  # the largest float8_e4m3fn value
HOPPER = (9, 0)
ROW_MULTIPLE = 16


def check_fp8_support(device: torch.device) -> None:
    """Raise ConfigError unless `device` is a GPU that runs FP8 matmuls (Hopper or newer) under this torch."""
    where = "the model runs on the CPU" if device.type != "cuda" else None
    if where is None:
        capability = torch.cuda.get_device_capability(device)
        if capability < HOPPER:
            where = (
                f"this GPU ({torch.cuda.get_device_name(device)}) has compute capability "
                f"{capability[0]}.{capability[1]}"
            )
        elif not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
            where = f"torch {torch.__version__} has no FP8 matmul (torch._scaled_mm)"
    if where is not None:
        raise ConfigError(
            f'quantize = "fp8" needs an NVIDIA GPU with FP8 tensor cores (Hopper, compute capability '
            f"9.0, or newer) and torch >= 2.5; {where}. Leave quantize unset to run in the model's dtype."
        )


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]) with x ~= values * scales."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Module):
    """nn.Linear with FP8 weights (per output row scales) and per-token FP8 activations."""

    weight: Tensor  # buffers, registered in __init__
    weight_scale: Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        # FP8 GEMMs want every dimension a multiple of 16: pad the rows (the layer sizes already are)
        rows = F.pad(rows, (0, 0, 0, -count % ROW_MULTIPLE)).contiguous()
        values, scale = quantize_rows(rows)
        out = torch._scaled_mm(
            values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=self.out_dtype
        )[:count]
        if self.bias is not None:  # added apart: not every torch version takes a bias with row-wise scales
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_fp8_(model: InstructBlipForConditionalGeneration) -> int:
    """Swap the linear layers of `model.vision_model` and of the language model's decoder layers for Fp8Linear, in
    place; returns how many."""
    lm = model.language_model
    if isinstance(lm, LlamaForCausalLM):
        layers = lm.model.layers
    elif isinstance(lm, OPTForCausalLM):
        layers = lm.model.decoder.layers
    else:
        raise ConfigError('quantize = "fp8" supports LLaMA (Vicuna) and OPT language models, not T5')
    swapped = 0
    for root in (model.vision_model, layers):
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear(child))
                    swapped += 1
    return swapped
