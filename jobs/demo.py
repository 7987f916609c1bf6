"""`blipbatch demo`: a caption job and an annotate job over the sample images in examples/images."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
CAPTION_PROMPT = "A short image caption:"
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?", "count": "How many shapes are there?"}


def write_sample_input(folder: Path) -> Path:
    """One Parquet shard listing the sample images (paths), as a user's input would list URLs."""
    images = sorted(SAMPLE_IMAGES.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no sample images in {SAMPLE_IMAGES}")
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"name": [p.stem for p in images], "image_url": [str(p) for p in images]})
    pq.write_table(table, folder / "samples.parquet")
    return folder


def run_demo(output: Path, model: str | None, max_new_tokens: int) -> int:
    import pipeline
    from jobs.kinds import write_wide_table
    from model.tiny import write_tiny_checkpoint
    from pipeline.fetch import FetchConfig
    from pipeline.sink import read_output

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = str(write_tiny_checkpoint(Path(tmp) / "tiny-instructblip"))
            print("No trained demo model ships yet: using a tiny InstructBLIP with RANDOM weights made on the spot,\n"
                  "so the texts below are gibberish by design. They show the whole path working: Parquet shard ->\n"
                  "fetch -> decode -> vision encoder -> Q-Former (with the instruction) -> LLaMA -> Parquet.\n")
        source = str(write_sample_input(Path(tmp) / "input"))
        common = dict(passthrough=["name"], max_new_tokens=max_new_tokens, batch_size=8, progress=False,
                      fetch=FetchConfig(local_roots=(str(SAMPLE_IMAGES),)))
        jobs = (("captions", dict(prompt=CAPTION_PROMPT)), ("annotations", dict(prompt=QUESTIONS)))
        for name, what in jobs:
            target = str(output / name)
            summary = pipeline.run(source, target, model, **what, **common)
            print(f"== {name} job: {summary.rows_ok} rows ok, {summary.rows_error} in error, "
                  f"{summary.wall_s:.1f}s -> {target}")
            for row in read_output(target).to_pylist()[:6]:
                label = row.get("question_id") or "caption"
                print(f"  {row['name']:22s} {label:8s} {row['text']!r}")
        wide = write_wide_table(str(output / "annotations"))
        print(f"\nannotations as one row per image, one column per question: {wide}")
    return 0


def main_demo(output: str, model: str | None, max_new_tokens: int) -> int:
    try:
        return run_demo(Path(output).resolve(), model, max_new_tokens)
    except FileNotFoundError as e:
        print(f"blipbatch demo: {e}", file=sys.stderr)
        return 3
