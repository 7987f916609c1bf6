"""Images per second end to end, files in, Parquet out: transformers' generate, our model, the engine, the worker.

    python bench/gpu_throughput.py                       # CUDA: Vicuna-7B-shaped InstructBLIP, bf16 (<= 6 min, H100)
    python bench/gpu_throughput.py --size medium         # CPU check of the same script (< 3 min)
    python bench/gpu_throughput.py --json results.json   # also write the figures as JSON

No downloads, no Ray (a stand-in for ray.util.metrics is put in place when Ray is missing, so the worker's
`process_unit` runs in-process), and no installed package needed (the repository's folders are mapped to
`blipbatch` when it is not installed). Models are built in memory with random weights; the processor's
tokenizers are the small ones the tests use. Every row: `min_new_tokens = max_new_tokens` (exactly N new tokens),
greedy, one fixed prompt (the image's 32 query tokens + BOS + about 10 text tokens).

Measured, in order (reference/gpu.md has the first H100 figures and the ~530 images/s compute limit):
1. prepare stage: JPEG files (640 x 480) -> fetch, decode, RGB, resize, stack (`pipeline.prepare`; the engine
   normalizes on the GPU), with one thread and with the default thread count: images/s;
2. transformers' `generate` with pixels already on the device, at each batch size;
3. ours, pixels on the device: static `generate`, and continuous batching (`generate_greedy`, slots = batch, CUDA
   graphs on CUDA), at each batch size;
4. `Engine.generate` with decoded PIL images (the Python API's path: the processor runs in the caller's thread);
5. `ModelWorker.process_unit` on the JPEG files -> Parquet (one unit), with its stage times;
6. with `--quantize fp8` (Hopper): our model quantized in place (model/fp8.py), continuous batching and the worker
   again, and the share of rows whose ids equal bf16's;
and per phase the peak device memory, and the best rate as a share of the compute limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
LIMIT_IMAGES_PER_S = 530  # ~1.5 TFLOP an image at ~800 TFLOP/s (bf16 matmul on an H100): reference/gpu.md
PROMPT = "Write a short description of this photo for a blind reader."
PHOTO = (640, 480)


def ensure_imports() -> None:
    """Map the repository's folders to `blipbatch` where the package is not installed, and stand in for
    ray.util.metrics where Ray is missing (the GPU machine has neither)."""
    try:
        import blipbatch.model  # noqa: F401
    except ModuleNotFoundError:
        for name, folder in [
            ("blipbatch", "blipbatch"),
            ("blipbatch.schemas", "schemas"),
            ("blipbatch.model", "model"),
            ("blipbatch.pipeline", "pipeline"),
            ("blipbatch.jobs", "jobs"),
        ]:
            spec = importlib.util.spec_from_file_location(
                name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    try:
        import ray.util.metrics  # noqa: F401
    except ModuleNotFoundError:

        class Metric:
            def __init__(self, *args, **kwargs) -> None:
                pass

            def inc(self, *args, **kwargs) -> None:
                pass

            observe = set = inc

        metrics = types.ModuleType("ray.util.metrics")
        metrics.Counter = metrics.Gauge = metrics.Histogram = Metric
        for name, module in [
            ("ray", types.ModuleType("ray")),
            ("ray.util", types.ModuleType("ray.util")),
            ("ray.util.metrics", metrics),
        ]:
            sys.modules[name] = module


@dataclass(frozen=True)
class Size:
    vision: dict
    qformer: dict
    text: dict
    vocab: int
    batches: tuple[int, ...]  # batch sizes of the model-only measurements
    batch: int  # the engine's and the worker's batch
    images: int  # JPEG files for the prepare stage and the worker
    new_tokens: int
    repeats: int  # timed calls per model-only measurement


SIZES = {
    "7b": Size(
        vision=dict(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, patch_size=14
        ),
        qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        vocab=32064,
        batches=(128, 256, 512),
        batch=256,
        images=1024,
        new_tokens=30,
        repeats=2,
    ),
    "medium": Size(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=14),
        qformer=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
        vocab=32001,
        batches=(8, 32),
        batch=32,
        images=64,
        new_tokens=30,
        repeats=1,
    ),
}


@dataclass
class Results:
    setup: dict
    rates: dict = field(default_factory=dict)  # name -> images/s
    peaks: dict = field(default_factory=dict)  # name -> peak device GiB
    notes: dict = field(default_factory=dict)

    def add(self, name: str, images: int, seconds: float, device: torch.device, note: str = "") -> None:
        self.rates[name] = images / seconds
        if device.type == "cuda":
            self.peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        peak = f", peak {self.peaks[name]:.1f} GiB" if name in self.peaks else ""
        print(f"{name:48s} {self.rates[name]:8.1f} images/s ({images} in {seconds:.2f}s{peak}) {note}", flush=True)
        if note:
            self.notes[name] = note


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# -- set-up ------------------------------------------------------------------------------------------------------


def write_photo(path: Path, seed: int) -> Path:
    """A 640 x 480 JPEG of a smooth colour field with noise (~100 KB, like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : PHOTO[1], 0 : PHOTO[0]]
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 100 * np.sin(x / (40 + 7 * c) + y / (55 + 5 * c) + phase[c]) for c in range(3)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path, quality=90)
    return path


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` distinct photos, written on all cores (numpy and Pillow release the GIL)."""
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(write_photo, [folder / f"{i:05d}.jpg" for i in range(count)], range(count)))


def configs(size: Size, folder: Path):
    """(our config, transformers' config, image token id, processor) for the size, the processor's files in
    `folder`."""
    import transformers

    from blipbatch.jobs.tokenizer_files import write_processor_files
    from blipbatch.model.configs import InstructBlipConfig
    from blipbatch.model.processor import InstructBlipProcessor

    infos = write_processor_files(folder, lm="llama", num_query_tokens=32, image_size=224)
    lm_tokens, qformer_tokens = infos["tokenizer"], infos["qformer_tokenizer"]
    data = dict(
        vision_config=dict(size.vision, image_size=224),
        qformer_config=dict(
            size.qformer, vocab_size=qformer_tokens.vocab_size, encoder_hidden_size=size.vision["hidden_size"]
        ),
        text_config=dict(
            size.text,
            model_type="llama",
            vocab_size=size.vocab,
            max_position_embeddings=2048,
            bos_token_id=lm_tokens.bos_token_id,
            eos_token_id=lm_tokens.eos_token_id,
            pad_token_id=lm_tokens.pad_token_id,
        ),
        num_query_tokens=32,
        image_token_index=lm_tokens.image_token_id,
    )
    return (
        InstructBlipConfig.from_dict(data),
        transformers.InstructBlipConfig(**data),
        lm_tokens.image_token_id,
        InstructBlipProcessor.from_pretrained(folder),
    )


def random_init_(model: torch.nn.Module) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_ours(config, dtype: torch.dtype, device: torch.device):
    """Our model with random weights, built on the meta device and given storage on `device` (as loading does)."""
    from blipbatch.model.instructblip import InstructBlipForConditionalGeneration
    from blipbatch.model.loading import materialize

    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    materialize(model, dtype, device, model.keep_in_fp32)
    model.tie_weights()
    random_init_(model)
    return model.eval()


def build_transformers(config, dtype: torch.dtype, device: torch.device):
    import transformers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.InstructBlipForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    random_init_(model)
    return model.eval()


def model_inputs(processor, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The processor's text inputs for `batch` rows of PROMPT, and random pixels, on the device."""
    inputs = processor.encode_prompts([PROMPT] * batch)
    g = torch.Generator().manual_seed(1)
    inputs["pixel_values"] = torch.randn(batch, 3, 224, 224, generator=g).to(dtype)
    return {k: v.to(device) for k, v in inputs.items()}


# -- measurements --------------------------------------------------------------------------------------------------


def prepare_stage(paths: list[Path], processor, results: Results) -> None:
    from blipbatch.pipeline.decode import DecodeConfig
    from blipbatch.pipeline.fetch import FetchConfig, Fetcher
    from blipbatch.pipeline.prepare import PrepareConfig, PrepareStage, default_threads, usable_cpus
    from blipbatch.pipeline.shards import InputRow

    rows = [InputRow(id=str(i), image=str(p), instruction=PROMPT, row_index=i) for i, p in enumerate(paths)]
    fetcher = Fetcher(FetchConfig(local_roots=(str(paths[0].parent),)))
    configs = [(f"{n} thread(s)", PrepareConfig(threads=n, processes=0)) for n in sorted({1, default_threads()})]
    configs += [(f"{n} decode process(es)", PrepareConfig(processes=n)) for n in sorted({1, usable_cpus()})]
    for name, config in configs:
        with PrepareStage(fetcher, DecodeConfig(), processor.image_processor, config) as stage:
            start = time.perf_counter()  # after the decode processes start: a worker starts them once
            count = sum(batch.pixels.shape[0] for batch in stage.batches(rows, 256))
            seconds = time.perf_counter() - start
        results.add(
            f"prepare stage, {name}",
            count,
            seconds,
            torch.device("cpu"),
            f"decode {stage.times.decode_s:.1f} thread-s, fetch {stage.times.fetch_s:.1f} thread-s",
        )


def static_generate(
    model, name: str, settings: dict, inputs_for, size: Size, device: torch.device, results: Results, after=None
) -> None:
    """Timed `generate` calls at each batch size, after a warm-up; then `after(batch, inputs)`, if given."""
    with torch.inference_mode():
        model.generate(**inputs_for(min(size.batches)), **settings)  # warm-up
        for batch in size.batches:
            inputs = inputs_for(batch)
            seconds = timed(lambda: [model.generate(**inputs, **settings) for _ in range(size.repeats)], device)
            results.add(f"{name}, batch {batch}", batch * size.repeats, seconds, device)
            if after is not None:
                after(batch, inputs)


def transformers_generate(hf, inputs_for, size: Size, device: torch.device, results: Results) -> None:
    settings = dict(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens, do_sample=False)
    static_generate(hf, "transformers generate", settings, inputs_for, size, device, results)


def ours_model_only(ours, inputs_for, size: Size, device: torch.device, results: Results) -> None:
    from blipbatch.model.continuous import GraphStep, GreedyLimits, generate_greedy

    settings = dict(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens)
    limits = GreedyLimits(size.new_tokens, size.new_tokens, tuple(ours.generation_config.eos_token_ids))
    graph = GraphStep(ours.language_model) if device.type == "cuda" else None

    def greedy(inputs: dict) -> None:
        text = {k: v for k, v in inputs.items() if k != "pixel_values"}
        generate_greedy(ours, ours.encode_images(inputs["pixel_values"]), text, limits, len(text["input_ids"]), graph)

    def continuous(batch: int, inputs: dict) -> None:
        greedy(inputs)  # warm-up (and on CUDA the graph's capture) for this slot count
        seconds = timed(lambda: [greedy(inputs) for _ in range(size.repeats)], device)
        results.add(
            f"ours continuous batching, batch {batch}",
            batch * size.repeats,
            seconds,
            device,
            "CUDA graph" if graph and graph.capture else "eager (no CUDA or its capture failed)",
        )

    static_generate(ours, "ours static generate", settings, inputs_for, size, device, results, after=continuous)


def engine_pil(engine, paths: list[Path], size: Size, device: torch.device, results: Results) -> None:
    from blipbatch.pipeline.decode import decode_image

    images = [decode_image(p.read_bytes()) for p in paths]
    engine.generate(images[: size.batch], [PROMPT] * size.batch)  # warm-up
    seconds = timed(
        lambda: [
            engine.generate(images[i : i + size.batch], [PROMPT] * len(images[i : i + size.batch]))
            for i in range(0, len(images), size.batch)
        ],
        device,
    )
    results.add(f"Engine.generate with PIL images, batch {size.batch}", len(images), seconds, device)


def worker_unit(
    engine, paths: list[Path], size: Size, folder: Path, device: torch.device, results: Results, label: str = ""
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blipbatch.model.engine import EngineConfig
    from blipbatch.pipeline.fetch import FetchConfig
    from blipbatch.pipeline.shards import discover_shards, plan_units
    from blipbatch.pipeline.worker import ModelWorker, WorkerConfig
    from blipbatch.schemas import ColumnMapping

    source = folder / "input"
    source.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_url": [str(p) for p in paths]}), source / "part-00000.parquet")
    folder = folder / f"worker{label}"
    [unit] = plan_units(discover_shards(str(source)), ColumnMapping(), len(paths))
    config = WorkerConfig(
        engine=EngineConfig(model="in-memory", device=str(device), generation=engine.settings),
        mapping=ColumnMapping(),
        output=str(folder / "output"),
        instructions=(PROMPT,),
        batch_size=size.batch,
        fetch=FetchConfig(local_roots=(str(paths[0].parent),)),
    )
    worker = ModelWorker(config, engine=engine)
    records = []
    seconds = timed(lambda: records.append(worker.process_unit(unit, 1)), device)
    table = pq.read_table(folder / "output")
    ok = sum(status == "ok" for status in table.column("status").to_pylist())
    if ok != len(paths):
        raise RuntimeError(f"the worker wrote {ok} ok rows of {len(paths)}")
    timing = dataclasses.asdict(records[0].timing) if records[0].timing else {}
    note = ", ".join(f"{k} {timing[k]:.2f}s" for k in ("fetch_s", "decode_s", "model_s") if k in timing)
    results.add(
        f"worker process_unit{label}: {len(paths)} JPEG files -> Parquet",
        len(paths),
        seconds,
        device,
        f"batch {size.batch}; {note} (fetch/decode in thread-seconds)",
    )


def fp8_phase(
    engine, inputs_for, paths: list[Path], size: Size, folder: Path, device: torch.device, results: Results
) -> None:
    """Quantize our model to FP8 in place; the share of rows whose ids equal bf16's, FP8 speed, FP8 end to end."""
    from blipbatch.model.continuous import GreedyLimits, generate_greedy
    from blipbatch.model.fp8 import check_fp8_support, quantize_fp8_

    check_fp8_support(device)
    model = engine.model
    limits = GreedyLimits(size.new_tokens, size.new_tokens, tuple(model.generation_config.eos_token_ids))
    inputs = inputs_for(size.batch)
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}

    def greedy() -> list[list[int]]:
        return generate_greedy(
            model, model.encode_images(inputs["pixel_values"]), text, limits, size.batch, engine.graph_step
        )

    with torch.inference_mode():
        reference = greedy()
        quantize_fp8_(model)
        if engine.graph_step is not None:
            engine.graph_step.forget()
        quantized = greedy()  # also the warm-up (and capture) of the FP8 step
        seconds = timed(lambda: [greedy() for _ in range(size.repeats)], device)
    same = sum(a == b for a, b in zip(reference, quantized)) / len(reference)
    results.add(
        f"ours continuous batching FP8, batch {size.batch}",
        size.batch * size.repeats,
        seconds,
        device,
        f"ids identical to bf16 for {100 * same:.0f}% of rows",
    )
    worker_unit(engine, paths, size, folder, device, results, label=" FP8")


# -- report --------------------------------------------------------------------------------------------------------


def setup_line(args, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    commit = (
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": name,
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "size": args.size,
        "dtype": str(dtype),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 7b on CUDA, medium on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="after the rest, quantize our model to FP8 (Hopper) and measure it again",
    )
    parser.add_argument("--images", type=int, default=None, help="JPEG files (default: 1,024 for 7b, 64 for medium)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["prepare", "transformers", "model", "engine", "worker"]
    )
    args = parser.parse_args()
    ensure_imports()
    from blipbatch.model.engine import Engine, EngineConfig

    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.size = args.size or ("7b" if device.type == "cuda" else "medium")
    size = SIZES[args.size]
    if args.images:
        size = dataclasses.replace(size, images=args.images)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = Results(setup_line(args, device, dtype))
    print(json.dumps(results.setup), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        paths = write_photos(work / "photos", size.images)
        ours_config, hf_config, _, processor = configs(size, work / "processor")
        if "prepare" not in args.skip:
            prepare_stage(paths, processor, results)

        def inputs_for(batch: int) -> dict:
            return model_inputs(processor, batch, device, dtype)

        if "transformers" not in args.skip:
            hf = build_transformers(hf_config, dtype, device)
            transformers_generate(hf, inputs_for, size, device, results)
            del hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
        build_start = time.perf_counter()
        ours = build_ours(ours_config, dtype, device)
        print(
            f"built our model ({sum(p.numel() for p in ours.parameters()) / 1e9:.2f} B parameters) in "
            f"{time.perf_counter() - build_start:.1f}s",
            flush=True,
        )
        if "model" not in args.skip:
            ours_model_only(ours, inputs_for, size, device, results)
        settings = dict(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens)
        engine = Engine(
            EngineConfig(model="in-memory", device=str(device), generation=settings), loaded=(processor, ours)
        )
        results.setup["engine default rows (batch, slots)"] = engine.default_rows
        if "engine" not in args.skip:
            engine_pil(engine, paths, size, device, results)
        if "worker" not in args.skip:
            worker_unit(engine, paths, size, work, device, results)
        if args.quantize:
            fp8_phase(engine, inputs_for, paths, size, work, device, results)
    results.setup["host peak RSS GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results.setup["wall s"] = time.perf_counter() - started
    model_rates = {name: rate for name, rate in results.rates.items() if not name.startswith("prepare")}
    for name, rate in sorted(model_rates.items(), key=lambda item: -item[1])[:1]:
        print(
            f"\nbest: {name}: {rate:.1f} images/s = {100 * rate / LIMIT_IMAGES_PER_S:.0f}% of "
            f"~{LIMIT_IMAGES_PER_S} images/s (the H100 compute limit; meaningful on that card only)"
        )
    print(json.dumps(results.setup))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "setup": results.setup,
                    "images_per_s": results.rates,
                    "peak_gib": results.peaks,
                    "notes": results.notes,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
