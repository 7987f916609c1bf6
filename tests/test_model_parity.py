"""Whole-model parity with transformers: logits, loss and generated ids, loaded from saved checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from blipbatch.model import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
from tests.oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, build_hf_model, random_inputs

CASES = [("llama", False), ("t5", False), ("opt", False), ("opt", True), ("t5", True)]
IDS = ["instructblip-llama", "instructblip-t5", "instructblip-opt", "blip2-opt", "blip2-t5"]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint, lm name, is_blip2)."""
    lm, blip2 = request.param
    hf_model, _ = build_hf_model(lm, blip2=blip2)
    folder = tmp_path_factory.mktemp(f"{lm}-{blip2}")
    hf_model.save_pretrained(folder)
    cls = Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration
    ours = cls.from_pretrained(folder)
    return hf_model, ours, lm, blip2


def model_inputs(lm: str, blip2: bool, batch: int = 3, seed: int = 1) -> dict:
    side = "right" if lm == "t5" else "left"
    inputs = random_inputs(batch, [5, 3, 4][:batch], seed=seed, lm=lm, padding_side=side)
    if blip2:
        del inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    return inputs


def decoder_inputs(lm: str, batch: int) -> dict:
    if lm != "t5":
        return {}
    g = torch.Generator().manual_seed(5)
    return {"decoder_input_ids": torch.randint(3, IMAGE_TOKEN, (batch, 4), generator=g)}


def real_positions(inputs: dict, lm: str) -> torch.Tensor:
    return inputs["attention_mask"].bool() if lm != "t5" else torch.ones(1, dtype=torch.bool)


def test_logits_match(pair):
    hf_model, ours, lm, blip2 = pair
    inputs = model_inputs(lm, blip2) | decoder_inputs(lm, 3)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == expected.shape
    keep = real_positions(inputs, lm)
    diff = (got - expected).abs()[keep.expand(got.shape[:2])] if lm != "t5" else (got - expected).abs()
    assert diff.max().item() <= 1e-4


def test_image_changes_logits(pair):
    """Guards the oracle itself: with re-drawn weights the image must matter."""
    _, ours, lm, blip2 = pair
    inputs = model_inputs(lm, blip2) | decoder_inputs(lm, 3)
    with torch.no_grad():
        a = ours(**inputs).logits
        inputs["pixel_values"] = inputs["pixel_values"].flip(-1)
        b = ours(**inputs).logits
    assert (a - b).abs().max().item() > 1e-2


def test_loss_matches(pair):
    hf_model, ours, lm, blip2 = pair
    inputs = model_inputs(lm, blip2)
    if lm == "t5":
        labels = torch.randint(3, IMAGE_TOKEN, (3, 5), generator=torch.Generator().manual_seed(3))
        labels[1, -2:] = -100
    else:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, :NUM_QUERY_TOKENS] = -100
    with torch.no_grad():
        expected = hf_model(**inputs, labels=labels).loss
        got = ours(**inputs, labels=labels).loss
    assert abs(got.item() - expected.item()) <= 1e-5


GENERATION_SETTINGS = [
    dict(),  # transformers' default: 20 new tokens
    dict(max_length=15),  # counts the prompt for decoder-only models
    dict(max_new_tokens=8),
    dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2),
    dict(max_new_tokens=7, num_beams=3, length_penalty=0.6, num_return_sequences=2),
    dict(max_new_tokens=7, num_beams=3, length_penalty=1.7, early_stopping=True),
    dict(max_new_tokens=8, repetition_penalty=1.5),
    dict(max_new_tokens=8, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("settings", GENERATION_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_ids_match(pair, settings):
    hf_model, ours, lm, blip2 = pair
    inputs = model_inputs(lm, blip2)
    torch.manual_seed(11)  # sampling draws from the global RNG in the same order in both
    with torch.no_grad():
        expected = hf_model.generate(**inputs, **settings)
    torch.manual_seed(11)
    got = ours.generate(**inputs, **settings)
    assert got.tolist() == expected.tolist()


def test_batched_equals_one_at_a_time(pair):
    _, ours, lm, blip2 = pair
    inputs = model_inputs(lm, blip2)
    batched = ours.generate(**inputs, max_new_tokens=6)
    pad_id = ours.generation_config.pad_token_id
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        keep = single["attention_mask"][0].bool()
        single["input_ids"] = single["input_ids"][:, keep]
        single["attention_mask"] = single["attention_mask"][:, keep]
        if "qformer_attention_mask" in single:
            qkeep = single["qformer_attention_mask"][0].bool()
            single["qformer_input_ids"] = single["qformer_input_ids"][:, qkeep]
            single["qformer_attention_mask"] = single["qformer_attention_mask"][:, qkeep]
        alone = ours.generate(**single, max_new_tokens=6)[0]
        prompt_pad = int((inputs["attention_mask"][row] == 0).sum()) if lm != "t5" else 0
        together = batched[row]
        if prompt_pad:
            together = torch.cat([together[:NUM_QUERY_TOKENS], together[NUM_QUERY_TOKENS + prompt_pad :]])
        assert together[: alone.shape[0]].tolist() == alone.tolist()
        assert all(t == pad_id for t in together[alone.shape[0] :].tolist())


def test_our_checkpoint_loads_in_transformers(pair, tmp_path):
    import transformers

    hf_model, ours, lm, blip2 = pair
    ours.save_pretrained(tmp_path)
    cls = transformers.Blip2ForConditionalGeneration if blip2 else transformers.InstructBlipForConditionalGeneration
    reloaded = cls.from_pretrained(tmp_path).eval()
    inputs = model_inputs(lm, blip2, seed=7) | decoder_inputs(lm, 3)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        got = reloaded(**inputs).logits
    keep = real_positions(inputs, lm)
    diff = (got - expected).abs()[keep.expand(got.shape[:2])] if lm != "t5" else (got - expected).abs()
    assert diff.max().item() <= 1e-5


@pytest.mark.parametrize("lm", ["t5", "opt"])
def test_tied_config_over_a_separate_stored_head_keeps_both(lm, tmp_path, caplog):
    """config.json says tie_word_embeddings, the file also holds a different lm_head: transformers keeps both."""
    import transformers
    from safetensors.torch import load_file, save_file

    hf_model, _ = build_hf_model(lm, untied_t5_head=False)
    assert hf_model.config.text_config.tie_word_embeddings
    hf_model.save_pretrained(tmp_path)
    if lm == "t5":  # the original T5 layout: a tied head over a rescaled decoder output
        config = json.loads((tmp_path / "config.json").read_text())
        config["text_config"]["scale_decoder_outputs"] = True
        (tmp_path / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    embedding_key = next(k for k in state if k.endswith("embed_tokens.weight") or k == "language_model.shared.weight")
    head = torch.randn(state[embedding_key].shape, generator=torch.Generator().manual_seed(11)) * 0.25
    state["language_model.lm_head.weight"] = head
    save_file(state, weights, metadata={"format": "pt"})

    reference = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reference.language_model.lm_head.weight is not reference.language_model.get_input_embeddings().weight
    with caplog.at_level("WARNING"):
        ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    assert "keeping both" in caplog.text
    assert torch.equal(ours.language_model.lm_head.weight, head)
    assert ours.language_model.lm_head.weight is not ours.language_model.get_input_embeddings().weight

    inputs = model_inputs(lm, False) | decoder_inputs(lm, 3)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = ours(**inputs).logits
    keep = real_positions(inputs, lm).expand(got.shape[:2])
    assert (got - expected).abs()[keep].max().item() <= 1e-4
    # ... and a save keeps the head, so the folder loads the same again
    ours.save_pretrained(tmp_path / "again")
    assert "language_model.lm_head.weight" in load_file(tmp_path / "again" / "model.safetensors")
