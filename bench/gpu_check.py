"""Do the GPU-only code paths give the ids they should? A one-minute check to run before `gpu_throughput.py`.

    python bench/gpu_check.py            # CUDA; on CPU it runs the same comparisons without CUDA graphs

The CPU test suite never runs CUDA graphs or FP8. Here, on the medium random InstructBLIP of gpu_throughput.py in
fp32 with TF32 off (so kernels differ only in the last bits): transformers' `generate` against our static
`generate`, and our static `generate` against continuous batching (a captured CUDA graph per slot count) with fewer
slots than rows (rows join as others finish) and with as many slots as rows. Greedy, exactly 30 new tokens. Prints
the share of rows whose ids are identical; exits 1 when a share is under 90% (random weights give flat logits, so
a rare last-bit tie may flip one row; a wrong mask or cache gives far less).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as bench  # noqa: E402

ROWS = 48
MIN_SAME = 0.9


def same_share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> int:
    bench.ensure_imports()
    from blipbatch.model.continuous import GraphStep, GreedyLimits, generate_greedy

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = bench.SIZES["medium"]

    with tempfile.TemporaryDirectory() as work:
        ours_config, hf_config, _, processor = bench.configs(size, Path(work))
        # Prompts of different lengths, so padding, masks and positions matter.
        words = bench.PROMPT.split()
        inputs = processor.encode_prompts([" ".join(words[: 2 + i % len(words)]) for i in range(ROWS)])
        g = torch.Generator().manual_seed(1)
        inputs["pixel_values"] = torch.randn(ROWS, 3, 224, 224, generator=g)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        settings = dict(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            hf = bench.build_transformers(hf_config, torch.float32, device)
            theirs = hf.generate(**inputs, **settings)[:, -size.new_tokens :].tolist()
            del hf
            ours = bench.build_ours(ours_config, torch.float32, device)
            static = ours.generate(**inputs, **settings)
            static = static[:, static.shape[1] - size.new_tokens :].tolist()
            limits = GreedyLimits(size.new_tokens, size.new_tokens, tuple(ours.generation_config.eos_token_ids))
            graph = GraphStep(ours.language_model) if device.type == "cuda" else None
            text = {k: v for k, v in inputs.items() if k != "pixel_values"}
            embeds = ours.encode_images(inputs["pixel_values"])
            shares = {"ours static vs transformers": same_share(static, theirs)}
            for slots in (ROWS // 3, ROWS):
                continuous = generate_greedy(ours, embeds, text, limits, slots, graph)
                step = "CUDA graph" if graph and graph.capture else "eager"  # a failed capture falls back to eager
                shares[f"continuous ({slots} slots, {step}) vs ours static"] = same_share(continuous, static)
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__},"
        f" {ROWS} rows, prompt {prompt_length} tokens, {size.new_tokens} new tokens, fp32"
    )
    for name, share in shares.items():
        print(f"{name:60s} {100 * share:5.1f}% of rows identical")
    return 0 if min(shares.values()) >= MIN_SAME else 1


if __name__ == "__main__":
    sys.exit(main())
