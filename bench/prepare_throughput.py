"""The prepare stage against bare decode + resize on the same files: images/s per thread count, per decode-process
count, exact and fast-JPEG paths, JPEG/PNG/WebP mixes. Needs no GPU and no model (the processor alone).

    .venv/bin/python bench/prepare_throughput.py [--images 256] [--size 640x480] [--threads 1,2] [--processes 1,2]
        [--mix jpeg] [--repeats 5] [--fast-jpeg] [--cpu-by-thread] [--answers N]
        [--fast-jpeg-sizes 640x480,1024x768,4000x3000]

Writes --images distinct pictures (smooth shapes and noise, as photos compress: ~115 KB per 640 x 480 JPEG at
quality 90) into a temporary folder, then measures in --repeats rounds, each measure once a round in turn (so a
change in the machine's load falls on all alike); medians are printed:
- bare: `decode_image` + `BlipImageProcessor.resized`, one image per task, on N threads (a ThreadPoolExecutor);
- stage: `PrepareStage` as the worker runs it, one unit of every image in one micro-batch: local files fetched
  (under a local root, each under its deadline), decoded, resized and stacked (uint8: the engine normalizes on
  its device); on N threads (`processes = 0`) and on N decode processes, whose scaling is printed as images/s per
  process against the first count's (1.00: perfect);
- with --fast-jpeg, the same with `[decode] fast_jpeg = true`, and its mean absolute pixel difference to the exact
  path (0..255 scale, over every pixel of every image).
The ratio printed is the median over the rounds of stage / bare at the same N, with its range. The CPU time this
process spent per image is printed too (all its threads, median; with decode processes, what the worker process
itself spends beside them): on a shared machine it is the steadier figure, as rates follow the load.
With --fast-jpeg-sizes: for JPEGs of each size, the CPU time of decode + resize per image on one thread, exact and
fast_jpeg, and their mean absolute pixel difference (0..255).
With --cpu-by-thread: instead of the rates, the CPU milliseconds per image each kind of thread of the stage spent
(fetch: the fetch pool; fetch-attempt: the threads reads run on, under their deadlines; prepare: decode + resize, or
the hand-offs to the decode processes; assemble: the batch; MainThread), median of --repeats units (Linux).
With --answers N: the demo model's answers (jobs/demo_data/shapes-instructblip: the caption and its three questions,
greedy) on N of its held-out pictures scaled to 640 x 480 and saved as JPEG quality 75, decoded exactly and with
fast_jpeg: the share of answers that are identical.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import torch  # noqa: E402

from blipbatch.model.image_processing import BlipImageProcessor  # noqa: E402
from blipbatch.pipeline.decode import DecodeConfig, decode_image  # noqa: E402
from blipbatch.pipeline.fetch import FetchConfig, Fetcher  # noqa: E402
from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage  # noqa: E402
from blipbatch.pipeline.shards import InputRow  # noqa: E402

FORMATS = {"jpeg": ("JPEG", {"quality": 90}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 90})}


def picture(rng: np.random.Generator, width: int, height: int) -> PIL.Image.Image:
    """Shapes on a gradient with some noise: compresses about as a photo does."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height) + 64], -1)
    noise = rng.normal(0, 12, (height, width, 3))
    image = PIL.Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(20, max(21, width // 3)))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_images(folder: Path, count: int, size: tuple[int, int], mix: list[str]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        name = mix[i % len(mix)]
        fmt, options = FORMATS[name]
        path = folder / f"{i:05d}.{name}"
        buffer = io.BytesIO()
        picture(rng, *size).save(buffer, fmt, **options)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def bare(datas: list[bytes], processor: BlipImageProcessor, decode: DecodeConfig, threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda data: processor.resized(decode_image(data, decode, processor.rgb_resize.covering)), datas))
    return len(datas) / (time.perf_counter() - start)


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds a thread of this process has run (Linux: /proc/self/task/ID/schedstat, in nanoseconds)."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def stage(
    paths: list[Path],
    root: Path,
    processor: BlipImageProcessor,
    decode: DecodeConfig,
    config: PrepareConfig,
    cpu_by_thread: dict[str, float] | None = None,
) -> tuple[float, torch.Tensor]:
    """images/s of the stage over one unit of every image, and its pixels. With `cpu_by_thread`, also the CPU
    milliseconds per image each kind of thread spent (fetch, fetch-attempt, prepare, assemble, MainThread), added
    into it."""
    rows = [InputRow(id=str(i), image=str(path), instruction="x", row_index=i) for i, path in enumerate(paths)]
    fetcher = Fetcher(FetchConfig(local_roots=(str(root),)))
    with PrepareStage(fetcher, decode, processor, config) as prepare:
        before = {thread.native_id: thread_cpu_s(thread.native_id) for thread in threading.enumerate()}
        start = time.perf_counter()  # the decode processes are started: a worker starts them once
        [batch] = list(prepare.batches(rows, len(rows)))
        rate = len(rows) / (time.perf_counter() - start)
        if cpu_by_thread is not None:  # read before the stage's pools end their threads
            for thread in threading.enumerate():
                kind = thread.name.rstrip("0123456789").rstrip("_")  # "fetch_3" -> "fetch"
                spent = thread_cpu_s(cast(int, thread.native_id)) - before.get(thread.native_id, 0.0)
                cpu_by_thread[kind] = cpu_by_thread.get(kind, 0.0) + spent * 1e3 / len(rows)
    assert all(p.error is None for p in batch.rows), [p.error for p in batch.rows if p.error][:3]
    return rate, batch.pixels


def answers_agreement(count: int) -> tuple[int, int]:
    """(identical answers, answers) of the demo model on `count` held-out pictures as 640 x 480 JPEGs, exact decode
    against fast_jpeg."""
    from blipbatch.jobs import shapes
    from blipbatch.jobs.demo import DEMO_MODEL
    from blipbatch.model import InstructBlipForConditionalGeneration, InstructBlipProcessor

    processor = InstructBlipProcessor.from_pretrained(DEMO_MODEL)
    model = InstructBlipForConditionalGeneration.from_pretrained(DEMO_MODEL)
    covering = processor.image_processor.rgb_resize.covering
    photos = []
    for sample in shapes.make_dataset(count, seed=7, held_out=True):
        buffer = io.BytesIO()
        sample.image.resize((640, 480), PIL.Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=75)
        photos.append(buffer.getvalue())
    answers = {}
    for mode, decode in (("exact", DecodeConfig()), ("fast", DecodeConfig(fast_jpeg=True))):
        images = [decode_image(data, decode, covering) for data in photos]
        answers[mode] = []
        for text in shapes.INSTRUCTIONS:
            for first in range(0, count, 50):
                inputs = processor(images=images[first : first + 50], text=text)
                with torch.inference_mode():
                    ids = model.generate(**inputs, max_new_tokens=6)
                answers[mode] += processor.batch_decode(
                    ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
    return sum(a == b for a, b in zip(answers["exact"], answers["fast"])), len(answers["exact"])


def fast_jpeg_gain(sizes: list[tuple[int, int]], processor: BlipImageProcessor) -> None:
    rng = np.random.default_rng(0)
    for width, height in sizes:
        count = max(3, 32 * 640 * 480 // (width * height))
        datas = []
        for _ in range(count):
            buffer = io.BytesIO()
            picture(rng, width, height).save(buffer, "JPEG", quality=90)
            datas.append(buffer.getvalue())
        cpu, pixels = {}, {}
        for mode, decode in (("exact", DecodeConfig()), ("fast", DecodeConfig(fast_jpeg=True))):
            times = []
            for _ in range(2):
                start = time.process_time()
                pixels[mode] = [
                    processor.resized(decode_image(data, decode, processor.rgb_resize.covering)) for data in datas
                ]
                times.append((time.process_time() - start) / count * 1e3)
            cpu[mode] = min(times)
        difference = np.mean(
            [(a.float() - b.float()).abs().mean().item() for a, b in zip(pixels["exact"], pixels["fast"])]
        )
        print(
            f"{width}x{height} ({count} JPEGs q90): CPU ms/image exact {cpu['exact']:.1f}, fast_jpeg "
            f"{cpu['fast']:.1f} ({cpu['exact'] / cpu['fast']:.1f}x); mean absolute pixel difference "
            f"{difference:.2f} (0..255)",
            flush=True,
        )
        try:
            import simplejpeg
        except ImportError:
            continue
        side = processor.rgb_resize.covering
        times = []
        for _ in range(2):  # simplejpeg's scaled decode (no EXIF orientation, no checks), then the same resize
            start = time.process_time()
            for data in datas:
                rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
                processor.resized(PIL.Image.fromarray(rgb))
            times.append((time.process_time() - start) / count * 1e3)
        print(
            f"{width}x{height}: simplejpeg {simplejpeg.__version__} scaled decode + resize, CPU ms/image "
            f"{min(times):.1f}",
            flush=True,
        )


def alternating(repeats: int, measures: dict[str, Callable[[], float]]) -> dict[str, tuple[list[float], list[float]]]:
    """Each measure once a round, in turn, for `repeats` rounds (so a change in the machine's load falls on all of
    them alike): per measure, its images/s and this process's CPU seconds, one of each a round."""
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            start = time.process_time()
            results[name][0].append(measure())
            results[name][1].append(time.process_time() - start)
    return results


def print_cpu_by_thread(
    paths: list[Path],
    root: Path,
    processor: BlipImageProcessor,
    paths_modes: list[tuple[str, DecodeConfig]],
    threads: list[int],
    processes: list[int],
    repeats: int,
) -> None:
    """Where the stage's CPU goes: per image, by kind of thread, the median of `repeats` units."""
    for mode, decode in paths_modes:
        configs = [(f"threads={n}", PrepareConfig(threads=n, processes=0)) for n in threads]
        configs += [(f"processes={n}", PrepareConfig(processes=n)) for n in processes]
        for name, config in configs:
            runs = []
            for _ in range(repeats):
                runs.append({})
                stage(paths, root, processor, decode, config, runs[-1])
            kinds = sorted({kind for run in runs for kind in run}, key=lambda kind: -runs[0].get(kind, 0.0))
            spent = "  ".join(f"{kind} {statistics.median(run.get(kind, 0.0) for run in runs):.2f}" for kind in kinds)
            print(f"{mode:9s} {name}: CPU ms/image by thread: {spent}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--mix", default="jpeg", help="comma-separated formats cycled over the images: jpeg,png,webp")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fast-jpeg", action="store_true", help="also measure [decode] fast_jpeg = true")
    parser.add_argument("--answers", type=int, default=0, help="the demo model's answers on N pictures, exact/fast")
    parser.add_argument("--fast-jpeg-sizes", default="", help="CPU time of exact and fast_jpeg decodes at these sizes")
    parser.add_argument(
        "--cpu-by-thread", action="store_true", help="the stage's CPU time per image by kind of thread (Linux)"
    )
    args = parser.parse_args()
    if args.fast_jpeg_sizes:
        fast_jpeg_gain(
            [tuple(int(v) for v in size.split("x")) for size in args.fast_jpeg_sizes.split(",")],
            BlipImageProcessor(size={"height": 224, "width": 224}),
        )
        return
    if args.answers:
        same, total = answers_agreement(args.answers)
        print(
            f"demo model, {args.answers} pictures x {total // args.answers} prompts as 640 x 480 JPEG q75: "
            f"{same} of {total} answers identical with fast_jpeg ({same / total:.1%})"
        )
        return
    size = tuple(int(v) for v in args.size.split("x"))
    processor = BlipImageProcessor(size={"height": 224, "width": 224})
    paths_modes = [("exact", DecodeConfig())] + (
        [("fast_jpeg", DecodeConfig(fast_jpeg=True))] if args.fast_jpeg else []
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = write_images(root, args.images, size, args.mix.split(","))
        datas = [path.read_bytes() for path in paths]
        what = "" if args.cpu_by_thread else f"; images/s, median of {args.repeats} rounds, each measure in turn"
        mean_kb = sum(map(len, datas)) / len(datas) / 1024
        print(f"{args.images} images {args.size} ({args.mix}), mean {mean_kb:.0f} KB{what}")
        exact_pixels = None
        threads = [int(v) for v in args.threads.split(",")]
        processes = [int(v) for v in args.processes.split(",") if v]
        per_image = 1e3 / len(datas)
        if args.cpu_by_thread:
            print_cpu_by_thread(paths, root, processor, paths_modes, threads, processes, args.repeats)
            return
        for mode, decode in paths_modes:
            measures: dict[str, Callable[[], float]] = {}
            for n in threads:
                measures[f"bare {n}"] = lambda n=n: bare(datas, processor, decode, n)
                config = PrepareConfig(threads=n, processes=0)
                measures[f"threads {n}"] = lambda config=config: stage(paths, root, processor, decode, config)[0]
            for n in processes:
                config = PrepareConfig(processes=n)
                measures[f"processes {n}"] = lambda config=config: stage(paths, root, processor, decode, config)[0]
            results = alternating(args.repeats, measures)
            rate = {name: statistics.median(rates) for name, (rates, _) in results.items()}
            cpu = {name: statistics.median(seconds) * per_image for name, (_, seconds) in results.items()}
            for n in threads:
                ratios = [s / b for s, b in zip(results[f"threads {n}"][0], results[f"bare {n}"][0])]
                print(
                    f"{mode:9s} threads={n}: bare {rate[f'bare {n}']:7.1f}  stage {rate[f'threads {n}']:7.1f}  "
                    f"stage/bare {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})  "
                    f"(CPU ms/image: bare {cpu[f'bare {n}']:.2f}, stage {cpu[f'threads {n}']:.2f})"
                )
            first = processes[0] if processes else 0
            for n in processes:
                # images/s per process against the first count's: 1.00 is perfect scaling
                scaling = rate[f"processes {n}"] * first / (rate[f"processes {first}"] * n)
                print(
                    f"{mode:9s} processes={n}: stage {rate[f'processes {n}']:7.1f}  scaling from {first}: "
                    f"{scaling:.2f}  (CPU ms/image in the worker process, the decode processes' own not counted: "
                    f"{cpu[f'processes {n}']:.2f})"
                )
            _, pixels = stage(paths, root, processor, decode, PrepareConfig(processes=0))
            if exact_pixels is None:
                exact_pixels = pixels
            else:
                difference = (pixels.float() - exact_pixels.float()).abs().mean().item()
                print(f"{mode}: mean absolute pixel difference to exact {difference:.2f} (0..255)")


if __name__ == "__main__":
    main()
