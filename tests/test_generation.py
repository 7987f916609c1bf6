"""Our search loops (model/generation.py) against transformers' `generate`, on tiny re-drawn LMs.

Each transformers model is wrapped in a DecodeSession adapter that runs that same model with its own cache, so any
difference in ids comes from the search: processors, token selection, finishing and padding rules.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_processors
from transformers.modeling_outputs import BaseModelOutput

from blipbatch.model import generation
from blipbatch.model.configs import GenerationConfig
from blipbatch.model.errors import ConfigError, GenerationError
from blipbatch.model.generation import generate_ids

VOCAB = 96
PAD = 0


def redraw(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (default inits leave many paths negligible); keep norm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    return module.eval()


class LlamaSession:
    """Runs a transformers decoder-only LM the way its `generate` does: positions from the mask, a DynamicCache."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, expand: int):
        self.model = model
        self.ids = ids.repeat_interleave(expand, 0)
        self.mask = mask.repeat_interleave(expand, 0)
        positions = self.mask.long().cumsum(-1) - 1
        self.positions = positions.masked_fill(self.mask == 0, 0)
        self.cache = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # generate drops an all-ones mask; do the same so the model takes the same attention path
        mask = None if bool((self.mask == 1).all()) else self.mask
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        return self._forward(self.ids, self.positions)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], 1)
        return self._forward(next_ids[:, None], self.positions[:, -1:])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)


class T5Session:
    """Runs a transformers encoder-decoder the way its `generate` does: encoder once on B rows, then expanded."""

    def __init__(
        self, model: torch.nn.Module, enc_ids: torch.Tensor, enc_mask: torch.Tensor, start: torch.Tensor, expand: int
    ):
        self.model = model
        hidden = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask, return_dict=True).last_hidden_state
        self.encoder_outputs = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(expand, 0))
        self.enc_mask = enc_mask.repeat_interleave(expand, 0)
        self.start = start.repeat_interleave(expand, 0)
        self.cache = None

    def _forward(self, decoder_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            decoder_input_ids=decoder_ids,
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.enc_mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        return self._forward(self.start)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(next_ids[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def right_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded(lengths, seed)
    for row, n in enumerate(lengths):
        ids[row] = torch.cat([ids[row, -n:], ids[row, :-n]])
        mask[row] = torch.cat([mask[row, -n:], mask[row, :-n]])
    return ids, mask


class Llama:
    def __init__(self, device: str = "cpu"):
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(0)
        self.model = redraw(transformers.LlamaForCausalLM(config), seed=1).to(device)
        self.ids, self.mask = (t.to(device) for t in left_padded([5, 8, 3], seed=2))
        self.eos: dict[str, int | list[int]] = {}  # filled by eos_candidates

    def hf(self, **kwargs) -> torch.Tensor:
        return self.model.generate(input_ids=self.ids, attention_mask=self.mask, **kwargs)

    def ours(self, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
        return generate_ids(
            lambda expand: LlamaSession(self.model, self.ids, self.mask, expand),
            self.ids,
            config,
            generator=generator,
            attention_mask=self.mask,
        )


class T5:
    def __init__(self, device: str = "cpu"):
        config = transformers.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            pad_token_id=PAD,
            eos_token_id=1,
            decoder_start_token_id=PAD,
        )
        torch.manual_seed(0)
        self.model = redraw(transformers.T5ForConditionalGeneration(config), seed=3).to(device)
        self.ids, self.mask = (t.to(device) for t in right_padded([6, 4, 7], seed=4))
        self.start = torch.full((3, 1), PAD, device=device)
        self.eos: dict[str, int | list[int]] = {}  # filled by eos_candidates

    def hf(self, **kwargs) -> torch.Tensor:
        return self.model.generate(input_ids=self.ids, attention_mask=self.mask, **kwargs)

    def ours(self, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
        return generate_ids(
            lambda expand: T5Session(self.model, self.ids, self.mask, self.start, expand),
            self.start,
            config,
            generator=generator,
        )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops only lose from intra-op threads, badly so on a busy machine; restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, Llama | T5]:
    return {"llama": Llama(), "t5": T5()}


def first_step_logits(lm: Llama | T5) -> torch.Tensor:
    if isinstance(lm, Llama):
        return LlamaSession(lm.model, lm.ids, lm.mask, 1).prefill()
    return T5Session(lm.model, lm.ids, lm.mask, lm.start, 1).prefill()


def eos_candidates(lm: Llama | T5) -> dict[str, int | list[int]]:
    """Tokens that decoding really emits early, so that eos paths fire: A = greedy row 0 at new step 3, B = greedy
    row 1 at step 5 (or later, if equal to A), C = 3-beam search row 0 at step 3 (finishes a live beam there),
    top3 = row 0's three likeliest first tokens (eos candidates crowd out the live ones); early = every row's second
    greedy token and firsts = every row's four likeliest first tokens (all rows finish early, so the loops must stop
    before max_length); every4th = ids 1, 5, 9, ... (hypotheses end all the time)."""
    if not lm.eos:
        greedy = lm.hf(max_new_tokens=8, do_sample=False, eos_token_id=None)[:, -8:]
        beam = lm.hf(max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None)[:, -4:]
        first = int(greedy[0, 2])
        second = next(int(t) for t in greedy[1, 4:].tolist() + greedy[2].tolist() if int(t) != first)
        lm.eos = {"A": first, "B": second, "C": int(beam[0, 2])}
        assert PAD not in lm.eos.values(), "pick prompts/seeds whose early tokens are not the pad id"
        lm.eos["top3"] = first_step_logits(lm)[0].topk(3).indices.tolist()
        lm.eos["early"] = sorted(set(greedy[:, 1].tolist()) - {PAD})
        lm.eos["every4th"] = list(range(1, VOCAB, 4))
        lm.eos["firsts"] = sorted(set(first_step_logits(lm).topk(4).indices.flatten().tolist()) - {PAD})
    return lm.eos


# name -> (model, settings); eos placeholders name the eos candidates above. With "C" a beam finishes at step 3 but
# may lose to longer hypotheses, so only the FINISHING ones must show an eos in their output.
FINISHING = {"A", "B", "top3", "early", "firsts", "every4th"}
STOPS_EARLY = {"early", "firsts"}
CASES = {
    "greedy_max_new_tokens": ("llama", dict(max_new_tokens=9)),
    "greedy_max_length": ("llama", dict(max_length=14)),
    "greedy_eos": ("llama", dict(max_new_tokens=10, eos_token_id="A")),
    "greedy_eos_list": ("llama", dict(max_new_tokens=10, eos_token_id=["B", "A"])),
    "min_new_tokens": ("llama", dict(max_new_tokens=10, min_new_tokens=5, eos_token_id="A")),
    "min_length": ("llama", dict(max_new_tokens=10, min_length=12, eos_token_id="A")),
    "repetition_penalty": ("llama", dict(max_new_tokens=10, repetition_penalty=1.5, eos_token_id="A")),
    "no_repeat_ngram": ("llama", dict(max_new_tokens=12, no_repeat_ngram_size=2)),
    "pad_none_greedy": ("llama", dict(max_new_tokens=10, eos_token_id="A", pad_token_id=None)),
    "no_eos_no_pad": ("llama", dict(max_new_tokens=6, eos_token_id=None, pad_token_id=None)),
    "greedy_all_finish": ("llama", dict(max_new_tokens=10, eos_token_id="early")),
    "beam_lp_0.5": ("llama", dict(max_new_tokens=10, num_beams=3, length_penalty=0.5, eos_token_id="A")),
    "beam_lp_2": ("llama", dict(max_new_tokens=10, num_beams=3, length_penalty=2.0, eos_token_id="C")),
    "beam_return_2": ("llama", dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id="A")),
    "beam_early_true": ("llama", dict(max_new_tokens=10, num_beams=3, early_stopping=True, eos_token_id="A")),
    "beam_early_false": ("llama", dict(max_new_tokens=10, num_beams=3, early_stopping=False, eos_token_id="B")),
    "beam_early_never": ("llama", dict(max_new_tokens=10, num_beams=3, early_stopping="never", eos_token_id="C")),
    "beam_never_lp_2": (
        "llama",
        dict(max_new_tokens=10, num_beams=3, early_stopping="never", length_penalty=2.0, eos_token_id="C"),
    ),
    "beam_eos_list": ("llama", dict(max_new_tokens=10, num_beams=2, eos_token_id=["A", "B"])),
    # more than num_beams of the best candidates end in an eos id: the extra candidates keep beams alive
    "beam_eos_crowd": (
        "llama",
        dict(
            max_new_tokens=6,
            num_beams=2,
            num_return_sequences=2,
            length_penalty=2.0,
            early_stopping="never",
            eos_token_id="top3",
        ),
    ),
    "beam_all_finish": ("llama", dict(max_new_tokens=10, num_beams=3, eos_token_id="firsts")),
    "beam_all_finish_early_true": (
        "llama",
        dict(max_new_tokens=10, num_beams=3, early_stopping=True, eos_token_id="firsts"),
    ),
    # a quarter of the vocab ends a hypothesis: every input fills its finished slots while longer running beams
    # could still win (length_penalty 2), so only early_stopping=True stops the search
    "beam_early_true_many_eos": (
        "llama",
        dict(max_new_tokens=10, num_beams=3, early_stopping=True, length_penalty=2.0, eos_token_id="every4th"),
    ),
    "beam_max_length": ("llama", dict(max_length=15, num_beams=3, eos_token_id="A")),
    "beam_no_eos": ("llama", dict(max_new_tokens=6, num_beams=3, eos_token_id=None)),
    "beam_pad_nonzero": ("llama", dict(max_new_tokens=10, num_beams=3, eos_token_id="A", pad_token_id=7)),
    "beam_pad_none": ("llama", dict(max_new_tokens=10, num_beams=3, eos_token_id="A", pad_token_id=None)),
    "beam_min_new_tokens": ("llama", dict(max_new_tokens=10, num_beams=3, min_new_tokens=4, eos_token_id="A")),
    "beam_repetition_penalty": (
        "llama",
        dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.5, eos_token_id="A"),
    ),
    "beam_no_repeat_ngram": ("llama", dict(max_new_tokens=12, num_beams=3, no_repeat_ngram_size=2)),
    "t5_greedy": ("t5", dict(max_new_tokens=10, eos_token_id="A")),
    "t5_all_finish": ("t5", dict(max_new_tokens=10, eos_token_id="early")),
    "t5_beam_all_finish": ("t5", dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id="firsts")),
    "t5_max_length": ("t5", dict(max_length=9, eos_token_id="B")),
    "t5_min_new_tokens": ("t5", dict(max_new_tokens=10, min_new_tokens=6, eos_token_id="A")),
    "t5_penalties": ("t5", dict(max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2)),
    "t5_beam": ("t5", dict(max_new_tokens=10, num_beams=3, length_penalty=2.0, eos_token_id="C")),
    "t5_beam_return_2": ("t5", dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, eos_token_id="A")),
    "t5_beam_early_true": ("t5", dict(max_new_tokens=10, num_beams=3, early_stopping=True, eos_token_id="A")),
    "t5_beam_early_true_many_eos": (
        "t5",
        dict(max_new_tokens=10, num_beams=2, early_stopping=True, length_penalty=2.0, eos_token_id="every4th"),
    ),
    "t5_beam_penalties": (
        "t5",
        dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=2, eos_token_id="A"),
    ),
}

SAMPLE_CASES = {
    "sample_defaults": ("llama", dict(max_new_tokens=10, do_sample=True, eos_token_id="A")),
    "sample_temperature_top_k": (
        "llama",
        dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=10, eos_token_id="A"),
    ),
    "sample_top_p": ("llama", dict(max_new_tokens=10, do_sample=True, top_p=0.8, temperature=1.3, top_k=0)),
    "sample_return_3": (
        "llama",
        dict(max_new_tokens=10, do_sample=True, num_return_sequences=3, top_p=0.9, eos_token_id="B"),
    ),
    "sample_penalties": (
        "llama",
        dict(max_new_tokens=10, do_sample=True, repetition_penalty=1.5, no_repeat_ngram_size=2),
    ),
    "beam_sample": ("llama", dict(max_new_tokens=10, do_sample=True, num_beams=3, top_k=20, eos_token_id="A")),
    "beam_sample_return_2": (
        "llama",
        dict(max_new_tokens=10, do_sample=True, num_beams=3, num_return_sequences=2, top_p=0.9, eos_token_id="A"),
    ),
    # peaked beams, where top_p must still keep len(eos) + 1 tokens per beam
    "beam_sample_top_p_min_keep": (
        "llama",
        dict(max_new_tokens=8, do_sample=True, num_beams=3, top_p=0.5, temperature=0.5, eos_token_id="A"),
    ),
    "t5_sample": ("t5", dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id="A")),
    "t5_beam_sample": ("t5", dict(max_new_tokens=10, do_sample=True, num_beams=2, eos_token_id="A")),
}


def settings_for(lm: Llama | T5, settings: dict) -> dict:
    """Replace the eos placeholders and spell out pad/eos (None included) so both sides see the same values."""
    names = eos_candidates(lm)
    out = {"pad_token_id": PAD, "eos_token_id": None, **settings}
    eos = out["eos_token_id"]
    out["eos_token_id"] = [names[e] for e in eos] if isinstance(eos, list) else names.get(eos, eos)
    return out


def count_forwards(model: torch.nn.Module, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        hook.remove()


def compare(lm: Llama | T5, settings: dict, seed: int | None = None) -> torch.Tensor:
    torch.manual_seed(seed or 0)
    expected, hf_steps = count_forwards(lm.model, lambda: lm.hf(**settings))
    torch.manual_seed(seed or 0)
    got, steps = count_forwards(lm.model, lambda: lm.ours(GenerationConfig(**settings)))
    assert got.shape == expected.shape, f"{tuple(got.shape)} != {tuple(expected.shape)}\n{got}\n{expected}"
    assert torch.equal(got, expected), f"\nours:\n{got}\ntransformers:\n{expected}"
    assert steps == hf_steps, f"{steps} forward passes where transformers stops after {hf_steps}"
    return got


def generated_part(lm: Llama | T5, ids: torch.Tensor) -> torch.Tensor:
    return ids[:, lm.ids.shape[1] if isinstance(lm, Llama) else 1 :]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(models, name):
    model_name, raw = CASES[name]
    lm = models[model_name]
    settings = settings_for(lm, raw)
    out = compare(lm, settings)
    new = generated_part(lm, out)
    eos = settings["eos_token_id"]
    eos_ids = [eos] if isinstance(eos, int) else (eos or [])
    placeholders = raw.get("eos_token_id")
    placeholders = set(placeholders) if isinstance(placeholders, list) else {placeholders}
    if FINISHING & placeholders and "min_new_tokens" not in settings and "min_length" not in settings:
        # the eos candidates were picked so that finishing (and padding/fill) paths actually run
        assert torch.isin(new, torch.tensor(eos_ids)).any(), "no row finished: the case does not test eos handling"
    if STOPS_EARLY & placeholders:
        assert new.shape[1] < settings["max_new_tokens"], "generation should have stopped before max_length"


def test_min_new_tokens_holds_back_eos(models):
    lm = models["llama"]
    settings = settings_for(lm, dict(max_new_tokens=10, eos_token_id="A"))
    free = generated_part(lm, lm.ours(GenerationConfig(**settings)))
    held = generated_part(lm, lm.ours(GenerationConfig(**settings, min_new_tokens=5)))
    eos = settings["eos_token_id"]
    assert (free[:, :5] == eos).any(), "eos must fire early without min_new_tokens for this check to mean anything"
    assert not (held[:, :5] == eos).any()


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("name", list(SAMPLE_CASES))
def test_sampling_matches_transformers_seeds(models, name, seed):
    model_name, raw = SAMPLE_CASES[name]
    lm = models[model_name]
    compare(lm, settings_for(lm, raw), seed=seed)


def test_generator_is_used_for_every_draw(models):
    lm = models["llama"]
    for raw in (SAMPLE_CASES["sample_return_3"][1], SAMPLE_CASES["beam_sample"][1]):
        config = GenerationConfig(**settings_for(lm, raw))
        torch.manual_seed(5)
        from_global = lm.ours(config)
        torch.manual_seed(123)
        state = torch.get_rng_state()
        from_generator = lm.ours(config, generator=torch.Generator().manual_seed(5))
        assert torch.equal(torch.get_rng_state(), state), "a draw used the global RNG despite the generator"
        assert torch.equal(from_generator, from_global)
        other = lm.ours(config, generator=torch.Generator().manual_seed(6))
        assert not torch.equal(other, from_global), "different seeds gave the same samples"


def test_processors_match_transformers():
    # Each processor on its own, on random scores with repeated ids, against transformers' class.
    g, lp = generation, hf_processors
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (4, 9), generator=gen)
    scores = torch.randn(4, 20, generator=gen) * 3
    ignore = torch.tensor([0, 3, 9, 1])
    eos = torch.tensor([2, 5])
    pairs = [
        (g.repetition_penalty(ids, scores, 1.5), lp.RepetitionPenaltyLogitsProcessor(1.5)),
        (
            g.repetition_penalty(ids, scores, 0.7, ignore),
            lp.RepetitionPenaltyLogitsProcessor(0.7, prompt_ignore_length=ignore),
        ),
        (g.no_repeat_ngram(ids, scores, 2), lp.NoRepeatNGramLogitsProcessor(2)),
        (g.no_repeat_ngram(ids, scores, 3), lp.NoRepeatNGramLogitsProcessor(3)),
        (g.suppress_eos(ids, scores, 10, eos), lp.MinLengthLogitsProcessor(10, eos)),
        (g.suppress_eos(ids, scores, 9, eos), lp.MinLengthLogitsProcessor(9, eos)),
        (g.temperature(ids, scores, 0.7), lp.TemperatureLogitsWarper(0.7)),
        (g.top_k(ids, scores, 5), lp.TopKLogitsWarper(5)),
        (g.top_p(ids, scores, 0.8, 1), lp.TopPLogitsWarper(0.8)),
        (g.top_p(ids, scores, 0.3, 3), lp.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs(ids, scores.clone())), theirs
    # the ignored prefix matters: row 2 ignores everything, so it is left untouched
    penalised = g.repetition_penalty(ids, scores, 1.5, ignore)
    assert torch.equal(penalised[2], scores[2]) and not torch.equal(penalised[0], scores[0])


def test_repetition_penalty_ignores_left_padding(models):
    # Fill the padded positions with each row's likeliest next token: penalising them (wrongly) changes the ids.
    lm = models["llama"]
    favourite = first_step_logits(lm).argmax(-1)
    ids = torch.where(lm.mask == 0, favourite[:, None], lm.ids)
    settings = dict(max_new_tokens=4, repetition_penalty=3.0, pad_token_id=PAD)
    expected = lm.model.generate(input_ids=ids, attention_mask=lm.mask, **settings)

    def make(expand: int) -> LlamaSession:
        return LlamaSession(lm.model, ids, lm.mask, expand)

    assert torch.equal(generate_ids(make, ids, GenerationConfig(**settings), attention_mask=lm.mask), expected)
    assert not torch.equal(generate_ids(make, ids, GenerationConfig(**settings)), expected)


def test_length_errors(models):
    lm = models["llama"]
    with pytest.raises(GenerationError, match="max_length"):
        lm.ours(GenerationConfig(max_length=lm.ids.shape[1]))
    with pytest.raises(ConfigError, match="num_return_sequences"):
        lm.ours(GenerationConfig(max_new_tokens=3, do_sample=True, num_beams=2, num_return_sequences=3))
    with pytest.raises(ConfigError, match="num_return_sequences"):
        lm.ours(GenerationConfig(max_new_tokens=3, num_return_sequences=2))
    with pytest.raises(GenerationError, match="attention_mask"):
        generate_ids(lambda e: None, lm.ids, GenerationConfig(max_new_tokens=2), attention_mask=lm.mask[:, 1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_transformers_on_cuda():
    # Same search on GPU tensors: device placement of every helper tensor, CUDA RNG parity, a CUDA generator.
    for lm in (Llama("cuda"), T5("cuda")):
        for name in ("greedy_eos", "beam_return_2", "t5_beam_return_2", "beam_pad_none"):
            if CASES[name][0] == ("llama" if isinstance(lm, Llama) else "t5"):
                compare(lm, settings_for(lm, CASES[name][1]))
        for raw in (SAMPLE_CASES["sample_return_3"][1], SAMPLE_CASES["beam_sample"][1]):
            settings = settings_for(lm, raw)
            compare(lm, settings, seed=3)
            torch.manual_seed(3)
            from_global = lm.ours(GenerationConfig(**settings))
            generator = torch.Generator("cuda").manual_seed(3)
            assert torch.equal(lm.ours(GenerationConfig(**settings), generator=generator), from_global)
