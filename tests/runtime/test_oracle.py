"""The runtime against Hugging Face transformers, the oracle, token for token (greedy)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from sparsezip_deploy.runtime.generate import embed, encode_images, text_features
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.preprocess import load_image, preprocess
from sparsezip_deploy.runtime.prompt import first_turn_ids

from .conftest import _build

NEW_TOKENS = 24
QUESTION = "What colour is the circle?"
RAW = f"USER: <image>\n{QUESTION} ASSISTANT:"


@pytest.fixture(scope="module")
def processor(tiny_dir):
    # The PIL image processor: what LLaVA-1.5 used, and what the runtime reproduces.
    return AutoProcessor.from_pretrained(tiny_dir, backend="pil")


@pytest.fixture(scope="module")
def engine_visionzip(tiny_dir, tmp_path_factory):
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-visionzip", "visionzip",
                  "--dominant", "20", "--contextual", "6")


def hf_generate(tiny, processor, image_path, text, max_new_tokens=NEW_TOKENS, extra_ids=()):
    inputs = processor(images=Image.open(image_path), text=text, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([list(extra_ids)], dtype=torch.long)], 1)
    with torch.no_grad():
        out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  pixel_values=inputs["pixel_values"], max_new_tokens=max_new_tokens,
                                  do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_none_cli_equals_llava_generate(tiny, processor, engine_none, shapes_png):
    expected = hf_generate(tiny, processor, shapes_png, RAW)
    result = subprocess.run(
        [sys.executable, "-m", "sparsezip_deploy.runtime.cli", "--engine", str(engine_none), "--image",
         str(shapes_png), "--prompt", RAW, "--raw", "--json", "--max-new-tokens", str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert len(expected) >= 20, "the oracle stopped early: the comparison would say little"
    assert got["token_ids"] == expected
    assert got["visual_tokens_kept"] == got["visual_tokens_total"] == 576


@pytest.mark.parametrize("engine_name", ["engine_visionzip", "engine_sparsezip", "engine_split"])
def test_compressed_equals_hf_llm_fed_the_same_visual_tokens(request, tiny, engine_name, shapes_png):
    """HF's LLM generates from [text before | the graph's visual tokens | text after]."""
    engine_dir = request.getfixturevalue(engine_name)
    with Pipeline(engine_dir) as pipe:
        engine = pipe.engine
        ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, QUESTION, False)
        text = text_features(pipe.table, [ids.text_ids]) if engine.vision.text_aware else None
        visual = encode_images(pipe.vision, preprocess(load_image(shapes_png), engine.image), text)[0]
        embeds = np.concatenate([embed(pipe.table, ids.before), visual.tokens, embed(pipe.table, ids.after)])
        got = pipe.ask(shapes_png, QUESTION, NEW_TOKENS)
    assert got.visual_tokens_kept == len(visual.tokens) < 576
    with torch.no_grad():
        out = tiny.model.generate(inputs_embeds=torch.from_numpy(embeds)[None],
                                  attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    assert list(got.token_ids) == out[0].tolist()
    assert got.kv_bytes == (len(embeds) + len(got.token_ids) - 1) * engine.llm.kv_bytes_per_token


def test_chat_second_turn_equals_llava_generate_on_the_whole_conversation(tiny, processor, engine_none,
                                                                         shapes_png):
    with Pipeline(engine_none) as pipe:
        chat = pipe.conversation(shapes_png)
        first = chat.ask(QUESTION, 8)
        second = chat.ask("Where is the square?", 12)
        next_turn = pipe.engine.prompt.next_turn.replace("{prompt}", "Where is the square?")
    eos = tiny.eos_token_id
    answer = [t for t in first.token_ids if t != eos]
    follow_up = processor.tokenizer(next_turn, add_special_tokens=False)["input_ids"]
    expected = hf_generate(tiny, processor, shapes_png, RAW, max_new_tokens=12, extra_ids=answer + follow_up)
    assert list(second.token_ids) == expected
    assert second.vision_ms == 0.0, "the second turn must reuse the image tokens"


# -- batches: every row equals the oracle and the same question answered alone

BATCH_QUESTIONS = ["What colour is the circle?", "Is there a square?",
                   "How many shapes are in the picture, and which one is the largest?", "Where is the star?"]


@pytest.fixture(scope="module")
def scene_images(tmp_path_factory):
    """Four generated scenes: different content, so a dynamic K keeps a different number per image."""
    from sparsezip_deploy.scenes.scene import render, sample_scene

    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i in range(4):
        image, _ = render(sample_scene(rng))
        image.save(folder / f"scene{i}.png")
        paths.append(folder / f"scene{i}.png")
    return paths


@pytest.fixture(scope="module")
def engine_dynamic(tiny_dir, tmp_path_factory):
    """sparsezip with the dynamic-K law at its defaults: K follows each image's score variance."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-dynamic", "sparsezip",
                  "--dynamic-k", "--k-max", "40", "--contextual", "8", "--beta", "0")


def test_batch_of_none_rows_equal_llava_generate(tiny, processor, engine_none, scene_images):
    images, questions = scene_images[:3], BATCH_QUESTIONS[:3]
    with Pipeline(engine_none) as pipe:
        rows = pipe.ask_batch(images, questions, NEW_TOKENS)
    for image, question, row in zip(images, questions, rows):
        expected = hf_generate(tiny, processor, image, f"USER: <image>\n{question} ASSISTANT:")
        assert list(row.token_ids) == expected
        assert row.batch == 3 and row.visual_tokens_kept == 576


def test_batch_rows_with_different_kept_counts_equal_hf_and_alone(tiny, engine_dynamic, scene_images):
    with Pipeline(engine_dynamic) as pipe:
        rows = pipe.ask_batch(scene_images, BATCH_QUESTIONS, NEW_TOKENS)
        alone = [pipe.ask(image, q, NEW_TOKENS) for image, q in zip(scene_images, BATCH_QUESTIONS)]
        engine = pipe.engine
        prompts = []
        for image, question in zip(scene_images, BATCH_QUESTIONS):
            ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, question, False)
            visual = encode_images(pipe.vision, preprocess(load_image(image), engine.image))[0]
            prompts.append(np.concatenate([embed(pipe.table, ids.before), visual.tokens,
                                           embed(pipe.table, ids.after)]))
    kept = [r.visual_tokens_kept for r in rows]
    assert len(set(kept)) > 1, f"the images keep the same number of tokens {kept}: the test would say little"
    assert len({len(p) for p in prompts}) > 1  # rows are left-padded by different amounts
    per_token = engine.llm.kv_bytes_per_token
    for row, single, embeds in zip(rows, alone, prompts):
        assert row.token_ids == single.token_ids
        assert row.visual_tokens_kept == single.visual_tokens_kept == len(embeds) - row.prompt_text_tokens
        assert row.kv_bytes == single.kv_bytes == (len(embeds) + len(row.token_ids) - 1) * per_token
        with torch.no_grad():
            out = tiny.model.generate(inputs_embeds=torch.from_numpy(embeds)[None],
                                      attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                      max_new_tokens=NEW_TOKENS, do_sample=False)
        assert list(row.token_ids) == out[0].tolist()
