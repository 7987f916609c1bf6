"""Closed-set scoring (model.ranking): each candidate's log-likelihood equals transformers' forward(..., labels=...)
for the same (image, prompt, candidate), and the candidates share one prefill."""

from __future__ import annotations

import pytest
import tokenizers
import torch

from blipbatch.model import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration, ProcessorError
from blipbatch.model.tokenizer import Tokenizer
from tests.oracle import IMAGE_TOKEN, TEXT, build_hf_model, random_inputs

CASES = [("llama", False), ("opt", False), ("t5", False), ("opt", True)]
IDS = ["instructblip-llama", "instructblip-opt", "instructblip-t5", "blip2-opt"]
# Candidates of 1 to 4 words (ids of the word tokenizer below), so targets of 2 to 5 tokens with the eos.
CANDIDATES = ["t5", "t17 t40", "t99 t3 t64", "t40 t41 t42 t43", "t17"]


def word_tokenizer(eos: int) -> Tokenizer:
    """A whitespace word tokenizer over the tiny models' vocabulary: "t17" is token 17."""
    vocab = {f"t{i}": i for i in range(IMAGE_TOKEN)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {"eos_token": f"t{eos}"})


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def pair(request, tmp_path_factory):
    lm, blip2 = request.param
    hf_model, _ = build_hf_model(lm, blip2=blip2, seed=4)
    folder = tmp_path_factory.mktemp(f"rank-{lm}-{blip2}")
    hf_model.save_pretrained(folder)
    ours = (Blip2ForConditionalGeneration if blip2 else InstructBlipForConditionalGeneration).from_pretrained(folder)
    return hf_model, ours, lm, blip2


def prompts(lm: str, blip2: bool) -> dict:
    inputs = random_inputs(3, [5, 2, 4], seed=2, lm=lm, padding_side="right" if lm == "t5" else "left")
    if blip2:
        del inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    return inputs


def transformers_loglikelihood(hf_model, inputs: dict, row: int, target: list[int], lm: str) -> float:
    """transformers' summed log-likelihood of `target` after row `row`'s prompt (its real tokens, unpadded)."""
    one = {k: v[row : row + 1] for k, v in inputs.items()}
    real = one.pop("attention_mask")[0].bool()
    prompt = one.pop("input_ids")[0][real]
    target_ids = torch.tensor([target])
    if lm == "t5":
        batch = dict(one, input_ids=prompt[None], labels=target_ids)
    else:
        labels = torch.cat([torch.full((1, len(prompt)), -100), target_ids], dim=1)
        batch = dict(one, input_ids=torch.cat([prompt[None], target_ids], dim=1), labels=labels)
    with torch.no_grad():
        return -hf_model(**batch).loss.item() * len(target)


@pytest.mark.slow
def test_each_candidate_scores_as_transformers_forward_with_labels(pair):
    hf_model, ours, lm, blip2 = pair
    eos = TEXT[lm]["eos_token_id"]
    tokenizer = word_tokenizer(eos)
    inputs = prompts(lm, blip2)
    got = ours.score_candidates(CANDIDATES, tokenizer, **inputs)
    assert got.shape == (3, len(CANDIDATES)) and got.dtype == torch.float64
    for row in (0, 1):  # the longest prompt, and one with left padding (T5: right padding)
        for k, candidate in enumerate(CANDIDATES):
            target = [int(word[1:]) for word in candidate.split()] + [eos]
            expected = transformers_loglikelihood(hf_model, inputs, row, target, lm)
            assert abs(got[row, k].item() - expected) <= 1e-4, (row, candidate, got[row, k].item(), expected)
    # the mean is the sum per target token (the eos counts)
    mean = ours.score_candidates(CANDIDATES, tokenizer, **inputs, scoring="mean")
    lengths = torch.tensor([len(c.split()) + 1 for c in CANDIDATES], dtype=torch.float64)
    assert torch.allclose(mean, got / lengths, atol=1e-12)


def test_one_list_per_row_scores_as_the_shared_list(pair):
    _, ours, lm, blip2 = pair
    tokenizer = word_tokenizer(TEXT[lm]["eos_token_id"])
    inputs = prompts(lm, blip2)
    shared = ours.score_candidates(CANDIDATES, tokenizer, **inputs)
    lists = [CANDIDATES[:2], CANDIDATES[1:], CANDIDATES[::-1]]
    per_row = ours.score_candidates(lists, tokenizer, **inputs)
    assert [len(s) for s in per_row] == [2, 4, 5]
    assert torch.allclose(per_row[0], shared[0, :2], atol=1e-5)
    assert torch.allclose(per_row[1], shared[1, 1:], atol=1e-5)
    assert torch.allclose(per_row[2], shared[2].flip(0), atol=1e-5)


def test_candidates_share_one_vision_pass_and_one_prefill(pair, monkeypatch):
    _, ours, lm, blip2 = pair
    tokenizer = word_tokenizer(TEXT[lm]["eos_token_id"])
    inputs = prompts(lm, blip2)
    calls: dict[str, list[int]] = {"vision": [], "lm": []}

    def count(what: str, module: torch.nn.Module, name: str) -> None:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: (calls[what].append(a[0].shape[0]), original(*a, **k))[1])

    count("vision", ours.vision_model, "encode")
    if lm == "t5":  # the encoder once, the decoder once from its start token and once over every candidate
        count("lm", ours.language_model, "encode")
        count("lm", ours.language_model, "decode")
    else:
        count("lm", ours.language_model, "forward")
    monkeypatch.setattr("blipbatch.model.ranking.LOGIT_BUDGET", 10**9)  # one chunk
    ours.score_candidates(CANDIDATES, tokenizer, **inputs)
    assert calls["vision"] == [3]
    expected = [3, 3, 3 * len(CANDIDATES)] if lm == "t5" else [3, 3 * len(CANDIDATES)]
    assert calls["lm"] == expected


def test_chunks_give_the_same_scores(pair, monkeypatch):
    _, ours, lm, blip2 = pair
    tokenizer = word_tokenizer(TEXT[lm]["eos_token_id"])
    inputs = prompts(lm, blip2)
    whole = ours.score_candidates(CANDIDATES, tokenizer, **inputs)
    monkeypatch.setattr("blipbatch.model.ranking.LOGIT_BUDGET", 4 * 5 * 120)  # 4 candidates of 5 tokens a chunk
    assert torch.allclose(ours.score_candidates(CANDIDATES, tokenizer, **inputs), whole, atol=1e-6)


def test_bad_candidates_are_refused(pair):
    _, ours, lm, blip2 = pair
    tokenizer = word_tokenizer(TEXT[lm]["eos_token_id"])
    inputs = prompts(lm, blip2)
    with pytest.raises(ProcessorError, match="tokenizes to nothing"):
        ours.score_candidates(["t5", "  "], tokenizer, **inputs)
    with pytest.raises(ProcessorError, match="2 candidate lists for 3 rows"):
        ours.score_candidates([["t5", "t6"], ["t7", "t8"]], tokenizer, **inputs)
    with pytest.raises(ProcessorError, match="not a string"):
        ours.score_candidates(["t5", 7], tokenizer, **inputs)
    if lm != "t5":
        with pytest.raises(ProcessorError, match="the model takes 128"):
            ours.score_candidates([" ".join(["t9"] * 130), "t5"], tokenizer, **inputs)
