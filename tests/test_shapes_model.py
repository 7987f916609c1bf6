"""The small trained InstructBLIP that ships in jobs/demo_data/shapes-instructblip.

It answers right through the whole pipeline on pictures it has never seen, the instruction decides which answer
it gives, transformers loads it and generates the same ids, `blipbatch demo` uses it, and the training script
that made it still trains (a few steps; the shipped model is never retrained here).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from PIL import Image

from blipbatch import pipeline
from blipbatch.jobs import shapes
from blipbatch.jobs.cli import main
from blipbatch.jobs.demo import DEMO_MODEL, SAMPLE_IMAGES, run_demo
from blipbatch.jobs.train import EVAL_SEED, HELD_OUT_SEED, TrainConfig, accuracy, train
from blipbatch.model import InstructBlipForConditionalGeneration, InstructBlipProcessor
from blipbatch.pipeline.sink import read_output

SHIPPED = Path(__file__).resolve().parents[1] / "jobs" / "demo_data" / "shapes-instructblip"
PICTURES = 200
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def pictures() -> list[shapes.ShapeSample]:
    # EVAL_SEED is not a training seed: these pictures are new to the model.
    return shapes.make_dataset(PICTURES, EVAL_SEED)


@pytest.fixture(scope="module")
def pipeline_output(ray_local, pictures, tmp_path_factory) -> dict[str, dict[str, str]]:
    """{picture id: {"caption": text, question_id: answer, ...}} from two pipeline runs over raw PNG bytes."""
    root = tmp_path_factory.mktemp("shapes")
    table = pa.table(
        {"key": [f"pic-{i}" for i in range(len(pictures))], "image": pa.array([p.png() for p in pictures], pa.binary())}
    )
    (root / "in").mkdir()
    pq.write_table(table, root / "in" / "pictures.parquet")
    common = dict(image_column="image", id_column="key", max_new_tokens=NEW_TOKENS, batch_size=32, progress=False)
    texts: dict[str, dict[str, str]] = {f"pic-{i}": {} for i in range(len(pictures))}
    for name, prompt in (("answers", dict(shapes.QUESTIONS)), ("captions", shapes.CAPTION_PROMPT)):
        summary = pipeline.run(str(root / "in"), str(root / name), str(SHIPPED), prompt=prompt, **common)
        assert summary.rows_error == 0 and summary.units_failed == 0
        for row in read_output(str(root / name)).to_pylist():
            assert row["status"] == "ok", row
            texts[row["id"]][row.get("question_id") or "caption"] = row["text"]
    return texts


def test_answers_through_the_pipeline(pictures, pipeline_output):
    accuracy = {}
    for key in shapes.QUESTIONS:
        right = [pipeline_output[f"pic-{i}"][key] == p.scene.answers[key] for i, p in enumerate(pictures)]
        accuracy[key] = sum(right) / len(right)
    print(f"answers right on {PICTURES} new pictures: {accuracy}")
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_captions_through_the_pipeline(pictures, pipeline_output):
    named = [shapes.parse_caption(pipeline_output[f"pic-{i}"]["caption"]) == p.scene for i, p in enumerate(pictures)]
    print(f"captions naming the right count, colour and shape: {sum(named) / len(named):.3f}")
    assert sum(named) / len(named) >= 0.90


def test_the_instruction_decides_the_answer(pictures, pipeline_output):
    # The three questions about one picture share its vision pass (an annotate run): only the instruction differs.
    right = 0
    for i, picture in enumerate(pictures):
        answers = {key: pipeline_output[f"pic-{i}"][key] for key in shapes.QUESTIONS}
        assert len(set(answers.values())) == 3, answers  # never the answer to another question
        right += answers == picture.scene.answers
    print(f"pictures whose three questions got three different, correct answers: {right / len(pictures):.3f}")
    assert right / len(pictures) >= 0.95


@pytest.mark.parametrize("jpeg_quality", [None, 75])
def test_answers_pictures_of_the_held_out_generator(jpeg_quality):
    # Drawn with other parameters than training (shapes.draw_held_out_scene): near-square canvases, gradients
    # between two white-mixed tints under pixel noise, anti-aliased shapes. The model trained on the old, narrower
    # generator read 94.0% of these counts and 93.0% of these captions right; as JPEGs at quality 75, 92.5% of both
    # (and one trained on the wide generator without JPEGs, 94.5%).
    data = shapes.make_dataset(PICTURES, HELD_OUT_SEED, held_out=True)
    if jpeg_quality:
        data = [shapes.ShapeSample(p.scene, shapes.as_jpeg(p.image, jpeg_quality)) for p in data]
    scores = accuracy(SHIPPED, data, max_new_tokens=NEW_TOKENS)
    print(f"held-out generator, {PICTURES} pictures, JPEG quality {jpeg_quality}: {scores}")
    assert all(value >= 0.97 for value in scores.values()), scores


def test_both_generators_draw_the_same_pictures_from_a_seed_and_keep_their_ranges():
    assert [p.png() for p in shapes.make_dataset(6, 5)] == [p.png() for p in shapes.make_dataset(6, 5)]
    held_out = shapes.make_dataset(60, 5, held_out=True)
    assert [p.png() for p in held_out[:6]] == [p.png() for p in shapes.make_dataset(6, 5, held_out=True)]
    for picture in held_out:
        short, long = sorted(picture.image.size)
        assert (
            shapes.HELD_OUT_CANVAS[0]
            <= short
            <= long
            <= min(shapes.HELD_OUT_CANVAS[1], round(short * shapes.HELD_OUT_MAX_ASPECT))
        )
    for picture in shapes.make_dataset(60, 5):
        short, long = sorted(picture.image.size)
        assert shapes.CANVAS[0] <= short <= long <= min(shapes.CANVAS[1], shapes.MAX_ASPECT * short)
    # every scene of both generators: counts, colours and shapes all drawn
    scenes = {(p.scene.count, p.scene.color, p.scene.shape) for p in held_out}
    assert {s[0] for s in scenes} == {1, 2, 3} and len({s[1] for s in scenes}) == len(shapes.COLORS)


def test_transformers_generates_the_same_ids(pictures):
    ours_processor = InstructBlipProcessor.from_pretrained(SHIPPED)
    ours = InstructBlipForConditionalGeneration.from_pretrained(SHIPPED)
    theirs_processor = transformers.InstructBlipProcessor.from_pretrained(str(SHIPPED))
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(SHIPPED)).eval()
    images = [p.image for p in pictures[:8]]
    for prompt in shapes.INSTRUCTIONS:  # one prompt per batch: both processors build the same unpadded inputs
        inputs = ours_processor(images=images, text=prompt)
        expected = theirs_processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        for key, value in inputs.items():
            assert torch.equal(value, expected[key]), key
    # every instruction about each picture in one left-padded batch, as the pipeline sends them
    prompts = list(shapes.INSTRUCTIONS)
    batch = ours_processor(images=[image for image in images for _ in prompts], text=prompts * len(images))
    with torch.no_grad():
        expected_ids = theirs.generate(**batch, max_new_tokens=NEW_TOKENS)
    got_ids = ours.generate(**batch, max_new_tokens=NEW_TOKENS)
    assert got_ids.tolist() == expected_ids.tolist()
    answers = ours_processor.batch_decode(got_ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(set(answers[: len(prompts)])) == len(prompts)  # one picture, four instructions, four answers


def scene_of_sample(stem: str) -> shapes.ShapeScene:
    """The sample images are named its pictures by what they show: "three-purple-squares", "red-circle"."""
    words = stem.split("-")
    count = shapes.COUNT_WORDS.index(words[0]) + 1 if words[0] in shapes.COUNT_WORDS else 1
    return shapes.ShapeScene(words[-2], words[-1].removesuffix("s"), count)


def test_demo_uses_the_shipped_model_and_answers_right(ray_local, tmp_path, capsys):
    assert DEMO_MODEL == SHIPPED
    assert run_demo(tmp_path, None, max_new_tokens=NEW_TOKENS) == 0
    assert str(SHIPPED) in capsys.readouterr().out
    expected = {path.stem: scene_of_sample(path.stem) for path in SAMPLE_IMAGES.glob("*.png")}
    captions = {row["name"]: row["text"] for row in read_output(str(tmp_path / "captions")).to_pylist()}
    assert {name: shapes.parse_caption(text) for name, text in captions.items()} == expected
    wide = pq.read_table(tmp_path / "annotations.wide.parquet").to_pylist()
    assert {row["name"]: {k: row[k] for k in shapes.QUESTIONS} for row in wide} == {
        name: scene.answers for name, scene in expected.items()
    }


def test_training_script_trains_and_saves_what_both_libraries_load(tmp_path):
    result = train(tmp_path / "model", TrainConfig(steps=30, batch_images=4, warmup_steps=3), log=lambda line: None)
    assert result.last_loss < result.first_loss - 1.0, result
    # same architecture and tokenizers as the shipped checkpoint (the files are made the same way)
    for name in ("config.json", "tokenizer.json", "qformer_tokenizer/tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "model" / name).read_text() == (SHIPPED / name).read_text(), name
    processor = InstructBlipProcessor.from_pretrained(tmp_path / "model")
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "model")
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(tmp_path / "model")).eval()
    inputs = processor(images=Image.new("RGB", (90, 70), (240, 240, 235)), text=shapes.QUESTIONS["color"])
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-4)


def test_train_demo_command(tmp_path, capsys):
    assert main(["train-demo", "--output", str(tmp_path / "model"), "--steps", "2", "--evaluate", "4"]) == 0
    out = capsys.readouterr().out
    assert "trained in" in out and "accuracy on 4 new pictures" in out
    assert "accuracy on 4 held-out generator pictures (seed 0)" in out
    assert InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "model").config.num_query_tokens == 8
