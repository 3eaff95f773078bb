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
from sparsezip_deploy.runtime.preprocess import ImageConfig, preprocess
from sparsezip_deploy.scenes.questions import TYPES, Question
from sparsezip_deploy.scenes.scene import COLOURS, KINDS, Scene, render

IGNORE = -100
# A patch is labelled with the shape covering most of it, if that shape covers at
# least this fraction; a small shape (about 2 x 2 patches) still gets its patches.
PATCH_COVER = 0.2
PATCH_CLASSES = (1 + len(COLOURS), 1 + len(KINDS))  # (background + colours, background + kinds)
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
    patch_colour: torch.Tensor  # [B, P] 0 = background
    patch_kind: torch.Tensor  # [B, P]
    answer_at: torch.Tensor  # [B, Q] position in `after` whose next token starts answer q; -1 = none
    look_at: torch.Tensor  # [B, Q, P] the patches answer q is read from (Question.about)


def cls_targets(scene: Scene) -> np.ndarray:
    colours, kinds = list(COLOURS), list(KINDS)
    out = np.zeros(CLS_TARGETS, np.float32)
    for shape in scene.shapes:
        out[colours.index(shape.colour) * len(kinds) + kinds.index(shape.kind)] = 1
    base = len(colours) * len(kinds)
    out[base + kinds.index(scene.small.kind)] = 1
    out[base + len(kinds) + colours.index(scene.small.colour)] = 1
    return out


def patch_labels(scene: Scene, owner: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major, as CLIP orders them): colour and kind class of its main shape."""
    grid = owner.shape[0] // patch
    cells = owner.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(scene.shapes))], 1)  # [P, shapes]
    best = counts.argmax(1)
    covered = counts.max(1) >= PATCH_COVER * patch * patch
    colour_of = np.array([1 + list(COLOURS).index(s.colour) for s in scene.shapes])
    kind_of = np.array([1 + KINDS.index(s.kind) for s in scene.shapes])
    return np.where(covered, colour_of[best], 0), np.where(covered, kind_of[best], 0)


def make_batch(scenes: list[Scene], questions: list[list[Question]], prompter: Prompter,
               patch: int) -> Batch:
    config = image_config(scenes[0].image_size)
    pixels, colours, kinds, seqs = [], [], [], []
    for scene, asked in zip(scenes, questions):
        image, owner = render(scene)
        pixels.append(preprocess(image, config)[0])
        colour, kind = patch_labels(scene, owner, patch)
        colours.append(colour)
        kinds.append(kind)
        seqs.append(prompter.conversation(asked))
    width = max(len(tokens) for tokens, _ in seqs)
    turns = max(len(asked) for asked in questions)
    answer_at = np.full((len(seqs), turns), -1)
    look_at = np.zeros((len(seqs), turns, len(colours[0])), bool)
    for row, ((_, target), asked) in enumerate(zip(seqs, questions)):
        starts = [p for p in range(len(target)) if target[p] != IGNORE and (p == 0 or target[p - 1] == IGNORE)]
        answer_at[row, : len(starts)] = starts
        for q, question in enumerate(asked):
            look_at[row, q] = np.isin(colours[row], [1 + list(COLOURS).index(c) for c in question.about])
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
        patch_colour=torch.from_numpy(np.stack(colours)), patch_kind=torch.from_numpy(np.stack(kinds)),
        answer_at=torch.from_numpy(answer_at), look_at=torch.from_numpy(look_at),
    )


def shuffled_types(rng: np.random.Generator) -> tuple[str, ...]:
    """Question types in a random order: no type is always the first (deployed) turn."""
    return tuple(TYPES[i] for i in rng.permutation(len(TYPES)))
