"""InstructBLIP / BLIP-2 processors: images -> pixel_values, prompts -> LM ids with image placeholders
(and, for InstructBLIP, Q-Former ids).

Layout of `input_ids` (as transformers >= 4.47 builds it): `num_query_tokens` image placeholders first, then the
tokenized prompt with its own BOS/EOS and padding, i.e. [<image>*Q][PAD...][BOS prompt] with left padding and
[<image>*Q][BOS prompt][PAD...] with right padding. The model replaces the placeholders by the projected queries.

Padding side of the LM text: the tokenizer's stored `padding_side` if tokenizer_config.json has one, else right
for T5-like tokenizers (T5's relative positions must not see pads between queries and prompt) and left for
decoder-only LMs (needed for batched generation; transformers defaults to right for OPT, so tests pass
padding_side="left" to it). A call can override it with `padding_side`.

`num_query_tokens` comes from processor_config.json, else from the model's config.json (old Hub revisions have no
processor_config.json; transformers would then not expand at all). With None, no placeholders are inserted.

Differences from transformers' processors, on purpose:
- a literal "<image>" in a prompt is tokenized as plain text, never as a placeholder;
- the Q-Former text is always truncated on the left to `qformer_max_length` (128, LAVIS's max_txt_len) and padded
  to the longest row on the right, whatever `padding`/`max_length` say (transformers applies the LM's text
  arguments to it and does not truncate by default);
- one prompt string with several images is repeated for every image (as LAVIS does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .errors import CheckpointError, ProcessorError
from .hub import checkpoint_dir
from .image_processing import BlipImageProcessor
from .tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
QFORMER_MAX_LENGTH = 128


def check_placeholders(input_ids: torch.Tensor, image_token_id: int, num_query_tokens: int) -> None:
    """Raise ProcessorError unless every row of `input_ids` [B, L] holds exactly `num_query_tokens` image tokens.

    transformers silently leaves rows with missing placeholders without image features; we refuse instead."""
    if input_ids.dim() != 2:
        raise ProcessorError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    need = f"input_ids needs exactly {{n}} image tokens (id {image_token_id})"
    check_placeholder_mask(input_ids == image_token_id, num_query_tokens, need)


def check_placeholder_mask(is_image: torch.Tensor, num_query_tokens: int, need: str) -> None:
    """Raise ProcessorError unless every row of the boolean mask `is_image` [B, L] marks `num_query_tokens` positions.

    `need` says what each row needs, with `{n}` for the count (e.g. "input_ids needs exactly {n} image tokens")."""
    counts = is_image.sum(dim=1).tolist()
    bad = [(row, n) for row, n in enumerate(counts) if n != num_query_tokens]
    if bad:
        listed = ", ".join(f"row {row} has {n}" for row, n in bad[:8])
        raise ProcessorError(
            f"each row of {need.format(n=num_query_tokens)}, but "
            f"{listed}{' ...' if len(bad) > 8 else ''}; build the inputs with the processor (with images) and do "
            "not truncate them"
        )


class BatchFeature(dict):
    """What the processors return: a dict of tensors, as transformers' BatchFeature (keys also read as attributes).

    `.to(device)` moves every tensor; `.to(dtype)` casts only the floating ones (pixel_values), never the ids;
    `.to(device, dtype)` and the keywords `device=` / `dtype=` / `non_blocking=` work as with a tensor.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        device, dtype, non_blocking = _to_arguments(args, kwargs)
        moved = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast, non_blocking=non_blocking)
            moved[key] = value
        return moved


def _to_arguments(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.device | None, torch.dtype | None, bool]:
    """(device, dtype, non_blocking) from `.to`'s positional and keyword forms."""
    unknown = sorted(set(kwargs) - {"device", "dtype", "non_blocking"})
    if unknown:
        raise ProcessorError(f"BatchFeature.to got unexpected arguments {unknown}; it takes a device and/or a dtype")
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device, int)):
            device = arg
        else:
            raise ProcessorError(f"BatchFeature.to takes a device (e.g. 'cuda') or a torch dtype, got {arg!r}")
    return (torch.device(device) if device is not None else None), dtype, bool(kwargs.get("non_blocking", False))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _load_common(directory: Path) -> tuple[BlipImageProcessor, Tokenizer, int | None]:
    """Image processor, LM tokenizer and num_query_tokens from a processor folder (either layout)."""
    proc_path = directory / "processor_config.json"
    proc_config = _read_json(proc_path) if proc_path.is_file() else {}
    image_path = directory / "preprocessor_config.json"
    if image_path.is_file():  # the Hub checkpoints' layout
        image_config = _read_json(image_path)
    elif "image_processor" in proc_config:  # what transformers 5.x save_pretrained writes
        image_config = proc_config["image_processor"]
    else:
        raise CheckpointError(
            f"{directory} has neither preprocessor_config.json nor an 'image_processor' entry in processor_config.json"
        )
    num_query_tokens = proc_config.get("num_query_tokens")
    model_config_path = directory / "config.json"
    if num_query_tokens is None and model_config_path.is_file():
        num_query_tokens = _read_json(model_config_path).get("num_query_tokens")
    return BlipImageProcessor.from_dict(image_config), Tokenizer.from_dir(directory), num_query_tokens


class Blip2Processor:
    """BLIP-2: image processor + LM tokenizer."""

    processor_class = "Blip2Processor"

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: Tokenizer, num_query_tokens: int | None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.image_token = IMAGE_TOKEN
        # Same as transformers: a tokenizer without "<image>" gets it appended as a special token.
        self.image_token_id = tokenizer.add_special_token(IMAGE_TOKEN)
        self._prompt_tokenizer = tokenizer.without_added_token(IMAGE_TOKEN)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> Blip2Processor:
        """Read a processor folder: a local path, an fsspec URL or a Hub id (see model.hub.checkpoint_dir)."""
        image_processor, tokenizer, num_query_tokens = _load_common(checkpoint_dir(name_or_path))
        return cls(image_processor, tokenizer, num_query_tokens)

    def _batch(
        self, images: Any, text: str | Sequence[str] | None
    ) -> tuple[list[PIL.Image.Image] | None, list[str] | None]:
        if images is None and text is None:
            raise ProcessorError("give images, text or both")
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if images is not None:
            images = list(images)
        if text is None:
            return images, None
        if isinstance(text, str):
            text = [text] * (len(images) if images else 1)
        elif not isinstance(text, Sequence) or not text or not all(isinstance(t, str) for t in text):
            raise ProcessorError("text must be a string or a non-empty list of strings")
        text = list(text)
        if images is not None and len(images) != len(text):
            raise ProcessorError(f"{len(images)} images but {len(text)} prompts; give one prompt per image")
        return images, text

    def _encode_lm_text(
        self,
        text: list[str],
        with_placeholders: bool,
        padding: bool | str,
        truncation: bool | None,
        max_length: int | None,
        padding_side: str | None,
    ) -> dict[str, torch.Tensor]:
        expand = with_placeholders and self.num_query_tokens is not None
        n_image = (self.num_query_tokens or 0) if expand else 0
        if max_length is not None:
            # max_length counts the whole sequence; only the prompt is padded or truncated.
            max_length -= n_image
            if max_length < 1:
                raise ProcessorError(f"max_length leaves no room for the prompt after {n_image} image tokens")
        encoded = self._prompt_tokenizer(
            text, padding=padding, truncation=truncation, max_length=max_length, padding_side=padding_side
        )
        if not expand:
            return encoded
        batch = encoded["input_ids"].shape[0]
        image_ids = torch.full((batch, n_image), self.image_token_id, dtype=torch.long)
        return {
            "input_ids": torch.cat([image_ids, encoded["input_ids"]], dim=1),
            "attention_mask": torch.cat([torch.ones_like(image_ids), encoded["attention_mask"]], dim=1),
        }

    def __call__(
        self,
        images: PIL.Image.Image | Sequence[PIL.Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """pixel_values [B,3,H,W] float32 (with images); input_ids, attention_mask [B, Q+L] int64 (with text;
        the Q placeholders only when images are given, as in transformers)."""
        if return_tensors != "pt":
            raise ProcessorError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        images, text = self._batch(images, text)
        out = BatchFeature()
        if text is not None:
            out.update(self._encode_lm_text(text, images is not None, padding, truncation, max_length, padding_side))
        if images is not None:
            out["pixel_values"] = self.image_processor(images)
        return out

    def encode_prompts(self, text: Sequence[str]) -> dict[str, torch.Tensor]:
        """The text inputs of `self(images=..., text=text)` without processing the images: for callers
        that bring image embeddings computed once per image (several prompts about one image)."""
        return self._encode_lm_text(list(text), True, True, None, None, None)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hub layout: preprocessor_config.json, processor_config.json and the tokenizer files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        image_config = {**self.image_processor.to_dict(), "processor_class": self.processor_class}
        proc_config = {"num_query_tokens": self.num_query_tokens, "processor_class": self.processor_class}
        for name, data in (("preprocessor_config.json", image_config), ("processor_config.json", proc_config)):
            (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save(directory)


class InstructBlipProcessor(Blip2Processor):
    """InstructBLIP: image processor + LM tokenizer + Q-Former (BERT) tokenizer in `qformer_tokenizer/`."""

    processor_class = "InstructBlipProcessor"

    def __init__(
        self,
        image_processor: BlipImageProcessor,
        tokenizer: Tokenizer,
        qformer_tokenizer: Tokenizer,
        num_query_tokens: int | None,
        qformer_max_length: int = QFORMER_MAX_LENGTH,
    ) -> None:
        super().__init__(image_processor, tokenizer, num_query_tokens)
        self.qformer_tokenizer = qformer_tokenizer
        self.qformer_max_length = qformer_max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> InstructBlipProcessor:
        directory = checkpoint_dir(name_or_path)
        image_processor, tokenizer, num_query_tokens = _load_common(directory)
        qformer_dir = directory / "qformer_tokenizer"
        if not qformer_dir.is_dir():
            raise CheckpointError(f"{directory} has no qformer_tokenizer/ folder (is it a BLIP-2 checkpoint?)")
        return cls(image_processor, tokenizer, Tokenizer.from_dir(qformer_dir), num_query_tokens)

    def __call__(
        self,
        images: PIL.Image.Image | Sequence[PIL.Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """As Blip2Processor, plus qformer_input_ids / qformer_attention_mask [B, L'] (with text)."""
        out = super().__call__(
            images,
            text,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            padding_side=padding_side,
            return_tensors=return_tensors,
        )
        _, text = self._batch(images, text)
        if text is not None:
            out.update(self._encode_qformer_text(text))
        return out

    def encode_prompts(self, text: Sequence[str]) -> dict[str, torch.Tensor]:
        return super().encode_prompts(text) | self._encode_qformer_text(list(text))

    def _encode_qformer_text(self, text: list[str]) -> dict[str, torch.Tensor]:
        # LAVIS: truncated on the left to max_txt_len, padded on the right (Q-Former positions start at 0).
        qformer = self.qformer_tokenizer(
            text,
            padding=True,
            truncation=True,
            max_length=self.qformer_max_length,
            padding_side="right",
            truncation_side="left",
        )
        return {"qformer_input_ids": qformer["input_ids"], "qformer_attention_mask": qformer["attention_mask"]}

    def save_pretrained(self, directory: str | Path) -> None:
        super().save_pretrained(directory)
        self.qformer_tokenizer.save(Path(directory) / "qformer_tokenizer")
