"""How many rows a model call takes when the job does not say: CPU defaults, and on CUDA the free-memory rule
(computed here on the meta device, so no GPU is needed)."""

from __future__ import annotations

import pytest
import torch
from tiny import write_tiny_checkpoint

from blipbatch.model.configs import InstructBlipConfig
from blipbatch.model.engine import CPU_ROWS, Engine, EngineConfig, rows_for_memory
from blipbatch.model.instructblip import InstructBlipForConditionalGeneration

GIB = 2**30


VICUNA_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=32064,
)
FLAN_T5_XL = dict(model_type="t5", d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128)


def on_meta(text_config: dict, dtype: torch.dtype = torch.bfloat16) -> InstructBlipForConditionalGeneration:
    """The official checkpoint's shapes (EVA ViT-g, the Q-Former, `text_config`), with no memory behind them."""
    config = InstructBlipConfig.from_dict(
        dict(
            vision_config=dict(
                hidden_size=1408,
                intermediate_size=6144,
                num_hidden_layers=39,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
            ),
            qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            text_config=text_config,
            num_query_tokens=32,
            image_token_index=32000,
        )
    )
    with torch.device("meta"):
        return InstructBlipForConditionalGeneration(config).to(dtype)


def vicuna_7b_on_meta(dtype: torch.dtype = torch.bfloat16) -> InstructBlipForConditionalGeneration:
    return on_meta(VICUNA_7B, dtype)


@pytest.mark.parametrize("free_gib,rows", [(64, 256), (124, 512), (20, 64), (0.5, 8), (1000, 512)])
def test_rows_for_memory_on_vicuna_7b(free_gib, rows):
    """What is left of an 80 GB card after loading the 7B model (~64 GiB) gives 256 rows; an H200 (~124 GiB) 512;
    the rule never goes below 8 or above 512."""
    assert rows_for_memory(vicuna_7b_on_meta(), int(free_gib * GIB), 30) == rows


def test_rows_for_memory_counts_the_kv_cache():
    """fp32 doubles a row's cost, and more new tokens cost more: the rule halves where the memory per row doubles."""
    model = vicuna_7b_on_meta()
    assert rows_for_memory(vicuna_7b_on_meta(torch.float32), 64 * GIB, 30) == 128
    assert rows_for_memory(model, 64 * GIB, 400) < rows_for_memory(model, 64 * GIB, 30)


def test_rows_for_memory_on_flan_t5_xl():
    """T5 counts its decoder's self-attention cache (it raised AttributeError on every CUDA start before): 24 layers x
    32 heads x 64 x 2 (keys, values) x 2 bytes is 196,608 bytes a position, 62 MB a row with the vision activations,
    so 20 GiB holds 256 rows where Vicuna-7B's 512 KB a position holds 64."""
    assert rows_for_memory(on_meta(FLAN_T5_XL), 20 * GIB, 30) == 256
    assert rows_for_memory(on_meta(FLAN_T5_XL), 64 * GIB, 30) == 512


def test_cpu_defaults_and_no_cuda_graphs(tmp_path):
    engine = Engine(EngineConfig(model=str(write_tiny_checkpoint(tmp_path)), device="cpu"))
    assert engine.default_rows == CPU_ROWS == (8, 32)
    assert engine.decode_slots == 32 and engine.graph_step is None


def test_out_of_memory_halves_and_keeps_each_row_with_its_image(tmp_path):
    """A call that runs out of GPU memory is split in halves (each with only the images its rows use) until the
    parts fit; the texts are those of the whole call. The memory error is injected for calls over 2 rows."""
    engine = Engine(
        EngineConfig(model=str(write_tiny_checkpoint(tmp_path)), device="cpu", generation={"max_new_tokens": 4})
    )
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    image_rows = [0, 1, 0, 2, 1]
    instructions = ["a photo of", "what is it?", "describe it", "which colour?", "how many?"]
    whole = engine.generate_pixels(pixels, image_rows, instructions)
    fitting = engine._generate
    calls = []

    def small_memory(pixel_values, rows, texts, closed_sets):
        calls.append(len(texts))
        if len(texts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return fitting(pixel_values, rows, texts, closed_sets)

    engine._generate = small_memory
    assert engine.generate_pixels(pixels, image_rows, instructions) == whole
    assert calls == [5, 2, 3, 1, 2]
    # each text is the one that row gets alone, with its own image
    assert [
        engine.generate_pixels(pixels[[row]], [0], [text])[0] for row, text in zip(image_rows, instructions)
    ] == whole
