"""A tokenizer read from a Hub tokenizer folder, run by the `tokenizers` library.

tokenizer.json is the source of truth for the whole pipeline (normalizer, pre-tokenizer, model, post-processor,
added tokens), as it is for transformers 5.x, which also ignores `add_bos_token`/`add_eos_token` in
tokenizer_config.json when a tokenizer.json exists. tokenizer_config.json (and, for old-format folders without
`added_tokens_decoder`, special_tokens_map.json and added_tokens.json) gives the named special tokens, the
padding/truncation sides and the decode clean-up flag.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken

from .errors import CheckpointError, ProcessorError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokenizers of encoders (T5's encoder, BERT): their sequences end in EOS/SEP and their models use positions
# counted from the first token, so they pad on the right. Everything else is a decoder-only LM and pads on the left,
# which batched generation needs (transformers' own default is right for GPT-2/OPT, left for LLaMA).
_RIGHT_PADDING_CLASS_PREFIXES = ("T5", "MT5", "UMT5", "Bert")
_RIGHT_PADDING_MODELS = ("Unigram", "WordPiece")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _clean_up_tokenization(text: str) -> str:
    # The detokenization clean-up of transformers (undoes WordPiece's spaces around punctuation).
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Encodes batches of strings into padded id/mask tensors and decodes ids back to text."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
        self._backend = backend
        # Padding and truncation are set on the shared backend for each call; the lock keeps calls apart.
        self._lock = threading.Lock()
        self.config = dict(config)
        self.padding_side: str = self.config.get("padding_side") or self._default_padding_side()
        self.truncation_side: str = self.config.get("truncation_side") or "right"
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise CheckpointError(
                    f"tokenizer_config.json: padding/truncation side must be left or right, got {side!r}"
                )
        max_len = self.config.get("model_max_length")
        self.model_max_length: int | None = int(max_len) if isinstance(max_len, (int, float)) else None
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_dir(cls, directory: Path | str) -> Tokenizer:
        directory = Path(directory)
        json_path = directory / "tokenizer.json"
        if not json_path.is_file():
            raise CheckpointError(
                f"no tokenizer.json in {directory}: only `tokenizers` serializations are supported "
                "(convert a tokenizer.model with transformers' `AutoTokenizer(...).save_pretrained` first)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise CheckpointError(f"cannot parse {json_path}: {err}") from err
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        extra_added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            for idx, tok in config["added_tokens_decoder"].items():
                extra_added[int(idx)] = AddedToken(**{k: v for k, v in tok.items() if k != "__type"})
        else:
            # Old-format folders: special_tokens_map.json wins over tokenizer_config.json (as in transformers),
            # added_tokens.json lists tokens appended after the base vocabulary.
            map_path = directory / "special_tokens_map.json"
            if map_path.is_file():
                config.update(_read_json(map_path))
            added_path = directory / "added_tokens.json"
            if added_path.is_file():
                named = {_token_content(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
                for content, idx in _read_json(added_path).items():
                    extra_added[int(idx)] = AddedToken(content, special=content in named, normalized=False)
        for key in (*SPECIAL_TOKEN_KEYS, "additional_special_tokens"):
            if key in config:
                value = config[key]
                config[key] = [_token_content(v) for v in value] if isinstance(value, list) else _token_content(value)
        tokenizer = cls(backend, config)
        tokenizer._add_missing_tokens(extra_added)
        return tokenizer

    def _add_missing_tokens(self, declared: dict[int, AddedToken]) -> None:
        """Add the tokens the config files declare but tokenizer.json lacks, at the ids they declare."""
        for idx, token in sorted(declared.items()):
            existing = self._backend.token_to_id(token.content)
            if existing is None:
                existing = self._add(token)
            if existing != idx:
                raise CheckpointError(
                    f"token {token.content!r} has id {existing} in tokenizer.json but the tokenizer config files "
                    f"declare id {idx}; the tokenizer files disagree, re-export them"
                )
        for key in SPECIAL_TOKEN_KEYS:
            content = self.config.get(key)
            if content is not None and self._backend.token_to_id(content) is None:
                self._add(AddedToken(content, special=True, normalized=False))

    def _add(self, token: AddedToken) -> int:
        if token.special:
            self._backend.add_special_tokens([token])
        else:
            self._backend.add_tokens([token])
        token_id = self._backend.token_to_id(token.content)
        assert token_id is not None  # just added
        return token_id

    def add_special_token(self, content: str) -> int:
        """Return the id of `content`, appending it to the vocabulary as a special token if it is missing."""
        existing = self._backend.token_to_id(content)
        return existing if existing is not None else self._add(AddedToken(content, special=True, normalized=False))

    def save(self, directory: Path | str) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and added_tokens.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._backend.save(str(directory / "tokenizer.json"))
        added = self._backend.get_added_tokens_decoder()
        config = dict(self.config)
        # Sides are written only when stored or changed: transformers' processors apply a stored LM padding_side
        # to the Q-Former tokenizer too.
        if "padding_side" in config or self.padding_side != self._default_padding_side():
            config["padding_side"] = self.padding_side
        if "truncation_side" in config or self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        }
        special_map = {k: config[k] for k in (*SPECIAL_TOKEN_KEYS, "additional_special_tokens") if config.get(k)}
        base_size = self._backend.get_vocab_size(with_added_tokens=False)
        appended = {t.content: i for i, t in sorted(added.items()) if i >= base_size}
        for name, data in (
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special_map),
            ("added_tokens.json", appended),
        ):
            (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def without_added_token(self, content: str) -> Tokenizer:
        """A copy that tokenizes `content` as ordinary text instead of matching it as one added token.

        Used for user prompts, so that a literal "<image>" in them cannot become an image placeholder."""
        with self._lock:
            data = json.loads(self._backend.to_str())
        # The token keeps its slot under a content no text holds (random): `tokenizers` numbers added tokens by their
        # position, so dropping it would renumber those after it ("<video>" would take the "<image>" id).
        for token in data["added_tokens"]:
            if token["content"] == content:
                token["content"] = f"<removed-{secrets.token_hex(16)}>"
        copy = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), self.config)
        copy.padding_side, copy.truncation_side = self.padding_side, self.truncation_side
        return copy

    def _default_padding_side(self) -> str:
        cls_name = str(self.config.get("tokenizer_class") or "")
        if cls_name:
            return "right" if cls_name.startswith(_RIGHT_PADDING_CLASS_PREFIXES) else "left"
        return "right" if type(self._backend.model).__name__ in _RIGHT_PADDING_MODELS else "left"

    # ---------------------------------------------------------------- special tokens
    def _special_id(self, key: str) -> int | None:
        content = self.config.get(key)
        return None if content is None else self._backend.token_to_id(content)

    @property
    def bos_token(self) -> str | None:
        return self.config.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.config.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.config.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.config.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int:
        idx = self._backend.token_to_id(token)
        if idx is None:
            raise ProcessorError(f"token {token!r} is not in the tokenizer's vocabulary")
        return idx

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    # ---------------------------------------------------------------- encoding
    def _reset_backend(self) -> None:
        self._backend.no_padding()
        self._backend.no_truncation()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            self._reset_backend()
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | None = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize a batch into {"input_ids", "attention_mask"} int64 tensors [B, L].

        padding: False / "do_not_pad", True / "longest", or "max_length" (to `max_length`).
        truncation: True cuts each sequence (special tokens included) to `max_length`, or to model_max_length
        without one; None means "truncate if `max_length` is given"."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ProcessorError("the tokenizer needs a non-empty list of strings")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ProcessorError(
                f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}"
            )
        for side in (padding_side, truncation_side):
            if side not in (None, "left", "right"):
                raise ProcessorError(f"padding_side/truncation_side must be 'left' or 'right', got {side!r}")
        if truncation is None:
            truncation = max_length is not None
        length = max_length if max_length is not None else self.model_max_length
        with self._lock:
            return self._encode_batch(
                list(texts),
                add_special_tokens,
                padding,
                truncation,
                length,
                padding_side or self.padding_side,
                truncation_side or self.truncation_side,
            )

    def _encode_batch(
        self,
        texts: list[str],
        add_special_tokens: bool,
        padding: bool | str,
        truncation: bool,
        length: int | None,
        padding_side: str,
        truncation_side: str,
    ) -> dict[str, torch.Tensor]:
        self._reset_backend()
        try:
            if truncation:
                if length is None:
                    raise ProcessorError("truncation needs max_length (the tokenizer config has no model_max_length)")
                self._backend.enable_truncation(max_length=length, strategy="longest_first", direction=truncation_side)
            if padding in (True, "longest", "max_length"):
                if self.pad_token_id is None:
                    raise ProcessorError("padding needs a pad token, and this tokenizer has none")
                if padding == "max_length" and length is None:
                    raise ProcessorError("padding='max_length' needs max_length")
                self._backend.enable_padding(
                    direction=padding_side,
                    pad_id=self.pad_token_id,
                    pad_token=self.pad_token,
                    length=length if padding == "max_length" else None,
                )
            try:
                encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            except Exception as err:  # the Rust side raises plain Exceptions (e.g. max_length below the specials)
                raise ProcessorError(f"tokenization failed (max_length={length}): {err}") from err
        finally:
            self._reset_backend()
        lengths = {len(e.ids) for e in encodings}
        if len(lengths) > 1:
            raise ProcessorError(f"texts tokenize to different lengths {sorted(lengths)}; pass padding=True")
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }

    # ---------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models, where it would delete real spaces.
        if self.clean_up_tokenization_spaces and type(self._backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]
