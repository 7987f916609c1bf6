"""Our generate against transformers' on the same random medium InstructBLIP, in one process.

    .venv/bin/python bench/model_generate.py [--repeats 5] [--threads 2]

Builds the medium model of shared/reference/environment.md (vision 384 x 6 at 224/14, Q-Former
384 x 4, LLaMA 512 x 8, vocab 32001, 32 queries), batch 8, a 45-token prompt, then times greedy
(20 new tokens) and beam search (5 beams, 20 new tokens), alternating transformers and ours, and
prints medians, the ratio and whether the ids are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import InstructBlipForConditionalGeneration  # noqa: E402

QUERIES, VOCAB, BATCH, PROMPT = 32, 32001, 8, 45
IMAGE_TOKEN = VOCAB - 1


def build_transformers_model():
    import transformers

    config = transformers.InstructBlipConfig(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                           image_size=224, patch_size=14),
        qformer_config=dict(vocab_size=30523, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                            intermediate_size=1536),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=8, num_attention_heads=8, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, max_position_embeddings=512),
        num_query_tokens=QUERIES,
        image_token_index=IMAGE_TOKEN,
    )
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(1.0 + noise if "norm" in name.lower() else noise)
    return model


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((BATCH, QUERIES), IMAGE_TOKEN), torch.randint(3, 32000, (BATCH, PROMPT), generator=g)], 1)
    ids[:, QUERIES] = 1
    return dict(
        pixel_values=torch.randn(BATCH, 3, 224, 224, generator=g),
        qformer_input_ids=torch.randint(1000, 30000, (BATCH, 12), generator=g),
        qformer_attention_mask=torch.ones(BATCH, 12, dtype=torch.long),
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
    )


def time_call(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name: str, hf_model, ours, inputs: dict, settings: dict, repeats: int) -> None:
    hf_times, our_times = [], []
    hf_ids = our_ids = None
    with torch.inference_mode():
        for _ in range(repeats):
            t, hf_ids = time_call(lambda: hf_model.generate(**inputs, **settings))
            hf_times.append(t)
            t, our_ids = time_call(lambda: ours.generate(**inputs, **settings))
            our_times.append(t)
    hf_median, our_median = statistics.median(hf_times), statistics.median(our_times)
    same = hf_ids.tolist() == our_ids.tolist()
    print(
        f"{name:8s} transformers {hf_median:.3f}s  ours {our_median:.3f}s  "
        f"speed-up {hf_median / our_median:.2f}x  identical ids: {same}  "
        f"(medians of {repeats}; all hf {[round(t, 3) for t in hf_times]}, ours {[round(t, 3) for t in our_times]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_model = build_transformers_model()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        ours = InstructBlipForConditionalGeneration.from_pretrained(folder)
    inputs = make_inputs()
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, prompt {QUERIES}+{PROMPT} tokens")
    compare("greedy", hf_model, ours, inputs, dict(max_new_tokens=20, min_new_tokens=20), args.repeats)
    compare("beam5", hf_model, ours, inputs, dict(max_new_tokens=20, min_new_tokens=20, num_beams=5), args.repeats)


if __name__ == "__main__":
    main()
