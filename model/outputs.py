"""Output records with transformers' names, fields and field order (`transformers.modeling_outputs`,
`generation.utils`).

Like transformers' `ModelOutput`, a record reads by attribute (`out.logits`), by key (`out["logits"]`) and by
position over the fields that are set (`out[0]`, `out.to_tuple()`): fields left None are skipped, so the
positions of a record depend on what was asked for, exactly as there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, dataclass_transform

from torch import Tensor

Tensors = tuple[Tensor, ...]
R = TypeVar("R", bound="ModelOutput")


class ModelOutput(Mapping):
    """Base of the records below (each a dataclass): a read-only mapping of its set fields, in field order."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set on each record by `output`
    # Identity, not Mapping's value comparison (tensors have no single truth value).
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def keys(self) -> list[str]:  # type: ignore[override]
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_tuple(self) -> tuple[Any, ...]:
        """The set fields in order; nested records become tuples too (as transformers' composite outputs do)."""
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (getattr(self, k) for k in self.keys()))


@dataclass
class Collector:
    """Lists a forward fills when the caller asked for hidden states or attention probabilities (None: not asked).
    The fast paths pass no collector at all."""

    hidden_states: list[Tensor] | None = None
    attentions: list[Tensor] | None = None
    cross_attentions: list[Tensor] | None = None

    @classmethod
    def asked(cls, hidden_states: bool | None, attentions: bool | None) -> Collector | None:
        if not hidden_states and not attentions:
            return None
        return cls([] if hidden_states else None, [] if attentions else None, [] if attentions else None)

    def hidden(self, x: Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(x)

    def result(self, name: str) -> Tensors | None:
        found = getattr(self, name)
        return tuple(found) if found is not None else None


def collected(collector: Collector | None, name: str) -> Tensors | None:
    """`collector.result(name)`, or None without a collector."""
    return collector.result(name) if collector is not None else None


@dataclass_transform(eq_default=False)
def output(cls: type[R]) -> type[R]:
    """A ModelOutput dataclass: field-wise equality makes no sense for tensors, so it is off."""
    return dataclass(eq=False)(cls)


@output
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@output
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: Tensors | None = None
    past_key_values: Any = None
    attentions: Tensors | None = None
    cross_attentions: Tensors | None = None


@output
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Tensor | None = None
    past_key_values: Any = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@output
class CausalLMOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None
    hidden_states: Tensors | None = None
    attentions: Tensors | None = None


@output
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    past_key_values: Any = None
    decoder_hidden_states: Tensors | None = None
    decoder_attentions: Tensors | None = None
    cross_attentions: Tensors | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: Tensors | None = None
    encoder_attentions: Tensors | None = None


@output
class Seq2SeqLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None
    decoder_hidden_states: Tensors | None = None
    decoder_attentions: Tensors | None = None
    cross_attentions: Tensors | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: Tensors | None = None
    encoder_attentions: Tensors | None = None


@output
class InstructBlipForConditionalGenerationModelOutput(ModelOutput):
    """What InstructBlipModel and InstructBlipForConditionalGeneration (and the BLIP-2 classes) return."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    # CausalLMOutputWithPast / Seq2SeqLMOutput with the head, BaseModelOutputWithPast / Seq2SeqModelOutput without
    language_model_outputs: ModelOutput | None = None


Blip2ForConditionalGenerationModelOutput = InstructBlipForConditionalGenerationModelOutput


@output
class GenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: transformers' Generate{,Beam}{DecoderOnly,EncoderDecoder}Output
    reduced to what we fill. `scores`: one [batch * beams or sequences, vocab] tensor per generated token, the
    processed scores the search chose from; `sequences_scores` (beam search only): each returned sequence's score."""

    sequences: Tensor | None = None
    sequences_scores: Tensor | None = None
    scores: Tensors | None = None
