"""Our generate and engine against transformers' generate on the same random medium InstructBLIP, in one process.

    .venv/bin/python bench/model_generate.py [--repeats 5] [--threads 2] [--only NAME ...]

Builds the medium model of shared/reference/environment.md (vision 384 x 6 at 224/14, Q-Former
384 x 4, LLaMA 512 x 8, vocab 32001, 32 queries) and a 45-token prompt per row, then times, alternating
transformers and ours, and prints medians, the ratio and whether the ids are identical:
- greedy: batch 8, exactly 20 new tokens; our `generate`, and our continuous-batching engine path.
- beam5: batch 8, 5 beams, exactly 20 new tokens.
- varied: 32 rows, at most 20 new tokens, eos ids chosen so that rows end at different steps; transformers
  in static batches of 8, ours continuous batching over 8 slots.
- annotate: 1 image x 8 questions; transformers as 8 separate requests, and as one batch of 8 with the
  image repeated; ours encodes the image once.
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

from blipbatch.model import InstructBlipForConditionalGeneration  # noqa: E402
from blipbatch.model.continuous import GreedyLimits, generate_greedy  # noqa: E402

QUERIES, VOCAB, BATCH, PROMPT = 32, 32001, 8, 45
IMAGE_TOKEN = VOCAB - 1


def build_transformers_model():
    import transformers

    config = transformers.InstructBlipConfig(
        vision_config=dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
            image_size=224,
            patch_size=14,
        ),
        qformer_config=dict(
            vocab_size=30523, hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            max_position_embeddings=512,
        ),
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


def make_inputs(rows: int = BATCH, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((rows, QUERIES), IMAGE_TOKEN), torch.randint(3, 32000, (rows, PROMPT), generator=g)], 1)
    ids[:, QUERIES] = 1
    return dict(
        pixel_values=torch.randn(rows, 3, 224, 224, generator=g),
        qformer_input_ids=torch.randint(1000, 30000, (rows, 12), generator=g),
        qformer_attention_mask=torch.ones(rows, 12, dtype=torch.long),
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
    )


def rows_of(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def text_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    """A row's new tokens up to and including its first eos id (transformers pads the rest)."""
    end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
    return row[:end]


def time_call(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name: str, hf_run, our_run, repeats: int, note: str = "") -> None:
    """Time hf_run and our_run alternately; each returns a list of token lists, compared at the end."""
    hf_times, our_times = [], []
    hf_ids = our_ids = None
    with torch.inference_mode():
        for _ in range(repeats):
            t, hf_ids = time_call(hf_run)
            hf_times.append(t)
            t, our_ids = time_call(our_run)
            our_times.append(t)
    hf_median, our_median = statistics.median(hf_times), statistics.median(our_times)
    print(
        f"{name:14s} transformers {hf_median:.3f}s  ours {our_median:.3f}s  "
        f"speed-up {hf_median / our_median:.2f}x  identical ids: {hf_ids == our_ids}  {note}"
        f"(medians of {repeats}; all hf {[round(t, 3) for t in hf_times]}, ours {[round(t, 3) for t in our_times]})",
        flush=True,
    )


def new_tokens(ids: torch.Tensor, prompt_length: int) -> list[list[int]]:
    return ids[:, prompt_length:].tolist()


def continuous(ours, inputs: dict, limits: GreedyLimits, slots: int, vision_batch: int = BATCH) -> list[list[int]]:
    """Our engine's greedy path: vision in batches of `vision_batch`, then continuous batching."""
    pixels = inputs["pixel_values"]
    embeds = torch.cat([ours.encode_images(pixels[i : i + vision_batch]) for i in range(0, len(pixels), vision_batch)])
    return generate_greedy(ours, embeds, text_inputs(inputs), limits, slots)


def bench_fixed(hf_model, ours, repeats: int) -> None:
    inputs, settings = make_inputs(), dict(max_new_tokens=20, min_new_tokens=20)
    length = inputs["input_ids"].shape[1]
    compare(
        "greedy",
        lambda: new_tokens(hf_model.generate(**inputs, **settings), length),
        lambda: new_tokens(ours.generate(**inputs, **settings), length),
        repeats,
        "generate; ",
    )
    compare(
        "greedy",
        lambda: new_tokens(hf_model.generate(**inputs, **settings), length),
        lambda: continuous(ours, inputs, GreedyLimits(20, 20), BATCH),
        repeats,
        "engine; ",
    )
    beams = dict(settings, num_beams=5)
    compare(
        "beam5",
        lambda: new_tokens(hf_model.generate(**inputs, **beams), length),
        lambda: new_tokens(ours.generate(**inputs, **beams), length),
        repeats,
    )


def bench_varied(hf_model, ours, repeats: int, rows: int = 32) -> None:
    inputs = make_inputs(rows, seed=2)
    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        free = new_tokens(hf_model.generate(**inputs, max_new_tokens=20, min_new_tokens=20), length)
    # eos ids: the token each of a few rows produces at a random step, so rows end at different steps
    g = torch.Generator().manual_seed(3)
    eos = {free[row][int(torch.randint(2, 20, (1,), generator=g))] for row in range(0, rows, 4)}
    settings = dict(max_new_tokens=20, eos_token_id=sorted(eos))

    def hf_run() -> list[list[int]]:
        out = []
        for start in range(0, rows, BATCH):
            ids = hf_model.generate(**rows_of(inputs, start, start + BATCH), **settings)
            out += [until_eos(row, eos) for row in new_tokens(ids, length)]
        return out

    lengths = [len(until_eos(row, eos)) for row in free]
    static_steps = sum(max(lengths[i : i + BATCH]) for i in range(0, rows, BATCH))
    note = (
        f"{rows} rows, new tokens {min(lengths)}-{max(lengths)} (mean {sum(lengths) / rows:.1f}; "
        f"static batches run {static_steps * BATCH / rows:.1f} steps per row); "
    )
    compare(
        "varied",
        hf_run,
        lambda: continuous(ours, inputs, GreedyLimits(20, 0, tuple(sorted(eos))), BATCH),
        repeats,
        note,
    )


def bench_annotate(hf_model, ours, repeats: int, questions: int = 8) -> None:
    one = make_inputs(questions, seed=4)
    one["pixel_values"] = one["pixel_values"][:1].expand(questions, -1, -1, -1).contiguous()  # one image
    length = one["input_ids"].shape[1]
    settings = dict(max_new_tokens=20, min_new_tokens=20)
    limits = GreedyLimits(20, 20)

    def hf_separate() -> list[list[int]]:
        return [
            new_tokens(hf_model.generate(**rows_of(one, q, q + 1), **settings), length)[0] for q in range(questions)
        ]

    def ours_once() -> list[list[int]]:
        embeds = ours.encode_images(one["pixel_values"][:1]).expand(questions, -1, -1)
        return generate_greedy(ours, embeds, text_inputs(one), limits, questions)

    compare("annotate", hf_separate, ours_once, repeats, f"1 image x {questions} questions vs {questions} requests; ")
    compare(
        "annotate",
        lambda: new_tokens(hf_model.generate(**one, **settings), length),
        ours_once,
        repeats,
        f"vs one batch of {questions} with the image repeated; ",
    )


BENCHES = {"fixed": bench_fixed, "varied": bench_varied, "annotate": bench_annotate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_model = build_transformers_model()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        ours = InstructBlipForConditionalGeneration.from_pretrained(folder)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, prompt {QUERIES}+{PROMPT} tokens")
    for name in args.only:
        BENCHES[name](hf_model, ours, args.repeats)


if __name__ == "__main__":
    main()
