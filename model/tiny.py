"""A tiny random-weight InstructBLIP checkpoint with its processor files, made on the spot.

For the demo and the tests that need a whole checkpoint folder without downloading anything. The
weights are random (re-drawn so that the image and the instruction both change the output): the
text it generates is gibberish by design.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .configs import InstructBlipConfig
from .instructblip import InstructBlipForConditionalGeneration
from .tiny_tokenizers import write_processor_files

NUM_QUERY_TOKENS = 8
IMAGE_SIZE = 64


def write_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write a LLaMA-based InstructBLIP (about 0.3M parameters) and its processor to `folder`."""
    folder = Path(folder)
    infos = write_processor_files(folder, lm="llama", num_query_tokens=NUM_QUERY_TOKENS, image_size=IMAGE_SIZE)
    lm_tokens, qformer_tokens = infos["tokenizer"], infos["qformer_tokenizer"]
    config = InstructBlipConfig.from_dict(
        dict(
            vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE_SIZE, patch_size=8),
            qformer_config=dict(vocab_size=qformer_tokens.vocab_size, hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=96, max_position_embeddings=160),
            text_config=dict(model_type="llama", vocab_size=lm_tokens.vocab_size, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=512, bos_token_id=lm_tokens.bos_token_id,
                             eos_token_id=lm_tokens.eos_token_id, pad_token_id=lm_tokens.pad_token_id),
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=lm_tokens.image_token_id,
        )
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if "norm" in name.lower() else noise)
    model.save_pretrained(folder)
    return folder
