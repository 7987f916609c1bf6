"""generate() settings against transformers 5.24: the same checkpoint (saved by transformers, loaded by our
from_pretrained), the same call, the same ids (and scores within 1e-4), or refused by both.

Covers every setting transformers applies through its logits processors, alone and with beams / sampling, explicit
None per setting, generation_config= (ours and transformers'), a checkpoint whose generation_config.json holds
search settings, and a seeded randomized run (GENERATE_FUZZ_CASES=N for more cases than the default)."""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

from blipbatch.errors import BlipbatchError
from blipbatch.model import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration
from blipbatch.model.configs import GenerationConfig
from blipbatch.model.errors import ConfigError, GenerationError
from tests.oracle import IMAGE_TOKEN, TEXT_VOCAB, build_hf_model
from tests.test_model_parity import model_inputs

pytestmark = pytest.mark.filterwarnings("ignore")

LMS = [("llama", False), ("opt", True), ("t5", False)]
# Per language model, an id its tiny model emits a few tokens in (greedy), so that eos paths run.
EOS = {"llama": 110, "opt": 118, "t5": 79}


@pytest.fixture(scope="module", autouse=True)
def quiet_and_one_thread():
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


def load_pair(lm: str, blip2: bool, folder, seed: int = 0):
    hf_model, _ = build_hf_model(lm, blip2=blip2, seed=seed)
    hf_model.save_pretrained(folder)
    cls = Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration
    return hf_model, cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    return {lm: load_pair(lm, blip2, tmp_path_factory.mktemp(lm)) for lm, blip2 in LMS}


def outcome(model, inputs: dict, settings: dict, seed: int):
    """(ids, scores or None) or the exception generate raised."""
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **settings)
    except Exception as e:  # noqa: BLE001 - transformers refuses with many types; the caller sorts them out
        return e
    if not torch.is_tensor(out):
        scores = torch.stack(list(out.scores), 1) if out.scores is not None else None
        return out.sequences, scores, getattr(out, "sequences_scores", None)
    return out, None, None


def assert_same(hf_model, ours, inputs: dict, settings: dict, seed: int = 0):
    """Same ids (and scores within 1e-4) as transformers, or an error from both (ours a BlipbatchError)."""
    expected = outcome(hf_model, inputs, settings, seed)
    got = outcome(ours, inputs, settings, seed)
    if isinstance(got, Exception) and not isinstance(got, BlipbatchError):
        raise got
    if isinstance(expected, Exception) or isinstance(got, Exception):
        assert isinstance(expected, Exception) and isinstance(got, Exception), (
            f"{settings}: transformers {'refused' if isinstance(expected, Exception) else 'ran'} "
            f"({expected if isinstance(expected, Exception) else 'ok'}), ours "
            f"{'refused' if isinstance(got, Exception) else 'ran'} ({got if isinstance(got, Exception) else 'ok'})"
        )
        return None
    assert got[0].tolist() == expected[0].tolist(), f"{settings}\nours:\n{got[0]}\ntransformers:\n{expected[0]}"
    for ours_part, theirs in zip(got[1:], expected[1:]):  # the step scores; beam search's sequence scores
        if theirs is not None:
            torch.testing.assert_close(ours_part, theirs, atol=1e-4, rtol=0, msg=lambda m: f"{settings}: {m}")
    return got[0]


# Each setting alone, at values that change the ids of these tiny models ("EOS": the model's eos id).
ALONE = {
    "bad_words_ids": dict(bad_words_ids=[[37], [52, 52], [79, 79], ["EOS"]]),
    "suppress_tokens": dict(suppress_tokens=[37, 52, 79, 60]),
    "begin_suppress_tokens": dict(begin_suppress_tokens=[37, 43, 71, 41, 118, 79]),
    "min_p": dict(min_p=0.2),
    "forced_bos_token_id": dict(forced_bos_token_id=9),
    "forced_eos_token_id": dict(forced_eos_token_id="EOS"),
    "forced_eos_list": dict(forced_eos_token_id=["EOS", 8]),
    "renormalize_logits": dict(renormalize_logits=True),
    "use_cache_false": dict(use_cache=False),
    "use_cache_true": dict(use_cache=True),
    "typical_p": dict(typical_p=0.5),
    "epsilon_cutoff": dict(epsilon_cutoff=0.02),
    "eta_cutoff": dict(eta_cutoff=0.9),
    "sequence_bias": dict(sequence_bias=[[[5], 4.0], [[12, 13], -3.0], [[20], -10.0]]),
    "sequence_bias_dict": dict(sequence_bias={(5,): 4.0, (30, 31): 6.0}),
    "exponential_decay": dict(exponential_decay_length_penalty=(2, 1.6)),
    "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.7),
    "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=2),
    "remove_invalid_values": dict(remove_invalid_values=True),
}


def with_eos(value, eos: int):
    """`value` with every "EOS" placeholder replaced by `eos`."""
    if value == "EOS":
        return eos
    if isinstance(value, dict):
        return {k: with_eos(v, eos) for k, v in value.items()}
    if isinstance(value, list):
        return [with_eos(v, eos) for v in value]
    return value


MODES = {
    "greedy": dict(),
    "beam": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    "sample": dict(do_sample=True, top_k=30, temperature=1.3),
    "beam_sample": dict(do_sample=True, num_beams=2, top_p=0.95),
}


# Every setting greedy on each language model, and with each other mode on one of them (in turn), to stay fast.
SETTING_CASES = [(name, "greedy", lm) for name in ALONE for lm, _ in LMS] + [
    (name, mode, LMS[(i + j) % len(LMS)][0])
    for i, name in enumerate(ALONE)
    for j, mode in enumerate(m for m in MODES if m != "greedy")
]


@pytest.mark.parametrize("name,mode,lm", SETTING_CASES)
def test_setting_matches_transformers(pairs, lm, mode, name):
    hf_model, ours = pairs[lm]
    blip2 = dict(LMS)[lm]
    settings = dict(max_new_tokens=7, eos_token_id=EOS[lm], return_dict_in_generate=True, output_scores=True)
    settings |= MODES[mode] | with_eos(ALONE[name], EOS[lm])
    assert_same(hf_model, ours, model_inputs(lm, blip2), settings, seed=3)


def test_settings_change_the_ids(pairs):
    """Guards the cases above: each setting changes the ids of at least one of the models (greedy, or sampling for
    the warpers); forced_bos_token_id acts only where the prefix is one token long (T5)."""
    inert = {
        "use_cache_false",
        "use_cache_true",
        "encoder_repetition_penalty",
        "encoder_no_repeat_ngram_size",
        "remove_invalid_values",
        "renormalize_logits",
    }
    for name, setting in ALONE.items():
        if name in inert:
            continue
        mode = MODES["sample"] if name in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff") else {}
        changed_for = []
        for lm, blip2 in LMS:
            ours = pairs[lm][1]
            inputs = model_inputs(lm, blip2)
            base = dict(max_new_tokens=7, eos_token_id=EOS[lm]) | mode
            torch.manual_seed(0)
            plain = ours.generate(**inputs, **base)
            torch.manual_seed(0)
            if plain.tolist() != ours.generate(**inputs, **base, **with_eos(setting, EOS[lm])).tolist():
                changed_for.append(lm)
        assert changed_for, f"{name} changed nothing: the cases do not test it"


NONE_CASES = [
    "max_new_tokens",
    "max_length",
    "min_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "output_scores",
    "return_dict_in_generate",
    "encoder_repetition_penalty",
    "remove_invalid_values",
]


# Each None case on one language model in turn; the token ids (whose fallbacks differ for T5) on all of them.
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache")
NONE_PARAMS = [
    (name, lm)
    for i, name in enumerate(NONE_CASES)
    for j, (lm, _) in enumerate(LMS)
    if name in TOKEN_IDS or i % len(LMS) == j
]


@pytest.mark.parametrize("name,lm", NONE_PARAMS)
def test_explicit_none_as_transformers(pairs, lm, name):
    hf_model, ours = pairs[lm]
    inputs = model_inputs(lm, dict(LMS)[lm])
    for mode in (dict(do_sample=True, max_new_tokens=6), dict(num_beams=2, max_new_tokens=6)):
        if (lm, name) == ("t5", "use_cache"):
            # transformers 5.24 re-feeds T5's whole decoder input into a kept cache (other logits): refused instead
            with pytest.raises(GenerationError, match="use_cache=None with a T5"):
                ours.generate(**inputs, **mode, use_cache=None)
            continue
        assert_same(hf_model, ours, inputs, mode | {name: None}, seed=5)


def test_none_top_k_samples_from_the_whole_vocabulary(pairs):
    # transformers' own reading of the issue's first example: top_k=None is no top-k cut, not the default 50.
    hf_model, ours = pairs["llama"]
    inputs = model_inputs("llama", False)
    settings = dict(max_new_tokens=6, do_sample=True, return_dict_in_generate=True, output_scores=True)
    _, cut, _ = outcome(ours, inputs, settings, 0)
    _, whole, _ = outcome(ours, inputs, settings | dict(top_k=None), 0)
    assert (torch.isfinite(cut[:, 0]).sum(-1) == 50).all()
    assert (torch.isfinite(whole[:, 0]).sum(-1) == TEXT_VOCAB).all()
    assert_same(hf_model, ours, inputs, settings | dict(top_k=None))


@pytest.mark.parametrize("lm", [lm for lm, _ in LMS])
def test_transformers_generation_config_argument(pairs, lm):
    import transformers

    hf_model, ours = pairs[lm]
    inputs = model_inputs(lm, dict(LMS)[lm])
    given = transformers.GenerationConfig(num_beams=3, max_new_tokens=6, suppress_tokens=[5], length_penalty=2.0)
    for kwargs in ({}, dict(num_beams=2), dict(length_penalty=None, num_beams=1), dict(eos_token_id=None)):
        expected = outcome(hf_model, inputs, dict(generation_config=given, **kwargs), 0)
        got = outcome(ours, inputs, dict(generation_config=given, **kwargs), 0)
        assert not isinstance(got, Exception), got
        assert got[0].tolist() == expected[0].tolist(), kwargs
        # ours, with the same values set, reads the same
        ours_given = GenerationConfig(num_beams=3, max_new_tokens=6, suppress_tokens=[5], length_penalty=2.0)
        assert outcome(ours, inputs, dict(generation_config=ours_given, **kwargs), 0)[0].tolist() == got[0].tolist()


def test_generation_config_with_an_unsupported_transformers_setting_is_refused(pairs):
    import transformers

    _, ours = pairs["llama"]
    inputs = model_inputs("llama", False)
    given = transformers.GenerationConfig(max_new_tokens=3, guidance_scale=1.5)
    with pytest.raises(ConfigError, match="guidance_scale.*does not support"):
        ours.generate(**inputs, generation_config=given)
    with pytest.raises(ConfigError, match="generation_config must be a GenerationConfig"):
        ours.generate(**inputs, generation_config={"max_new_tokens": 3})


def test_ids_beyond_the_vocabulary_refused_when_transformers_refuses_them(pairs):
    hf_model, ours = pairs["llama"]
    inputs = model_inputs("llama", False)
    for settings in (
        dict(forced_eos_token_id=500),
        dict(forced_bos_token_id=500),  # bos: never forced here
        dict(exponential_decay_length_penalty=(1, 1.5), eos_token_id=[2, 500]),
        dict(bad_words_ids=[[500]]),
        dict(sequence_bias=[[[3, 500], 1.0]]),
        dict(eos_token_id=[]),
    ):
        assert_same(hf_model, ours, inputs, dict(max_new_tokens=4, **settings))
    with pytest.raises(GenerationError, match="beyond the vocabulary"):
        ours.generate(**inputs, max_new_tokens=4, forced_eos_token_id=500)


def test_unknown_setting_names_it_with_a_did_you_mean(pairs):
    _, ours = pairs["llama"]
    inputs = model_inputs("llama", False)
    with pytest.raises(ConfigError) as info:
        ours.generate(**inputs, max_new_tokens=3, num_beam=2)
    message = str(info.value)
    assert "\n" not in message and "'num_beam'" in message and "did you mean num_beams?" in message
    with pytest.raises(ConfigError, match="'penalty_alpha' is a transformers setting that blipbatch does not"):
        ours.generate(**inputs, max_new_tokens=3, penalty_alpha=0.6)
    with pytest.raises(ConfigError, match="unknown generation setting 'zzz'"):
        ours.generate(**inputs, max_new_tokens=3, zzz=1)


@pytest.mark.parametrize("lm,blip2", LMS)
def test_checkpoint_generation_config_is_not_applied(lm, blip2, tmp_path):
    """transformers 5.24's InstructBLIP/BLIP-2 generate() hands over to the language model, whose generation config
    holds only token ids: the search settings of generation_config.json do not apply. Written back as read."""
    hf_model, _ = build_hf_model(lm, blip2=blip2)
    hf_model.generation_config.num_beams = 2
    hf_model.generation_config.max_new_tokens = 3
    hf_model.generation_config.do_sample = True
    hf_model.generation_config.temperature = 2  # an int: a generate call refuses it, loading the file does not
    hf_model.save_pretrained(tmp_path / "ckpt")
    import transformers

    cls = transformers.Blip2ForConditionalGeneration if blip2 else transformers.InstructBlipForConditionalGeneration
    hf_loaded = cls.from_pretrained(tmp_path / "ckpt").eval()
    ours = (Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration).from_pretrained(
        tmp_path / "ckpt"
    )
    inputs = model_inputs(lm, blip2)
    for settings in ({}, dict(max_new_tokens=5), dict(num_beams=3, max_new_tokens=4)):
        ids = assert_same(hf_loaded, ours, inputs, settings)
        assert ids is not None
    assert ours.generation_config.num_beams == 2  # kept, and written back
    ours.save_pretrained(tmp_path / "again")
    assert cls.from_pretrained(tmp_path / "again").generation_config.max_new_tokens == 3


# --- randomized differential run -------------------------------------------------------------------------------------

FUZZ_CASES = int(os.environ.get("GENERATE_FUZZ_CASES", "36"))
FUZZ_SEED = int(os.environ.get("GENERATE_FUZZ_SEED", "2305"))


def draw_settings(rng: random.Random, eos: int) -> dict:
    """A generate() call's settings: a mode, a few processors, sometimes an explicit None."""
    s: dict = dict(max_new_tokens=rng.randint(2, 7), eos_token_id=rng.choice([eos, [eos, 9], None, 2]))
    mode = rng.choice(["greedy", "greedy", "beam", "sample", "beam_sample"])
    if mode in ("beam", "beam_sample"):
        s["num_beams"] = rng.randint(2, 3)
        s["num_return_sequences"] = rng.randint(1, s["num_beams"])
        s["length_penalty"] = rng.choice([0.5, 1.0, 2.0, -1.0])
        s["early_stopping"] = rng.choice([True, False, "never"])
    if mode in ("sample", "beam_sample"):
        s["do_sample"] = True
        if mode == "sample" and rng.random() < 0.3:
            s["num_return_sequences"] = 2
    optional = {
        "temperature": lambda: rng.choice([0.6, 1.4, None]),
        "top_k": lambda: rng.choice([0, 5, 40, None]),
        "top_p": lambda: rng.choice([0.5, 0.9, None]),
        "min_p": lambda: rng.choice([0.05, 0.3, None]),
        "typical_p": lambda: rng.choice([0.4, 0.9, None]),
        "epsilon_cutoff": lambda: rng.choice([0.01, 0.05]),
        "eta_cutoff": lambda: rng.choice([0.01, 0.2]),
        "repetition_penalty": lambda: rng.choice([0.8, 1.5, None]),
        "no_repeat_ngram_size": lambda: rng.choice([1, 2, None]),
        "min_new_tokens": lambda: rng.randint(0, 4),
        "min_length": lambda: rng.choice([0, 12, None]),
        "bad_words_ids": lambda: [[rng.randrange(3, 100)], [rng.randrange(3, 100), rng.randrange(3, 100)]],
        "sequence_bias": lambda: [
            [[rng.randrange(3, 100)], rng.uniform(-5, 5)],
            [[rng.randrange(3, 100), rng.randrange(3, 100)], rng.uniform(-5, 5)],
        ],
        "suppress_tokens": lambda: rng.sample(range(3, 100), 5),
        "begin_suppress_tokens": lambda: rng.sample(range(3, 100), 5),
        "forced_bos_token_id": lambda: rng.randrange(3, 100),
        "forced_eos_token_id": lambda: rng.choice([eos, [eos, 9]]),
        "exponential_decay_length_penalty": lambda: (rng.randint(0, 3), rng.choice([1.2, 2.0])),
        "renormalize_logits": lambda: rng.choice([True, False]),
        "use_cache": lambda: rng.choice([True, False]),
        "pad_token_id": lambda: rng.choice([None, 0, 4]),
        "output_scores": lambda: True,
    }
    for name in rng.sample(sorted(optional), rng.randint(1, 5)):
        s[name] = optional[name]()
    if s.get("output_scores"):
        s["return_dict_in_generate"] = True
    return s


# Other checkpoint shapes for the randomized run: (name, lm, blip2, text config over the oracle's).
VARIANTS = [
    (
        "llama-gqa1-head_dim-tied",
        "llama",
        True,
        dict(
            num_key_value_heads=1,
            head_dim=12,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1000.0),
        ),
    ),
    (
        "llama-dynamic-rope",
        "llama",
        False,
        dict(max_position_embeddings=12, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
    ),
    ("opt-postnorm-proj", "opt", False, dict(do_layer_norm_before=False, word_embed_proj_dim=24)),
    ("t5-tied", "t5", True, dict(tie_word_embeddings=True, feed_forward_proj="relu")),
]


@pytest.mark.slow
def test_randomized_settings_match_transformers(pairs, tmp_path):
    models = {lm: (lm, blip2, *pairs[lm]) for lm, blip2 in LMS}
    for name, lm, blip2, text in VARIANTS:
        models[name] = (lm, blip2, *custom_pair(lm, blip2, text, tmp_path / name))
    rng = random.Random(FUZZ_SEED)
    for case in range(FUZZ_CASES):
        key = rng.choice(sorted(models))
        lm, blip2, hf_model, ours = models[key]
        settings = draw_settings(rng, EOS[lm])
        inputs = model_inputs(lm, blip2, batch=rng.randint(1, 3), seed=case)
        try:
            assert_same(hf_model, ours, inputs, settings, seed=case)
        except AssertionError as e:
            raise AssertionError(f"case {case} ({key}): {e}") from None


# --- LLaMA RoPE kinds ------------------------------------------------------------------------------------------------

ROPE = {
    "linear": dict(rope_type="linear", factor=2.5),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "llama3": dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=4
    ),
}


def custom_pair(lm: str, blip2: bool, text: dict, folder, seed: int = 4):
    """A transformers model with `text` over the oracle's text config, saved, and ours loaded from it."""
    import transformers

    from tests.oracle import NUM_QUERY_TOKENS, QFORMER, TEXT, VISION, redraw_

    config_cls = transformers.Blip2Config if blip2 else transformers.InstructBlipConfig
    config = config_cls(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=dict(TEXT[lm], **text),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN,
    )
    model_cls = (
        transformers.Blip2ForConditionalGeneration if blip2 else transformers.InstructBlipForConditionalGeneration
    )
    hf_model = model_cls(config)
    redraw_(hf_model, seed)
    hf_model.eval().save_pretrained(folder)
    ours_cls = Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration
    return hf_model, ours_cls.from_pretrained(folder)


def rope_pair(kind: str, folder, legacy: bool = False):
    """A LLaMA InstructBLIP whose positions run past max_position_embeddings (16) within a short generate."""
    text = dict(max_position_embeddings=16, rope_parameters=dict(ROPE[kind], rope_theta=500.0))
    hf_model, ours = custom_pair("llama", False, text, folder)
    if legacy:  # the older layout: rope_scaling with "type", rope_theta at the top level
        import json

        data = json.loads((folder / "config.json").read_text())
        params = data["text_config"].pop("rope_parameters")
        data["text_config"]["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        data["text_config"]["rope_scaling"] = params
        (folder / "config.json").write_text(json.dumps(data))
        ours = InstructBlipForConditionalGeneration.from_pretrained(folder)
    return hf_model, ours


@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_kinds_match_transformers(kind, tmp_path):
    hf_model, ours = rope_pair(kind, tmp_path / "a")
    _, legacy = rope_pair(kind, tmp_path / "b", legacy=True)
    inputs = model_inputs("llama", False, batch=2)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        for model in (ours, legacy):
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-4, rtol=0)
    # prompts of 9 tokens + 12 new ones: past max_position_embeddings, where dynamic scaling re-derives its frequencies
    for settings in (
        dict(max_new_tokens=12),
        dict(max_new_tokens=12, num_beams=2),
        dict(max_new_tokens=12, do_sample=True),
    ):
        settings |= dict(return_dict_in_generate=True, output_scores=True)
        assert_same(hf_model, ours, inputs, settings)
    plain_hf, _ = build_hf_model("llama", seed=4)  # the guard: scaling changes the logits
    with torch.no_grad():
        assert (plain_hf(**inputs).logits - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    "params,named",
    [
        (dict(rope_type="yarn", factor=2.0), "'yarn'"),
        (dict(type="longrope", factor=2.0), "'longrope'"),
        (dict(rope_type="linear"), "needs factor"),
    ],
)
def test_unsupported_rope_is_refused_at_load_naming_it(params, named):
    from blipbatch.model.configs import LlamaConfig

    with pytest.raises(ConfigError, match=named):
        LlamaConfig.from_dict(dict(hidden_size=32, num_attention_heads=4, rope_scaling=params))
