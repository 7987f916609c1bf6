"""Prompt templates over row columns: parsing, filling, the spec's and the run's refusals."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blipbatch.jobs.spec import SpecError, load_spec
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.job import PipelineError, job_from_keywords
from blipbatch.pipeline.shards import discover_shards, plan_units, read_unit
from blipbatch.pipeline.template import TemplateError, parse
from blipbatch.schemas import ColumnMapping


def test_columns_are_filled_and_doubled_braces_are_literal():
    template = parse("Caption it. {{page}} said: {caption} ({lang}, {caption}) }}")
    assert template.columns == ("caption", "lang")
    assert (
        template.fill({"caption": "a red kite", "lang": "en"})
        == "Caption it. {page} said: a red kite (en, a red kite) }"
    )
    assert template.fill({"caption": 7, "lang": "x"}).endswith("said: 7 (x, 7) }")  # any value, as text
    assert parse("no columns {{}}").fill({}) == "no columns {}"


@pytest.mark.parametrize("value, what", [(None, "null"), ("", "empty"), ("   ", "empty")])
def test_a_null_or_empty_value_is_an_invalid_input_naming_the_column_unless_missing_is_empty(value, what):
    template = parse("The page said: {caption}.")
    with pytest.raises(RowError) as info:
        template.fill({"caption": value})
    assert info.value.kind == "invalid_input"
    assert f"column 'caption' is {what}" in info.value.message and 'missing = "empty"' in info.value.message
    assert template.fill({"caption": value}, missing="empty") == f"The page said: {value or ''}."


@pytest.mark.parametrize(
    "text, message",
    [
        ("Say {caption", r"unclosed '\{' at character 5 of 'Say \{caption'"),
        ("Say {a{b}", r"unclosed '\{' at character 5"),
        ("Say {} now", r"empty '\{\}' at character 5 of 'Say \{\} now': name a column"),
        ("Say { }", r"empty '\{\}' at character 5"),
        ("Say } now", r"single '\}' at character 5 .*write '\}\}' for a literal brace"),
    ],
)
def test_malformed_templates_are_refused_saying_where(text, message):
    with pytest.raises(TemplateError, match=message):
        parse(text)


BASE = '[job]\nkind = "{kind}"\n[input]\npath = "in"\n[output]\npath = "out"\n[model]\npath = "m"\n'


def test_the_spec_refuses_a_bad_template_at_its_file_and_line(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text(BASE.format(kind="caption") + '[prompt]\ntext = "Caption it, see {alt"\n')
    with pytest.raises(SpecError, match=r"job.toml:10: \[prompt\] text: unclosed '\{' at character 17"):
        load_spec(spec)
    spec.write_text(BASE.format(kind="annotate") + '[questions]\ncolor = "What color?"\nsize = "How big, {}?"\n')
    with pytest.raises(SpecError, match=r"job.toml:11: \[questions\] size: empty '\{\}'"):
        load_spec(spec)
    with_missing = BASE.replace('path = "in"\n', 'path = "in"\nmissing = {}\n') + '[prompt]\ntext = "{{caption}}"\n'
    spec.write_text(with_missing.format('"skip"', kind="caption"))
    with pytest.raises(SpecError, match=r"job.toml:5: \[input\] missing: expected one of \"error\", \"empty\""):
        load_spec(spec)
    spec.write_text(with_missing.format('"empty"', kind="caption"))
    assert load_spec(spec).input.missing == "empty"


def test_the_python_api_refuses_a_bad_template():
    with pytest.raises(PipelineError, match=r"prompt: unclosed '\{'"):
        job_from_keywords("in", "out", "m", prompt="About {alt")
    with pytest.raises(PipelineError, match=r"prompt: empty '\{\}'"):
        job_from_keywords("in", "out", "m", prompt={"q": "What {}?"})


def test_read_unit_fills_each_row_and_leaves_a_rows_own_question_alone(tmp_path):
    pq.write_table(
        pa.table(
            {
                "image_url": ["a", "b", "c"],
                "caption": ["a kite", None, ""],
                "question": ["What is {caption}?", "Why?", "How?"],
            }
        ),
        tmp_path / "in.parquet",
    )
    (unit,) = plan_units(discover_shards(str(tmp_path / "in.parquet")), ColumnMapping())
    rows = read_unit(unit, ColumnMapping(), {"what": "Caption it; alt: {caption}", "plain": "Say {{hi}}"})
    assert [(r.question_id, r.instruction, r.problem and r.problem.kind) for r in rows] == [
        ("what", "Caption it; alt: a kite", None),
        ("plain", "Say {hi}", None),
        ("what", "Caption it; alt: {caption}", "invalid_input"),
        ("plain", "Say {hi}", None),
        ("what", "Caption it; alt: {caption}", "invalid_input"),
        ("plain", "Say {hi}", None),
    ]
    assert "column 'caption' is null" in rows[2].problem.message
    rows = read_unit(unit, ColumnMapping(missing="empty"), ["Alt: {caption}."])
    assert [(r.instruction, r.problem) for r in rows] == [("Alt: a kite.", None), ("Alt: .", None), ("Alt: .", None)]
    vqa = ColumnMapping(instruction_column="question")
    assert [r.instruction for r in read_unit(unit, vqa)] == ["What is {caption}?", "Why?", "How?"]
