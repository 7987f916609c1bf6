"""Continuous batching (model/continuous.py, used by the Engine for greedy decoding): each prompt gets the ids
that transformers' greedy `generate` gives it alone, while sequences of different lengths share slots."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from PIL import Image
from tiny import write_tiny_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from blipbatch.model import InstructBlipForConditionalGeneration
from blipbatch.model.continuous import (
    SYNC_EVERY,
    GraphStep,
    GreedyBatcher,
    GreedyLimits,
    decode_logits,
    generate_greedy,
    greedy_batcher,
)
from blipbatch.model.engine import Engine, EngineConfig
from blipbatch.model.processor import InstructBlipProcessor
from tests.oracle import build_hf_model, random_inputs

PROMPT_LENGTHS = [5, 2, 7, 3, 6, 1, 4]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "opt"])
def pair(request, tmp_path_factory):
    hf_model, _ = build_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)
    return hf_model, InstructBlipForConditionalGeneration.from_pretrained(folder), request.param


def one_row(inputs: dict, row: int) -> dict:
    """Row `row` alone, without the left padding the batch gave it."""
    real = inputs["attention_mask"][row].bool()
    return {
        "pixel_values": inputs["pixel_values"][row : row + 1],
        "qformer_input_ids": inputs["qformer_input_ids"][row : row + 1],
        "qformer_attention_mask": inputs["qformer_attention_mask"][row : row + 1],
        "input_ids": inputs["input_ids"][row : row + 1, real],
        "attention_mask": inputs["attention_mask"][row : row + 1, real],
    }


def lengths_with_eos(rows: list[list[int]], eos: set[int]) -> list[int]:
    return [next((i + 1 for i, token in enumerate(row) if token in eos), len(row)) for row in rows]


def varied_eos(hf_model, inputs: dict) -> list[int]:
    """Two eos ids under which the rows end at as many different steps as possible, one row running to the
    limit: picked from the tokens the rows generate when no eos can stop them."""
    rows = []
    for row in range(len(PROMPT_LENGTHS)):
        alone = one_row(inputs, row)
        ids = hf_model.generate(**alone, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        rows.append(ids[0, alone["input_ids"].shape[1] :].tolist())
    tokens = sorted({token for row in rows for token in row})
    pairs = [{a, b} for a in tokens for b in tokens if a < b]
    usable = [pair for pair in pairs if NEW_TOKENS in lengths_with_eos(rows, pair)]
    return sorted(max(usable, key=lambda pair: len(set(lengths_with_eos(rows, pair)))))


def random_prompts(model, count: int) -> list[torch.Tensor]:
    """Prompt embeddings of different lengths (the language model does not care where they came from)."""
    width = model.language_model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(7)
    return [torch.randn(length, width, generator=g) for length in range(3, 3 + count)]


_EXPECTED: dict = {}


def transformers_alone(hf_model, lm: str, min_new_tokens: int) -> tuple[dict, list[int], list[list[int]]]:
    """(inputs, eos ids, each row's ids from transformers' greedy generate of that row alone); computed once per
    language model and min_new_tokens, since transformers is the slow part of these tests."""
    key = (lm, min_new_tokens)
    if key not in _EXPECTED:
        inputs = random_inputs(len(PROMPT_LENGTHS), PROMPT_LENGTHS, seed=3, lm=lm)
        with torch.no_grad():
            eos = varied_eos(hf_model, inputs)
            expected = []
            for row in range(len(PROMPT_LENGTHS)):
                alone = one_row(inputs, row)
                ids = hf_model.generate(
                    **alone, max_new_tokens=NEW_TOKENS, min_new_tokens=min_new_tokens, eos_token_id=eos, do_sample=False
                )
                # transformers pads a row that ended before the batch did; alone, it stops at its eos
                expected.append(ids[0, alone["input_ids"].shape[1] :].tolist())
        _EXPECTED[key] = inputs, eos, expected
    return _EXPECTED[key]


@pytest.mark.parametrize("step", ["eager", "fixed"])
@pytest.mark.parametrize("min_new_tokens", [0, 5])
@pytest.mark.parametrize("slots", [1, 3, 7, 64])
def test_same_ids_as_transformers_one_prompt_at_a_time(pair, slots, min_new_tokens, step):
    """The decode loop without per-step host syncs; "fixed": the CUDA-graph-shaped step (a preallocated cache,
    slots rounded up to a power of two, the whole window every step), run eagerly."""
    hf_model, ours, lm = pair
    inputs, eos, expected = transformers_alone(hf_model, lm, min_new_tokens)
    limits = GreedyLimits(NEW_TOKENS, min_new_tokens, tuple(eos))
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    graph = GraphStep(ours.language_model, capture=False) if step == "fixed" else None
    with torch.no_grad():
        got = generate_greedy(ours, ours.encode_images(inputs["pixel_values"]), text_inputs, limits, slots, graph)
    assert got == expected
    # the rows ended at different steps (so slots were freed and refilled mid-run) and some ran to the limit
    assert len({len(tokens) for tokens in expected}) >= 3 and max(map(len, expected)) == NEW_TOKENS
    if min_new_tokens:
        assert min(map(len, expected)) >= min_new_tokens


@pytest.mark.parametrize("step", ["eager", "fixed"])
def test_64_slots_over_many_prompts_match_transformers(pair, step):
    """70 prompts of different lengths through 64 slots (refilled as rows end at different steps): each gets the
    ids of transformers' language model generating from that prompt alone."""
    hf_model, ours, _ = pair
    prompts = random_prompts(ours, 70)
    with torch.no_grad():
        free = [
            hf_model.language_model.generate(
                inputs_embeds=p[None], max_new_tokens=8, min_new_tokens=8, do_sample=False
            )[0].tolist()
            for p in prompts[:10]
        ]
        eos = sorted({row[3] for row in free[:2]} | {row[5] for row in free[2:4]})
        expected = [
            hf_model.language_model.generate(
                inputs_embeds=p[None], max_new_tokens=8, do_sample=False, eos_token_id=eos
            )[0].tolist()
            for p in prompts
        ]
        graph = GraphStep(ours.language_model, capture=False) if step == "fixed" else None
        got = GreedyBatcher(ours.language_model, prompts, GreedyLimits(8, 0, tuple(eos)), 64, graph=graph).run()
    assert got == expected
    assert len({len(row) for row in expected}) >= 3


def test_decode_loop_reads_the_device_every_few_steps(pair, monkeypatch):
    """Host reads of device values (tolist, item, int/bool of a tensor) happen at most once per SYNC_EVERY decode
    steps (plus the final read of the ids), not once per step."""
    _, ours, _ = pair
    lm = ours.language_model
    forwards, reads = [0], [0]
    lm.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    for name in ("tolist", "item", "__int__", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        tokens = GreedyBatcher(lm, random_prompts(ours, 5), GreedyLimits(24), slots=5).run()
    assert [len(t) for t in tokens] == [24] * 5
    assert forwards[0] == 24  # one prefill, 23 decode steps
    assert reads[0] <= 23 // SYNC_EVERY + 4, reads[0]


def test_slots_are_reused_not_grown(pair):
    """More prompts than slots: the slot cache keeps `slots` rows, and every prompt is answered once."""
    _, ours, _ = pair
    with torch.no_grad():
        batcher = GreedyBatcher(ours.language_model, random_prompts(ours, 7), GreedyLimits(4), slots=2)
        tokens = batcher.run()
    assert [len(t) for t in tokens] == [4] * 7
    assert batcher.cache.keys[0].shape[0] == 2
    assert not batcher.cache.active.any()


def test_zero_slots_is_refused(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="slots must be at least 1"):
        GreedyBatcher(ours.language_model, random_prompts(ours, 2), GreedyLimits(4), slots=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40 + seed, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_engine_continuous_matches_generate_alone(tiny):
    """The Engine's greedy path (continuous batching over 2 slots) answers each row as model.generate does
    for that row alone; an eos list makes the answers end at different lengths."""
    processor = InstructBlipProcessor.from_pretrained(tiny)
    model = InstructBlipForConditionalGeneration.from_pretrained(tiny)
    images = [picture(i) for i in range(5)]
    instructions = [
        "a photo of",
        "What is in the picture? Answer in detail.",
        "Describe it.",
        "Why?",
        "What colour is the thing in the middle of this image?",
    ]
    images.append(images[0])  # a second question about the first image
    instructions.append("How many?")

    def alone(settings: dict) -> list[str]:
        texts = []
        for image, instruction in zip(images, instructions):
            inputs = processor(images=image, text=instruction)
            ids = model.generate(**inputs, **settings)
            texts.append(processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
        return texts

    with torch.no_grad():
        full = alone(dict(max_new_tokens=10, min_new_tokens=10))
    # end rows early on tokens they produce (first word of some answers)
    eos = sorted({processor.tokenizer.encode(text.split()[0])[-1] for text in full[1::2] if text})
    settings = dict(max_new_tokens=10, eos_token_id=[model.generation_config.eos_token_ids[0], *eos])
    engine = Engine(EngineConfig(model=tiny, generation=settings, decode_slots=2))
    assert engine.greedy_limits is not None  # the continuous path is the one under test
    with torch.no_grad():
        expected = alone(settings)
    assert engine.generate(images, instructions) == expected
    assert len({len(text) for text in expected}) >= 3


def test_engine_uses_static_generate_for_beams(tiny):
    engine = Engine(EngineConfig(model=tiny, generation=dict(max_new_tokens=4, num_beams=2)))
    assert engine.greedy_limits is None
    with pytest.raises(ValueError, match="decode_slots"):
        Engine(EngineConfig(model=tiny, decode_slots=0))


@pytest.mark.parametrize("slots,step", [(3, "eager"), (64, "fixed")])
@pytest.mark.parametrize("min_new_tokens", [0, 5])
def test_mean_logprobs_match_transformers_transition_scores(pair, slots, min_new_tokens, step):
    """Each row's score is the mean of transformers' compute_transition_scores(..., normalize_logits=True) over its
    tokens (generating that row alone, so up to its eos); the rows end at different steps."""
    hf_model, ours, lm = pair
    inputs, eos, expected = transformers_alone(hf_model, lm, min_new_tokens)
    means = []
    with torch.no_grad():
        for row in range(len(PROMPT_LENGTHS)):
            out = hf_model.generate(
                **one_row(inputs, row),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=min_new_tokens,
                eos_token_id=eos,
                do_sample=False,
                return_dict_in_generate=True,
                output_scores=True,
            )
            means.append(
                hf_model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).mean().item()
            )
        text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        graph = GraphStep(ours.language_model, capture=False) if step == "fixed" else None
        batcher = greedy_batcher(
            ours,
            ours.encode_images(inputs["pixel_values"]),
            text_inputs,
            GreedyLimits(NEW_TOKENS, min_new_tokens, tuple(eos)),
            slots,
            graph,
        )
        assert batcher.run() == expected
    assert len({len(tokens) for tokens in expected}) >= 3
    assert batcher.mean_logprobs() == pytest.approx(means, abs=1e-4)
    assert all(mean < 0 for mean in means)


class HostTraffic(TorchDispatchMode):
    """Records what a CUDA graph cannot capture, seen on the meta device (no GPU here): an op given a host tensor
    (a copy to the device), and `aten.scalar_tensor` (a Python scalar written through tensor indexing, which on
    CUDA is made on the host and copied). Syncs (.item(), bool(tensor)) fail on meta by themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.scalar_tensor.default or any(
            isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" for leaf in tree_leaves((args, kwargs))
        ):
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_the_captured_decode_step_moves_nothing_from_the_host(pair):
    # What GraphStep captures on CUDA is decode_logits over its fixed-shape cache. An H100 run found
    # `valid[rows, lengths] = True` there: capture refused the host scalar's copy.
    _, ours, _ = pair
    lm = copy.deepcopy(ours.language_model).to("meta")
    step = GraphStep(lm, capture=False)
    cache = step.prepare(4, 40)
    with torch.inference_mode():
        decode_logits(lm, cache, step.next_ids, cache.max_length - 1)  # warm-up, as before a capture
        with HostTraffic() as traffic:
            decode_logits(lm, cache, step.next_ids, cache.max_length - 1)
    assert traffic.found == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture works here: a CPU model's step would be captured empty")
def test_a_failed_capture_decodes_eagerly_with_the_same_ids(pair, caplog):
    # Without CUDA, capturing fails as a driver or torch quirk would on a GPU: the run goes on without graphs.
    hf_model, ours, lm = pair
    inputs, eos, expected = transformers_alone(hf_model, lm, 0)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    step = GraphStep(ours.language_model, capture=True)
    with torch.no_grad(), caplog.at_level("WARNING", logger="blipbatch.model.continuous"):
        got = generate_greedy(
            ours,
            ours.encode_images(inputs["pixel_values"]),
            text_inputs,
            GreedyLimits(NEW_TOKENS, 0, tuple(eos)),
            4,
            step,
        )
    assert got == expected
    assert step.graph is None and not step.capture
    assert [r.message for r in caplog.records if "CUDA graph capture" in r.message] != []
