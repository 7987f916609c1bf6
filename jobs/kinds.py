"""Job kinds: what a job asks of each image, as the Job's instructions; and the wide table of an annotate job.

- caption: one prompt asked of every image (`[prompt] text`, or a default per model family) -> instructions (text,)
- vqa: each row's own question, from `[input] instruction_column` -> no fixed instructions
- annotate: every question of `[questions]` asked of every image -> instructions {question_id: question}; the output has
  one row per image and question with its `question_id`, and the image's vision features are computed once for all
  of its questions. With `[output] wide = true`, the wide table `OUT.wide.parquet` beside the output folder OUT has
  one row per image instead (beside, not inside: the output folder holds only parts of one schema).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blipbatch.errors import BlipbatchError
from blipbatch.pipeline.job import PipelineError
from blipbatch.pipeline.sink import read_output, write_table
from blipbatch.schemas import STATUS_ERROR

if TYPE_CHECKING:
    from .spec import JobSpec


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str
    requires: Mapping[str, str]  # kind-specific keys ("table.key" or "table") it needs -> what they are for
    allows: tuple[str, ...]  # kind-specific keys it accepts but does not need
    # (caption prompt, questions) -> the Job's instructions; None: each row's own, from the instruction column
    instructions: Callable[[str | None, Mapping[str, str]], tuple[str, ...] | dict[str, str] | None]


def _caption_instructions(prompt: str | None, questions: Mapping[str, str]) -> tuple[str, ...]:
    """The one prompt of a caption job (the spec gives the model's default when [prompt] sets none)."""
    if prompt is None:
        raise PipelineError("a caption job needs a prompt")
    return (prompt,)


_QUESTIONS_HINT = (
    'kind "annotate" asks every image each question of this table, e.g. [questions] color = "What color is the car?"'
)

KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("caption", "one prompt asked of every image", {}, ("prompt",), _caption_instructions),
        Kind(
            "vqa",
            "each row's own question, from a column",
            {
                "input.instruction_column": 'kind "vqa" reads each row\'s question from this column, '
                'e.g. instruction_column = "question"'
            },
            (),
            lambda prompt, questions: None,
        ),
        Kind(
            "annotate",
            "named questions asked of every image",
            {"questions": _QUESTIONS_HINT},
            ("output.wide",),
            lambda prompt, questions: dict(questions),
        ),
    )
}

# Keys that only some kinds use; a spec that sets one its kind does not use is refused rather than ignored.
KIND_SPECIFIC_KEYS = ("input.instruction_column", "prompt", "questions", "output.wide")


# ---------------------------------------------------------------------------------------------------------------------
# The wide table of an annotate job.

WIDE_SUFFIX = ".wide.parquet"  # the wide table of OUT is OUT.wide.parquet
SCORE_SUFFIX = "_score"  # the wide table's column of a question's scores: <question_id>_score
_OLD_WIDE_TABLE = "wide.parquet"  # where outputs written before it moved beside them kept it, inside the output
# Columns of the long output that vary by question; the others (id, the image column, passthrough) are the image's.
_PER_QUESTION = (
    "instruction",
    "question_id",
    "text",
    "score",
    "candidate_logprobs",
    "status",
    "error_kind",
    "error",
    "model",
    "generation",
)


class WideTableError(BlipbatchError, ValueError):
    """An output that cannot be made into a wide table."""


def wide_table(long: pa.Table) -> pa.Table:
    """One row per image id from the long output of an annotate job.

    Columns: the image's own (id, the image column, passthrough; from its first row), then for each question_id in
    the order the questions were asked, one holding the text (null where that question failed) and beside it
    `<question_id>_score`, the answer's score (its mean token log-probability; left out for outputs written before
    rows had scores), then `errors`: a map
    question_id -> "error_kind: error" for the image's failed questions, null when none failed. Rows without an id
    (error rows of input rows whose id was null) have no image to go under and are left out.
    """
    if "question_id" not in long.column_names:
        raise WideTableError(
            "the output has no question_id column: a wide table is made from the output of an annotate job"
        )
    long = long.filter(pc.is_valid(long.column("id")))
    ids = long.column("id").combine_chunks()
    image_ids = pc.unique(ids)  # in order of first appearance
    image_of_row = pc.index_in(ids, value_set=image_ids).to_numpy()
    _, first_rows = np.unique(image_of_row, return_index=True)
    own_columns = [name for name in long.column_names if name not in _PER_QUESTION]
    wide = long.select(own_columns).take(pa.array(first_rows))

    question_ids = long.column("question_id")
    scored = "score" in long.column_names
    for question in pc.unique(question_ids).drop_null().to_pylist():
        for column in (question, f"{question}{SCORE_SUFFIX}") if scored else (question,):
            if column in wide.column_names or column == "errors":
                raise WideTableError(
                    f"question {question!r} makes the column {column!r}, which the wide table "
                    "has already; rename the question"
                )
        rows = np.flatnonzero(pc.equal(question_ids, question).fill_null(False).to_numpy(zero_copy_only=False))
        images = image_of_row[rows]
        if len(np.unique(images)) != len(images):
            repeated = image_ids[int(images[np.argmax(np.bincount(images))])].as_py()
            raise WideTableError(
                f"id {repeated!r} has several rows for question {question!r}: a wide table needs "
                "unique ids (set [input] id_column to a unique column, or leave it out)"
            )
        slot = np.full(len(image_ids), -1)
        slot[images] = rows
        at = pa.array(slot, mask=slot < 0)
        wide = wide.append_column(question, long.column("text").take(at))
        if scored:
            wide = wide.append_column(f"{question}{SCORE_SUFFIX}", long.column("score").take(at))

    errors: list[list[tuple[str, str]] | None] = [None] * len(image_ids)
    failed = long.filter(pc.equal(long.column("status"), STATUS_ERROR))
    failed_images = pc.index_in(failed.column("id"), value_set=image_ids).to_pylist()
    for image, question, kind, message in zip(
        failed_images, *(failed.column(c).to_pylist() for c in ("question_id", "error_kind", "error"))
    ):
        errors[image] = (errors[image] or []) + [(question, f"{kind}: {message}")]
    return wide.append_column("errors", pa.array(errors, type=pa.map_(pa.string(), pa.string())))


def wide_location(output: str) -> str:
    """Where the wide table of `output` goes: beside it, named after it."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if "/" not in root.lstrip("/"):
        raise WideTableError(
            f"{output}: the wide table goes beside the output folder, and a bucket or filesystem "
            "root has nothing beside it; put the output in a folder (a prefix)"
        )
    return f"{output.rstrip('/')}{WIDE_SUFFIX}"


def write_wide_table(output: str) -> str:
    """Write the wide table (see wide_table) of `output` from its committed parts to wide_location(output); returns
    its path or URL. It is rewritten whole from every committed unit each time, so it is current after each run."""
    location = wide_location(output)
    long = read_output(output)
    if long.num_rows == 0:
        raise WideTableError(f"{output}: no committed rows yet, so no wide table")
    try:
        table = wide_table(long)
    except WideTableError as e:
        raise WideTableError(f"{output}: {e}") from None
    written = write_table(location, table)
    fs, root = fsspec.core.url_to_fs(output)
    old = f"{root.rstrip('/')}/{_OLD_WIDE_TABLE}"
    if fs.exists(old):  # a wide table inside the output would be read as a part of it
        fs.rm_file(old)
    return written


def finish_job(spec: JobSpec) -> str | None:
    """What a kind does after pipeline.run: an annotate job with `[output] wide = true` writes its wide table."""
    if spec.kind == "annotate" and spec.output.wide:
        return write_wide_table(spec.output.path)
    return None
