"""Closed-set ranking against free generation of the same answers, through the engine the pipeline calls.

    .venv/bin/python bench/closed_set.py [--images 8] [--repeats 1] [--threads 2]

Writes the medium random InstructBLIP of shared/reference/environment.md (vision 384 x 6 at 224/14, Q-Former
384 x 4, LLaMA 512 x 8, vocab 32001, 32 queries) with the small processor of jobs/tokenizer_files.py, then times,
for `--images` images with one question each, in the engine's CPU batches of 8 rows (medians of `--repeats`, after
one warm-up call):
- free: greedy generation of exactly as many tokens as the longest candidate answer takes with its eos (the
  random model never stops early, so every row decodes them all: the cost of generating such an answer);
- ranked K = 2, 6, 40: `Engine.generate_scored` with a closed set of K candidates (model.ranking: one prefill,
  every candidate against its KV cache);
- naive K = 6, 40: what the cache saves: `forward` over prompt + candidate for every (image, candidate), K
  full forwards per image (the vision encoder still once per image), batched 8 images x K candidates at a time.
Prints images/s (wall clock) and images per CPU-second of the process for each.
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

from blipbatch.model.candidates import ClosedSet  # noqa: E402
from blipbatch.model.engine import Engine, EngineConfig  # noqa: E402
from blipbatch.model.ranking import candidate_targets, eos_token_id  # noqa: E402
from tests.tiny import write_random_checkpoint  # noqa: E402

QUESTION = "What color is the car?"
WORDS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "brown"]
CANDIDATES = [f"{word} {kind}" for kind in ("car", "van", "bus", "train") for word in WORDS]  # 40 of 2-5 tokens
BATCH = 8


def write_model(folder: Path) -> Path:
    return write_random_checkpoint(
        folder,
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=14),
        qformer=dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
        num_query_tokens=32,
        image_size=224,
        vocab_size=32001,
        std=0.05,
    )


def median_seconds(run, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier one."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def in_batches(engine: Engine, pixels: torch.Tensor, closed: ClosedSet | None) -> None:
    for first in range(0, pixels.shape[0], BATCH):
        part = pixels[first : first + BATCH]
        engine.generate_scored(part, list(range(part.shape[0])), [QUESTION] * part.shape[0], [closed] * part.shape[0])


@torch.inference_mode()
def naive(engine: Engine, pixels: torch.Tensor, candidates: list[str]) -> None:
    """K full forwards per image over prompt + candidate + eos (the vision encoder once per image)."""
    model, processor = engine.model, engine.processor
    targets = candidate_targets(processor.tokenizer, candidates, eos_token_id(model, processor.tokenizer))
    prompt = processor.encode_prompts([QUESTION])
    for first in range(0, pixels.shape[0], BATCH):
        part = pixels[first : first + BATCH]
        image_embeds = model.encode_images(part).repeat_interleave(len(candidates), 0)
        width = max(map(len, targets))
        rows = [prompt["input_ids"][0].tolist() + t + [0] * (width - len(t)) for t in targets] * part.shape[0]
        ids = torch.tensor(rows)
        features = model.query_image(
            image_embeds,
            prompt["qformer_input_ids"].expand(len(rows), -1),
            prompt["qformer_attention_mask"].expand(len(rows), -1),
        )
        model.language_model(model.embed_inputs(ids, features), torch.ones_like(ids))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = write_model(Path(folder))
        probe = Engine(EngineConfig(model=str(path), device="cpu"))
        tokenizer = probe.processor.tokenizer
        lengths = [len(t) for t in candidate_targets(tokenizer, CANDIDATES, eos_token_id(probe.model, tokenizer))]
        answer_tokens = max(lengths)
        engine = Engine(
            EngineConfig(
                model=str(path),
                device="cpu",
                cpu_threads=args.threads,
                generation={"max_new_tokens": answer_tokens, "min_new_tokens": answer_tokens},
            )
        )
        pixels = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        print(
            f"{args.images} images, batches of {BATCH}, {args.threads} threads; candidate targets "
            f"{min(lengths)}-{answer_tokens} tokens with eos; free generation: {answer_tokens} new tokens"
        )
        in_batches(engine, pixels[:BATCH], ClosedSet(tuple(CANDIDATES[:2])))  # warm-up
        results = {"free": median_seconds(lambda: in_batches(engine, pixels, None), args.repeats)}
        for k in (2, 6, 40):
            closed = ClosedSet(tuple(CANDIDATES[:k]))
            results[f"ranked K={k}"] = median_seconds(lambda: in_batches(engine, pixels, closed), args.repeats)
        for k in (6, 40):
            results[f"naive K={k}"] = median_seconds(lambda: naive(engine, pixels, CANDIDATES[:k]), args.repeats)
    for name, (wall, cpu) in results.items():
        print(
            f"{name:>14}: {wall:7.3f} s  {args.images / wall:6.2f} images/s   CPU {cpu:7.3f} s  "
            f"{args.images / cpu:6.2f} images/CPU-s"
        )


if __name__ == "__main__":
    main()
