"""Prompt templates: `{column}` in a caption prompt or an annotate question is filled from each row.

"Write a short caption. The page said: {caption}" asks each image with its row's `caption`; `{{` and `}}` are literal
braces. A template is checked when the job is made (an unclosed brace, an empty `{}`: TemplateError) and its columns
against the input's when the run starts (check_columns); a row whose column is null or empty is an `invalid_input`
row naming the column, or with `[input] missing = "empty"` gets the empty string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from blipbatch.errors import BlipbatchError

from .errors import RowError

MISSING_CHOICES = ("error", "empty")  # [input] missing: what a null or empty template column does


class TemplateError(BlipbatchError, ValueError):
    """A prompt or question that is not a well-formed template."""


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and column names, in order (a column is a one-element tuple)."""

    text: str
    parts: tuple[str | tuple[str], ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(part[0] for part in self.parts if isinstance(part, tuple)))

    def fill(self, row: Mapping[str, object], missing: str = "error") -> str:
        """The instruction for `row` (column -> value); RowError("invalid_input") naming the first column whose value
        is null or empty, unless `missing` is "empty"."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = row.get(part[0])
            text = "" if value is None else str(value)
            if not text.strip() and missing == "error":
                what = "null" if value is None else "empty"
                raise RowError(
                    "invalid_input",
                    f"column {part[0]!r} is {what}, and the prompt template "
                    f'{self.text!r} fills it in; [input] missing = "empty" fills '
                    "it with an empty string instead",
                )
            out.append(text)
        return "".join(out)


def parse(text: str) -> Template:
    """Parse `text` as a template; TemplateError saying where it is malformed."""
    parts: list[str | tuple[str]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "{}" and text[i + 1 : i + 2] == char:
            literal.append(char)
            i += 2
        elif char == "}":
            raise TemplateError(f"single '}}' at character {i + 1} of {text!r}: write '}}}}' for a literal brace")
        elif char == "{":
            end = text.find("}", i + 1)
            opened = text.find("{", i + 1)
            if end < 0 or 0 <= opened < end:
                raise TemplateError(
                    f"unclosed '{{' at character {i + 1} of {text!r}: close it, or write '{{{{' for a literal brace"
                )
            name = text[i + 1 : end]
            if not name.strip():
                raise TemplateError(
                    f"empty '{{}}' at character {i + 1} of {text!r}: name a column, e.g. "
                    "{caption}, or write '{{}}' for literal braces"
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append((name,))
            i = end + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(text, tuple(parts))


def parse_all(instructions: Sequence[str] | Mapping[str, str] | None) -> dict[str, Template]:
    """The fixed instructions' templates, by their text; none for a job whose rows bring their own question."""
    if instructions is None:
        return {}
    texts = instructions.values() if isinstance(instructions, Mapping) else instructions
    return {text: parse(text) for text in texts}


def columns_of(templates: Iterable[Template]) -> list[str]:
    """Every column the templates fill, each once, in order."""
    return list(dict.fromkeys(column for template in templates for column in template.columns))


def check_columns(templates: Iterable[Template], shard: str, available: Sequence[str]) -> None:
    """TemplateError when a template names a column `shard` does not have, naming it and the columns there are."""
    missing = [column for column in columns_of(templates) if column not in available]
    if missing:
        raise TemplateError(
            f"{shard}: the prompt template names column(s) {', '.join(map(repr, missing))}, which "
            f"the input does not have; its columns: {', '.join(available) or '(none)'}"
        )
