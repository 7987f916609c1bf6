"""Closed-set questions through the whole pipeline with the shipped demo model, and their job-spec checks."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from blipbatch import pipeline
from blipbatch.jobs import shapes
from blipbatch.jobs.spec import SpecError, load_spec
from blipbatch.jobs.train import HELD_OUT_SEED
from blipbatch.model import InstructBlipForConditionalGeneration, InstructBlipProcessor
from blipbatch.model.candidates import ClosedSet
from blipbatch.pipeline.job import PipelineError, job_from_keywords
from blipbatch.pipeline.manifest import ManifestMismatch, read_manifest, recorded_job
from blipbatch.pipeline.sink import read_output

SHIPPED = Path(__file__).resolve().parents[1] / "jobs" / "demo_data" / "shapes-instructblip"
PICTURES = 60
CANDIDATES = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES), "count": list(shapes.COUNT_WORDS)}
# Prompt plus candidate longer than the demo model's 256 positions: every row of it is an invalid_input error.
TOO_LONG = ["red " * 300, "blue"]


def closed_sets() -> dict[str, ClosedSet]:
    ranked = {f"{key}_ranked": ClosedSet(tuple(CANDIDATES[key]), "sum") for key in shapes.QUESTIONS}
    return ranked | {"too_long": ClosedSet(tuple(TOO_LONG))}


def questions() -> dict[str, str]:
    ranked = {f"{key}_ranked": question for key, question in shapes.QUESTIONS.items()}
    return dict(shapes.QUESTIONS) | ranked | {"too_long": shapes.QUESTIONS["color"]}


@pytest.fixture(scope="module")
def pictures() -> list[shapes.ShapeSample]:
    return shapes.make_dataset(PICTURES, HELD_OUT_SEED, held_out=True)  # the generator training never used


@pytest.fixture(scope="module")
def run_output(ray_local, pictures, tmp_path_factory):
    """(rows by (picture id, question id), summary, output folder, input folder) of one annotate run that asks the
    free and the closed-set questions of every picture."""
    root = tmp_path_factory.mktemp("closed-set")
    (root / "in").mkdir()
    table = pa.table(
        {"key": [f"pic-{i}" for i in range(len(pictures))], "image": pa.array([p.png() for p in pictures], pa.binary())}
    )
    pq.write_table(table, root / "in" / "pictures.parquet")
    summary = pipeline.run(
        str(root / "in"),
        str(root / "out"),
        str(SHIPPED),
        prompt=questions(),
        closed_sets=closed_sets(),
        image_column="image",
        id_column="key",
        max_new_tokens=6,
        batch_size=32,
        progress=False,
    )
    rows = {(row["id"], row["question_id"]): row for row in read_output(str(root / "out")).to_pylist()}
    return rows, summary, root / "out", root / "in"


@pytest.mark.slow
def test_ranking_is_at_least_as_accurate_as_free_generation(pictures, run_output):
    rows, summary, _, _ = run_output
    assert summary.units_failed == 0
    # one vision pass per picture for its seven questions, free and closed-set alike
    assert summary.images_encoded == PICTURES
    for key in shapes.QUESTIONS:
        truth = [p.scene.answers[key] for p in pictures]
        free = sum(rows[(f"pic-{i}", key)]["text"] == t for i, t in enumerate(truth)) / PICTURES
        ranked = sum(rows[(f"pic-{i}", f"{key}_ranked")]["text"] == t for i, t in enumerate(truth)) / PICTURES
        print(f"{key}: free {free:.3f}, ranked {ranked:.3f}")
        assert ranked >= free and ranked >= 0.95, (key, free, ranked)


@pytest.mark.slow
def test_ranking_keeps_up_where_free_generation_errs(pictures):
    # As JPEGs at quality 10 the model miscounts some of these pictures (52 of 60 counts right when this was written,
    # free and ranked alike); ranking must not do worse on any question. Through the model API, no pipeline.
    processor = InstructBlipProcessor.from_pretrained(SHIPPED)
    model = InstructBlipForConditionalGeneration.from_pretrained(SHIPPED)
    images = [shapes.as_jpeg(p.image, 10) for p in pictures]
    for key, question in shapes.QUESTIONS.items():
        inputs = processor(images=images, text=question)
        ids = model.generate(**inputs, max_new_tokens=6)
        free = [
            a.strip() for a in processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        scores = model.score_candidates(CANDIDATES[key], processor.tokenizer, **inputs)
        ranked = [CANDIDATES[key][i] for i in scores.argmax(1).tolist()]
        truth = [p.scene.answers[key] for p in pictures]
        right_free, right_ranked = (sum(a == t for a, t in zip(answers, truth)) for answers in (free, ranked))
        print(f"JPEG q10 {key}: free {right_free}/{PICTURES}, ranked {right_ranked}/{PICTURES}")
        assert right_ranked >= right_free


def test_every_text_is_a_candidate_and_scores_are_probabilities(run_output):
    rows, _, _, _ = run_output
    for key in shapes.QUESTIONS:
        for i in range(PICTURES):
            row = rows[(f"pic-{i}", f"{key}_ranked")]
            assert row["status"] == "ok" and row["text"] in CANDIDATES[key]
            logprobs = row["candidate_logprobs"]
            assert len(logprobs) == len(CANDIDATES[key]) and all(v <= 0 for v in logprobs)
            probabilities = [math.exp(v - max(logprobs)) for v in logprobs]
            probabilities = [p / sum(probabilities) for p in probabilities]
            assert abs(sum(probabilities) - 1) < 1e-12 and all(0 <= p <= 1 for p in probabilities)
            best = max(range(len(logprobs)), key=logprobs.__getitem__)
            assert row["text"] == CANDIDATES[key][best] and 0 < row["score"] <= 1
            assert abs(row["score"] - probabilities[best]) < 1e-12
            free = rows[(f"pic-{i}", key)]
            assert free["candidate_logprobs"] is None and free["score"] <= 0  # free: mean token log-probability


def test_prompt_and_candidate_too_long_is_that_rows_error(run_output):
    rows, summary, _, _ = run_output
    errors = [rows[(f"pic-{i}", "too_long")] for i in range(PICTURES)]
    assert all(r["status"] == "error" and r["error_kind"] == "invalid_input" for r in errors)
    assert all(r["text"] is None and r["score"] is None and r["candidate_logprobs"] is None for r in errors)
    assert "'too_long'" in errors[0]["error"] and "this model takes 256" in errors[0]["error"]
    assert summary.rows_error == PICTURES


@pytest.mark.slow
def test_logprobs_equal_transformers_forward_with_labels(pictures, run_output):
    rows, _, _, _ = run_output
    processor = InstructBlipProcessor.from_pretrained(SHIPPED)
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(str(SHIPPED)).eval()
    eos = processor.tokenizer.eos_token_id
    for i in (0, 1):
        inputs = processor(images=pictures[i].image, text=shapes.QUESTIONS["color"])
        for candidate, got in zip(CANDIDATES["color"], rows[(f"pic-{i}", "color_ranked")]["candidate_logprobs"]):
            target = torch.tensor([processor.tokenizer.encode(candidate, add_special_tokens=False) + [eos]])
            ids = torch.cat([inputs["input_ids"], target], dim=1)
            labels = torch.cat([torch.full_like(inputs["input_ids"], -100), target], dim=1)
            with torch.no_grad():
                loss = theirs(
                    **(inputs | {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), labels=labels
                ).loss
            assert abs(got - (-loss.item() * target.shape[1])) <= 1e-4, (i, candidate)


def test_manifest_records_the_candidates_and_a_resume_must_match(run_output):
    _, _, out, inputs = run_output
    recorded = read_manifest(str(out)).closed_sets
    assert recorded["color_ranked"] == {"candidates": CANDIDATES["color"], "scoring": "sum"}
    assert recorded_job(read_manifest(str(out)), str(out)).closed_sets == closed_sets()  # status, retry-failed
    changed = closed_sets() | {"color_ranked": ClosedSet(tuple(CANDIDATES["color"]), "mean")}
    with pytest.raises(ManifestMismatch, match="closed_sets.color_ranked.scoring"):
        pipeline.run(
            str(inputs),
            str(out),
            str(SHIPPED),
            prompt=questions(),
            closed_sets=changed,
            image_column="image",
            id_column="key",
            max_new_tokens=6,
            batch_size=32,
            progress=False,
        )


@pytest.mark.slow
def test_outputs_without_closed_sets_keep_their_schema(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    picture = shapes.make_dataset(1, HELD_OUT_SEED, held_out=True)[0]
    pq.write_table(pa.table({"image": pa.array([picture.png()], pa.binary())}), tmp_path / "in" / "one.parquet")
    pipeline.run(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        str(SHIPPED),
        prompt=dict(shapes.QUESTIONS),
        image_column="image",
        max_new_tokens=6,
        progress=False,
    )
    assert "candidate_logprobs" not in read_output(str(tmp_path / "out")).column_names
    assert read_manifest(str(tmp_path / "out")).closed_sets is None


SPEC = """\
[job]
kind = "annotate"

[input]
path = "in/"

[output]
path = "out/"

[model]
path = "{model}"

[questions]
caption = "A short image caption:"

[questions.color]
question = "What color is the shape?"
{extra}
"""


def spec_error(tmp_path: Path, extra: str, model: Path = SHIPPED, overrides: dict | None = None) -> str:
    path = tmp_path / "job.toml"
    path.write_text(SPEC.format(model=model, extra=extra))
    with pytest.raises(SpecError) as caught:
        load_spec(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("candidates = []", "job.toml:18: [questions.color] candidates: empty"),
        ('candidates = ["red"]', "job.toml:18: [questions.color] candidates: only one candidate"),
        ('candidates = ["red", "blue", "red"]', "job.toml:18: [questions.color] candidates: 'red' is listed more"),
        ('candidates = ["red", 3]', "job.toml:18: [questions.color] candidates: candidate 2 is not a string"),
        ('candidates = ["red", " "]', "job.toml:18: [questions.color] candidates: candidate 2 is blank"),
        ('candidates = "red"', "job.toml:18: [questions.color] candidates: expected an array"),
        (
            'candidates = ["red", "blue"]\nscoring = "max"',
            'job.toml:19: [questions.color] scoring: expected one of "sum"',
        ),
        (
            'candidate = ["red", "blue"]',
            "job.toml:18: [questions.color] candidate: unknown key; did you mean candidates?",
        ),
        ('scoring = "sum"', "job.toml:18: [questions.color] scoring: only a question with candidates is scored"),
    ],
)
def test_bad_candidates_are_refused_with_file_line_and_question(tmp_path, extra, message):
    assert message in spec_error(tmp_path, extra)


def test_more_candidates_than_the_limit_are_refused(tmp_path):
    many = "candidates = [" + ", ".join(f'"c{i}"' for i in range(257)) + "]"
    assert "job.toml:18: [questions.color] candidates: 257 candidates, more than the limit of 256" in spec_error(
        tmp_path, many
    )
    path = tmp_path / "job.toml"
    spec = load_spec(path, {"run.max_candidates": 300})  # the limit is a setting
    assert len(spec.closed_sets["color"].candidates) == 257
    assert "limit of 3" in spec_error(
        tmp_path, 'candidates = ["a", "b", "c", "d"]', overrides={"run.max_candidates": 3}
    )


def test_a_question_table_without_question_is_refused(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        SPEC.format(model=SHIPPED, extra="").replace(
            'question = "What color is the shape?"\n', 'candidates = ["red", "blue"]\n'
        )
    )
    with pytest.raises(SpecError, match=r"job.toml:16: \[questions.color\] question: missing"):
        load_spec(path)


def test_a_candidate_the_tokenizer_drops_is_refused(tmp_path):
    import tokenizers

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1}, []))  # no unk: other text vanishes
    backend.save(str(model / "tokenizer.json"))
    message = spec_error(tmp_path, 'candidates = ["ab", "€"]', model=model)
    assert 'job.toml:18: [questions.color] candidates: "€" tokenizes to nothing' in message


def test_spec_flags_and_python_api_reach_the_same_job(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(SPEC.format(model=SHIPPED, extra='candidates = ["red", "blue"]\nscoring = "mean"'))
    from_file = load_spec(path)
    assert from_file.closed_sets == {"color": ClosedSet(("red", "blue"), "mean")}
    assert from_file.questions == {"caption": "A short image caption:", "color": "What color is the shape?"}
    # --set reaches a question's keys, and turns a plain question into a closed-set one
    overridden = load_spec(path, {"questions.caption.candidates": ["yes", "no"], "questions.color.scoring": "sum"})
    assert overridden.closed_sets == {"caption": ClosedSet(("yes", "no")), "color": ClosedSet(("red", "blue"))}
    assert overridden.instructions["caption"] == "A short image caption:"
    # the command line: --max-candidates and --set questions.NAME.KEY
    from blipbatch.jobs.cli import build_parser, flag_overrides

    args = build_parser().parse_args(
        ["run", str(path), "--max-candidates", "3", "--set", 'questions.color.candidates=["a", "b", "c", "d"]']
    )
    with pytest.raises(
        SpecError,
        match=r"\(override questions.color.candidates\): \[questions.color\] candidates: "
        "4 candidates, more than the limit of 3",
    ):
        load_spec(path, flag_overrides(args))
    job = job_from_keywords(
        "in", "out", str(SHIPPED), prompt={"color": "What color is the shape?"}, closed_sets={"color": ["red", "blue"]}
    )
    assert job.closed_sets == {"color": ClosedSet(("red", "blue"), "sum")}
    with pytest.raises(PipelineError, match="'shape' is not one of the questions"):
        job_from_keywords("in", "out", str(SHIPPED), prompt={"color": "?"}, closed_sets={"shape": ["a", "b"]})
    with pytest.raises(PipelineError, match="question 'color': only one candidate"):
        job_from_keywords("in", "out", str(SHIPPED), prompt={"color": "?"}, closed_sets={"color": ["a"]})


@pytest.mark.slow
def test_engine_ranks_beside_free_rows_with_one_vision_pass_and_halves_on_out_of_memory(tmp_path):
    from blipbatch.model.engine import Engine, EngineConfig
    from tests.tiny import write_tiny_checkpoint

    engine = Engine(
        EngineConfig(model=str(write_tiny_checkpoint(tmp_path)), device="cpu", generation={"max_new_tokens": 4})
    )
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rows, texts = [0, 1, 0, 1], ["what colour?", "a photo of", "which shape?", "what colour?"]
    closed = [
        ClosedSet(("red", "green", "blue")),
        None,
        ClosedSet(("circle", "square"), "mean"),
        ClosedSet(("red", "green", "blue")),
    ]
    got = engine.generate_scored(pixels, rows, texts, closed)
    assert engine.images_encoded == 2  # both images once, for the free and the closed-set rows
    assert got[1] == engine.generate_scored(pixels[1:], [0], ["a photo of"])[0]  # free rows as without ranking
    processor, model = engine.processor, engine.model
    for i in (0, 2, 3):
        with torch.no_grad():
            image_embeds = model.encode_images(pixels[rows[i] : rows[i] + 1])
        expected = model.score_candidates(
            list(closed[i].candidates),
            processor.tokenizer,
            image_embeds=image_embeds,
            **processor.encode_prompts([texts[i]]),
            scoring=closed[i].scoring,
        )[0]
        assert torch.allclose(torch.tensor(got[i].candidate_logprobs, dtype=torch.float64), expected, atol=1e-5)
        probabilities = torch.softmax(expected, 0)
        assert got[i].text == closed[i].candidates[int(probabilities.argmax())]
        assert abs(got[i].score - probabilities.max().item()) < 1e-6
    fitting, calls = engine._generate, []

    def small_memory(pixel_values, image_rows, instructions, closed_sets):
        calls.append(len(instructions))
        if len(instructions) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return fitting(pixel_values, image_rows, instructions, closed_sets)

    engine._generate = small_memory
    halved = engine.generate_scored(pixels, rows, texts, closed)
    assert calls == [4, 2, 2]
    assert [g.text for g in halved] == [g.text for g in got]
    for again, first in zip(halved, got):
        assert (again.candidate_logprobs is None) == (first.candidate_logprobs is None)
        if first.candidate_logprobs is not None:
            assert max(abs(a - b) for a, b in zip(again.candidate_logprobs, first.candidate_logprobs)) < 1e-5


def test_report_charts_each_candidates_wins_and_the_rows_thresholds_keep(run_output, tmp_path):
    from collections import Counter

    from blipbatch.jobs.report import write_report

    rows, _, out, _ = run_output
    page = Path(write_report(str(out), str(tmp_path / "report.html"), sample=0)).read_text()
    section = page[page.index('<section id="closed-set">') :]
    section = section[: section.index("</section>")]
    for key in shapes.QUESTIONS:
        answers = [rows[(f"pic-{i}", f"{key}_ranked")] for i in range(PICTURES)]
        wins = Counter(r["text"] for r in answers)
        part = section[section.index(f"<h3>{key}_ranked</h3>") :]
        for candidate in CANDIDATES[key]:  # one bar per candidate, in the spec's order, labelled with its wins
            bar = part[part.index(f">{candidate}</text>") :]
            assert bar[: bar.index(" rows</text>")].endswith(f">{wins[candidate]}"), (key, candidate)
        for threshold in (0.5, 0.9):
            kept = sum(r["score"] >= threshold for r in answers)
            assert f"<td>score &ge; {threshold}</td><td>{kept}</td>" in part
    too_long = section[section.index("<h3>too_long</h3>") :]
    assert "<td>score &ge; 0.5</td><td>0</td><td>-</td>" in too_long  # no ok rows: nothing to keep


def test_a_closed_set_row_needs_room_for_its_candidates_not_for_max_new_tokens(ray_local, tmp_path):
    """Per row, from the filled template: a prompt too long to generate max_new_tokens after is still ranked when
    it and its longest candidate fit the model's 256 positions; one that does not fit is that row's error only."""
    notes = {"short": "red " * 5, "medium": "red " * 180, "long": "red " * 260}
    (tmp_path / "in").mkdir()
    picture = shapes.make_dataset(1, HELD_OUT_SEED, held_out=True)[0].png()
    table = pa.table({"key": list(notes), "note": list(notes.values()), "image": [picture] * len(notes)})
    pq.write_table(table, tmp_path / "in" / "rows.parquet")
    question = "What color is the shape? {note}"
    summary = pipeline.run(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        str(SHIPPED),
        prompt={"free": question, "pick": question},
        closed_sets={"pick": ["red", "blue"]},
        image_column="image",
        id_column="key",
        max_new_tokens=100,  # free rows: 256 - 8 queries - 100 leaves 148 prompt tokens; "medium" has ~186
        progress=False,
    )
    rows = {(row["id"], row["question_id"]): row for row in read_output(str(tmp_path / "out")).to_pylist()}
    assert {key: row["status"] for key, row in rows.items()} == {
        ("short", "free"): "ok",
        ("short", "pick"): "ok",
        ("medium", "free"): "error",
        ("medium", "pick"): "ok",
        ("long", "free"): "error",
        ("long", "pick"): "error",
    }
    assert "this model takes at most 148 with 100 new tokens" in rows[("medium", "free")]["error"]
    assert rows[("medium", "pick")]["text"] in ("red", "blue")
    assert rows[("long", "pick")]["error"].startswith("question 'pick': the instruction (")
    assert "positions; this model takes 256" in rows[("long", "pick")]["error"]
    assert (summary.rows_ok, summary.rows_error) == (3, 3)
