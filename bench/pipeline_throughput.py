"""The pipeline end to end against the engine alone, on the same model and images; and fetch + decode per core.

    .venv/bin/python bench/pipeline_throughput.py [--rows 256] [--batch-size 32] [--max-new-tokens 20]

An image server process on 127.0.0.1 serves 64 distinct 640 x 480 JPEGs (about 80 KB each). The model is a
random InstructBLIP of the medium size of shared/reference/environment.md (vision 384 x 6 at 224/14, Q-Former
384 x 4, LLaMA 512 x 8, vocab 32001, 32 queries) with a small tokenizer. Three measurements:
1. fetch + decode: the pipeline's Fetcher and decode_image over every URL in one thread (images/s per core);
2. engine alone: Engine.generate on the decoded images in batches of --batch-size (images/s), after a warm-up;
3. pipeline: pipeline.run over Parquet shards of the URLs on an in-process Ray with one model worker,
   images/s in steady state: rows over the span from the first unit's start to the last unit's end, as the
   workers recorded them (so Ray's start-up and the model load are not counted; the wall time is printed too).
Overhead = 1 - pipeline / engine alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_soak import ImageServerProcess, fetch_config  # noqa: E402

PROMPT = "A short image caption:"
IMAGES = 64
PHOTO_SIZE = (640, 480)


def write_medium_checkpoint(folder: Path) -> str:
    from tests.tiny import write_random_checkpoint

    return str(
        write_random_checkpoint(
            folder,
            vision=dict(
                hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=14
            ),
            qformer=dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536),
            text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
            num_query_tokens=32,
            image_size=224,
            std=0.05,
            vocab_size=32001,
        )
    )


def write_input(folder: Path, urls: list[str], rows_per_unit: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": [f"r{i:06d}" for i in range(len(urls))], "image_url": urls})
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=rows_per_unit)
    return str(folder)


def fetch_and_decode(urls: list[str]) -> tuple[float, list]:
    """(images/s in this one thread, the decoded images)."""
    from blipbatch.pipeline.decode import decode_image
    from blipbatch.pipeline.fetch import Fetcher

    fetcher = Fetcher(fetch_config(backoff_s=0.05))
    start = time.perf_counter()
    images = [decode_image(fetcher.fetch(url)) for url in urls]
    elapsed = time.perf_counter() - start
    fetcher.close()
    return len(urls) / elapsed, images


def engine_alone(checkpoint: str, images: list, batch_size: int, max_new_tokens: int, repeats: int) -> float:
    """Median images/s of Engine.generate over all the images, in batches of `batch_size`."""
    from blipbatch.model.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=checkpoint, generation=dict(max_new_tokens=max_new_tokens)))
    engine.generate(images[:batch_size], [PROMPT] * min(batch_size, len(images)))  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            engine.generate(chunk, [PROMPT] * len(chunk))
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


def pipeline_run(
    checkpoint: str, source: str, output: str, rows: int, batch_size: int, rows_per_unit: int, max_new_tokens: int
) -> tuple[float, float]:
    """(steady-state images/s from the units' own timing, images/s over the whole pipeline.run call)."""
    from blipbatch import pipeline
    from blipbatch.pipeline.sink import progress_records

    start = time.perf_counter()
    summary = pipeline.run(
        source,
        output,
        checkpoint,
        prompt=PROMPT,
        id_column="key",
        batch_size=batch_size,
        workers=1,
        max_new_tokens=max_new_tokens,
        rows_per_unit=rows_per_unit,
        fetch=fetch_config(backoff_s=0.05),
        progress=False,
    )
    wall = time.perf_counter() - start
    if summary.rows_ok != rows:
        raise RuntimeError(f"the pipeline wrote {summary.rows_ok} ok rows of {rows}: {summary}")
    timings = [r.timing for r in progress_records(output)]
    span = max(t.finished for t in timings) - min(t.started for t in timings)
    return rows / span, rows / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rows-per-unit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="engine-alone passes over the images (median)")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # an in-process Ray, not whatever cluster the shell points at

    import ray
    import torch

    with tempfile.TemporaryDirectory() as work, ImageServerProcess(IMAGES, photo_size=PHOTO_SIZE) as server:
        work = Path(work)
        checkpoint = write_medium_checkpoint(work / "model")
        urls = [server.url(f"/img/{(i * 7919) % IMAGES}.png?row={i}") for i in range(args.rows)]
        per_core, images = fetch_and_decode(urls)
        print(
            f"fetch + decode: {per_core:.0f} images/s in one thread ({PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG)", flush=True
        )
        alone = engine_alone(checkpoint, images, args.batch_size, args.max_new_tokens, args.repeats)
        print(
            f"engine alone: {alone:.2f} images/s (batch {args.batch_size}, {args.max_new_tokens} new tokens, "
            f"torch threads {torch.get_num_threads()})",
            flush=True,
        )
        source = write_input(work / "in", urls, args.rows_per_unit)
        try:
            steady, whole = pipeline_run(
                checkpoint,
                source,
                str(work / "out"),
                args.rows,
                args.batch_size,
                args.rows_per_unit,
                args.max_new_tokens,
            )
        finally:
            ray.shutdown()
        print(
            f"pipeline: {steady:.2f} images/s in steady state ({whole:.2f} over the whole run, start-up included); "
            f"overhead against the engine alone {100 * (1 - steady / alone):.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
