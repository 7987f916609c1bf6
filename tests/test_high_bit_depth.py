"""16-bit and float images: what the pipeline's decode makes of them, checked against transformers' processor.

A 16-bit file holds the same picture as its 8-bit version at 257 times the scale, so decode_image divides by 257
(rounding): the pixel_values the model gets for a 16-bit PNG or TIFF are exactly those transformers'
InstructBlipProcessor (BlipImageProcessorPil) gives for the 8-bit picture. Float (F) images are on Pillow's 0..255
scale, as transformers reads them. Handed a PIL image directly, our processor matches transformers' on every mode
(transformers clips 16-bit samples: a user of the model API sees what a transformers user sees)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from blipbatch.model.image_processing import BlipImageProcessor
from blipbatch.pipeline.decode import decode_image

SIZE = {"height": 24, "width": 20}


def ours(image: PIL.Image.Image) -> torch.Tensor:
    return BlipImageProcessor(size=SIZE)(image)


def theirs(image: PIL.Image.Image) -> torch.Tensor:
    return transformers.BlipImageProcessorPil(size=SIZE)(image, return_tensors="pt")["pixel_values"]


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    PIL.Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def eight_bit(samples: np.ndarray) -> PIL.Image.Image:
    """The 8-bit greyscale picture 16-bit samples stand for: v / 257, rounded, within 0..255."""
    return PIL.Image.fromarray(np.clip(np.floor(samples / 257 + 0.5), 0, 255).astype(np.uint8), "L")


RNG = np.random.default_rng(15)
PICTURE = RNG.integers(0, 256, (31, 27)).astype(np.uint16)  # an 8-bit picture
NOISE = RNG.integers(0, 65536, (31, 27)).astype(np.uint16)  # 16-bit samples that are no multiple of 257


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("samples", [PICTURE * 257, NOISE], ids=["expanded-8-bit", "full-16-bit"])
def test_16_bit_files_give_transformers_pixels_of_the_8_bit_picture(fmt, samples):
    data = encoded(samples, fmt)
    assert PIL.Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    expected = eight_bit(samples)
    assert torch.equal(ours(decoded), theirs(expected))
    if samples is not NOISE:
        assert np.array_equal(np.asarray(decoded)[..., 0], PICTURE)  # the very picture the 16-bit file was made from
    # not the near-white image Pillow's own conversion gives (what 16-bit PNGs used to decode to)
    assert np.asarray(decoded).mean() < 200


def test_32_bit_integer_tiff_is_read_as_16_bit_samples_clipped():
    samples = NOISE.astype(np.int32)
    samples[0, :4] = [-7, 65535, 70000, 2**31 - 1]
    data = encoded(samples, "TIFF")
    assert PIL.Image.open(io.BytesIO(data)).mode == "I"
    decoded = decode_image(data)
    assert torch.equal(ours(decoded), theirs(eight_bit(samples)))
    assert list(np.asarray(decoded)[0, :4, 0]) == [0, 255, 255, 255]


def test_float_tiff_is_read_as_transformers_reads_it():
    samples = (RNG.random((31, 27), dtype=np.float32) * 300 - 20).astype(np.float32)
    data = encoded(samples, "TIFF")
    image = PIL.Image.open(io.BytesIO(data))
    assert image.mode == "F"
    assert torch.equal(ours(decode_image(data)), theirs(image))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_the_model_processor_matches_transformers_on_high_bit_depth_images(mode):
    samples = {
        "I;16": NOISE,
        "I": NOISE.astype(np.int32) * 3 - 50_000,
        "F": RNG.random((31, 27), dtype=np.float32) * 300 - 20,
    }[mode]
    image = PIL.Image.fromarray(samples)
    assert image.mode == mode
    assert torch.equal(ours(image), theirs(image))
