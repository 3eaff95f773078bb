"""Random scenes of a few coloured shapes on a plain background, drawn with Pillow.

A scene is pure data (`Scene`): every question about it is answered from the data,
never from the pixels, so the answers are right by construction. `render` draws it
and, for training, also returns a per-pixel map of which shape covers each pixel.
Every scene has exactly one small shape (so "which shape is small?" has one answer)
and distinct colours (so "the red one" names one shape); kinds may repeat, which
gives the counting questions something to count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
# Far apart in RGB so that a 14 px patch of each is unambiguous; every name is one
# token of the project's tokenizer.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = ("large", "small")


@dataclass(frozen=True)
class SceneConfig:
    image_size: int = 336
    min_large: int = 1
    max_large: int = 4
    large_radius: tuple[int, int] = (28, 48)
    # 10-15 px radius: a small shape covers about 2 x 2 patches of 14 px, the regime
    # where a compressor that drops a few patches can lose the object entirely.
    small_radius: tuple[int, int] = (10, 15)
    gap: int = 6  # minimum pixels between two shapes' bounding circles
    margin: int = 4  # minimum pixels between a shape and the border


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    image_size: int

    @property
    def small(self) -> Shape:
        return next(s for s in self.shapes if s.size == "small")

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.shapes)


def sample_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """One scene; the same generator state always gives the same scene."""
    n_large = int(rng.integers(config.min_large, config.max_large + 1))
    colours = rng.permutation(len(COLOURS))[: n_large + 1]
    sizes = ["small"] + ["large"] * n_large
    placed: list[Shape] = []
    for colour, size in zip(colours, sizes):
        low, high = config.small_radius if size == "small" else config.large_radius
        kind = KINDS[int(rng.integers(len(KINDS)))]
        # Rejection sampling: with at most 5 shapes of radius <= 48 in 336 px a free
        # spot is found in a few tries; the bound only guards against a bad config.
        for _ in range(1000):
            radius = float(rng.uniform(low, high))
            lo, hi = radius + config.margin, config.image_size - radius - config.margin
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            if all(math.hypot(x - s.x, y - s.y) > radius + s.radius + config.gap for s in placed):
                break
        else:
            raise RuntimeError("no free spot for a shape: the scene config is too crowded")
        placed.append(Shape(kind, list(COLOURS)[int(colour)], size, x, y, radius))
    order = rng.permutation(len(placed))  # the small shape is not always drawn first
    # Greys only, dark to light: no background can be mistaken for a shape's colour.
    grey = int(rng.integers(40, 200))
    return Scene(tuple(placed[i] for i in order), (grey, grey, grey), config.image_size)


def _outline(shape: Shape) -> list[tuple[float, float]] | None:
    """Polygon vertices; None for a circle."""
    x, y, r = shape.x, shape.y, shape.radius
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        side = r / math.sqrt(2) * 1.15  # a little larger than inscribed: similar area to the circle
        return [(x - side, y - side), (x + side, y - side), (x + side, y + side), (x - side, y + side)]
    if shape.kind == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape.kind == "star":
        return [(x + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 y + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The RGB picture and a [H, W] uint8 map: 0 = background, i + 1 = scene.shapes[i]."""
    size = scene.image_size
    image = Image.new("RGB", (size, size), scene.background)
    owner = Image.new("L", (size, size), 0)
    draw, draw_owner = ImageDraw.Draw(image), ImageDraw.Draw(owner)
    for index, shape in enumerate(scene.shapes):
        colour = COLOURS[shape.colour]
        points = _outline(shape)
        for canvas, fill in ((draw, colour), (draw_owner, index + 1)):
            if points is None:
                box = [shape.x - shape.radius, shape.y - shape.radius,
                       shape.x + shape.radius, shape.y + shape.radius]
                canvas.ellipse(box, fill=fill)
            else:
                canvas.polygon(points, fill=fill)
    return image, np.asarray(owner)
