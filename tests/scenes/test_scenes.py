"""The scene generator: deterministic, and every answer agrees with the drawn pixels."""
from __future__ import annotations

import numpy as np
import pytest

from sparsezip_deploy.scenes.questions import CHANCE, SIDES, TYPES, ask, candidates, heldout, side
from sparsezip_deploy.scenes.scene import COLOURS, KINDS, render, sample_scene


def scenes(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_same_seed_same_scenes_and_pixels():
    a, b = scenes(3, 5), scenes(3, 5)
    assert a == b and a != scenes(4, 5)
    assert all(np.array_equal(np.asarray(render(x)[0]), np.asarray(render(y)[0])) for x, y in zip(a, b))


def test_heldout_is_fixed_and_balanced():
    first, again = heldout(per_type=5), heldout(per_type=5)
    assert first == again
    assert [e.question.type for e in first] == [t for t in TYPES for _ in range(5)]
    assert set(CHANCE) == set(TYPES)
    full = heldout()
    assert sum(e.question.small for e in full) >= len(full) // 3, "too few small-object questions"


@pytest.mark.parametrize("seed", range(40))
def test_answers_match_the_drawn_scene(seed):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    image, owner = render(scene)
    pixels = np.asarray(image)
    assert sum(s.size == "small" for s in scene.shapes) == 1
    assert len({s.colour for s in scene.shapes}) == len(scene.shapes)
    for index, shape in enumerate(scene.shapes):
        x, y = int(shape.x), int(shape.y)
        # The centre pixel carries the shape's colour and the shape's id in the owner map.
        assert tuple(pixels[y, x]) == COLOURS[shape.colour] and owner[y, x] == index + 1
    for question in [q for t in TYPES for q in candidates(scene, t, rng)]:
        words = question.text.rstrip("?").split()
        if question.type in ("colour", "small_colour"):
            (shape,) = [s for s in scene.shapes if s.kind == words[-1]
                        and (question.type == "colour" or s.size == "small")]
            assert tuple(pixels[int(shape.y), int(shape.x)]) == COLOURS[question.answer]
        elif question.type == "exists":
            colour, kind = words[-2:]
            present = any(s.colour == colour and s.kind == kind for s in scene.shapes)
            assert question.answer == ("Yes" if present else "No")
        elif question.type == "count":
            kind = words[2].rstrip("s")
            assert kind in KINDS and int(question.answer) == sum(s.kind == kind for s in scene.shapes)
        elif question.type == "position":
            (shape,) = [s for s in scene.shapes if s.name == " ".join(words[-2:])]
            assert question.answer in SIDES and question.answer == side(shape, scene.image_size)
            half = scene.image_size / 2
            on_side = {"left": shape.x < half, "right": shape.x > half, "top": shape.y < half,
                       "bottom": shape.y > half}
            assert on_side[question.answer]
        elif question.type == "small":
            assert question.answer == scene.small.kind and question.small
    assert [q.type for q in ask(scene, rng)] == [t for t in TYPES if candidates(scene, t, rng)]
