"""Questions with one-word answers about a `Scene`, and the fixed held-out set.

Types (each answer is a single token of the project's tokenizer):

| type | question | answers |
| --- | --- | --- |
| colour | What colour is the {kind}? (kind unique in the scene) | 6 colours |
| exists | Is there a {colour} {kind}? | Yes / No |
| count | How many {kind}s are there? | 0-5 |
| position | Where is the {colour} {kind}? (only when clearly on one side) | left / right / top / bottom |
| small | Which shape is small? | 4 kinds |
| small_colour | What colour is the small {kind}? | 6 colours |

`Question.small` marks questions about the small shape (all `small` and
`small_colour` ones, and `colour` / `exists` / `position` ones that name it): that is
where a compressor that drops patches can drop the answer with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import COLOURS, KINDS, Scene, SceneConfig, Shape, sample_scene

TYPES = ("colour", "exists", "count", "position", "small", "small_colour")
SIDES = ("left", "right", "top", "bottom")
# Chance of a guess uniform over the answers a type can have (what a model that
# ignored the image and knew only the answer set would score, at best by type).
CHANCE = {"colour": 1 / len(COLOURS), "exists": 1 / 2, "count": 1 / 6, "position": 1 / len(SIDES),
          "small": 1 / len(KINDS), "small_colour": 1 / len(COLOURS)}
HELDOUT_SEED = 20250501
HELDOUT_PER_TYPE = 50
# The large held-out set (1200 questions): its own seed, far from training's small integers,
# the calibration seed 7 and HELDOUT_SEED; tests check its scenes are disjoint from theirs.
HELDOUT_LARGE_SEED = 20251214
HELDOUT_LARGE_PER_TYPE = 200
HELDOUTS = {"large": (HELDOUT_LARGE_SEED, HELDOUT_LARGE_PER_TYPE), "small": (HELDOUT_SEED, HELDOUT_PER_TYPE)}
# POPE-style existence questions (see `pope`).
POPE_SEED = 20251215
POPE_PER_SPLIT = 150
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str
    small: bool


def side(shape: Shape, image_size: int) -> str | None:
    """left/right/top/bottom when the shape is clearly on that side of the centre, else None."""
    dx, dy = shape.x - image_size / 2, shape.y - image_size / 2
    # Off-centre by at least 15% of the image, and 10% further along one axis than the
    # other: a human would not hesitate about the answer.
    if max(abs(dx), abs(dy)) < 0.15 * image_size or abs(abs(dx) - abs(dy)) < 0.1 * image_size:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def candidates(scene: Scene, question_type: str, rng: np.random.Generator) -> list[Question]:
    """Every question of one type the scene supports (a random subset for `exists`)."""
    shapes, small = scene.shapes, scene.small
    if question_type == "colour":
        return [Question("colour", f"What colour is the {s.kind}?", s.colour, s.size == "small")
                for s in shapes if scene.count(s.kind) == 1]
    if question_type == "exists":
        present = {(s.colour, s.kind): s for s in shapes}
        shape = shapes[int(rng.integers(len(shapes)))]
        yes = Question("exists", f"Is there a {shape.colour} {shape.kind}?", "Yes", shape.size == "small")
        # The absent pair shares a word with a present shape (its colour or its kind),
        # so that "No" needs colour and kind bound together, not either one alone.
        absent = ([(shape.colour, k) for k in KINDS] + [(c, shape.kind) for c in COLOURS])
        absent = [pair for pair in absent if pair not in present]
        colour, kind = absent[int(rng.integers(len(absent)))]
        no = Question("exists", f"Is there a {colour} {kind}?", "No", shape.size == "small")
        return [yes, no]
    if question_type == "count":
        return [Question("count", f"How many {k}s are there?", str(scene.count(k)),
                         scene.count(k) > 0 and small.kind == k) for k in KINDS]
    if question_type == "position":
        return [Question("position", f"Where is the {s.name}?", where, s.size == "small")
                for s in shapes if (where := side(s, scene.image_size)) is not None]
    if question_type == "small":
        return [Question("small", "Which shape is small?", small.kind, True)]
    if question_type == "small_colour":
        return [Question("small_colour", f"What colour is the small {small.kind}?", small.colour, True)]
    raise ValueError(f"unknown question type {question_type!r}; expected one of {TYPES}")


def ask(scene: Scene, rng: np.random.Generator, types: tuple[str, ...] = TYPES) -> list[Question]:
    """One question per type in `types` that the scene supports, in `types` order."""
    picked = []
    for question_type in types:
        options = candidates(scene, question_type, rng)
        if options:
            picked.append(options[int(rng.integers(len(options)))])
    return picked


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: Question


def heldout(per_type: int = HELDOUT_PER_TYPE, seed: int = HELDOUT_SEED,
            config: SceneConfig = SceneConfig()) -> list[Example]:
    """The evaluation set: `per_type` questions of each type, each on its own scene.

    Its seed is far from the small integers training runs use, and its scenes are
    drawn from a separate generator, so no training stream reproduces them.
    """
    rng = np.random.default_rng(seed)
    examples = []
    for question_type in TYPES:
        while sum(e.question.type == question_type for e in examples) < per_type:
            scene = sample_scene(rng, config)
            options = candidates(scene, question_type, rng)
            if options:
                examples.append(Example(scene, options[int(rng.integers(len(options)))]))
    return examples


def objects(scene: Scene) -> set[tuple[str, str]]:
    """The (colour, kind) pairs present: POPE's objects in a scene."""
    return {(s.colour, s.kind) for s in scene.shapes}


def pope(per_split: int = POPE_PER_SPLIT, seed: int = POPE_SEED,
         config: SceneConfig = SceneConfig()) -> dict[str, list[Example]]:
    """POPE's three splits on scenes: per split `per_split` scenes, each asked one Yes and one No.

    An object is a (colour, kind) pair, asked as "Is there a {colour} {kind}?" (the wording the
    scene models are trained on for `exists`; POPE's "... in the image?" is unseen text to them).
    The positive is a present pair (uniform); the negative an absent pair chosen as
    - random: uniform over the absent pairs;
    - popular: the absent pair present in the most scenes of the split's scene set;
    - adversarial: the absent pair that co-occurs most (summed over the scene set) with the
      scene's present pairs, among those sharing a colour or a kind with the positive: the
      scene analogue of POPE's co-occurring objects, answerable only with colour and kind bound.
    Ties go to the generator. `Question.small` marks pairs whose positive is the small shape.
    """
    rng = np.random.default_rng(seed)
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    out = {}
    for split in POPE_SPLITS:
        scenes = [sample_scene(rng, config) for _ in range(per_split)]
        present = [objects(s) for s in scenes]
        frequency = {p: sum(p in o for o in present) for p in pairs}
        together = {(p, q): sum(p in o and q in o for o in present) for p in pairs for q in pairs}
        examples = []
        for scene, here in zip(scenes, present):
            shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
            absent = [p for p in pairs if p not in here]
            if split == "random":
                weight = {p: 1.0 for p in absent}
            elif split == "popular":
                weight = {p: float(frequency[p]) for p in absent}
            else:
                absent = [p for p in absent if p[0] == shape.colour or p[1] == shape.kind]
                weight = {p: float(sum(together[p, q] for q in here)) for p in absent}
            best = max(weight.values())
            ties = [p for p in absent if weight[p] == best]
            colour, kind = ties[int(rng.integers(len(ties)))]
            small = shape.size == "small"
            examples.append(Example(scene, Question("pope", f"Is there a {shape.colour} {shape.kind}?",
                                                    "Yes", small)))
            examples.append(Example(scene, Question("pope", f"Is there a {colour} {kind}?", "No", small)))
        out[split] = examples
    return out
