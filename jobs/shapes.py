"""Synthetic shapes: pictures of one to three copies of a coloured shape, with their caption and answers.

The data of the small model that ships in jobs/demo_data/shapes-instructblip. Every picture is drawn from a seed, so a
data set is the same on every machine; sizes, positions, background tints and colour shades vary from picture
to picture so that a model has to read the shapes rather than remember pixels.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

import PIL.Image
import PIL.ImageDraw

# Base RGB of each colour; a picture's shade is within COLOR_JITTER of it on every channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 170),
    "orange": (240, 140, 30),
}
COLOR_JITTER = 20
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")

CAPTION_PROMPT = "A short image caption:"
# question_id -> question, in the order `blipbatch demo` and the tests ask them.
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
}
# Everything the model is trained to answer, in the order of ShapeScene.targets().
INSTRUCTIONS: tuple[str, ...] = (CAPTION_PROMPT, *QUESTIONS.values())


@dataclass(frozen=True)
class ShapeScene:
    """What a picture shows: `count` copies of one `shape` in one `color`."""

    color: str
    shape: str
    count: int

    @property
    def caption(self) -> str:
        """"a blue square", "an orange circle", "two red circles", "three green triangles"."""
        if self.count == 1:
            return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.color} {self.shape}"
        return f"{COUNT_WORDS[self.count - 1]} {self.color} {self.shape}s"

    @property
    def answers(self) -> dict[str, str]:
        """question_id -> the answer to QUESTIONS[question_id]."""
        return {"color": self.color, "shape": self.shape, "count": COUNT_WORDS[self.count - 1]}

    def targets(self) -> dict[str, str]:
        """Every instruction of INSTRUCTIONS -> its answer."""
        return {CAPTION_PROMPT: self.caption} | {QUESTIONS[k]: v for k, v in self.answers.items()}


@dataclass(frozen=True)
class ShapeSample:
    scene: ShapeScene
    image: PIL.Image.Image

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def parse_caption(text: str) -> ShapeScene | None:
    """The scene a caption names ("two red circles" -> ShapeScene("red", "circle", 2)), or None when it names no
    single count, colour and shape."""
    words = text.lower().replace(".", " ").split()
    counts = [i + 1 for i, w in enumerate(COUNT_WORDS) if w in words] + ([1] if {"a", "an"} & set(words) else [])
    colors = [c for c in COLORS if c in words]
    kinds = [s for s in SHAPES if s in words or s + "s" in words]
    if len(counts) != 1 or len(colors) != 1 or len(kinds) != 1:
        return None
    return ShapeScene(colors[0], kinds[0], counts[0])


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def _boxes(rng: random.Random, count: int, width: int, height: int) -> list[tuple[int, int, int]]:
    """`count` non-overlapping square boxes (x, y, side), a gap apart, inside the picture."""
    short = min(width, height)
    gap = short // 10  # 5-8 pixels of the 64x64 model input: shapes stay apart
    while True:  # a handful of tries at most: three boxes of at most a third of the short side always fit
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200):
            side = rng.randint(int(0.2 * short), int(0.34 * short))
            x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
            if all(x + side + gap <= bx or bx + bs + gap <= x or y + side + gap <= by or by + bs + gap <= y
                   for bx, by, bs in boxes):
                boxes.append((x, y, side))
                if len(boxes) == count:
                    return boxes


def _draw(draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int], fill: tuple[int, int, int]) -> None:
    x, y, side = box
    if shape == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:  # an upright triangle filling the box's width and height
        draw.polygon([(x + side / 2, y), (x + side, y + side), (x, y + side)], fill=fill)


def draw_scene(scene: ShapeScene, rng: random.Random) -> PIL.Image.Image:
    """A picture of `scene` on a plain light background, positions, sizes and shades drawn from `rng`."""
    width, height = rng.randint(120, 200), rng.randint(100, 150)
    light = rng.randint(215, 250)
    background = _jitter((light, light, light), rng, 8)
    image = PIL.Image.new("RGB", (width, height), background)
    draw = PIL.ImageDraw.Draw(image)
    fill = _jitter(COLORS[scene.color], rng, COLOR_JITTER)
    for box in _boxes(rng, scene.count, width, height):
        _draw(draw, scene.shape, box, fill)
    return image


def random_scene(rng: random.Random) -> ShapeScene:
    return ShapeScene(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 3))


def samples(seed: int) -> Iterator[ShapeSample]:
    """An endless stream of pictures, the same for the same seed."""
    rng = random.Random(seed)
    while True:
        scene = random_scene(rng)
        yield ShapeSample(scene, draw_scene(scene, rng))


def make_dataset(count: int, seed: int) -> list[ShapeSample]:
    """The first `count` pictures of `samples(seed)`."""
    stream = samples(seed)
    return [next(stream) for _ in range(count)]


def corpus() -> str:
    """Every instruction and answer the model sees, one per line: the text its tokenizers are trained on."""
    scenes = [ShapeScene(c, s, n) for c in COLORS for s in SHAPES for n in (1, 2, 3)]
    lines = list(INSTRUCTIONS)
    lines += sorted({text for scene in scenes for text in (scene.caption, *scene.answers.values())})
    return "\n".join(lines) + "\n"
