"""Processor, image preprocessing and tokenizers against transformers 5.23 built on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from blipbatch.jobs.tokenizer_files import preprocessor_config, write_bert_tokenizer, write_processor_files
from blipbatch.model.errors import CheckpointError, ProcessorError
from blipbatch.model.image_processing import BlipImageProcessor
from blipbatch.model.processor import Blip2Processor, InstructBlipProcessor, check_placeholders
from blipbatch.model.tokenizer import Tokenizer

NUM_QUERY_TOKENS = 4
LMS = ("llama", "t5", "opt")
TEXTS = [
    "What is unusual about this image?",
    "A short image caption.",
    "Question: which city is this? Answer:",
    "She's  here!  Zebra café 7€ 🙂, they're \"quoted\" (ok)",
    "",
    "The dog is giving her a high five. The sun is setting over the ocean and the sky is orange, pink and purple.",
]


def _ours_cls(lm: str):
    return Blip2Processor if lm == "opt" else InstructBlipProcessor


def _hf_cls(lm: str):
    return transformers.Blip2Processor if lm == "opt" else transformers.InstructBlipProcessor


def _hf_kwargs(lm: str) -> dict:
    # transformers pads GPT-2/OPT tokenizers on the right by default; we pad decoder-only LMs on the left.
    return {"padding_side": "left"} if lm == "opt" else {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("processors")
    out = {}
    for lm in LMS:
        out[lm] = root / lm
        write_processor_files(out[lm], lm=lm, num_query_tokens=NUM_QUERY_TOKENS, image_size=30)
    return out


@pytest.fixture(scope="module")
def processors(folders) -> dict[str, tuple]:
    return {
        lm: (_ours_cls(lm).from_pretrained(folders[lm]), _hf_cls(lm).from_pretrained(str(folders[lm]))) for lm in LMS
    }


def _images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), mode="RGBA")
    gray = PIL.Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), mode="L")
    palette = rgb.resize((90, 50)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    tiny = PIL.Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8))
    return [rgb, rgba, gray, palette, palette_transparent, tiny, rgb.convert("LA"), rgb.convert("CMYK")]


def _assert_batch_equal(ours: dict, theirs, keys) -> None:
    for key in keys:
        assert torch.equal(ours[key], theirs[key]), (key, ours[key].tolist(), theirs[key].tolist())


# ------------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("size,resample", [(30, 3), (224, 3), (17, 2)])
def test_pixel_values_match_transformers(size, resample):
    config = {**preprocessor_config(size), "resample": resample, "size": {"height": size, "width": size + 5}}
    ours = BlipImageProcessor.from_dict(config)
    theirs = transformers.BlipImageProcessorPil(**{k: v for k, v in config.items() if k != "image_processor_type"})
    images = _images()
    pixels = ours(images)
    assert pixels.dtype == torch.float32 and pixels.shape == (len(images), 3, size, size + 5)
    expected = theirs(images, return_tensors="pt")["pixel_values"]
    assert (pixels - expected).abs().max().item() <= 1e-6
    # one image at a time gives the same rows
    assert torch.equal(ours(images[1]), pixels[1:2])


def test_image_processor_dict_round_trip_and_errors():
    config = preprocessor_config(224)
    ours = BlipImageProcessor.from_dict(config)
    assert BlipImageProcessor.from_dict(ours.to_dict()).to_dict() == ours.to_dict()
    assert ours.to_dict()["processor_class"] == "InstructBlipProcessor"
    assert ours.to_dict()["size"] == {"height": 224, "width": 224}
    no_resize = BlipImageProcessor.from_dict({**config, "do_resize": False})
    with pytest.raises(ProcessorError, match="different sizes"):
        no_resize(_images()[:2])
    with pytest.raises(ProcessorError, match="PIL"):
        ours([np.zeros((4, 4, 3), dtype=np.uint8)])


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("lm", LMS)
def test_tokenizer_matches_transformers(folders, lm):
    ours = Tokenizer.from_dir(folders[lm])
    theirs = transformers.AutoTokenizer.from_pretrained(str(folders[lm]))
    assert len(ours) == len(theirs)
    for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, special) == getattr(theirs, special), special
    for text in TEXTS:
        for add_special in (True, False):
            ids = ours([text], add_special_tokens=add_special)["input_ids"][0].tolist()
            assert ids == theirs(text, add_special_tokens=add_special)["input_ids"], (text, add_special)
            assert ours.encode(text, add_special) == ids
    batch = TEXTS[:4]
    for side in ("left", "right"):
        got = ours(batch, padding=True, padding_side=side)
        _assert_batch_equal(
            got, theirs(batch, padding=True, padding_side=side, return_tensors="pt"), ["input_ids", "attention_mask"]
        )
    got = ours(batch, padding="max_length", truncation=True, max_length=9)
    _assert_batch_equal(
        got,
        theirs(batch, padding="max_length", truncation=True, max_length=9, return_tensors="pt"),
        ["input_ids", "attention_mask"],
    )
    ids = ours(batch, padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[3], skip_special_tokens=skip) == theirs.decode(ids[3], skip_special_tokens=skip)
    assert ours.convert_tokens_to_ids("<image>") == theirs.convert_tokens_to_ids("<image>")


# Special and added tokens at the start, in the middle and at the end, with and without spaces around them: text after
# an added token is tokenized on its own, and whether it gets a leading "▁" is where tokenizers differ.
SPECIAL_TEXTS = [
    "<video> What is this?",
    "<image>What is this?",
    "What <video> is this?",
    "What is<image>this? <video>",
    "<image> <image>  two",
    "a</s> b</s>",
    "<s> hi <s>",
    "x [PAD] y <pad> z <unk>",
    "<extra_id_0> The sky <extra_id_1>is blue",
    "Look: <obj> here <obj>",
    "<obj>",
    " leading space",
    "▁already marked",
    "tab\tand  two spaces",
]


@pytest.mark.parametrize(
    "lm,config_change",
    [
        ("llama", {}),  # the tiny writer's config: legacy=True
        ("llama", {"legacy": None}),  # no `legacy` key, as in the Vicuna Hub config: transformers' default, False
        ("llama", {"add_prefix_space": False}),
        ("t5", {}),
        ("opt", {}),
    ],
)
def test_tokenizer_matches_transformers_around_special_tokens(folders, tmp_path, lm, config_change):
    folder = tmp_path / lm
    shutil.copytree(folders[lm], folder)
    config_path = folder / "tokenizer_config.json"
    config = {**json.loads(config_path.read_text()), **config_change}
    config_path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    ours = Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours.add_special_token("<obj>")  # a token added at run time, as the processor adds a missing "<image>"
    theirs.add_tokens([transformers.AddedToken("<obj>", special=True, normalized=False)], special_tokens=True)
    for text in SPECIAL_TEXTS:
        for add_special in (True, False):
            expected = theirs(text, add_special_tokens=add_special)["input_ids"]
            tokens = theirs.convert_ids_to_tokens(expected)
            assert ours.encode(text, add_special) == expected, (text, add_special, tokens)
            for skip in (False, True):
                assert ours.decode(expected, skip) == theirs.decode(expected, skip_special_tokens=skip), (text, skip)
    for side in ("left", "right"):
        got = ours(SPECIAL_TEXTS, padding=True, padding_side=side)
        expected = theirs(SPECIAL_TEXTS, padding=True, padding_side=side, return_tensors="pt")
        _assert_batch_equal(got, expected, ["input_ids", "attention_mask"])
    for skip in (False, True):
        assert ours.batch_decode(got["input_ids"], skip) == theirs.batch_decode(got["input_ids"], skip)
    # a saved copy keeps tokenizer.json's own pipeline (LLaMA's is replaced on load) and the behaviour, for both
    ours.save(tmp_path / "saved")
    saved, source = (json.loads((path / "tokenizer.json").read_text()) for path in (tmp_path / "saved", folder))
    assert all(saved[key] == source[key] for key in ("normalizer", "pre_tokenizer", "decoder"))
    ours_again = Tokenizer.from_dir(tmp_path / "saved")
    theirs_again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for text in SPECIAL_TEXTS:
        assert ours_again.encode(text) == theirs_again(text)["input_ids"] == theirs(text)["input_ids"], text


def test_qformer_tokenizer_matches_transformers(folders):
    ours = Tokenizer.from_dir(folders["llama"] / "qformer_tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folders["llama"] / "qformer_tokenizer"))
    assert ours.padding_side == "right" and ours.truncation_side == "left"
    assert ours.pad_token_id == 0 and ours.convert_tokens_to_ids("[DEC]") == len(ours) - 1
    got = ours(TEXTS, padding=True)
    _assert_batch_equal(got, theirs(TEXTS, padding=True, return_tensors="pt"), ["input_ids", "attention_mask"])
    for skip in (False, True):  # WordPiece output gets transformers' clean-up ("she ' s" -> "she's")
        assert ours.batch_decode(got["input_ids"], skip) == theirs.batch_decode(got["input_ids"], skip)


def test_tokenizer_special_tokens_and_padding_sides(folders, tmp_path):
    llama = Tokenizer.from_dir(folders["llama"])
    # Vicuna: bos = eos = unk = "</s>" (id 2), "[PAD]" right after the base vocabulary, left padding.
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id) == (2, 2, 2)
    assert llama.pad_token_id == llama.convert_tokens_to_ids("[PAD]")
    assert llama.encode("What is this?")[0] == 2
    assert (llama.padding_side, llama.truncation_side) == ("left", "left")
    t5 = Tokenizer.from_dir(folders["t5"])
    assert (t5.pad_token_id, t5.eos_token_id, t5.bos_token_id) == (0, 1, None)
    assert t5.encode("What is this?")[-1] == 1 and t5.padding_side == "right"
    opt = Tokenizer.from_dir(folders["opt"])
    assert (opt.bos_token_id, opt.pad_token_id, opt.padding_side) == (2, 1, "left")
    # a stored padding_side wins
    shutil.copytree(folders["llama"], tmp_path / "llama")
    config_path = tmp_path / "llama" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "padding_side": "right"}))
    assert Tokenizer.from_dir(tmp_path / "llama").padding_side == "right"
    with pytest.raises(ProcessorError, match="padding=True"):
        llama(["a", "a longer text"])
    with pytest.raises(ProcessorError, match="not in the tokenizer"):
        llama.convert_tokens_to_ids("<definitely-not-a-token>")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_old_format_tokenizer_folder(folders, tmp_path):
    """The Vicuna Hub layout: no added_tokens_decoder, pad only in special_tokens_map.json, and added tokens
    declared in added_tokens.json that tokenizer.json lacks."""
    folder = tmp_path / "llama"
    shutil.copytree(folders["llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    config["pad_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<image>", "<video>")]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    declared = json.loads((folder / "added_tokens.json").read_text())
    for token, idx in declared.items():
        assert ours.convert_tokens_to_ids(token) == idx == theirs.convert_tokens_to_ids(token)
    assert ours.pad_token == "[PAD]" and ours.pad_token_id == theirs.pad_token_id == declared["[PAD]"]
    text = ["What is this <video>?"]
    assert ours(text)["input_ids"].tolist() == theirs(text)["input_ids"]
    # an added_tokens.json that contradicts tokenizer.json is refused
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": 7}))
    with pytest.raises(CheckpointError, match="declare id 7"):
        Tokenizer.from_dir(folder)


# ------------------------------------------------------------------------------------------------ processor
@pytest.mark.parametrize("lm", LMS)
def test_processor_matches_transformers(processors, lm):
    ours, theirs = processors[lm]
    images = _images()[:3]
    keys = ["input_ids", "attention_mask", "pixel_values"]
    if lm != "opt":
        keys += ["qformer_input_ids", "qformer_attention_mask"]
    # single sample
    got = ours(images=images[:1], text=TEXTS[0])
    expected = theirs(images=images[:1], text=TEXTS[0], return_tensors="pt", **_hf_kwargs(lm))
    assert sorted(got) == sorted(expected.keys())
    _assert_batch_equal(got, expected, keys)
    assert got["input_ids"][0, :NUM_QUERY_TOKENS].eq(ours.image_token_id).all()
    # batched with padding, and with truncation to a max_length that counts the image tokens
    for kwargs in ({"padding": True}, {"padding": "max_length", "truncation": True, "max_length": 14}):
        got = ours(images=images, text=TEXTS[:3], **kwargs)
        expected = theirs(images=images, text=TEXTS[:3], return_tensors="pt", **kwargs, **_hf_kwargs(lm))
        _assert_batch_equal(got, expected, [k for k in keys if not k.startswith("qformer")])
        check_placeholders(got["input_ids"], ours.image_token_id, NUM_QUERY_TOKENS)
    got = ours(images=images, text=TEXTS[:3])
    expected = theirs(images=images, text=TEXTS[:3], return_tensors="pt", padding=True, **_hf_kwargs(lm))
    _assert_batch_equal(got, expected, keys)
    mask = got["attention_mask"]
    assert mask[:, :NUM_QUERY_TOKENS].eq(1).all() and mask.sum(1).tolist() != [mask.shape[1]] * 3
    # the pads sit between the image tokens and the prompt (left) or after the prompt (right)
    short = mask[int(mask.sum(1).argmin()), NUM_QUERY_TOKENS:]
    assert (short[0] == 0) if lm != "t5" else (short[-1] == 0)
    for skip in (False, True):
        assert ours.batch_decode(got["input_ids"], skip_special_tokens=skip) == theirs.batch_decode(
            got["input_ids"], skip_special_tokens=skip
        )
        assert ours.decode(got["input_ids"][1], skip) == theirs.decode(got["input_ids"][1], skip_special_tokens=skip)


def test_processor_layout_llama(processors):
    ours, _ = processors["llama"]
    got = ours(images=_images()[:2], text=["What is this?", "A short image caption."])
    pad, image, bos = ours.tokenizer.pad_token_id, ours.image_token_id, ours.tokenizer.bos_token_id
    row = got["input_ids"][0].tolist()
    n_pad = row.count(pad)
    assert n_pad > 0
    assert row[: NUM_QUERY_TOKENS + n_pad + 1] == [image] * NUM_QUERY_TOKENS + [pad] * n_pad + [bos]
    right = ours(images=_images()[:2], text=["What is this?", "A short image caption."], padding_side="right")
    row = right["input_ids"][0].tolist()
    assert row[: NUM_QUERY_TOKENS + 1] == [image] * NUM_QUERY_TOKENS + [bos] and row[-n_pad:] == [pad] * n_pad


def test_qformer_text_is_left_truncated_to_128(processors):
    ours, _ = processors["llama"]
    long_text = " ".join(["the dog is on the beach"] * 40) + " final words"
    got = ours(images=_images()[:1], text=long_text)
    q = ours.qformer_tokenizer
    assert got["qformer_input_ids"].shape == (1, 128)
    full = q.encode(long_text)
    # [CLS] + the last 126 text tokens + [SEP]
    assert got["qformer_input_ids"][0].tolist() == full[:1] + full[-127:]
    # the LM prompt is not truncated
    assert got["input_ids"].shape[1] == NUM_QUERY_TOKENS + len(ours.tokenizer.encode(long_text))


@pytest.mark.parametrize("lm", LMS)
def test_literal_image_text_is_not_a_placeholder(processors, lm):
    ours, theirs = processors[lm]
    texts = ["Describe <image> here.", "<image><image> twice"]
    got = ours(images=_images()[:2], text=texts)
    counts = (got["input_ids"] == ours.image_token_id).sum(1).tolist()
    assert counts == [NUM_QUERY_TOKENS, NUM_QUERY_TOKENS]
    check_placeholders(got["input_ids"], ours.image_token_id, NUM_QUERY_TOKENS)
    # transformers turns the literal into extra placeholders, which would misalign the image features
    expected = theirs(images=_images()[:2], text=texts, return_tensors="pt", padding=True, **_hf_kwargs(lm))
    assert (expected["input_ids"] == ours.image_token_id).sum(1).tolist() == [
        NUM_QUERY_TOKENS + 1,
        NUM_QUERY_TOKENS + 2,
    ]
    if lm != "t5":  # T5's vocabulary may lack "<"; byte-level and byte-fallback vocabularies round-trip it
        text = ours.decode(got["input_ids"][0, NUM_QUERY_TOKENS:], skip_special_tokens=True)
        assert text == "Describe <image> here."


def test_check_placeholders_raises_with_row_and_counts():
    ids = torch.tensor([[9, 9, 9, 5, 6], [9, 9, 5, 6, 7], [9, 9, 9, 9, 7]])
    with pytest.raises(ProcessorError) as info:
        check_placeholders(ids, image_token_id=9, num_query_tokens=3)
    message = str(info.value)
    assert "row 1 has 2" in message and "row 2 has 4" in message and "row 0" not in message
    assert "exactly 3 image tokens (id 9)" in message
    check_placeholders(ids[:1], image_token_id=9, num_query_tokens=3)
    with pytest.raises(ProcessorError, match="shape"):
        check_placeholders(ids[0], image_token_id=9, num_query_tokens=3)


def test_processor_inputs(processors):
    ours, theirs = processors["llama"]
    images = _images()[:2]
    text_only = ours(text=["What is this?"])
    assert set(text_only) == {"input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"}
    assert ours.image_token_id not in text_only["input_ids"]
    _assert_batch_equal(text_only, theirs(text=["What is this?"], return_tensors="pt"), list(text_only))
    assert set(ours(images=images)) == {"pixel_values"}
    # one prompt for several images is repeated (LAVIS)
    broadcast = ours(images=images, text="What is this?")
    assert broadcast["input_ids"].shape[0] == 2 and torch.equal(broadcast["input_ids"][0], broadcast["input_ids"][1])
    with pytest.raises(ProcessorError, match="2 images but 3 prompts"):
        ours(images=images, text=["a", "b", "c"])
    with pytest.raises(ProcessorError, match="images, text or both"):
        ours()
    with pytest.raises(ProcessorError, match="no room"):
        ours(images=images, text="hi", max_length=NUM_QUERY_TOKENS)
    with pytest.raises(ProcessorError, match="return_tensors"):
        ours(images=images, text="hi", return_tensors="np")


# ------------------------------------------------------------------------------------------------ saving, layouts
@pytest.mark.parametrize("lm", LMS)
def test_save_pretrained_round_trip(processors, tmp_path, lm):
    ours, _ = processors[lm]
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["num_query_tokens"] == 4
    images, texts = _images()[:3], TEXTS[:3]
    expected = ours(images=images, text=texts)
    reloaded = _ours_cls(lm).from_pretrained(tmp_path / "saved")
    _assert_batch_equal(reloaded(images=images, text=texts), expected, list(expected))
    # transformers reads our folder and gives the same ids
    theirs = _hf_cls(lm).from_pretrained(str(tmp_path / "saved"))
    assert theirs.num_query_tokens == NUM_QUERY_TOKENS
    _assert_batch_equal(
        expected, theirs(images=images, text=texts, return_tensors="pt", padding=True, **_hf_kwargs(lm)), list(expected)
    )
    # sides are written only where they were stored (a stored LM padding_side would reach transformers' Q-Former)
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "padding_side" not in saved


def test_both_processor_config_layouts(folders, processors, tmp_path):
    ours, theirs = processors["llama"]
    images, texts = _images()[:2], TEXTS[:2]
    expected = ours(images=images, text=texts)
    # processor_config.json with an "image_processor" entry and no preprocessor_config.json
    write_processor_files(tmp_path / "combined", lm="llama", num_query_tokens=NUM_QUERY_TOKENS, combined_layout=True)
    assert not (tmp_path / "combined" / "preprocessor_config.json").exists()
    combined = InstructBlipProcessor.from_pretrained(tmp_path / "combined")
    assert combined.num_query_tokens == NUM_QUERY_TOKENS
    _assert_batch_equal(combined(images=images, text=texts), expected, list(expected))
    # and what transformers 5.23 save_pretrained writes
    theirs.save_pretrained(str(tmp_path / "hf_saved"))
    from_hf = InstructBlipProcessor.from_pretrained(tmp_path / "hf_saved")
    _assert_batch_equal(from_hf(images=images, text=texts), expected, list(expected))
    # old Hub revisions: no num_query_tokens in processor_config.json, it comes from the model's config.json
    no_count = {"image_processor": preprocessor_config(30)}
    (tmp_path / "combined" / "processor_config.json").write_text(json.dumps(no_count))
    assert InstructBlipProcessor.from_pretrained(tmp_path / "combined").num_query_tokens is None
    (tmp_path / "combined" / "config.json").write_text(json.dumps({"num_query_tokens": NUM_QUERY_TOKENS}))
    old_revision = InstructBlipProcessor.from_pretrained(tmp_path / "combined")
    _assert_batch_equal(old_revision(images=images, text=texts), expected, list(expected))
    # a folder without any image-processor settings, or without qformer_tokenizer/, is refused
    (tmp_path / "combined" / "processor_config.json").write_text(json.dumps({"num_query_tokens": 4}))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        InstructBlipProcessor.from_pretrained(tmp_path / "combined")
    shutil.rmtree(tmp_path / "hf_saved" / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="qformer_tokenizer"):
        InstructBlipProcessor.from_pretrained(tmp_path / "hf_saved")


def test_missing_image_token_is_appended(tmp_path):
    """A tokenizer without "<image>" gets it as a special token at the end, as transformers' processor does."""
    write_processor_files(tmp_path / "p", lm="llama", num_query_tokens=2)
    write_bert_tokenizer(tmp_path / "bert")
    bert = Tokenizer.from_dir(tmp_path / "bert")
    size = len(bert)
    processor = InstructBlipProcessor(
        BlipImageProcessor.from_dict(preprocessor_config(30)),
        bert,
        Tokenizer.from_dir(tmp_path / "bert"),
        num_query_tokens=2,
    )
    assert processor.image_token_id == size and len(bert) == size + 1
    got = processor(images=_images()[:1], text="what is <image>?")
    assert got["input_ids"][0].tolist().count(size) == 2
    assert processor.decode([size], skip_special_tokens=False) == "<image>"
    assert processor.decode([size], skip_special_tokens=True) == ""
