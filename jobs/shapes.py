"""Synthetic shapes: pictures of one to three copies of a coloured shape, with their caption and answers.

The data of the small model that ships in jobs/demo_data/shapes-instructblip. Every picture is drawn from a seed, so a
data set is the same on every machine; canvas sizes, backgrounds, shape sizes, positions and colour shades vary from
picture to picture so that a model has to read the shapes rather than remember pixels. Two generators: `samples`
(training) and `held_out_samples`, which draws with other parameters, so that a model can be checked on pictures
unlike any it was trained on.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import PIL.Image
import PIL.ImageChops
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
# Least RGB distance between a background and the shape colour: never a shape that fades into its background.
MIN_CONTRAST = 110

# The model's processor squashes every picture to INPUT_SIZE x INPUT_SIZE pixels: what a model can tell apart is
# measured there.
INPUT_SIZE = 64

# Training pictures: width and height each 64-256 px, one at most MAX_ASPECT times the other (the squash to the
# model input then turns a circle into an ellipse at most twice as wide as high).
CANVAS = (64, 256)
MAX_ASPECT = 2.0
SHAPE_SIDE = (0.16, 0.40)  # a shape's side, as a fraction of the picture's short side ...
MIN_INPUT_SIDE = 6  # ... and at least this many input pixels across
# Shapes at least this fraction of the picture's width apart side by side, or of its height one above the other:
# 6 input pixels either way (a gap of a tenth of the short side shrinks to 3 along a long side, and two squares in
# a row then read as one).
GAP = 0.1
GRADIENTS = 0.4  # the share of training backgrounds that shade from one colour to a near one across the picture
# The share of training pictures saved as JPEG (at a quality drawn from JPEG_QUALITY) and read back: images in the
# wild are mostly JPEGs, whose block artefacts a model that only saw clean pixels miscounts.
JPEG_SHARE = 0.3
JPEG_QUALITY = (40, 95)

# The held-out generator (draw_held_out_scene), with parameters training never uses: near-square pictures, a
# gradient between two independent tints under pixel noise, anti-aliased shapes of a narrower size range.
HELD_OUT_CANVAS = (96, 224)  # the short side; the long one at most HELD_OUT_MAX_ASPECT times it, within the range
HELD_OUT_MAX_ASPECT = 1.2
HELD_OUT_SHAPE_SIDE = (0.18, 0.32)  # a shape's side, as a fraction of the short side
HELD_OUT_GAP = 0.125  # shapes at least this fraction of the short side apart
HELD_OUT_NOISE = 6  # each pixel's channels shifted by up to this much

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
        """ "a blue square", "an orange circle", "two red circles", "three green triangles"."""
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


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    return r, g, b


def _contrasts(background: tuple[int, int, int], fill: tuple[int, int, int]) -> bool:
    return math.dist(background, fill) >= MIN_CONTRAST


def _boxes(
    rng: random.Random, count: int, width: int, height: int, sides: tuple[int, int], space: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """`count` non-overlapping square boxes (x, y, side), sides in the `sides` range of pixels, anywhere inside the
    picture, at least space[0] pixels apart side by side or space[1] one above the other."""
    while True:  # a handful of tries at most: three of the largest boxes fit in two rows
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200):
            side = rng.randint(*sides)
            x, y = rng.randint(1, width - side - 1), rng.randint(1, height - side - 1)
            if all(
                x + side + space[0] <= bx
                or bx + bs + space[0] <= x
                or y + side + space[1] <= by
                or by + bs + space[1] <= y
                for bx, by, bs in boxes
            ):
                boxes.append((x, y, side))
                if len(boxes) == count:
                    return boxes


def _draw(
    draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int], fill: int | tuple[int, int, int]
) -> None:
    x, y, side = box
    if shape == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + side, y + side), fill=fill)
    else:  # an upright triangle filling the box's width and height
        draw.polygon([(x + side / 2, y), (x + side, y + side), (x, y + side)], fill=fill)


def _canvas(rng: random.Random) -> tuple[int, int]:
    """Training: width and height each drawn from CANVAS, redrawn while one is over MAX_ASPECT times the other."""
    while True:
        width, height = rng.randint(*CANVAS), rng.randint(*CANVAS)
        if max(width, height) <= MAX_ASPECT * min(width, height):
            return width, height


def _background(rng: random.Random, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Training: a plain light grey (30%), a pastel of any hue (55%) or a mid-dark tint of any hue (15%), drawn
    again until it contrasts with the shape colour. Saturation stays at most 0.35: no background reads as one of
    the named colours."""
    while True:
        kind = rng.random()
        if kind < 0.30:
            level = rng.randint(190, 252)
            background = _jitter((level, level, level), rng, 8)
        elif kind < 0.85:
            background = _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.75, 1.0))
        else:
            background = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.45))
        if _contrasts(background, fill):
            return background


def _gradient(
    rng: random.Random, size: tuple[int, int], start: tuple[int, int, int], end: tuple[int, int, int]
) -> PIL.Image.Image:
    """A picture shading from `start` to `end`, top to bottom, left to right or the other way round."""
    ramp = PIL.Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize(size)
    return PIL.Image.composite(PIL.Image.new("RGB", size, end), PIL.Image.new("RGB", size, start), ramp)


def draw_scene(scene: ShapeScene, rng: random.Random) -> PIL.Image.Image:
    """A training picture of `scene`: hard-edged shapes on a plain or gently shaded background, everything drawn
    from `rng`."""
    width, height = _canvas(rng)
    fill = _jitter(COLORS[scene.color], rng, COLOR_JITTER)
    background = _background(rng, fill)
    if rng.random() < GRADIENTS:
        end = _jitter(background, rng, 40)
        image = _gradient(rng, (width, height), background, end if _contrasts(end, fill) else background)
    else:
        image = PIL.Image.new("RGB", (width, height), background)
    short, long = min(width, height), max(width, height)
    sides = (max(int(SHAPE_SIDE[0] * short), math.ceil(MIN_INPUT_SIDE * long / INPUT_SIZE)), int(SHAPE_SIDE[1] * short))
    space = (round(GAP * width), round(GAP * height))
    draw = PIL.ImageDraw.Draw(image)
    for box in _boxes(rng, scene.count, width, height, sides, space):
        _draw(draw, scene.shape, box, fill)
    if rng.random() < JPEG_SHARE:
        image = as_jpeg(image, rng.randint(*JPEG_QUALITY))
    return image


def as_jpeg(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    """`image` saved as JPEG at `quality` and read back: the same picture with JPEG's block artefacts."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return PIL.Image.open(buffer).convert("RGB")


def _held_out_tint(rng: random.Random, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random RGB colour mixed with 70-90% white (not an HSV draw as in training), contrasting with `fill`."""
    while True:
        white = rng.uniform(0.70, 0.90)
        r, g, b = (round(255 * white + rng.randint(0, 255) * (1 - white)) for _ in range(3))
        if _contrasts((r, g, b), fill):
            return r, g, b


def draw_held_out_scene(scene: ShapeScene, rng: random.Random) -> PIL.Image.Image:
    """A picture of `scene` as another generator would draw it (see HELD_OUT_*): a near-square canvas, a gradient
    between two tints with pixel noise, smaller anti-aliased shapes further apart."""
    short = rng.randint(*HELD_OUT_CANVAS)
    long = min(HELD_OUT_CANVAS[1], round(short * rng.uniform(1.0, HELD_OUT_MAX_ASPECT)))
    width, height = (short, long) if rng.random() < 0.5 else (long, short)
    fill = _jitter(COLORS[scene.color], rng, COLOR_JITTER)
    image = _gradient(rng, (width, height), _held_out_tint(rng, fill), _held_out_tint(rng, fill))
    noise = PIL.Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    noise = noise.point(lambda v: v * (2 * HELD_OUT_NOISE + 1) // 256)
    image = PIL.ImageChops.add(image, noise, offset=-HELD_OUT_NOISE)
    # anti-aliased edges: the shapes' mask is drawn at 4x and scaled down
    mask = PIL.Image.new("L", (4 * width, 4 * height), 0)
    draw = PIL.ImageDraw.Draw(mask)
    sides = (int(HELD_OUT_SHAPE_SIDE[0] * short), int(HELD_OUT_SHAPE_SIDE[1] * short))
    space = max(2, int(HELD_OUT_GAP * short))
    for x, y, side in _boxes(rng, scene.count, width, height, sides, (space, space)):
        _draw(draw, scene.shape, (4 * x, 4 * y, 4 * side), 255)
    image.paste(fill, mask=mask.resize((width, height), PIL.Image.Resampling.BOX))
    return image


def random_scene(rng: random.Random) -> ShapeScene:
    return ShapeScene(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 3))


def samples(seed: int) -> Iterator[ShapeSample]:
    """An endless stream of training pictures, the same for the same seed."""
    rng = random.Random(seed)
    while True:
        scene = random_scene(rng)
        yield ShapeSample(scene, draw_scene(scene, rng))


def held_out_samples(seed: int) -> Iterator[ShapeSample]:
    """An endless stream of held-out pictures (`draw_held_out_scene`), the same for the same seed. The generator is
    seeded with a string, so no seed gives a stream that shares random draws with `samples`."""
    rng = random.Random(f"held-out/{seed}")
    while True:
        scene = random_scene(rng)
        yield ShapeSample(scene, draw_held_out_scene(scene, rng))


def make_dataset(count: int, seed: int, held_out: bool = False) -> list[ShapeSample]:
    """The first `count` pictures of `samples(seed)`, or of `held_out_samples(seed)`."""
    stream = held_out_samples(seed) if held_out else samples(seed)
    return [next(stream) for _ in range(count)]


def corpus() -> str:
    """Every instruction and answer the model sees, one per line: the text its tokenizers are trained on."""
    scenes = [ShapeScene(c, s, n) for c in COLORS for s in SHAPES for n in (1, 2, 3)]
    lines = list(INSTRUCTIONS)
    lines += sorted({text for scene in scenes for text in (scene.caption, *scene.answers.values())})
    return "\n".join(lines) + "\n"
