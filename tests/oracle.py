"""Tiny random InstructBLIP / BLIP-2 checkpoints built with transformers, our test oracle.

Every parameter is re-drawn (transformers' own init makes the image nearly irrelevant), so a
parity test can see bugs anywhere on the image -> Q-Former -> LM path.
"""

from __future__ import annotations

from pathlib import Path

import torch

NUM_QUERY_TOKENS = 4
TEXT_VOCAB = 120
IMAGE_TOKEN = 119  # the "<image>" placeholder id in the LM vocabulary
IMAGE_SIZE = 30

VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=5,
)
QFORMER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=40,
    cross_attention_frequency=2,
    max_position_embeddings=64,
)
TEXT = {
    "llama": dict(
        model_type="llama",
        vocab_size=TEXT_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "opt": dict(
        model_type="opt",
        vocab_size=TEXT_VOCAB,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=TEXT_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        bos_token_id=1,
        tie_word_embeddings=False,
    ),
}


def redraw_(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            # norms stay near 1 so activations keep a sane scale
            param.copy_(1.0 + noise if "norm" in name.lower() else noise)


def build_hf_model(lm: str, blip2: bool = False, seed: int = 0, untied_t5_head: bool = True):
    """A transformers model with re-drawn weights. Returns (model, config)."""
    import transformers

    if blip2:
        config = transformers.Blip2Config(
            vision_config=VISION,
            qformer_config=QFORMER,
            text_config=TEXT[lm],
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_TOKEN,
        )
        model = transformers.Blip2ForConditionalGeneration(config)
    else:
        config = transformers.InstructBlipConfig(
            vision_config=VISION,
            qformer_config=QFORMER,
            text_config=TEXT[lm],
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=IMAGE_TOKEN,
        )
        model = transformers.InstructBlipForConditionalGeneration(config)
    if lm == "t5" and untied_t5_head:
        # Flan-T5 checkpoints have a separate head; transformers 5.23's T5Config always ties it.
        head = torch.nn.Linear(TEXT["t5"]["d_model"], TEXT_VOCAB, bias=False)
        model.language_model.lm_head = head
    redraw_(model, seed)
    return model.eval(), config


def save_hf_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def random_inputs(
    batch: int,
    prompt_lengths: list[int],
    seed: int = 0,
    lm: str = "llama",
    padding_side: str = "left",
    qformer_length: int = 6,
):
    """pixel_values, Q-Former ids/mask and LM ids/mask in the processor's placeholder layout."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    qformer_ids = torch.randint(3, QFORMER["vocab_size"], (batch, qformer_length), generator=g)
    qformer_mask = torch.ones_like(qformer_ids)
    if batch > 1:
        qformer_mask[1:, -2:] = 0
        qformer_ids[1:, -2:] = 0
    pad = TEXT[lm]["pad_token_id"]
    longest = max(prompt_lengths)
    ids = torch.full((batch, NUM_QUERY_TOKENS + longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :NUM_QUERY_TOKENS] = IMAGE_TOKEN
    mask[:, :NUM_QUERY_TOKENS] = 1
    for row, length in enumerate(prompt_lengths):
        text = torch.randint(3, IMAGE_TOKEN, (length,), generator=g)
        start = NUM_QUERY_TOKENS + (longest - length if padding_side == "left" else 0)
        ids[row, start : start + length] = text
        mask[row, start : start + length] = 1
    return dict(
        pixel_values=pixel_values,
        qformer_input_ids=qformer_ids,
        qformer_attention_mask=qformer_mask,
        input_ids=ids,
        attention_mask=mask,
    )
