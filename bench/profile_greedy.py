"""Where our greedy generate spends its time: torch's profiler over one call on the medium random model.

    .venv/bin/python bench/profile_greedy.py [--threads 2]

Same model and inputs as bench/model_generate.py (batch 8, 20 new tokens); one warm-up call, then one
profiled call; prints the ops with the most self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_generate import build_transformers_model, make_inputs  # noqa: E402
from blipbatch.model import InstructBlipForConditionalGeneration  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        build_transformers_model().save_pretrained(folder)
        ours = InstructBlipForConditionalGeneration.from_pretrained(folder)
    inputs, settings = make_inputs(), dict(max_new_tokens=20, min_new_tokens=20)
    with torch.inference_mode():
        ours.generate(**inputs, **settings)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            ours.generate(**inputs, **settings)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
