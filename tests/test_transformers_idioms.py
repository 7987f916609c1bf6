"""What a transformers user pastes, on the shipped demo checkpoint: the documentation's example verbatim,
processor(...).to(device), from_pretrained(torch_dtype=/dtype=/device_map=), model.device / dtype /
num_parameters(), and generate(return_dict_in_generate=True, output_scores=True) against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from blipbatch.jobs.demo import DEMO_MODEL, SAMPLE_IMAGES
from blipbatch.model import ConfigError, InstructBlipForConditionalGeneration, InstructBlipProcessor, ProcessorError
from blipbatch.model.processor import BatchFeature

SCORE_TOL = 1e-4
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


@pytest.fixture(scope="module")
def processor() -> InstructBlipProcessor:
    return InstructBlipProcessor.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def ours() -> InstructBlipForConditionalGeneration:
    return InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def theirs():
    return transformers.InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL)).eval()


def test_documentation_example_verbatim():
    """transformers' InstructBlipForConditionalGeneration.forward docstring, model id and image swapped for ours."""
    model = InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL))
    processor = InstructBlipProcessor.from_pretrained(str(DEMO_MODEL))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    image = Image.open(SAMPLE_IMAGES / "red-circle.png").convert("RGB")
    prompt = "What color is the shape?"
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)

    outputs = model.generate(
        **inputs,
        do_sample=False,
        num_beams=5,
        max_length=256,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.5,
        length_penalty=1.0,
        temperature=1,
    )
    generated_text = processor.batch_decode(outputs, skip_special_tokens=True)[0].strip()
    print(generated_text)
    answer = generated_text.removeprefix(prompt).split()
    assert answer and answer[0] == "red" and not set(answer) & (set(COLOURS) - {"red"})


def test_documentation_example_ids_equal_transformers(processor, ours, theirs):
    image = Image.open(SAMPLE_IMAGES / "red-circle.png").convert("RGB")
    inputs = processor(images=image, text="What color is the shape?", return_tensors="pt")
    settings = dict(
        do_sample=False,
        num_beams=5,
        max_length=256,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.5,
        length_penalty=1.0,
        temperature=1,
    )
    with torch.no_grad():
        expected = theirs.generate(**inputs, **settings)
    assert ours.generate(**inputs, **settings).tolist() == expected.tolist()


# ---- processor output ------------------------------------------------------------------------------------------


def test_processor_output_moves_and_casts(processor):
    inputs = processor(images=Image.open(SAMPLE_IMAGES / "red-circle.png"), text="What shape is it?")
    assert isinstance(inputs, BatchFeature) and isinstance(inputs, dict)
    assert inputs.pixel_values is inputs["pixel_values"]
    half = inputs.to(torch.float16)
    assert half["pixel_values"].dtype == torch.float16
    assert all(half[k].dtype == torch.long for k in ("input_ids", "attention_mask", "qformer_input_ids"))
    moved = inputs.to("meta")  # a real move without a GPU: every tensor, dtypes kept
    assert all(v.device.type == "meta" for v in moved.values())
    assert moved["pixel_values"].dtype == torch.float32 and moved["input_ids"].dtype == torch.long
    both = inputs.to("meta", torch.bfloat16)
    assert both["pixel_values"].dtype == torch.bfloat16 and both["input_ids"].device.type == "meta"
    assert inputs.to(device="cpu", dtype=torch.float64)["pixel_values"].dtype == torch.float64
    assert inputs["pixel_values"].dtype == torch.float32  # .to returns a new mapping
    with pytest.raises(ProcessorError, match="a device"):
        inputs.to(3.5)
    with pytest.raises(AttributeError):
        _ = inputs.labels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_processor_output_to_cuda(processor):
    inputs = processor(images=Image.open(SAMPLE_IMAGES / "red-circle.png"), text="What shape is it?").to("cuda")
    assert all(v.is_cuda for v in inputs.values())


# ---- from_pretrained arguments, device, dtype, num_parameters ------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        dict(torch_dtype=torch.bfloat16),
        dict(torch_dtype="bfloat16"),
        dict(dtype="bfloat16"),
        dict(dtype=torch.bfloat16),
        dict(torch_dtype="torch.bfloat16"),
    ],
)
def test_from_pretrained_dtype_spellings(argument):
    model = InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL), **argument)
    assert model.dtype == torch.bfloat16
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.query_tokens.dtype == torch.float32  # kept in fp32, as transformers does


def test_from_pretrained_auto_dtype_and_device_map(ours):
    auto = InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL), torch_dtype="auto", device_map="auto")
    assert auto.dtype == torch.float32  # what the checkpoint was saved in
    assert auto.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    on_cpu = InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL), device_map="cpu")
    assert on_cpu.device == torch.device("cpu")


@pytest.mark.parametrize(
    "argument, message",
    [
        (dict(torch_dtype="int8"), "not a floating-point torch dtype"),
        (dict(dtype="float16", torch_dtype="bfloat16"), "disagree"),
        (dict(device_map={"": 0}), "device_map as a dict"),
        (dict(device_map="gpu7"), "not a device"),
        (dict(device="cpu", device_map="cpu"), "not both"),
    ],
)
def test_from_pretrained_bad_arguments(argument, message):
    with pytest.raises(ConfigError, match=message):
        InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL), **argument)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0"])
def test_from_pretrained_device_map_cuda(device_map):
    model = InstructBlipForConditionalGeneration.from_pretrained(str(DEMO_MODEL), device_map=device_map)
    assert model.device == torch.device("cuda", 0)


def test_num_parameters_match_transformers(ours, theirs):
    assert ours.num_parameters() == theirs.num_parameters() == 402_624
    assert ours.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)
    assert ours.num_parameters(only_trainable=True) == ours.num_parameters()


# ---- generate(return_dict_in_generate=True, output_scores=True) -------------------------------------------------


def batch_inputs(processor) -> dict:
    images = [Image.open(SAMPLE_IMAGES / name).convert("RGB") for name in ("red-circle.png", "green-square.png")]
    return processor(images=images, text="What color is the shape?")


def assert_scores_match(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))  # the same tokens ruled out
        assert (a[finite] - b[finite]).abs().max().item() <= SCORE_TOL


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_new_tokens=4),
        dict(max_new_tokens=4, repetition_penalty=1.5, min_new_tokens=2),
        dict(max_new_tokens=4, num_beams=3, num_return_sequences=2),
        dict(max_new_tokens=5, num_beams=3, length_penalty=0.5, repetition_penalty=1.3),
    ],
    ids=["greedy", "greedy-penalties", "beam", "beam-penalties"],
)
def test_generate_scores_match_transformers(processor, ours, theirs, settings):
    inputs = batch_inputs(processor)
    asked = dict(return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        expected = theirs.generate(**inputs, **settings, **asked)
    got = ours.generate(**inputs, **settings, **asked)
    assert torch.equal(got.sequences, expected.sequences)
    assert_scores_match(got.scores, expected.scores)
    if settings.get("num_beams", 1) > 1:
        returned = 2 * settings.get("num_return_sequences", 1)
        assert got.sequences_scores.shape == expected.sequences_scores.shape == (returned,)
        assert (got.sequences_scores - expected.sequences_scores).abs().max().item() <= SCORE_TOL
    else:
        assert got.sequences_scores is None and list(got.keys()) == ["sequences", "scores"]
    assert got[0] is got.sequences  # tuple-style access, None fields skipped


def test_generate_dict_without_scores(processor, ours):
    inputs = batch_inputs(processor)
    out = ours.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
    assert out.scores is None and list(out.keys()) == ["sequences"]
    assert torch.equal(out.sequences, ours.generate(**inputs, max_new_tokens=3))
