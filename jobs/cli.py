"""The `blipbatch` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEMO_PROMPTS = ("A short image caption:", "What color is the shape?")
DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def demo_images() -> list[tuple[str, "PIL.Image.Image"]]:  # noqa: F821
    from PIL import Image, ImageDraw

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipbatch", description="Batch InstructBLIP / BLIP-2 inference.")
    commands = parser.add_subparsers(dest="command", required=True)
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
