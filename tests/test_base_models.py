"""InstructBlipModel / Blip2Model and the standalone vision tower and Q-Former against transformers:
outputs, state_dict keys, and checkpoints in both directions (tiny models, all parameters re-drawn)."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from blipbatch.model import (
    Blip2Model,
    CheckpointError,
    ConfigError,
    InstructBlipForConditionalGeneration,
    InstructBlipModel,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
    ProcessorError,
)
from tests.oracle import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    NUM_QUERY_TOKENS,
    QFORMER,
    TEXT,
    VISION,
    build_hf_model,
    random_inputs,
    redraw_,
)

TOL = 1e-5
BATCH = 3


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def composite_config(config_class, lm: str):
    return config_class(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=TEXT[lm],
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN,
    )


def lm_inputs(lm: str, blip2: bool = False, seed: int = 1) -> dict:
    inputs = random_inputs(BATCH, [5, 3, 4], seed=seed, lm=lm, padding_side="right" if lm == "t5" else "left")
    if blip2:
        del inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    if lm == "t5":
        g = torch.Generator().manual_seed(5)
        inputs["decoder_input_ids"] = torch.randint(3, IMAGE_TOKEN, (BATCH, 4), generator=g)
    return inputs


def defined(hidden: torch.Tensor, inputs: dict, lm: str) -> torch.Tensor:
    """The positions both implementations define alike: real tokens for decoder-only LMs (a left pad
    that sees no real token is arbitrary), every decoder position for T5."""
    return hidden if lm == "t5" else hidden[inputs["attention_mask"].bool()]


# ---- InstructBlipModel ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "opt", "t5"])
def base_pair(request, tmp_path_factory):
    """(transformers InstructBlipModel, ours loaded from its checkpoint, lm)."""
    lm = request.param
    hf = transformers.InstructBlipModel(composite_config(transformers.InstructBlipConfig, lm))
    redraw_(hf, seed=0)
    folder = tmp_path_factory.mktemp(f"base-{lm}")
    hf.eval().save_pretrained(folder)
    return hf, InstructBlipModel.from_pretrained(folder), lm


def test_instructblip_model_matches_transformers(base_pair):
    hf, ours, lm = base_pair
    inputs = lm_inputs(lm)
    with torch.no_grad():
        expected = hf(**inputs).language_model_outputs
        got = ours(**inputs).language_model_outputs
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape
    assert max_diff(defined(got.last_hidden_state, inputs, lm), defined(expected.last_hidden_state, inputs, lm)) <= TOL
    if lm == "t5":
        assert max_diff(got.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= TOL
        del inputs["decoder_input_ids"]
        with pytest.raises(ProcessorError, match="decoder_input_ids"):
            ours(**inputs)
    else:
        assert not hasattr(got, "encoder_last_hidden_state")


def test_image_changes_hidden_state(base_pair):
    """Guards the oracle: with re-drawn weights the image must matter."""
    _, ours, lm = base_pair
    inputs = lm_inputs(lm)
    with torch.no_grad():
        a = ours(**inputs).language_model_outputs.last_hidden_state
        inputs["pixel_values"] = inputs["pixel_values"].flip(-1)
        b = ours(**inputs).language_model_outputs.last_hidden_state
    assert max_diff(a, b) > 1e-2


def test_instructblip_model_keys_match_transformers(base_pair):
    hf, ours, _ = base_pair
    keys = set(ours.state_dict())
    assert not keys & set(ours.tied_weights)  # aliases (T5's embed_tokens) are not separate tensors
    assert keys | set(ours.tied_weights) == set(hf.state_dict())
    assert not any(k.startswith(("language_model.model.", "language_model.lm_head")) for k in keys)


def test_our_instructblip_model_loads_in_transformers(base_pair, tmp_path):
    hf, ours, lm = base_pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.InstructBlipModel.from_pretrained(tmp_path).eval()
    inputs = lm_inputs(lm, seed=7)
    with torch.no_grad():
        expected = hf(**inputs).language_model_outputs.last_hidden_state
        got = reloaded(**inputs).language_model_outputs.last_hidden_state
    assert max_diff(defined(got, inputs, lm), defined(expected, inputs, lm)) <= TOL


def test_head_checkpoint_is_not_a_base_checkpoint(tmp_path):
    """An InstructBlipForConditionalGeneration checkpoint has `language_model.model.*`: a clear error, as
    transformers' InstructBlipModel cannot load it either."""
    hf, _ = build_hf_model("llama")
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected keys .*language_model\.model\.norm\.weight"):
        InstructBlipModel.from_pretrained(tmp_path)


def test_blip2_model_matches_transformers(tmp_path):
    """transformers' Blip2Model keeps the LM head: same keys as Blip2ForConditionalGeneration, logits out."""
    hf = transformers.Blip2Model(composite_config(transformers.Blip2Config, "opt"))
    redraw_(hf, seed=2)
    hf.eval().save_pretrained(tmp_path)
    ours = Blip2Model.from_pretrained(tmp_path)
    assert set(ours.state_dict()) | set(ours.tied_weights) == set(hf.state_dict())
    inputs = lm_inputs("opt", blip2=True)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = ours(**inputs).logits
    assert max_diff(defined(got, inputs, "opt"), defined(expected, inputs, "opt")) <= TOL


# ---- standalone vision tower and Q-Former -----------------------------------------------------

VISION_LENGTH = (IMAGE_SIZE // VISION["patch_size"]) ** 2 + 1


def part_inputs(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(2, 6, dtype=torch.long)
    text_mask[1, -2:] = 0
    return dict(
        pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        queries=torch.randn(2, NUM_QUERY_TOKENS, QFORMER["hidden_size"], generator=g),
        image=torch.randn(2, VISION_LENGTH, VISION["hidden_size"], generator=g),
        ids=torch.randint(3, QFORMER["vocab_size"], (2, 6), generator=g),
        mask=torch.cat([torch.ones(2, NUM_QUERY_TOKENS, dtype=torch.long), text_mask], dim=1),
    )


def run_hf(kind: str, module, x: dict) -> torch.Tensor:
    if kind == "vision":
        return module(pixel_values=x["pixel_values"]).last_hidden_state
    if kind == "qformer":
        return module(
            input_ids=x["ids"], attention_mask=x["mask"], query_embeds=x["queries"], encoder_hidden_states=x["image"]
        ).last_hidden_state
    return module(query_embeds=x["queries"], encoder_hidden_states=x["image"]).last_hidden_state


def run_ours(kind: str, module, x: dict) -> torch.Tensor:
    if kind == "vision":
        return module(x["pixel_values"]).last_hidden_state
    if kind == "qformer":
        return module(x["queries"], x["image"], input_ids=x["ids"], attention_mask=x["mask"]).last_hidden_state
    return module(x["queries"], x["image"]).last_hidden_state


QFORMER_STANDALONE = QFORMER | {"encoder_hidden_size": VISION["hidden_size"]}
PARTS = {
    # name: (kind, transformers class, its config class, config kwargs, our class)
    "InstructBlipVisionModel": (
        "vision",
        transformers.InstructBlipVisionModel,
        transformers.InstructBlipVisionConfig,
        VISION,
        InstructBlipVisionModel,
    ),
    "Blip2VisionModel": (
        "vision",
        transformers.Blip2VisionModel,
        transformers.Blip2VisionConfig,
        VISION,
        InstructBlipVisionModel,
    ),
    "InstructBlipQFormerModel": (
        "qformer",
        transformers.InstructBlipQFormerModel,
        transformers.InstructBlipQFormerConfig,
        QFORMER_STANDALONE,
        InstructBlipQFormerModel,
    ),
    "Blip2QFormerModel": (
        "blip2-qformer",
        transformers.Blip2QFormerModel,
        transformers.Blip2QFormerConfig,
        QFORMER_STANDALONE,
        InstructBlipQFormerModel,
    ),
}


@pytest.fixture(scope="module", params=list(PARTS))
def part(request, tmp_path_factory):
    """(kind, transformers class, transformers module, ours loaded from its standalone checkpoint, folder)."""
    kind, hf_class, hf_config_class, kwargs, our_class = PARTS[request.param]
    hf = hf_class(hf_config_class(**kwargs))
    redraw_(hf, seed=4, std=0.15)
    folder = tmp_path_factory.mktemp(request.param)
    hf.eval().save_pretrained(folder)
    return kind, hf_class, hf, our_class.from_pretrained(folder), folder


def test_standalone_checkpoint_from_transformers(part):
    kind, hf_class, hf, ours, _ = part
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.architecture == hf_class.__name__
    x = part_inputs()
    with torch.no_grad():
        assert max_diff(run_ours(kind, ours, x), run_hf(kind, hf, x)) <= TOL


def test_standalone_checkpoint_to_transformers(part, tmp_path):
    kind, hf_class, hf, ours, _ = part
    ours.save_pretrained(tmp_path)
    reloaded = hf_class.from_pretrained(tmp_path).eval()
    x = part_inputs(seed=8)
    with torch.no_grad():
        assert max_diff(run_hf(kind, reloaded, x), run_hf(kind, hf, x)) <= TOL


def test_wrong_checkpoint_kind_is_named(part):
    kind, _, hf, _, folder = part
    other = InstructBlipQFormerModel if kind == "vision" else InstructBlipVisionModel
    with pytest.raises(ConfigError, match=f"model_type '{hf.config.model_type}'"):
        other.from_pretrained(folder)


@pytest.fixture(scope="module", params=[("llama", False), ("opt", True)], ids=["instructblip", "blip2"])
def full(request, tmp_path_factory):
    """(transformers InstructBlip/Blip2ForConditionalGeneration, its checkpoint folder, is_blip2)."""
    lm, blip2 = request.param
    hf, _ = build_hf_model(lm, blip2=blip2)
    folder = tmp_path_factory.mktemp(f"full-{lm}")
    hf.save_pretrained(folder)
    return hf, folder, blip2


def check_parts_of(folder, hf, blip2: bool, dtype: torch.dtype | None = None) -> None:
    x = part_inputs(seed=5)
    vision = InstructBlipVisionModel.from_pretrained(folder, dtype=dtype)
    qformer = InstructBlipQFormerModel.from_pretrained(folder, dtype=dtype)
    assert qformer.config.use_qformer_text_input is not blip2
    assert qformer.architecture == ("Blip2QFormerModel" if blip2 else "InstructBlipQFormerModel")
    tol = TOL if dtype is None else 5e-2
    with torch.no_grad():
        got = run_ours("vision", vision, x)
        assert got.dtype == (dtype or torch.float32)
        assert max_diff(got, run_hf("vision", hf.vision_model, x)) <= tol
        kind = "blip2-qformer" if blip2 else "qformer"
        assert max_diff(run_ours(kind, qformer, x), run_hf(kind, hf.qformer, x)) <= tol


def test_parts_from_full_checkpoint(full):
    hf, folder, blip2 = full
    check_parts_of(folder, hf, blip2)
    check_parts_of(folder, hf, blip2, dtype=torch.bfloat16)


def test_parts_from_sharded_and_bin_checkpoints(full, tmp_path):
    hf, folder, blip2 = full
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    cls = Blip2Model if blip2 else InstructBlipForConditionalGeneration
    cls.from_pretrained(folder).save_pretrained(sharded, max_shard_size=50_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    check_parts_of(sharded, hf, blip2)
    binary.mkdir()
    torch.save(load_file(folder / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "config.json").write_text((folder / "config.json").read_text())
    check_parts_of(binary, hf, blip2)


def test_parts_read_only_their_tensors(full, tmp_path):
    """A broken language model does not stop the vision tower from loading; a missing vision tensor does."""
    hf, folder, blip2 = full
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    state["language_model.lm_head.weight"] = torch.zeros(3)
    state["language_model.something.else"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    check_parts_of(tmp_path, hf, blip2)

    del state["vision_model.post_layernorm.bias"]
    state["vision_model.extra.weight"] = torch.zeros(1)
    state["vision_model.embeddings.class_embedding"] = torch.zeros(1, 1, 5)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        InstructBlipVisionModel.from_pretrained(tmp_path)
    message = str(info.value)
    # as in loading.load_tensors, a mis-shaped tensor also counts as missing
    assert "missing keys (2): vision_model.embeddings.class_embedding, vision_model.post_layernorm.bias" in message
    assert "unexpected keys (1): vision_model.extra.weight" in message
    assert "vision_model.embeddings.class_embedding: checkpoint (1, 1, 5), model (1, 1, 32)" in message
