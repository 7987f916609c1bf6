"""A tiny random-weight InstructBLIP checkpoint with its processor files, made on the spot.

For the demo and the tests that need a whole checkpoint folder without downloading anything. The
weights are random (re-drawn so that the image and the instruction both change the output): the
text it generates is gibberish by design.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blipbatch.jobs.tokenizer_files import write_processor_files
from blipbatch.model.configs import InstructBlipConfig
from blipbatch.model.instructblip import InstructBlipForConditionalGeneration

NUM_QUERY_TOKENS = 8
IMAGE_SIZE = 64


def write_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write a LLaMA-based InstructBLIP (about 0.3M parameters) and its processor to `folder`."""
    return write_random_checkpoint(
        folder,
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
        qformer=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_size=IMAGE_SIZE,
        seed=seed,
        std=0.2,
    )


def write_random_checkpoint(
    folder: str | Path,
    vision: dict,
    qformer: dict,
    text: dict,
    num_query_tokens: int,
    image_size: int,
    seed: int = 0,
    std: float = 0.2,
    vocab_size: int | None = None,
) -> Path:
    """Write a random InstructBLIP with a LLaMA LM of the given sizes, and its processor, to `folder`.

    The processor's tokenizers are small; `vocab_size` (default: the tokenizer's) can make the LM's
    vocabulary, and so its output layer, as large as a real checkpoint's."""
    folder = Path(folder)
    infos = write_processor_files(folder, lm="llama", num_query_tokens=num_query_tokens, image_size=image_size)
    lm_tokens, qformer_tokens = infos["tokenizer"], infos["qformer_tokenizer"]
    config = InstructBlipConfig.from_dict(
        dict(
            vision_config=dict(vision, image_size=image_size),
            qformer_config=dict(qformer, vocab_size=qformer_tokens.vocab_size, max_position_embeddings=160),
            text_config=dict(
                text,
                model_type="llama",
                vocab_size=vocab_size or lm_tokens.vocab_size,
                max_position_embeddings=512,
                bos_token_id=lm_tokens.bos_token_id,
                eos_token_id=lm_tokens.eos_token_id,
                pad_token_id=lm_tokens.pad_token_id,
            ),
            num_query_tokens=num_query_tokens,
            image_token_index=lm_tokens.image_token_id,
        )
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "norm" in name.lower() else noise)
    model.save_pretrained(folder)
    return folder
