"""The documented InstructBLIP API (transformers v4.56's model_doc/instructblip), name by name, and its meaning
checked against transformers on tiny random models: hidden_states and attentions, tuple forms, inputs_embeds,
get_placeholder_mask, head_mask / position_ids / encoder_attention_mask, from_vision_qformer_text_configs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import transformers

import blipbatch.model as ours_api
from blipbatch.model import (
    Blip2ForConditionalGeneration,
    ConfigError,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionModel,
    ProcessorError,
)
from tests.oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, QFORMER, TEXT, VISION, build_hf_model, random_inputs

TOL = 1e-5

# What the documentation lists, class by class: constructor / method parameters that must exist here.
DOCUMENTED: dict[str, dict[str, list[str]]] = {
    "InstructBlipConfig": {
        "__init__": ["vision_config", "qformer_config", "text_config", "num_query_tokens", "image_token_index"],
        "from_vision_qformer_text_configs": ["vision_config", "qformer_config", "text_config"],
    },
    "InstructBlipVisionConfig": {
        "__init__": [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
            "attention_dropout",
            "initializer_range",
            "qkv_bias",
        ],
    },
    "InstructBlipQFormerConfig": {
        "__init__": [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "hidden_act",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "max_position_embeddings",
            "initializer_range",
            "layer_norm_eps",
            "pad_token_id",
            "position_embedding_type",
            "cross_attention_frequency",
            "encoder_hidden_size",
        ],
    },
    "InstructBlipProcessor": {
        "__call__": ["images", "text"],
        "from_pretrained": [],
        "save_pretrained": [],
        "batch_decode": [],
        "decode": [],
    },
    "InstructBlipVisionModel": {
        "forward": [
            "pixel_values",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
            "interpolate_pos_encoding",
        ],
        "from_pretrained": [],
    },
    "InstructBlipQFormerModel": {
        "forward": [
            "input_ids",
            "attention_mask",
            "position_ids",
            "query_embeds",
            "head_mask",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
        ],
        "from_pretrained": [],
    },
    "InstructBlipModel": {
        "forward": [
            "pixel_values",
            "qformer_input_ids",
            "qformer_attention_mask",
            "input_ids",
            "attention_mask",
            "decoder_input_ids",
            "decoder_attention_mask",
            "inputs_embeds",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
            "interpolate_pos_encoding",
            "use_cache",
        ],
        "get_placeholder_mask": ["input_ids", "inputs_embeds"],
        "from_pretrained": [],
    },
    "InstructBlipForConditionalGeneration": {
        "forward": [
            "pixel_values",
            "qformer_input_ids",
            "qformer_attention_mask",
            "input_ids",
            "attention_mask",
            "decoder_input_ids",
            "decoder_attention_mask",
            "inputs_embeds",
            "output_attentions",
            "output_hidden_states",
            "labels",
            "return_dict",
            "interpolate_pos_encoding",
            "use_cache",
        ],
        "generate": [
            "pixel_values",
            "qformer_input_ids",
            "qformer_attention_mask",
            "input_ids",
            "attention_mask",
            "inputs_embeds",
            "interpolate_pos_encoding",
        ],
        "get_placeholder_mask": ["input_ids", "inputs_embeds"],
        "get_image_features": [
            "pixel_values",
            "qformer_input_ids",
            "qformer_attention_mask",
            "interpolate_pos_encoding",
        ],
        "from_pretrained": [],
    },
}


def parameter_names(cls: type, method: str) -> set[str]:
    if method == "__init__" and dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(getattr(cls, method)).parameters)


@pytest.mark.parametrize("class_name", sorted(DOCUMENTED))
def test_documented_names_exist(class_name):
    cls = getattr(ours_api, class_name)
    missing = []
    for method, params in DOCUMENTED[class_name].items():
        if not callable(getattr(cls, method, None)):
            missing.append(f"{class_name}.{method}")
            continue
        missing += [f"{class_name}.{method}({p})" for p in params if p not in parameter_names(cls, method)]
    assert not missing


# Documented in v4.56, gone from transformers 5.x (whose signatures take **kwargs for the output_* flags).
DROPPED_IN_5 = {
    "InstructBlipConfig.from_vision_qformer_text_configs",
    "InstructBlipQFormerModel.forward(head_mask)",
    "InstructBlipQFormerConfig.__init__(position_embedding_type)",
}


def test_documented_list_matches_transformers():
    """Guards the list above: every name in it exists in transformers (the documentation's source), but for
    the few that 5.x dropped."""
    missing = set()
    for class_name, methods in DOCUMENTED.items():
        theirs = getattr(transformers, class_name)
        for method, params in methods.items():
            if not callable(getattr(theirs, method, None)):
                missing.add(f"{class_name}.{method}")
                continue
            signature = inspect.signature(getattr(theirs, method)).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
                missing |= {f"{class_name}.{method}({p})" for p in params if p not in signature}
    assert missing <= DROPPED_IN_5


# ---- tiny pairs (transformers, ours) ---------------------------------------------------------------------------


def eager(model: torch.nn.Module) -> torch.nn.Module:
    """transformers returns attention probabilities only from its eager attention."""
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module", params=["llama", "opt", "t5"])
def pair(request, tmp_path_factory):
    lm = request.param
    hf, _ = build_hf_model(lm)
    folder = tmp_path_factory.mktemp(f"api-{lm}")
    hf.save_pretrained(folder)
    return eager(hf), InstructBlipForConditionalGeneration.from_pretrained(folder), lm


def inputs_for(lm: str, blip2: bool = False) -> dict:
    inputs = random_inputs(3, [5, 3, 4], seed=2, lm=lm, padding_side="right" if lm == "t5" else "left")
    if blip2:
        del inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, IMAGE_TOKEN, (3, 4), generator=torch.Generator().manual_seed(5))
    return inputs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close_all(got: tuple, expected: tuple, rows: torch.Tensor | None = None) -> None:
    """Every tensor of two tuples within TOL; `rows` [B, T] restricts to real query positions (dim 1 for hidden
    states, dim 2 for attention probabilities)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        if rows is not None:
            a, b = (a[rows], b[rows]) if a.dim() == 3 else (a.transpose(1, 2)[rows], b.transpose(1, 2)[rows])
        assert max_diff(a, b) <= TOL


# ---- vision model ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_vision_hidden_states_and_attentions(pair):
    hf, ours, _ = pair
    pixels = inputs_for("llama")["pixel_values"]
    expected = hf.vision_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    got = ours.vision_model(pixels, output_attentions=True, output_hidden_states=True)
    assert list(got.keys()) == list(expected.keys())
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    assert len(got.hidden_states) == VISION["num_hidden_layers"] + 1
    assert got.hidden_states[0].shape == (3, patches, VISION["hidden_size"])
    assert got.attentions[0].shape == (3, VISION["num_attention_heads"], patches, patches)
    assert_close_all(got.hidden_states, expected.hidden_states)
    assert_close_all(got.attentions, expected.attentions)
    assert max_diff(got.pooler_output, expected.pooler_output) <= TOL
    as_tuple = ours.vision_model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2  # last_hidden_state, pooler_output
    assert max_diff(as_tuple[0], expected.last_hidden_state) <= TOL
    assert got[0] is got.last_hidden_state and got["pooler_output"] is got.pooler_output


def test_plain_forward_skips_unasked_outputs(pair):
    """None fields are skipped by position, as transformers' ModelOutput; nothing extra is computed."""
    _, ours, _ = pair
    with torch.no_grad():
        out = ours.vision_model(inputs_for("llama")["pixel_values"])
    assert out.hidden_states is None and out.attentions is None
    assert list(out.keys()) == ["last_hidden_state", "pooler_output"] and len(out.to_tuple()) == 2
    with pytest.raises(KeyError):
        out["attentions"]


# ---- Q-Former ----------------------------------------------------------------------------------------------------


def self_attentions(qformer_outputs) -> tuple:
    """transformers 5.x also records every cross-attention into `attentions` (its recorder's ".attention" matches
    ".crossattention.attention"); 4.x, and we, keep `attentions` for self-attention: the square ones."""
    return tuple(a for a in qformer_outputs.attentions if a.shape[-1] == a.shape[-2])


def qformer_call(hf, inputs: dict) -> dict:
    image = hf.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    queries = hf.query_tokens.expand(image.shape[0], -1, -1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), inputs["qformer_attention_mask"]], dim=1)
    return dict(
        query_embeds=queries, encoder_hidden_states=image, input_ids=inputs["qformer_input_ids"], attention_mask=mask
    )


@torch.no_grad()
def test_qformer_hidden_states_and_attentions(pair):
    hf, ours, _ = pair
    call = qformer_call(hf, inputs_for("llama"))
    image_mask = torch.ones(call["encoder_hidden_states"].shape[:2], dtype=torch.long)
    image_mask[1, 5:9] = 0
    asked = dict(output_attentions=True, output_hidden_states=True, encoder_attention_mask=image_mask)
    expected = hf.qformer(**call, **asked)
    got = ours.qformer(**call, **asked)
    assert len(got.hidden_states) == QFORMER["num_hidden_layers"] + 1
    assert got.hidden_states[0].shape == (3, NUM_QUERY_TOKENS + 6, QFORMER["hidden_size"])
    cross_layers = len(range(0, QFORMER["num_hidden_layers"], QFORMER["cross_attention_frequency"]))
    assert len(got.cross_attentions) == cross_layers
    assert got.cross_attentions[0][1, :, :, 5:9].abs().max() == 0  # the masked image positions get nothing
    assert_close_all(got.hidden_states, expected.hidden_states)
    assert len(got.attentions) == QFORMER["num_hidden_layers"]
    assert_close_all(got.attentions, self_attentions(expected))
    assert_close_all(got.cross_attentions, expected.cross_attentions)
    assert max_diff(got.pooler_output, expected.pooler_output) <= TOL
    # transformers' tuple order: last_hidden_state, pooler_output, hidden_states, attentions, cross_attentions
    as_tuple = ours.qformer(**call, **asked, return_dict=False)
    assert len(as_tuple) == len(expected.to_tuple()) == 5
    assert_close_all(as_tuple[2], expected.to_tuple()[2])


@torch.no_grad()
def test_qformer_position_ids(pair):
    hf, ours, _ = pair
    call = qformer_call(hf, inputs_for("llama"))
    positions = torch.arange(6)[None] + 7
    expected = hf.qformer(**call, position_ids=positions).last_hidden_state
    got = ours.qformer(**call, position_ids=positions).last_hidden_state
    assert max_diff(got, expected) <= TOL
    assert max_diff(got, ours.qformer(**call).last_hidden_state) > 1e-3
    with pytest.raises(ProcessorError, match="position_ids"):
        ours.qformer(**call, position_ids=positions + 100)


@torch.no_grad()
def test_qformer_head_mask(pair):
    """BERT's head masking (transformers 4.x; 5.x dropped it): a head masked to 0 contributes nothing, in self-
    and cross-attention; an all-ones mask changes nothing."""
    _, ours, _ = pair
    call = qformer_call_ours(ours)
    heads, layers = QFORMER["num_attention_heads"], QFORMER["num_hidden_layers"]
    plain = ours.qformer(**call, output_attentions=True)
    ones = ours.qformer(**call, head_mask=torch.ones(layers, heads), output_attentions=True)
    assert max_diff(ones.last_hidden_state, plain.last_hidden_state) <= TOL
    head_mask = torch.ones(heads)
    head_mask[1] = 0
    masked = ours.qformer(**call, head_mask=head_mask, output_attentions=True)
    for probs in masked.attentions + masked.cross_attentions:
        assert probs[:, 1].abs().max() == 0 and probs[:, 0].abs().sum() > 0
    # layer 0's kept heads see the same input, so their probabilities are unchanged
    assert max_diff(masked.attentions[0][:, [0, 2, 3]], plain.attentions[0][:, [0, 2, 3]]) <= TOL
    assert max_diff(masked.last_hidden_state, plain.last_hidden_state) > 1e-3
    with pytest.raises(ProcessorError, match="head_mask"):
        ours.qformer(**call, head_mask=torch.ones(heads + 1))


def qformer_call_ours(ours) -> dict:
    inputs = inputs_for("llama")
    image = ours.encode_images(inputs["pixel_values"])
    return ours.qformer_inputs(image, inputs["qformer_input_ids"], inputs["qformer_attention_mask"])


# ---- whole model -------------------------------------------------------------------------------------------------


def real_rows(inputs: dict, lm: str) -> torch.Tensor | None:
    """Decoder-only LMs: the real (unpadded) positions; a left pad that sees no real token is arbitrary."""
    return None if lm == "t5" else inputs["attention_mask"].bool()


LM_FIELDS = {
    "llama": ["hidden_states", "attentions"],
    "opt": ["hidden_states", "attentions"],
    "t5": [
        "decoder_hidden_states",
        "decoder_attentions",
        "cross_attentions",
        "encoder_hidden_states",
        "encoder_attentions",
    ],
}


@torch.no_grad()
def test_whole_model_hidden_states_and_attentions(pair):
    hf, ours, lm = pair
    inputs = inputs_for(lm)
    asked = dict(output_attentions=True, output_hidden_states=True)
    expected = hf(**inputs, **asked)
    got = ours(**inputs, **asked)
    assert (
        max_diff(
            got.logits[real_rows(inputs, lm)] if lm != "t5" else got.logits,
            expected.logits[real_rows(inputs, lm)] if lm != "t5" else expected.logits,
        )
        <= 1e-4
    )
    # transformers 5.x no longer passes output_* to the vision model and the Q-Former; 4.x did, and so do we
    vision = hf.vision_model(pixel_values=inputs["pixel_values"], **asked)
    assert_close_all(got.vision_outputs.hidden_states, vision.hidden_states)
    assert_close_all(got.vision_outputs.attentions, vision.attentions)
    qformer = hf.qformer(**qformer_call(hf, inputs), **asked)
    assert_close_all(got.qformer_outputs.hidden_states, qformer.hidden_states)
    assert_close_all(got.qformer_outputs.cross_attentions, qformer.cross_attentions)
    theirs, mine = expected.language_model_outputs, got.language_model_outputs
    layers = TEXT[lm].get("num_hidden_layers", TEXT[lm].get("num_layers"))
    for name in LM_FIELDS[lm]:
        assert len(getattr(mine, name)) == layers + ("hidden" in name), name
        assert_close_all(getattr(mine, name), getattr(theirs, name), rows=real_rows(inputs, lm))


@torch.no_grad()
def test_return_dict_false_is_transformers_tuple(pair):
    hf, ours, lm = pair
    inputs = inputs_for(lm)
    expected = hf(**inputs, use_cache=False, return_dict=False)
    got = ours(**inputs, use_cache=False, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    assert [len(x) if isinstance(x, tuple) else None for x in got] == [
        len(x) if isinstance(x, tuple) else None for x in expected
    ]
    labels = (
        inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        if lm != "t5"
        else (inputs["decoder_input_ids"])
    )
    with_loss = ours(**inputs, labels=labels, return_dict=False)
    assert with_loss[0].dim() == 0 and with_loss[1].shape == got[0].shape  # loss first, then logits


@torch.no_grad()
def test_use_cache_returns_the_language_model_keys_and_values(pair):
    hf, ours, lm = pair
    inputs = inputs_for(lm)
    expected = hf(**inputs, use_cache=True).language_model_outputs.past_key_values
    got = ours(**inputs, use_cache=True).language_model_outputs.past_key_values
    assert ours(**inputs).language_model_outputs.past_key_values is None  # only when asked
    layers = TEXT[lm].get("num_hidden_layers", TEXT[lm].get("num_layers"))
    assert len(got) == layers and len(got[0]) == (4 if lm == "t5" else 2)
    theirs = expected.self_attention_cache if lm == "t5" else expected
    rows = real_rows(inputs, lm)
    for i, layer in enumerate(theirs.layers):
        k, v = got[i][0], got[i][1]
        if rows is not None:  # keys of real positions; padded ones are never read
            k, v, hk, hv = (t.transpose(1, 2)[rows] for t in (k, v, layer.keys, layer.values))
        else:
            hk, hv = layer.keys, layer.values
        assert max_diff(k, hk) <= TOL and max_diff(v, hv) <= TOL


@torch.no_grad()
def test_inputs_embeds_gives_the_same_logits_and_ids(pair):
    hf, ours, lm = pair
    inputs = inputs_for(lm)
    embeds = ours.get_input_embeddings()(inputs["input_ids"])
    by_ids = ours(**inputs).logits
    no_ids = {k: v for k, v in inputs.items() if k != "input_ids"}
    by_embeds = ours(**no_ids, inputs_embeds=embeds).logits
    assert max_diff(by_ids, by_embeds) == 0
    settings = dict(max_new_tokens=5)
    gen_inputs = {k: v for k, v in no_ids.items() if k != "decoder_input_ids"}
    got = ours.generate(**gen_inputs, inputs_embeds=embeds, **settings)
    expected = hf.generate(**gen_inputs, inputs_embeds=embeds, **settings)
    assert torch.equal(got, expected)
    from_ids = ours.generate(**gen_inputs, input_ids=inputs["input_ids"], **settings)
    new = from_ids[:, inputs["input_ids"].shape[1] :] if lm != "t5" else from_ids
    assert torch.equal(got, new)  # decoder-only: only the new tokens come back, as transformers
    # an explicit max_length counts the prompt, which is not returned (transformers' arithmetic)
    length = inputs["input_ids"].shape[1] + 3
    if lm != "t5":
        assert torch.equal(
            ours.generate(**gen_inputs, inputs_embeds=embeds, max_length=length),
            hf.generate(**gen_inputs, inputs_embeds=embeds, max_length=length),
        )


@torch.no_grad()
def test_get_placeholder_mask_matches_transformers(pair):
    hf, ours, lm = pair
    inputs = inputs_for(lm)
    embeds = ours.get_input_embeddings()(inputs["input_ids"])
    for ids in (inputs["input_ids"], None):
        got = ours.get_placeholder_mask(ids, embeds)
        assert got.shape == (*inputs["input_ids"].shape, 1) and got.dtype == torch.bool
        assert torch.equal(got, hf.get_placeholder_mask(ids, embeds))
    assert int(got.sum()) == 3 * NUM_QUERY_TOKENS
    short = embeds.clone()
    short[0, 0] = 0.0
    with pytest.raises(ProcessorError, match=r"row 0 has 3"):
        ours(**{k: v for k, v in inputs.items() if k != "input_ids"}, inputs_embeds=short)


@torch.no_grad()
def test_blip2_and_base_model_share_the_outputs(tmp_path):
    hf, _ = build_hf_model("opt", blip2=True)
    hf.save_pretrained(tmp_path / "blip2")
    ours = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2")
    eager(hf)
    inputs = inputs_for("opt", blip2=True)
    asked = dict(output_attentions=True, output_hidden_states=True)
    got, expected = ours(**inputs, **asked), hf(**inputs, **asked)
    qformer = hf.qformer(
        query_embeds=hf.query_tokens.expand(3, -1, -1),
        encoder_hidden_states=hf.vision_model(pixel_values=inputs["pixel_values"])[0],
        **asked,
    )
    assert_close_all(got.qformer_outputs.hidden_states, qformer.hidden_states)
    assert_close_all(got.qformer_outputs.attentions, self_attentions(qformer))
    rows = real_rows(inputs, "opt")
    assert_close_all(got.language_model_outputs.hidden_states, expected.language_model_outputs.hidden_states, rows)
    base = InstructBlipModel(InstructBlipConfig.from_dict(build_hf_model("llama")[1].to_dict())).eval()
    out = base(**inputs_for("llama"), output_hidden_states=True)
    assert out.logits is None and out.language_model_outputs.hidden_states[-1] is not None
    assert list(out.language_model_outputs.keys()) == ["last_hidden_state", "hidden_states"]
    with pytest.raises(ProcessorError, match="no LM head"):
        base(**inputs_for("llama"), labels=inputs_for("llama")["input_ids"])


@torch.no_grad()
def test_fast_paths_never_compute_the_extra_outputs(pair, monkeypatch):
    """generate (the engine's path) and a plain forward run SDPA only: the eager attention that produces the
    probabilities is never called unless asked for."""
    _, ours, lm = pair

    def refuse(*args, **kwargs):
        raise AssertionError("eager attention on a fast path")

    for module in ("vision", "qformer", "llama", "opt", "t5"):
        monkeypatch.setattr(f"blipbatch.model.{module}.attend_eager", refuse)
    inputs = inputs_for(lm)
    out = ours(**inputs)
    assert out.language_model_outputs.past_key_values is None
    assert out.vision_outputs.hidden_states is None and out.qformer_outputs.attentions is None
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    ours.generate(**gen_inputs, max_new_tokens=3, num_beams=2)
    with pytest.raises(AssertionError, match="fast path"):
        ours(**inputs, output_attentions=True)


# ---- configs -----------------------------------------------------------------------------------------------------


def modelled(config) -> dict:
    """A config's modelled fields (what we read from config.json), recursively."""
    return {
        f.name: modelled(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v
        for f in dataclasses.fields(config)
        if f.name != "extra"
    }


def test_from_vision_qformer_text_configs_equals_transformers():
    """v4.56's classmethod built `cls(vision_config=v.to_dict(), qformer_config=q.to_dict(), text_config=t.to_dict(),
    **kwargs)`; transformers 5.x builds the same config from the parts' dicts in its constructor."""
    top = dict(num_query_tokens=NUM_QUERY_TOKENS, image_token_index=IMAGE_TOKEN)
    parts = dict(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT["llama"])
    theirs = transformers.InstructBlipConfig(**parts, **top)
    hf_parts = (theirs.vision_config.to_dict(), theirs.qformer_config.to_dict(), theirs.text_config.to_dict())
    got = InstructBlipConfig.from_vision_qformer_text_configs(*hf_parts, **top)
    assert modelled(got) == modelled(InstructBlipConfig.from_dict(theirs.to_dict()))
    assert got.qformer_config.encoder_hidden_size == VISION["hidden_size"] and got.num_query_tokens == NUM_QUERY_TOKENS
    # our own config objects give the config that the same dicts give
    objects = (
        ours_api.InstructBlipVisionConfig.from_dict(VISION),
        InstructBlipQFormerConfig.from_dict(QFORMER),
        ours_api.LlamaConfig.from_dict(TEXT["llama"]),
    )
    from_objects = InstructBlipConfig.from_vision_qformer_text_configs(*objects, **top)
    expected = InstructBlipConfig.from_dict(dict(**parts, **top))
    assert modelled(from_objects) == modelled(expected)


def test_position_embedding_type_absolute_only():
    absolute = InstructBlipQFormerConfig.from_dict({"position_embedding_type": "absolute"})
    assert absolute.position_embedding_type == "absolute"
    for other in ("relative_key", "relative_key_query"):
        with pytest.raises(ConfigError, match=f"position_embedding_type '{other}' is not supported.*'absolute'"):
            InstructBlipQFormerConfig.from_dict({"position_embedding_type": other})
    with pytest.raises(ConfigError, match="position_embedding_type"):
        InstructBlipQFormerConfig(position_embedding_type="relative_key").validate()


def test_standalone_parts_have_the_documented_forward(tmp_path):
    vision = InstructBlipVisionModel(ours_api.InstructBlipVisionConfig.from_dict(VISION)).eval()
    qformer = InstructBlipQFormerModel(
        InstructBlipQFormerConfig.from_dict(QFORMER | {"encoder_hidden_size": VISION["hidden_size"]})
    ).eval()
    with torch.no_grad():
        image = vision(torch.randn(1, 3, VISION["image_size"], VISION["image_size"]), output_hidden_states=True)
        out = qformer(
            query_embeds=torch.randn(1, 2, QFORMER["hidden_size"]),
            encoder_hidden_states=image[0],
            input_ids=torch.tensor([[5, 6]]),
            output_hidden_states=True,
            return_dict=False,
        )
    assert len(image.hidden_states) == VISION["num_hidden_layers"] + 1
    assert len(out) == 3 and out[0].shape == (1, 4, QFORMER["hidden_size"])


@torch.no_grad()
@pytest.mark.parametrize(
    "settings",
    [dict(max_new_tokens=4), dict(max_new_tokens=4, num_beams=3, num_return_sequences=2)],
    ids=["greedy", "beam"],
)
def test_generate_scores_match_transformers_on_every_language_model(pair, settings):
    hf, ours, lm = pair
    inputs = {k: v for k, v in inputs_for(lm).items() if k != "decoder_input_ids"}
    asked = dict(return_dict_in_generate=True, output_scores=True, **settings)
    got, expected = ours.generate(**inputs, **asked), hf.generate(**inputs, **asked)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores)
    for a, b in zip(got.scores, expected.scores):
        assert a.shape == b.shape and torch.equal(torch.isfinite(a), torch.isfinite(b))
        assert max_diff(a[torch.isfinite(b)], b[torch.isfinite(b)]) <= 1e-4
    if "num_beams" in settings:
        assert max_diff(got.sequences_scores, expected.sequences_scores) <= 1e-4
