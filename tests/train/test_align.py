"""The alignment stage and the tower's guides: the word space, the caption targets, and that
training the projector on them makes patches land on their words (and the figures see it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from sparsezip_deploy.export.prompt import prompt_formats
from sparsezip_deploy.export.tiny import TinyConfig, build_tiny
from sparsezip_deploy.export.tokenizer import BOS, EOS, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer
from sparsezip_deploy.scenes.questions import Example, ask, candidates
from sparsezip_deploy.scenes.scene import KINDS, sample_scene
from sparsezip_deploy.train.align import (CaptionCode, alignment_figures, alignment_losses, design_embeddings,
                                          named_shapes)
from sparsezip_deploy.train.data import PATCH_CLASSES, PATCH_TARGETS, Prompter, make_batch
from sparsezip_deploy.train.vision import feature_layer_states, guide_targets, layer_with_attention

TINY = TinyConfig(vision_hidden=32, vision_heads=2, vision_layers=2, vision_mlp=64, llm_hidden=32, llm_heads=2,
                  llm_kv_heads=1, llm_layers=1, llm_mlp=64, qk_scale=1.0, llm_init_std=32 ** -0.5)
DETAIL = 0.5


@pytest.fixture(scope="module")
def prompter():
    formats = prompt_formats(LLAVA_CHAT_TEMPLATE, IMAGE_TOKEN, BOS, EOS)
    return Prompter(build_tokenizer(), formats["first_turn"], formats["next_turn"])


@pytest.fixture(scope="module")
def code(prompter):
    return CaptionCode(prompter.tokenizer, DETAIL)


def designed(code: CaptionCode, seed: int = 0, width: int = 32) -> torch.Tensor:
    table = torch.randn(1024, width, generator=torch.Generator().manual_seed(seed)) * 0.088
    design_embeddings(table, code, torch.Generator().manual_seed(seed))
    return table


def test_caption_words_are_orthogonal_to_each_other_and_to_every_other_word(code):
    table = designed(code)
    words = table[code.words]
    norm = table.norm(dim=1).mean()
    torch.testing.assert_close(words @ words.T, torch.eye(len(code.words)) * norm ** 2, atol=1e-5, rtol=0)
    others = torch.ones(len(table), dtype=torch.bool)
    others[code.words] = False
    others[list(code.plurals)] = False
    assert (table[others] @ words.T).abs().max() < 1e-5
    for plural, singular in code.plurals.items():  # "circles" mostly points where "circle" does
        assert F.cosine_similarity(table[plural], table[singular], dim=0) == pytest.approx(0.8, abs=1e-4)
    assert torch.equal(table, designed(code)) and not torch.equal(table, designed(code, seed=1))


def test_caption_target_is_the_sum_of_the_patch_words(code, prompter):
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    batch = make_batch([scene], [ask(scene, rng)], prompter, 14)
    table = designed(code)
    targets = code.targets(batch.patch_targets, table)[0]
    owner = batch.patch_owner[0]
    for index, shape in enumerate(scene.shapes):
        patches = (owner == index + 1).nonzero()[:, 0]
        if len(patches) == 0:
            continue
        classes = batch.patch_targets[0, patches[0]]
        expected = sum((1.0 if name in ("colour", "kind") else DETAIL) * table[code.columns[name][int(c) - 1]]
                       for name, c in zip(PATCH_TARGETS, classes))
        torch.testing.assert_close(targets[patches[0]], expected)
        assert int(classes[PATCH_TARGETS.index("colour")]) and table[code.columns["kind"][KINDS.index(shape.kind)]] \
            @ targets[patches[0]] == pytest.approx(float(table[code.background].norm() ** 2), rel=1e-4)
    background = (owner == 0).nonzero()[0, 0]
    torch.testing.assert_close(targets[background], table[code.background])


def class_features(batch) -> torch.Tensor:
    """Stand-in feature layer [B, 1 + P, C] that shows what each patch shows: its classes one-hot
    (CLS zero), what a perfect tower's features carry (a random tower's are too faint for
    a few steps to align)."""
    onehot = torch.cat([F.one_hot(batch.patch_targets[..., i], n) for i, n in enumerate(PATCH_CLASSES)], -1)
    return F.pad(onehot.float(), (0, TINY.vision_hidden - onehot.shape[-1], 1, 0))


def test_alignment_puts_patches_on_their_words(tmp_path, code, prompter):
    """Trained on the alignment losses (features and words fixed), the projector puts each
    patch nearest its colour and kind words, and SparseZip's text term (the projector
    transposed) on the shape a question names; the random projector it starts from does
    neither."""
    build_tiny(tmp_path, seed=0, tiny=TINY)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    model.requires_grad_(False)
    table = model.model.language_model.embed_tokens.weight
    design_embeddings(table, code, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(4)]
    examples = [Example(s, q) for s in scenes for q in candidates(s, "position", rng)[:1]]
    assert len(examples) >= 2
    batch = make_batch(scenes, [ask(s, rng) for s in scenes], prompter, 14)
    hidden = class_features(batch)

    def features(model, pixel_values: torch.Tensor) -> torch.Tensor:  # the same scenes, looked up
        rows = [next(r for r in range(len(scenes)) if torch.equal(p, batch.pixel_values[r])) for p in pixel_values]
        return hidden[rows]

    before = alignment_figures(model, examples, prompter, code, 14, features)
    projector = model.model.multi_modal_projector.requires_grad_(True)
    optimizer = torch.optim.Adam(projector.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        parts = alignment_losses(projector, hidden, batch, table, code, scale=64.0, temperature=0.1)
        optimizer.zero_grad()
        sum(parts.values()).backward()
        optimizer.step()
        losses.append({k: v.item() for k, v in parts.items()})
    after = alignment_figures(model, examples, prompter, code, 14, features)
    assert all(losses[-1][k] < 0.5 * losses[0][k] for k in losses[0]), (losses[0], losses[-1])
    assert before["colour_first"] < 0.3 and before["kind_first"] < 0.3, before
    assert after["colour_first"] > 0.95 and after["kind_first"] > 0.95, after
    assert before["question_mass"] < 2 * before["question_uniform"], before
    # Not a top patch on the named shape every time: SparseVLM's raters keep only the words
    # that score above the mean over the image, and a small shape's colour word may not.
    assert after["question_mass"] > 5 * after["question_uniform"] and after["question_top1"] >= 0.5, after


def test_named_shapes():
    rng = np.random.default_rng(2)
    scene = sample_scene(rng)
    shape = scene.shapes[0]
    assert named_shapes(scene, f"Where is the {shape.colour} {shape.kind}?", "position") == [0]
    assert named_shapes(scene, "Which shape is small?", "small") == [scene.shapes.index(scene.small)]
    many = named_shapes(scene, f"How many {shape.kind}s are there?", "count")
    assert len(many) == scene.count(shape.kind) and 0 in many


def test_tower_guides_group_a_shape_and_count_its_kind(prompter):
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(3)]
    batch = make_batch(scenes, [ask(s, rng) for s in scenes], prompter, 14)
    group, count = guide_targets(batch)
    on_shape = batch.patch_owner > 0
    torch.testing.assert_close(group.sum(-1)[on_shape], torch.ones(int(on_shape.sum())))
    torch.testing.assert_close(count.sum(-1)[on_shape], torch.ones(int(on_shape.sum())))
    assert group[~on_shape].abs().sum() == 0 and count[~on_shape].abs().sum() == 0
    for row, scene in enumerate(scenes):
        for index, shape in enumerate(scene.shapes):
            patches = (batch.patch_owner[row] == index + 1).nonzero()[:, 0]
            if len(patches) == 0:
                continue
            i = patches[0]
            assert group[row, i, 0] == pytest.approx(1 / (len(patches) + 1))  # CLS keeps 1 / (1 + area)
            assert set(group[row, i, 1:].nonzero()[:, 0].tolist()) == set(patches.tolist())
            labelled = {int(o) for o in batch.patch_owner[row].unique() if o > 0 and scene.shapes[o - 1].kind == shape.kind}
            assert count[row, i, 0] == pytest.approx(1 / (len(labelled) + 1))  # CLS keeps 1 / (1 + shapes of the kind)


def test_layer_with_attention_is_the_clip_layer(tmp_path):
    build_tiny(tmp_path, seed=0, tiny=TINY)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    layer = model.model.vision_tower.encoder.layers[0]
    hidden = torch.randn(2, 577, TINY.vision_hidden)
    with torch.no_grad():
        ours, probs = layer_with_attention(layer, hidden)
        torch.testing.assert_close(ours, layer(hidden, None))
        pixels = torch.randn(2, 3, 336, 336)
        features, all_probs, states = feature_layer_states(model, pixels, attention=True)
        torch.testing.assert_close(features, feature_layer_states(model, pixels))
    assert probs.shape == (2, TINY.vision_heads, 577, 577) and len(all_probs) == len(states) == TINY.vision_layers - 1
    assert states[-1] is features
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, TINY.vision_heads, 577))
