"""Published outputs of the real Salesforce checkpoints (shared/reference/instructblip.md section 4).

Runs only where the weights exist locally (they cannot be downloaded on our build machines):
    BLIPBATCH_CHECKPOINT=/data/instructblip-flan-t5-xl   a Salesforce/instructblip-* or blip2-* folder
    BLIPBATCH_TEST_IMAGES=/data/images                  holding Confusing-Pictures.jpg and demo.jpg
It needs a CUDA GPU for the 7B/XL models in bf16/fp16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

CHECKPOINT = os.environ.get("BLIPBATCH_CHECKPOINT")
IMAGES = os.environ.get("BLIPBATCH_TEST_IMAGES")

pytestmark = [
    pytest.mark.skipif(not CHECKPOINT, reason="BLIPBATCH_CHECKPOINT is not set (no real checkpoint on this machine)"),
    pytest.mark.skipif(
        not IMAGES, reason="BLIPBATCH_TEST_IMAGES is not set (folder with Confusing-Pictures.jpg, demo.jpg)"
    ),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the real checkpoints need a CUDA GPU"),
    pytest.mark.gpu,
]

CONFUSING = "Confusing-Pictures.jpg"
DEMO = "demo.jpg"

# (checkpoint kind, image, prompt, dtype, generate settings, expected new ids or None, expected text)
EXPECTED = {
    "flan-t5-xl": [
        (
            CONFUSING,
            "What is unusual about this image?",
            torch.bfloat16,
            dict(
                do_sample=False,
                num_beams=5,
                max_length=256,
                min_length=1,
                top_p=0.9,
                repetition_penalty=1.5,
                length_penalty=1.0,
                temperature=1,
            ),
            [
                0,
                37,
                7225,
                1023,
                9850,
                7,
                3,
                9,
                388,
                3575,
                53,
                4954,
                30,
                8,
                223,
                13,
                3,
                9,
                4459,
                4049,
                16,
                8,
                2214,
                13,
                3,
                9,
                3164,
                690,
                2815,
                5,
                37,
                388,
                19,
                5119,
                3,
                9,
                4459,
                8677,
                28,
                46,
                3575,
                53,
                1476,
                5223,
                12,
                34,
                6,
                15495,
                24,
                3,
                88,
                19,
                692,
                112,
                293,
                10428,
                44,
                234,
                1066,
                145,
                338,
                3,
                9,
                50,
                1106,
                3522,
                144,
                42,
                2192,
                7919,
                31,
                7,
                5,
                37,
                1023,
                92,
                1267,
                3,
                9,
                381,
                13,
                119,
                3203,
                16,
                8,
                2458,
                6,
                379,
                14264,
                6,
                9256,
                7,
                6,
                11,
                11718,
                7,
                5,
                1,
            ],
        ),
    ],
    "vicuna-7b": [
        (
            CONFUSING,
            "What is unusual about this image?",
            torch.float16,
            dict(max_new_tokens=30),
            [32001] * 32
            + [
                2,
                1724,
                338,
                22910,
                1048,
                445,
                1967,
                29973,
                450,
                22910,
                9565,
                310,
                445,
                1967,
                338,
                393,
                263,
                767,
                338,
                13977,
                292,
                22095,
                373,
                278,
                1250,
                310,
                263,
                13328,
                20134,
                29963,
                1550,
                19500,
                373,
                263,
                19587,
                4272,
                11952,
                29889,
            ],
        ),
    ],
    "blip2-opt-2.7b": [
        (DEMO, None, torch.float16, dict(), [50265] * 32 + [2, 102, 693, 2828, 15, 5, 4105, 19, 10, 2335, 50118]),
    ],
    "blip2-flan-t5-xl": [
        (DEMO, None, torch.float16, dict(), [0, 2335, 1556, 28, 1782, 30, 8, 2608, 1]),
    ],
}


def checkpoint_kind(folder: Path) -> str:
    for kind in EXPECTED:
        if folder.name.endswith(kind):
            return kind
    config = json.loads((folder / "config.json").read_text())
    pytest.skip(f"no published outputs recorded for {folder.name} (model_type {config.get('model_type')})")


def test_published_outputs():
    from PIL import Image

    from blipbatch.model import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    folder = Path(CHECKPOINT)
    kind = checkpoint_kind(folder)
    blip2 = kind.startswith("blip2")
    model_cls = Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration
    processor = (Blip2Processor if blip2 else InstructBlipProcessor).from_pretrained(folder)
    for image_name, prompt, dtype, settings, expected in EXPECTED[kind]:
        model = model_cls.from_pretrained(folder, dtype=dtype, device="cuda")
        image = Image.open(Path(IMAGES) / image_name)
        inputs = processor(images=image, text=prompt) if prompt else processor(images=image)
        inputs = {k: v.to("cuda") for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        ids = model.generate(**inputs, **settings)[0].tolist()
        assert ids == expected, processor.decode(ids, skip_special_tokens=True)
