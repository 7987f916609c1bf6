"""The `score` of an output text: its mean token log-probability (beam search: transformers' sequence score).

The continuous-batching path is checked against transformers in tests/test_continuous.py; here the static
`generate` path (beams, and a greedy search that needs it), the shipped demo model (its right answers score higher
than its wrong ones) and the `score` column through the pipeline (null on error rows; an output written before the
column existed still resumes, its new parts without it)."""

from __future__ import annotations

import math

import pandas as pd
import PIL.Image
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from tiny import write_tiny_checkpoint

from blipbatch import pipeline
from blipbatch.jobs import shapes
from blipbatch.jobs.demo import DEMO_MODEL
from blipbatch.jobs.kinds import wide_table
from blipbatch.jobs.train import EVAL_SEED
from blipbatch.model.engine import Engine, EngineConfig
from blipbatch.pipeline.sink import read_output

INSTRUCTIONS = ["a photo of", "What is in the picture? Answer in detail.", "Describe it.", "Why?"]
IMAGE_ROWS = [0, 1, 0, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    return transformers.InstructBlipForConditionalGeneration.from_pretrained(tiny).eval()


def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def transformers_output(hf_model, engine: Engine, **settings):
    """transformers' generate of the engine's call, as one batch (the engine's static path makes one too)."""
    inputs = engine.processor.encode_prompts(INSTRUCTIONS)
    with torch.no_grad():
        return hf_model.generate(
            pixel_values=pixels()[IMAGE_ROWS], **inputs, return_dict_in_generate=True, output_scores=True, **settings
        ), inputs["input_ids"].shape[1]


def test_beam_scores_are_transformers_sequences_scores(tiny, hf_tiny):
    """With num_return_sequences > 1 each row has a list of texts and a list of scores, in transformers' order."""
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    engine = Engine(EngineConfig(model=tiny, device="cpu", generation=settings))
    got = engine.generate_scored(pixels(), IMAGE_ROWS, INSTRUCTIONS)
    expected, _ = transformers_output(hf_tiny, engine, **settings)
    assert all(isinstance(g.score, list) and len(g.score) == len(g.text) == 2 for g in got)
    assert [s for g in got for s in g.score] == pytest.approx(expected.sequences_scores.tolist(), abs=1e-4)
    assert engine.generate_pixels(pixels(), IMAGE_ROWS, INSTRUCTIONS) == [g.text for g in got]  # texts as before


STATIC_SETTINGS = [
    dict(repetition_penalty=1.3),
    dict(suppress_tokens=[5, 9, 14], renormalize_logits=True, exponential_decay_length_penalty=[2, 1.5]),
    dict(bad_words_ids=[[6], [8, 8]], sequence_bias=[[[7], 1.5], [[10, 11], -2.0]], use_cache=False),
]


@pytest.mark.parametrize("processors", STATIC_SETTINGS, ids=lambda s: ",".join(s))
def test_static_search_scores_are_mean_transition_scores(tiny, hf_tiny, processors):
    """Searches the continuous path hands to the static generate (logits processors): the mean of transformers'
    compute_transition_scores(..., normalize_logits=True) over each row's tokens up to its eos, none after, so
    after the processors; eos ids picked from the tokens generated make the rows end at different steps."""
    free = dict(max_new_tokens=8, **processors)
    engine = Engine(EngineConfig(model=tiny, device="cpu", generation=free))
    unstopped, prompt = transformers_output(hf_tiny, engine, **free, min_new_tokens=8)
    new = unstopped.sequences[:, prompt:]
    eos = sorted({int(new[0, 2]), int(new[1, 5])} - set(new[2].tolist()))  # row 2 runs to the limit
    settings = dict(free, eos_token_id=eos)
    engine = Engine(EngineConfig(model=tiny, device="cpu", generation=settings))
    assert engine.greedy_limits is None  # the static path is the one under test
    got = engine.generate_scored(pixels(), IMAGE_ROWS, INSTRUCTIONS)
    expected, prompt = transformers_output(hf_tiny, engine, **settings)
    assert [g.text for g in got] == [
        t.strip() for t in engine.processor.batch_decode(expected.sequences[:, prompt:], skip_special_tokens=True)
    ]
    transition = hf_tiny.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=True)
    means, lengths = [], []
    for ids, scores in zip(expected.sequences[:, prompt:].tolist(), transition.tolist()):
        length = next((i + 1 for i, token in enumerate(ids) if token in eos), len(ids))
        lengths.append(length)
        means.append(sum(scores[:length]) / length)
    # (the decay raises the eos ids' scores until every row ends)
    assert len(set(lengths)) >= 3 and (max(lengths) == 8 or "exponential_decay_length_penalty" in processors)
    assert [g.score for g in got] == pytest.approx(means, abs=1e-4)


def test_use_cache_keeps_continuous_batching(tiny):
    for use_cache in (True, False):
        engine = Engine(EngineConfig(model=tiny, device="cpu", generation=dict(max_new_tokens=4, use_cache=use_cache)))
        assert engine.greedy_limits is not None


def test_the_demo_models_right_answers_score_higher_than_its_wrong_ones():
    """The shipped model answers clean pictures all right, so each of 40 new pictures is blended half-and-half with
    another: the first picture's answers are the right ones, and the model gets many of them wrong."""
    pictures = shapes.make_dataset(80, EVAL_SEED + 1)  # not the training seed
    blended = [
        PIL.Image.blend(p.image, other.image.resize(p.image.size), 0.5)
        for p, other in zip(pictures[:40], pictures[40:])
    ]
    engine = Engine(EngineConfig(model=str(DEMO_MODEL), device="cpu", generation=dict(max_new_tokens=6)))
    rows, questions, answers = [], [], []
    for i, picture in enumerate(pictures[:40]):
        for key, question in shapes.QUESTIONS.items():
            rows.append(i)
            questions.append(question)
            answers.append(picture.scene.answers[key])
    got = engine.generate_scored(engine.processor.image_processor(blended), rows, questions)
    right = [g.score for g, answer in zip(got, answers) if g.text == answer]
    wrong = [g.score for g, answer in zip(got, answers) if g.text != answer]
    print(
        f"{len(right)} right, mean score {sum(right) / len(right):.4f}; "
        f"{len(wrong)} wrong, mean score {sum(wrong) / len(wrong):.4f}"
    )
    assert len(right) >= 20 and len(wrong) >= 20
    assert sum(right) / len(right) > sum(wrong) / len(wrong)
    assert all(math.isfinite(s) and s <= 0 for s in right + wrong)


def write_pictures(path, first: int, count: int, broken: int | None = None) -> None:
    pictures = shapes.make_dataset(first + count, EVAL_SEED)[first:]
    images = [b"not an image" if i == broken else p.png() for i, p in enumerate(pictures)]
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [f"pic-{first + i}" for i in range(count)]
    pq.write_table(pa.table({"key": keys, "image": pa.array(images, pa.binary())}), path)


def test_score_column_through_the_pipeline_and_an_old_output_resumes(ray_local, tmp_path):
    """ok rows have a finite score, error rows null; an output written before the column existed resumes, and its
    new parts keep the old schema (without score), so readers still read one table."""
    inputs, output = tmp_path / "in", str(tmp_path / "out")
    write_pictures(inputs / "a.parquet", 0, 5, broken=3)
    common = dict(image_column="image", id_column="key", max_new_tokens=6, progress=False)
    pipeline.run(str(inputs), output, str(DEMO_MODEL), prompt=dict(shapes.QUESTIONS), **common)
    table = read_output(output)
    assert table.schema.field("score").type == pa.float64()
    rows = table.to_pylist()
    assert len(rows) == 15
    for row in rows:
        if row["id"] == "pic-3":
            assert row["status"] == "error" and row["score"] is None
        else:
            assert row["status"] == "ok" and math.isfinite(row["score"]) and row["score"] <= 0
    assert "score" not in wide_table(table).column_names  # a score belongs to its question, not to the image

    # as an earlier version wrote it: the same part without the score column
    (part,) = [p for p in (tmp_path / "out").glob("*.parquet")]
    pq.write_table(pq.read_table(part).drop_columns(["score"]), part)
    write_pictures(inputs / "b.parquet", 5, 2)
    summary = pipeline.run(str(inputs), output, str(DEMO_MODEL), prompt=dict(shapes.QUESTIONS), **common)
    assert summary.units_skipped == 1 and summary.rows_error == 0
    assert "score" not in read_output(output).column_names
    assert len(pd.read_parquet(output)) == ds.dataset(output).count_rows() == 21
