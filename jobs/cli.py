"""The `blipbatch` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

DEMO_PROMPTS = ("A short image caption:", "What color is the shape?")
DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def demo_images() -> list[tuple[str, Image.Image]]:
    images = []
    for i, (name, rgb) in enumerate(DEMO_COLOURS.items()):
        image = Image.new("RGB", (160, 120), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        box = (20 + 30 * i, 20, 90 + 30 * i, 90)
        (draw.ellipse if i % 2 == 0 else draw.rectangle)(box, fill=rgb)
        images.append((f"{name} {'circle' if i % 2 == 0 else 'square'}", image))
    return images


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from model import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from model.tiny import write_tiny_checkpoint

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else write_tiny_checkpoint(Path(tmp) / "tiny-instructblip")
        if not args.model:
            print("No trained demo model ships yet: using a tiny InstructBLIP with RANDOM weights made on the spot,")
            print("so the text below is gibberish by design. It shows the whole path working:")
            print("image -> vision encoder -> Q-Former (with the instruction) -> LLaMA -> text.\n")
        start = time.perf_counter()
        processor = InstructBlipProcessor.from_pretrained(folder)
        model = InstructBlipForConditionalGeneration.from_pretrained(folder)
        print(f"loaded {folder.name} in {time.perf_counter() - start:.2f}s "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
        images = demo_images()
        for prompt in DEMO_PROMPTS:
            inputs = processor(images=[image for _, image in images], text=prompt)
            start = time.perf_counter()
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
            elapsed = time.perf_counter() - start
            new_ids = ids[:, inputs["input_ids"].shape[1]:]
            texts = processor.batch_decode(new_ids, skip_special_tokens=True)
            print(f"\nprompt: {prompt!r}  ({len(images)} images, {elapsed:.2f}s)")
            for (name, _), text in zip(images, texts):
                print(f"  [{name:13s}] {text.strip()!r}")
    return 0


# Exit codes scripts can rely on.
EXIT_OK, EXIT_UNITS_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def run_pipeline(args: argparse.Namespace) -> int:
    import pipeline
    from pipeline.shards import NoShardsError, ShardError
    from pipeline.sink import ManifestMismatch
    from schemas import SchemaError

    try:
        summary = pipeline.run(
            args.input[0] if len(args.input) == 1 else args.input, args.output, args.model,
            prompt=args.prompt, instruction_column=args.instruction_column, image_column=args.image_column,
            id_column=args.id_column, passthrough=args.passthrough, batch_size=args.batch_size,
            workers=args.workers, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
            dtype=args.dtype, device=args.device, rows_per_unit=args.rows_per_unit,
            max_attempts=args.max_attempts, address=args.address, force=args.force,
            retry_failed=args.retry_failed, progress=not args.quiet,
        )
    except (ManifestMismatch, SchemaError, NoShardsError, ShardError, pipeline.PipelineError) as e:
        print(f"blipbatch run: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(summary)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_UNITS_FAILED if summary.units_failed else EXIT_OK


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="caption / question every image of Parquet shards, resumably",
        description="Process every work unit of INPUT not yet committed in OUTPUT. Running the same command "
        "again resumes; exit codes: 0 all done, 1 some units failed, 3 refused (bad input, settings differ "
        "from the output's), 130 interrupted.",
    )
    run.add_argument("--input", required=True, nargs="+", help="Parquet folder, glob or files (local, s3://, gs://)")
    run.add_argument("--output", required=True, help="output folder (local, s3://, gs://)")
    run.add_argument("--model", required=True, help="checkpoint: local folder, fsspec URL or Hub id")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one instruction asked of every image")
    what.add_argument("--instruction-column", help="column holding each row's instruction")
    run.add_argument("--image-column", default="image_url", help="URL/path/data: URI or raw-bytes column")
    run.add_argument("--id-column", help="column of unique row ids (default: derived from shard and row)")
    run.add_argument("--passthrough", nargs="*", default=[], help="input columns copied to the output")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 1)")
    run.add_argument("--max-new-tokens", type=int, default=30)
    run.add_argument("--num-beams", type=int, default=1)
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--rows-per-unit", type=int, default=1000, help="rows per work unit (unit of retry and commit)")
    run.add_argument("--max-attempts", type=int, default=3, help="tries before a unit is marked failed")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray in-process)")
    run.add_argument("--force", action="store_true", help="resume even if the output was made with other settings")
    run.add_argument("--retry-failed", action="store_true", help="also redo units marked failed")
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.set_defaults(handler=run_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipbatch", description="Batch InstructBLIP / BLIP-2 inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_command(commands)
    demo = commands.add_parser("demo", help="caption and question a few sample images with a small model")
    demo.add_argument("--model", help="checkpoint folder to use instead of the built-in tiny model")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--num-beams", type=int, default=1)
    demo.set_defaults(handler=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
