"""FP8 is opt-in and Hopper-only: refused clearly elsewhere; the quantization itself checked on the CPU (the FP8
matmul, torch._scaled_mm, needs the GPU: bench/gpu_throughput.py --quantize fp8 measures it)."""

from __future__ import annotations

import pytest
import torch
from tiny import write_tiny_checkpoint
from torch import nn

from blipbatch.model import InstructBlipForConditionalGeneration
from blipbatch.model.engine import Engine, EngineConfig
from blipbatch.model.errors import ConfigError
from blipbatch.model.fp8 import FP8_MAX, Fp8Linear, quantize_fp8_, quantize_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_fp8_is_refused_on_cpu_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r'quantize = "fp8" needs an NVIDIA GPU with FP8 tensor cores .*on the CPU'):
        Engine(EngineConfig(model=str(tmp_path / "not-even-a-checkpoint"), device="cpu", quantize="fp8"))
    with pytest.raises(ConfigError, match='quantize must be "fp8" or unset'):
        Engine(EngineConfig(model=str(tmp_path), device="cpu", quantize="int4"))


def test_quantize_rows_keeps_each_row_within_fp8_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scales
    values, scale = quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert values.float().abs().amax(-1).eq(FP8_MAX).all()  # each row uses the whole range
    back = values.float() * scale
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 of the row's largest value
    assert ((back - x).abs() <= x.abs().amax(-1, keepdim=True) * 2**-4).all()


def test_quantize_swaps_the_vision_and_decoder_linears_only(tiny):
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny)
    vision = sum(isinstance(m, nn.Linear) for m in model.vision_model.modules())
    decoder = sum(isinstance(m, nn.Linear) for m in model.language_model.model.layers.modules())
    untouched = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        if not name.startswith(("vision_model.", "language_model.model.layers."))
    }
    assert quantize_fp8_(model) == vision + decoder > 0
    assert not any(isinstance(m, nn.Linear) for m in model.vision_model.modules())
    assert {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} == untouched
    assert "language_model.lm_head" in untouched
    layer = model.language_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn


def test_fp8_linear_is_close_to_the_linear_it_replaces():
    """Where this torch runs FP8 matmuls on the CPU (2.13 does), the layer's output (5 x 7 tokens, a bias, rows not
    a multiple of 16) is within FP8's precision of the bf16 layer's: two e4m3 roundings, a few percent."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
        linear.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(5, 7, 64, generator=g).to(torch.bfloat16)
    layer = Fp8Linear(linear)
    try:
        with torch.no_grad():
            got = layer(x)
    except (NotImplementedError, RuntimeError) as err:
        pytest.skip(f"no FP8 matmul on this CPU build: {err}")
    with torch.no_grad():
        expected = linear(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 0.05
