"""Tiny tokenizer and processor folders in the Hub layout, for demos, tests and the small trained model.

Each writer trains a small vocabulary (a few hundred tokens) with the `tokenizers` library on a corpus (by default
the built-in text below) and writes the files that the real InstructBLIP / BLIP-2 checkpoints carry (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, added_tokens.json), with the same special-token layout as
the real ones, so that transformers' AutoTokenizer reads them the way it reads the Hub files.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = """\
What is unusual about this image? The unusual aspect of this image is that a man is ironing clothes on the back
of a yellow van while driving on a busy city street. A short image caption. Question: which city is this? Answer:
it is not a city, it is a beach. A woman is sitting on the beach with her dog, and the dog is giving her a high five.
The sun is setting over the ocean and the sky is orange, pink and purple. Two children are playing with a red ball
in the park near a large tree. There is a cat sleeping on a wooden chair next to the window. Describe the image in
detail. Write a short description for the image. How many people are in the picture? There are three people
standing in front of a building. What color is the car? The car is blue. Is there a dog in the image? Yes, there is
a brown dog lying on the grass. What are the people doing? They are eating lunch at a table outside a small cafe.
The kitchen has white cabinets, a stainless steel refrigerator and a bowl of fresh fruit on the counter. A train is
pulling into the station while passengers wait on the platform. The mountains in the distance are covered with snow,
and a river runs through the green valley below. A group of friends is riding bicycles along a quiet road in the
countryside. The plate holds a sandwich, some chips and a pickle. A bird is perched on a branch, singing in the
morning light. The street is wet after the rain and the lights of the shops reflect on the road. An old man is
reading a newspaper on a bench in the square. The boat is floating on calm water under a clear blue sky. Someone is
holding an umbrella because it is raining heavily. The room is dark except for a lamp on the desk. A giraffe is
eating leaves from the top of a tall tree. Please answer the question briefly. Short answer: yes. Short answer: no.
Context: a photo of a street market. Options: fruit, bread, fish. The answer is fruit. Why is the man smiling? He is
happy because he won the game! Where was this photo taken? It was taken in Paris, near the river. When did it
happen? It happened yesterday, around 5 pm. Can you see the moon? I can't see it; it's hidden behind the clouds.
She's wearing a hat, a scarf and gloves. They're walking their dogs. We've never seen anything like it before.
"""

# Byte-fallback pieces of the LLaMA vocabulary, ids 3..258 as in the real one.
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int  # size of the whole vocabulary, added tokens included (len(tokenizer) in transformers)
    image_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int


def _lines(corpus: str) -> list[str]:
    return [line for line in corpus.splitlines() if line.strip()]


def _train_bpe(vocab_size: int, specials: list[str], corpus: str) -> dict:
    """Train a SentencePiece-like BPE on `corpus` ("▁" marks word starts) and return its JSON model
    ({"vocab", "merges"}); the same from run to run."""
    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_lines(corpus), trainer)
    return json.loads(tok.to_str())["model"]


def _bpe_pieces(vocab_size: int, specials: list[str], corpus: str) -> list[str]:
    learned = _train_bpe(vocab_size, specials, corpus)
    return [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _added(content: str, special: bool = True) -> AddedToken:
    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _added_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def _save(tok: Tokenizer, directory: Path, config: dict, special_map: dict, added: dict[str, int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {**config, "added_tokens_decoder": _added_decoder(tok)})
    _write_json(directory / "special_tokens_map.json", special_map)
    if added:
        _write_json(directory / "added_tokens.json", added)


def write_llama_tokenizer(directory: Path, vocab_size_hint: int = 300, corpus: str = CORPUS) -> TokenizerInfo:
    """Vicuna-style LLaMA tokenizer: BPE with byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, bos = eos = unk = `</s>`,
    `[PAD]`, `<image>` and `<video>` added after the base vocabulary (like 32000/32001/32002 in the real one)."""
    learned = _train_bpe(vocab_size_hint, ["<unk>", "<s>", "</s>"], corpus)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in _BYTE_TOKENS:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    # The layout of the real (legacy) Vicuna tokenizer.json: spaces become "▁" in the normalizer, no pre-tokenizer.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([_added("<unk>"), _added("<s>"), _added("</s>")])
    tok.add_special_tokens([_added("[PAD]"), _added("<image>"), _added("<video>")])
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "</s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "[PAD]",
        "model_max_length": 2048,
        "legacy": True,
        "tokenizer_class": "LlamaTokenizer",
        "truncation_side": "left",
    }
    special_map = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "</s>"}
    base = len(vocab)
    _save(tok, directory, config, special_map, {"[PAD]": base, "<image>": base + 1, "<video>": base + 2})
    return TokenizerInfo(tok.get_vocab_size(), base + 1, 2, 2, base)


def write_t5_tokenizer(
    directory: Path, vocab_size_hint: int = 300, extra_ids: int = 3, corpus: str = CORPUS
) -> TokenizerInfo:
    """Flan-T5-style tokenizer: Unigram, `<pad>`=0 `</s>`=1 `<unk>`=2, appends `</s>`, sentinel `<extra_id_*>` at the
    end of the base vocabulary (reversed, as in T5), `<image>` added after it."""
    # The pieces come from the (deterministic) BPE trainer: the Unigram trainer's output changes from run to run.
    # Every piece costs about the same, so Viterbi picks the segmentation with the fewest pieces.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    learned = _bpe_pieces(vocab_size_hint, ["<pad>", "</s>", "<unk>"], corpus)
    pieces += [(p, -1.0 - 1e-4 * i) for i, p in enumerate(learned)]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([_added("<pad>"), _added("</s>"), _added("<unk>")])
    tok.add_special_tokens([_added(f"<extra_id_{i}>") for i in range(extra_ids)])
    tok.add_special_tokens([_added("<image>")])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    config = {
        "additional_special_tokens": sentinels,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": extra_ids,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "truncation_side": "left",
        "unk_token": "<unk>",
    }
    special_map = {
        "additional_special_tokens": sentinels,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    image_id = len(pieces)
    _save(tok, directory, config, special_map, {"<image>": image_id})
    return TokenizerInfo(tok.get_vocab_size(), image_id, None, 1, 0)


def write_opt_tokenizer(directory: Path, vocab_size_hint: int = 400, corpus: str = CORPUS) -> TokenizerInfo:
    """OPT-style GPT-2 byte-level BPE: `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3; bos = eos = unk = `</s>`, prepended by
    tokenizer.json's post-processor (transformers 5.x ignores `add_bos_token` when a tokenizer.json exists),
    `<image>` added after the base vocabulary (like 50265 in the real one)."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size_hint,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    base = tok.get_vocab_size()
    tok.add_special_tokens([_added("<image>")])
    config = {
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": "</s>",
        "eos_token": "</s>",
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "</s>",
    }
    special_map = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>"}
    _save(tok, directory, config, special_map, {"<image>": base})
    return TokenizerInfo(tok.get_vocab_size(), base, 2, 2, 1)


def write_bert_tokenizer(directory: Path, vocab_size_hint: int = 300, corpus: str = CORPUS) -> TokenizerInfo:
    """Q-Former tokenizer: bert-base-uncased-style WordPiece, `[PAD]`=0 `[UNK]`=1 `[CLS]`=2 `[SEP]`=3 `[MASK]`=4,
    `[DEC]` added after the base vocabulary (like 30522 in the real one)."""
    # Built by hand (the WordPiece trainer's ids change between runs): every character, alone and as "##"
    # continuation, a few suffixes, and the most frequent words, so rarer words split into pieces.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = re.findall(r"\w+|[^\w\s]", corpus.lower())
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits))
    frequent = [w for w, _ in Counter(w for w in words if len(w) > 1).most_common(vocab_size_hint)]
    pieces = [*specials, *chars, *("##" + c for c in chars if c.isalnum()), "##s", "##ing", "##ed", "##ly", *frequent]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([_added(t) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    base = tok.get_vocab_size()
    tok.add_special_tokens([_added("[DEC]")])
    config = {
        "bos_token": "[DEC]",
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "truncation_side": "left",
        "unk_token": "[UNK]",
    }
    special_map = {
        "bos_token": "[DEC]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }
    _save(tok, directory, config, special_map, {"[DEC]": base})
    return TokenizerInfo(tok.get_vocab_size(), None, None, None, 0)


# The real preprocessor_config.json of the InstructBLIP / BLIP-2 checkpoints (only `size` varies in tests).
def preprocessor_config(size: int = 224, processor_class: str = "InstructBlipProcessor") -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": processor_class,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": size, "width": size},
    }


_LM_WRITERS: dict[str, Callable[..., TokenizerInfo]] = {
    "llama": write_llama_tokenizer,
    "t5": write_t5_tokenizer,
    "opt": write_opt_tokenizer,
}


def write_processor_files(
    directory: Path,
    lm: str = "llama",
    num_query_tokens: int = 4,
    image_size: int = 30,
    qformer: bool | None = None,
    combined_layout: bool = False,
    corpus: str = CORPUS,
) -> dict[str, TokenizerInfo]:
    """A whole processor folder: LM tokenizer at the top, `qformer_tokenizer/` (InstructBLIP; default unless
    lm == "opt", i.e. BLIP-2), and the image-processor settings either in `preprocessor_config.json` (the Hub
    layout) or, with `combined_layout`, under "image_processor" in processor_config.json (what transformers 5.23
    writes). Both tokenizers are trained on `corpus`. Returns {"tokenizer": ..., "qformer_tokenizer": ...} infos."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    qformer = lm != "opt" if qformer is None else qformer
    processor_class = "InstructBlipProcessor" if qformer else "Blip2Processor"
    infos = {"tokenizer": _LM_WRITERS[lm](directory, corpus=corpus)}
    if qformer:
        infos["qformer_tokenizer"] = write_bert_tokenizer(directory / "qformer_tokenizer", corpus=corpus)
    image_config = preprocessor_config(image_size, processor_class)
    processor_config = {"num_query_tokens": num_query_tokens, "processor_class": processor_class}
    if combined_layout:
        processor_config["image_processor"] = image_config
    else:
        _write_json(directory / "preprocessor_config.json", image_config)
    _write_json(directory / "processor_config.json", processor_config)
    return infos
