"""Training batches from generated scenes: pixels, token sequences and auxiliary targets.

Pixels go through the runtime's own preprocessing, so the model trains on exactly the
`pixel_values` the deployed engine will see. Each image carries several questions as
one multi-turn conversation (the LLaVA-1.5 template, first turn = the deployed
single-turn prompt): the 576 visual tokens dominate the cost of a sequence, so the
extra turns are nearly free supervision.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from sparsezip_deploy.export.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_BICUBIC
from sparsezip_deploy.export.tokenizer import BOS, EOS, IMAGE_TOKEN, PAD_TOKEN
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import preprocess
from sparsezip_deploy.scenes.questions import SIDES, TYPES, Question, side
from sparsezip_deploy.scenes.scene import COLOURS, KINDS, SIZES, Scene, SceneConfig, render

MAX_SHAPES = SceneConfig().max_large + 1

IGNORE = -100
# A patch is labelled with the shape covering most of it, if that shape covers at
# least this fraction; a small shape (about 2 x 2 patches) still gets its patches.
PATCH_COVER = 0.2
# Per-patch targets, each a class with 0 = background: what a question can ask about the
# shape under a patch (its colour, kind, size, side of the image, and how many shapes of
# its kind the scene has). Dense labels make every answer linearly readable from the
# patch it is about, so the LLM only has to learn where to look and how to read.
PATCH_TARGETS = ("colour", "kind", "size", "side", "count")
PATCH_CLASSES = (1 + len(COLOURS), 1 + len(KINDS), 1 + len(SIZES), 2 + len(SIDES), 1 + MAX_SHAPES)
# CLS targets: which (colour, kind) pairs are present, then the small shape's kind and colour.
CLS_TARGETS = len(COLOURS) * len(KINDS) + len(KINDS) + len(COLOURS)


def image_config(image_size: int) -> ImageConfig:
    """The preprocessing export/tiny.py's preprocessor_config.json describes."""
    return ImageConfig(crop_height=image_size, crop_width=image_size, shortest_edge=image_size,
                       resample=PIL_BICUBIC, rescale_factor=1 / 255, mean=OPENAI_CLIP_MEAN,
                       std=OPENAI_CLIP_STD, do_center_crop=True, pad_to_square=False)


class Prompter:
    """Token ids of the LLaVA-1.5 turns, exactly as the runtime builds them."""

    def __init__(self, tokenizer: Tokenizer, first_turn: str, next_turn: str):
        self.tokenizer, self.first_turn, self.next_turn = tokenizer, first_turn, next_turn
        self.image_id, self.eos_id = tokenizer.token_to_id(IMAGE_TOKEN), tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        ids = tokenizer.encode(first_turn.replace("{prompt}", "x"), add_special_tokens=True).ids
        assert ids[0] == tokenizer.token_to_id(BOS) and ids.count(self.image_id) == 1
        self.before = ids[: ids.index(self.image_id)]
        self.words = Words(tokenizer)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(answer, add_special_tokens=False).ids

    def conversation(self, questions: list[Question]) -> tuple[list[int], list[int]]:
        """(tokens after the image, next-token targets); targets are the answers and EOS only.

        The EOS that ends an answer is a target but never an input, as in the runtime's
        chat, which does not put a sampled EOS into the cache before the next turn.
        """
        tokens: list[int] = []
        targets: list[int] = []
        for turn, question in enumerate(questions):
            template = self.first_turn if turn == 0 else self.next_turn
            ids = self.tokenizer.encode(template.replace("{prompt}", question.text),
                                        add_special_tokens=turn == 0).ids
            if turn == 0:
                ids = ids[ids.index(self.image_id) + 1:]
            answer = self.answer_ids(question.answer)
            tokens += ids + answer
            targets += [IGNORE] * (len(ids) - 1) + answer + [self.eos_id]
        return tokens, targets


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor  # [B, 3, H, W]
    before: torch.Tensor  # [L0] the prompt before the image, the same for every row
    after: torch.Tensor  # [B, T] right-padded with pad ids
    mask: torch.Tensor  # [B, T] 1 = real token
    targets: torch.Tensor  # [B, T] next-token target per position, IGNORE elsewhere
    cls_targets: torch.Tensor  # [B, CLS_TARGETS] multi-label 0/1
    patch_targets: torch.Tensor  # [B, P, len(PATCH_TARGETS)] classes, 0 = background
    patch_owner: torch.Tensor  # [B, P] the shape under each patch, 1 + its index in scene.shapes; 0 = none
    # Attention targets (training aids; see train.py's guide loss), positions in `after`:
    ground_at: torch.Tensor  # [B, G] each word that names something (colour, kind, "small"); -1 = none
    ground_to: torch.Tensor  # [B, G, P] the patches it names (none: it should look at BOS)
    answer_at: torch.Tensor  # [B, Q] position whose next token starts answer q; -1 = none
    route_to: torch.Tensor  # [B, Q, T] the words of question q its answer is read through

    @property
    def patch_colour(self) -> torch.Tensor:
        return self.patch_targets[..., PATCH_TARGETS.index("colour")]


def cls_targets(scene: Scene) -> np.ndarray:
    colours, kinds = list(COLOURS), list(KINDS)
    out = np.zeros(CLS_TARGETS, np.float32)
    for shape in scene.shapes:
        out[colours.index(shape.colour) * len(kinds) + kinds.index(shape.kind)] = 1
    base = len(colours) * len(kinds)
    out[base + kinds.index(scene.small.kind)] = 1
    out[base + len(kinds) + colours.index(scene.small.colour)] = 1
    return out


def patch_owners(scene: Scene, owner: np.ndarray, patch: int) -> np.ndarray:
    """[P] the shape covering each patch (row-major, as CLIP orders them): i + 1 = scene.shapes[i], 0 = none."""
    grid = owner.shape[0] // patch
    cells = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(scene.shapes))], 1)  # [P, shapes]
    return np.where(counts.max(1) >= PATCH_COVER * patch * patch, counts.argmax(1) + 1, 0)


def patch_labels(scene: Scene, owners: np.ndarray) -> np.ndarray:
    """[P, len(PATCH_TARGETS)] classes of the shape covering each patch (`patch_owners`)."""
    per_shape = np.array([
        (1 + list(COLOURS).index(s.colour), 1 + KINDS.index(s.kind), 1 + SIZES.index(s.size),
         1 + (SIDES.index(where) + 1 if (where := side(s, scene.image_size)) else 0), scene.count(s.kind))
        for s in scene.shapes])
    return np.where(owners[:, None] > 0, per_shape[np.maximum(owners - 1, 0)], 0)


# The word each question type's answer is read through: the shape it names (colours are
# unique within a scene, kinds may repeat, "small" is unique).
ROUTES = {"colour": ("kind",), "exists": ("colour", "kind"), "count": ("kind",), "position": ("colour",),
          "small": ("small",), "small_colour": ("small",)}


class Words:
    """Token ids of the words that name shapes: what each names, as a patch test."""

    def __init__(self, tokenizer: Tokenizer):
        def one(word: str) -> int:
            ids = tokenizer.encode(word, add_special_tokens=False).ids
            assert len(ids) == 1, f"{word!r} is not one token"
            return ids[0]

        column = {name: PATCH_TARGETS.index(name) for name in ("colour", "kind", "size")}
        self.names: dict[int, tuple[str, int, int]] = {}  # id -> (role, column, class)
        for i, colour in enumerate(COLOURS):
            self.names[one(colour)] = ("colour", column["colour"], 1 + i)
        for i, kind in enumerate(KINDS):
            for word in (kind, kind + "s"):
                self.names[one(word)] = ("kind", column["kind"], 1 + i)
        self.names[one("small")] = ("small", column["size"], 1 + SIZES.index("small"))


def make_batch(scenes: list[Scene], questions: list[list[Question]], prompter: Prompter,
               patch: int) -> Batch:
    config = image_config(scenes[0].image_size)
    pixels, owners, labels, seqs = [], [], [], []
    for scene, asked in zip(scenes, questions):
        image, owner = render(scene)
        pixels.append(preprocess(image, config)[0])
        owners.append(patch_owners(scene, owner, patch))
        labels.append(patch_labels(scene, owners[-1]))
        seqs.append(prompter.conversation(asked))
    width = max(len(tokens) for tokens, _ in seqs)
    turns = max(len(asked) for asked in questions)
    patches = len(labels[0])
    names = prompter.words.names
    grounds = [[t for t, token in enumerate(tokens) if token in names] for tokens, _ in seqs]
    ground_at = np.full((len(seqs), max(map(len, grounds))), -1)
    ground_to = np.zeros((*ground_at.shape, patches), bool)
    answer_at = np.full((len(seqs), turns), -1)
    route_to = np.zeros((len(seqs), turns, width), bool)
    for row, ((tokens, target), asked) in enumerate(zip(seqs, questions)):
        for g, t in enumerate(grounds[row]):
            _, column, value = names[tokens[t]]
            ground_at[row, g] = t
            ground_to[row, g] = labels[row][:, column] == value
        starts = [p for p in range(len(target)) if target[p] != IGNORE and (p == 0 or target[p - 1] == IGNORE)]
        answer_at[row, : len(starts)] = starts
        for q, (question, start) in enumerate(zip(asked, starts)):
            turn = range(starts[q - 1] + 1 if q else 0, start + 1)
            for t in turn:  # this turn's question words; the previous answer is not one of them
                asked_word = t == 0 or target[t - 1] == IGNORE
                if asked_word and tokens[t] in names and names[tokens[t]][0] in ROUTES[question.type]:
                    route_to[row, q, t] = True
    after = np.full((len(seqs), width), prompter.pad_id)
    targets = np.full((len(seqs), width), IGNORE)
    mask = np.zeros((len(seqs), width), np.int64)
    for row, (tokens, target) in enumerate(seqs):
        after[row, : len(tokens)], targets[row, : len(tokens)], mask[row, : len(tokens)] = tokens, target, 1
    return Batch(
        pixel_values=torch.from_numpy(np.stack(pixels)),
        before=torch.tensor(prompter.before),
        after=torch.from_numpy(after), mask=torch.from_numpy(mask), targets=torch.from_numpy(targets),
        cls_targets=torch.from_numpy(np.stack([cls_targets(s) for s in scenes])),
        patch_targets=torch.from_numpy(np.stack(labels)), patch_owner=torch.from_numpy(np.stack(owners)),
        ground_at=torch.from_numpy(ground_at), ground_to=torch.from_numpy(ground_to),
        answer_at=torch.from_numpy(answer_at), route_to=torch.from_numpy(route_to),
    )


def shuffled_types(rng: np.random.Generator) -> tuple[str, ...]:
    """Question types in a random order: no type is always the first (deployed) turn."""
    return tuple(TYPES[i] for i in rng.permutation(len(TYPES)))
