"""The feature-alignment stage: the projector puts each patch where the words for what it
shows are, in the LLM's word-embedding space (LLaVA-1.5's stage 1, with the LLM frozen).

LLaVA aligns through a pretrained LLM's captioning loss; this LLM is trained from scratch,
so there is no meaningful word space to caption into until one is defined.
`design_embeddings` defines it, and the whole embedding table stays frozen from then on:

- the words that name what a patch can show (`CaptionCode.words`: colours, kinds, sizes,
  sides, counts and "background") are orthogonal directions of equal norm, and every
  other word's embedding is orthogonal to all of them. A plural ("circles") is mostly
  its singular's direction.
- a patch's caption target is the sum of its words' embeddings (colour and kind at full
  weight, the others at `detail`), times `scale`; "background" for a patch on no shape.

SparseZip scores patch i against a prompt word e by e . W2 W1 h_i / sqrt(C) (the
projector transposed, biases and GELU ignored: sparsezip/modules.py). The alignment
losses train both that linear path and the real projector output to the caption target,
and the text term directly (the softmax over patches of each colour or kind word in the
scene should fall on the patches that show it). With the designed space, a word that
names nothing visible (a function word, a prompt template word) scores 0 on every patch:
it neither pulls the selection anywhere nor outranks the content words among
SparseVLM-style raters.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from sparsezip_deploy.scenes.questions import SIDES, Example
from sparsezip_deploy.scenes.scene import COLOURS, KINDS, SIZES, Scene
from sparsezip_deploy.sparsezip.modules import project_text_to_vision, text_relevance
from sparsezip_deploy.train.data import MAX_SHAPES, PATCH_TARGETS, Batch, Prompter, make_batch

BACKGROUND_WORD = "background"
# Per PATCH_TARGETS column, the word of each class (class 0 = no shape: no word).
# side class 1 is a shape on no clear side of the image.
CLASS_WORDS = {
    "colour": tuple(COLOURS),
    "kind": KINDS,
    "size": SIZES,
    "side": ("middle", *SIDES),
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
}
# A plural's embedding: this much of its singular's direction, the rest its own.
PLURAL_SHARE = 0.8


def one_token(tokenizer: Tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    assert len(ids) == 1, f"{word!r} is not one token"
    return ids[0]


class CaptionCode:
    """Which word ids caption a patch, by its PATCH_TARGETS classes."""

    def __init__(self, tokenizer: Tokenizer, detail: float):
        self.columns = {name: [one_token(tokenizer, w) for w in CLASS_WORDS[name]] for name in PATCH_TARGETS}
        self.weights = {name: 1.0 if name in ("colour", "kind") else detail for name in PATCH_TARGETS}
        self.background = one_token(tokenizer, BACKGROUND_WORD)
        self.words = [i for ids in self.columns.values() for i in ids] + [self.background]
        self.plurals = {one_token(tokenizer, k + "s"): one_token(tokenizer, k) for k in KINDS}

    def targets(self, patch_targets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, P, len(PATCH_TARGETS)] classes -> [B, P, D] the sum of each patch's caption words' embeddings."""
        out = torch.zeros(*patch_targets.shape[:2], table.shape[1])
        for column, name in enumerate(PATCH_TARGETS):
            words = torch.cat([torch.zeros(1, table.shape[1]), table[self.columns[name]]]) * self.weights[name]
            out = out + words[patch_targets[..., column]]
        background = (patch_targets[..., PATCH_TARGETS.index("colour")] == 0).float()[..., None]
        return out + background * table[self.background]

    def named(self, patch_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour and kind word ids [n] and, per patch, whether it shows each [B, P, n]."""
        ids, shows = [], []
        for name in ("colour", "kind"):
            column = patch_targets[..., PATCH_TARGETS.index(name)]
            for value, word in enumerate(self.columns[name], start=1):
                ids.append(word)
                shows.append(column == value)
        return torch.tensor(ids), torch.stack(shows, -1)


def design_embeddings(table: torch.Tensor, code: CaptionCode, generator: torch.Generator) -> None:
    """Rewrite the embedding table [V, D] in place (see the module docstring); row norms
    stay those of the initialisation on average."""
    words = code.words
    assert len(words) < table.shape[1], "the caption words need their own dimensions"
    with torch.no_grad():
        norm = table.norm(dim=1).mean()
        basis, _ = torch.linalg.qr(torch.randn(table.shape[1], len(words), generator=generator))  # [D, n]
        table -= (table @ basis) @ basis.T  # every word off the caption directions
        own = F.normalize(table, dim=1) * norm
        table.copy_(own)
        table[words] = basis.T * norm
        for plural, singular in code.plurals.items():
            table[plural] = PLURAL_SHARE * table[singular] + math.sqrt(1 - PLURAL_SHARE ** 2) * own[plural]


def linear_path(projector: torch.nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """[B, P, C] -> [B, P, D]: W2 W1 h, what SparseZip's text term dots a word embedding with."""
    return patches @ (projector.linear_2.weight @ projector.linear_1.weight).T


def alignment_losses(projector: torch.nn.Module, hidden: torch.Tensor, batch: Batch, table: torch.Tensor,
                     code: CaptionCode, scale: float, temperature: float) -> dict[str, torch.Tensor]:
    """hidden [B, 1 + P, C] (feature layer) -> the alignment losses (module docstring):
    `output` and `linear` squared errors to the caption target, relative to one word's
    squared norm (`balanced`); `vocab` cross-entropy of the colour and kind word of each patch on a
    shape among all words (cosine / temperature); `text` SparseZip's softmax over patches."""
    patches = hidden[:, 1:]
    unit = table.norm(dim=1).mean()
    target = code.targets(batch.patch_targets, table) * scale
    output, linear = projector(patches), linear_path(projector, patches)
    squared = (scale * unit) ** 2
    on_shape = batch.patch_owner > 0
    cosine = F.normalize(output[on_shape], dim=-1) @ F.normalize(table, dim=-1).T / temperature
    colour = torch.tensor(code.columns["colour"])[batch.patch_targets[..., 0][on_shape] - 1]
    kind = torch.tensor(code.columns["kind"])[batch.patch_targets[..., 1][on_shape] - 1]
    ids, shows = code.named(batch.patch_targets)  # [n], [B, P, n]
    logits = torch.einsum("nd,bpd->bnp", table[ids], linear) / math.sqrt(patches.shape[-1])
    mass = (logits.softmax(-1) * shows.transpose(1, 2)).sum(-1)  # [B, n]
    shown = shows.any(1)
    return {"output": balanced((output - target).pow(2).sum(-1), on_shape) / squared,
            "linear": balanced((linear - target).pow(2).sum(-1), on_shape) / squared,
            "vocab": (F.cross_entropy(cosine, colour) + F.cross_entropy(cosine, kind)) / 2,
            "text": -(mass[shown] + 1e-6).log().mean()}


def balanced(error: torch.Tensor, on_shape: torch.Tensor) -> torch.Tensor:
    """The mean of `error` [B, P] over patches on shapes plus its mean over the others: shapes
    cover a tenth of an image, and are what the words are about."""
    return error[on_shape].mean() + error[~on_shape].mean()


def named_shapes(scene: Scene, text: str, question_type: str) -> list[int]:
    """Indices into scene.shapes of what a question is about (empty: nothing to look at)."""
    words = text.rstrip("?").split()
    if question_type in ("small", "small_colour"):
        return [scene.shapes.index(scene.small)]
    colours = [w for w in words if w in COLOURS]
    kinds = [w.removesuffix("s") for w in words if w.removesuffix("s") in KINDS]
    if not colours and not kinds:
        return []
    return [i for i, s in enumerate(scene.shapes)
            if (not colours or s.colour == colours[0]) and (not kinds or s.kind == kinds[0])]


@torch.no_grad()
def alignment_figures(model, examples: list[Example], prompter: Prompter, code: CaptionCode, patch: int,
                      features, batch: int = 16) -> dict[str, float]:
    """How aligned the projector is, on held-out scenes (`features(model, pixels)` -> the
    feature layer [B, 1 + P, C]):

    - patch -> word: over patches on a shape, how often the nearest word (cosine, all
      1024) to the projected token is its colour or kind word, and how often its colour
      (kind) word is nearer than every word not in its caption;
    - word -> patch (SparseZip's own text term: W1^T W2^T e, softmax over patches,
      SparseVLM raters, over the question's words as the runtime passes them): the
      relevance mass on the patches of the shape(s) the question names, its top patch on
      them, and the mass a uniform relevance would put there."""
    projector = model.model.multi_modal_projector
    table = model.model.language_model.embed_tokens.weight
    unit_table = F.normalize(table, dim=-1)
    stats: dict[str, list[float]] = {k: [] for k in ("nearest_is_colour_or_kind", "colour_first", "kind_first",
                                                     "question_mass", "question_top1", "question_uniform")}
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        data = make_batch([e.scene for e in chunk], [[e.question] for e in chunk], prompter, patch)
        patches = features(model, data.pixel_values)[:, 1:]
        on_shape = data.patch_owner > 0
        cosine = F.normalize(projector(patches), dim=-1) @ unit_table.T  # [B, P, V]
        caption = torch.zeros_like(cosine, dtype=torch.bool)
        for column, name in enumerate(PATCH_TARGETS):
            ids = torch.tensor([0, *code.columns[name]])
            cls = data.patch_targets[..., column]
            caption.scatter_(-1, ids[cls][..., None], (cls > 0)[..., None])
        colour = torch.tensor([0, *code.columns["colour"]])[data.patch_targets[..., 0]]
        kind = torch.tensor([0, *code.columns["kind"]])[data.patch_targets[..., 1]]
        nearest = cosine.argmax(-1)
        others = cosine.masked_fill(caption, -2).amax(-1)
        stats["nearest_is_colour_or_kind"] += ((nearest == colour) | (nearest == kind))[on_shape].tolist()
        stats["colour_first"] += (cosine.gather(-1, colour[..., None])[..., 0] > others)[on_shape].tolist()
        stats["kind_first"] += (cosine.gather(-1, kind[..., None])[..., 0] > others)[on_shape].tolist()
        texts = [prompter.tokenizer.encode(e.question.text, add_special_tokens=False).ids for e in chunk]
        width = max(map(len, texts))
        embeds = torch.zeros(len(chunk), width, table.shape[1])
        mask = torch.zeros(len(chunk), width)
        for row, ids in enumerate(texts):
            embeds[row, :len(ids)], mask[row, :len(ids)] = table[ids], 1
        text_vis = project_text_to_vision(embeds, projector.linear_1.weight, projector.linear_2.weight)
        relevance = text_relevance(patches, text_vis, mask, raters=True)  # [B, P]
        for row, example in enumerate(chunk):
            shapes = named_shapes(example.scene, example.question.text, example.question.type)
            if not shapes:
                continue
            on = torch.isin(data.patch_owner[row], torch.tensor(shapes) + 1)
            if not on.any():
                continue
            stats["question_mass"].append(float(relevance[row][on].sum()))
            stats["question_top1"].append(float(on[relevance[row].argmax()]))
            stats["question_uniform"].append(float(on.float().mean()))
    return {k: float(np.mean(v)) for k, v in stats.items()}
