"""`blipbatch demo`: a caption job and an annotate job over the sample images, with the small model trained on
synthetic shapes. Both ship inside the package (jobs/demo_data/), so the demo runs from a wheel too."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blipbatch.jobs.shapes import CAPTION_PROMPT, QUESTIONS

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
SAMPLE_IMAGES = DEMO_DATA / "images"
DEMO_MODEL = DEMO_DATA / "shapes-instructblip"


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
    from blipbatch import pipeline
    from blipbatch.jobs.kinds import write_wide_table
    from blipbatch.pipeline.fetch import FetchConfig
    from blipbatch.pipeline.sink import read_output

    if model is None:
        if not (DEMO_MODEL / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the demo model is missing from {DEMO_MODEL}; rebuild it with "
                f"`blipbatch train-demo --output {DEMO_MODEL}` or pass --model"
            )
        model = str(DEMO_MODEL)
        print(
            f"Model: {DEMO_MODEL}, a 0.4M-parameter InstructBLIP trained on synthetic pictures of circles,\n"
            "squares and triangles (see its README.md); it knows nothing else. The path is the real one: Parquet\n"
            "shard -> fetch -> decode -> vision encoder -> Q-Former (with the instruction) -> LLaMA -> Parquet.\n"
        )
    # The input stays beside the outputs, so that `blipbatch report` can tell what is pending.
    source = str(write_sample_input(output / "input"))
    # The sample images are local files: their folder is the one local root the jobs may read.
    common: dict[str, Any] = dict(
        passthrough=["name"],
        max_new_tokens=max_new_tokens,
        progress=False,
        fetch=FetchConfig(local_roots=(str(SAMPLE_IMAGES),)),
    )
    jobs = (("captions", dict(prompt=CAPTION_PROMPT)), ("annotations", dict(prompt=QUESTIONS)))
    for name, what in jobs:
        target = str(output / name)
        summary = pipeline.run(source, target, model, **what, **common)
        print(
            f"== {name} job: {summary.rows_ok} rows ok, {summary.rows_error} in error, "
            f"{summary.wall_s:.1f}s -> {target}"
        )
        for row in read_output(target).to_pylist()[:6]:
            label = row.get("question_id") or "caption"
            print(f"  {row['name']:22s} {label:8s} {row['text']!r}")
    wide = write_wide_table(str(output / "annotations"))
    print(f"\nannotations as one row per image, one column per question: {wide}")
    # The output records its [fetch] local_roots, so the report needs no flags to show the images.
    print(f"a page with the images and captions: {command()} report {output / 'captions'}")
    return 0


def command() -> str:
    """How to run blipbatch again from any shell: the script beside this interpreter (a venv that is not
    activated), else the module."""
    script = Path(sys.executable).with_name("blipbatch")
    return str(script) if script.is_file() else f"{sys.executable} -m blipbatch"


def main_demo(output: str, model: str | None, max_new_tokens: int) -> int:
    try:
        return run_demo(Path(output).resolve(), model, max_new_tokens)
    except FileNotFoundError as e:
        print(f"blipbatch demo: {e}", file=sys.stderr)
        return 3
