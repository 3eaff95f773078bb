"""runtime/pipeline.py end to end on engine folders built from the tiny model (ORT CPU).

The token-for-token oracle against transformers lives with the export tests; here
the runtime is checked against itself where the contract says two paths must
agree (chat continuation vs. one prefill, --raw vs. template) and the figures
against their definitions.
"""
from __future__ import annotations

import numpy as np
import pytest

from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.generate import GenerationConfig, embed, generate, prefill
from sparsezip_deploy.runtime.kv_cache import KVCache
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.prompt import first_turn_ids, next_turn_ids

from .conftest import SPARSEZIP_KEPT

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def pipe_none(engine_none):
    with Pipeline(engine_none, threads=2) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def pipe_sz(engine_sparsezip):
    with Pipeline(engine_sparsezip, threads=2) as pipe:
        yield pipe


def test_figures_follow_their_definitions(pipe_none, shapes_png):
    r = pipe_none.ask(shapes_png, QUESTION, max_new_tokens=6)
    per_token = pipe_none.engine.llm.kv_bytes_per_token
    assert r.visual_tokens_kept == r.visual_tokens_total == 576
    assert r.prompt_tokens == r.prompt_text_tokens + 576
    assert 1 <= len(r.token_ids) <= 6 and r.stop_reason in ("eos", "length")
    # The last token is sampled but never fed, so it is not in the cache.
    assert r.kv_bytes == (r.prompt_tokens + len(r.token_ids) - 1) * per_token
    assert r.kv_bytes_allocated == (r.prompt_tokens + 6) * per_token
    assert r.kv_bytes_uncompressed == r.kv_bytes
    assert r.ttft_ms >= r.vision_ms + r.prefill_ms > 0
    assert r.peak_rss_bytes > 10 * 2**20
    eos = pipe_none.engine.tokens.eos_token_id
    assert r.text == pipe_none.tokenizer.decode([t for t in r.token_ids if t != eos])
    assert set(r.to_json()) >= {"text", "token_ids", "visual_tokens_kept", "visual_tokens_total", "prompt_tokens",
                                "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "kv_bytes",
                                "kv_bytes_uncompressed", "peak_rss_bytes"}


def test_compressed_engine_drops_padding_and_reports_savings(pipe_sz, shapes_png):
    r = pipe_sz.ask(shapes_png, QUESTION, max_new_tokens=4)
    assert r.visual_tokens_kept == SPARSEZIP_KEPT < pipe_sz.engine.vision.num_slots
    kept = np.array(r.kept_index)
    assert kept[0] == -1 and (kept[-8:] == -1).all()  # CLS first, merged tokens last
    dominant = kept[1:-8]
    assert len(dominant) == 30 and (np.diff(dominant) > 0).all() and dominant.max() < 576  # spatial order
    per_token = pipe_sz.engine.llm.kv_bytes_per_token
    assert r.kv_bytes_uncompressed - r.kv_bytes == (576 - SPARSEZIP_KEPT) * per_token


def test_greedy_repeats_and_a_seed_fixes_sampling(pipe_none, shapes_png):
    a = pipe_none.ask(shapes_png, QUESTION, 5)
    assert pipe_none.ask(shapes_png, QUESTION, 5).token_ids == a.token_ids
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7)
    b = pipe_none.ask(shapes_png, QUESTION, config=sampled)
    assert pipe_none.ask(shapes_png, QUESTION, config=sampled).token_ids == b.token_ids


def test_raw_prompt_equals_the_template(pipe_none, shapes_png):
    template = pipe_none.engine.prompt.first_turn
    raw = pipe_none.ask(shapes_png, template.replace("{prompt}", QUESTION), 5, raw=True)
    assert raw.token_ids == pipe_none.ask(shapes_png, QUESTION, 5).token_ids


@pytest.mark.parametrize("prompt", ["", "Is there a red circle on the left?"])
def test_text_aware_engine_takes_any_prompt(pipe_sz, shapes_png, prompt):
    assert pipe_sz.engine.vision.text_aware
    assert pipe_sz.ask(shapes_png, prompt, 2).visual_tokens_kept == SPARSEZIP_KEPT


def test_chat_turn_equals_one_prefill_of_the_whole_conversation(pipe_sz, shapes_png):
    chat = pipe_sz.conversation(shapes_png)
    first = chat.ask(QUESTION, max_new_tokens=4)
    capacity = chat.cache.capacity
    second = chat.ask("And the square?", max_new_tokens=5)
    assert chat.cache.capacity > capacity  # grown for the unforeseen second turn
    assert second.turn == 1 and second.vision_ms == 0 and second.visual_tokens_kept == first.visual_tokens_kept

    # The same conversation as one prompt in a fresh cache: [turn 1 | answer 1 (no EOS) | turn 2].
    engine, table = pipe_sz.engine, pipe_sz.table
    ids = first_turn_ids(pipe_sz.tokenizer, engine.prompt, engine.tokens, QUESTION)
    answer = [t for t in first.token_ids if t != engine.tokens.eos_token_id]
    follow = next_turn_ids(pipe_sz.tokenizer, engine.prompt, "And the square?")
    assert second.prompt_tokens == len(follow) + (first.stop_reason == "length")
    embeds = np.concatenate([embed(table, ids.before), chat.visual.tokens, embed(table, ids.after),
                             embed(table, answer), embed(table, follow)])[None]
    cache = KVCache(pipe_sz.llm, engine.llm, 1, embeds.shape[1] + 5)
    logits = prefill(pipe_sz.llm, cache, embeds)
    expected = generate(pipe_sz.llm, cache, table, logits, GenerationConfig(max_new_tokens=5),
                        engine.tokens.eos_token_id, [np.random.default_rng()])
    assert tuple(int(t[0]) for t in expected) == second.token_ids
    assert second.kv_bytes == chat.cache.length * engine.llm.kv_bytes_per_token == cache.nbytes_used


def test_too_long_is_an_engine_error(pipe_none, shapes_png):
    with pytest.raises(EngineError, match=r"\+ 1500 new tokens = \d+ exceeds the engine's max_positions 2048"):
        pipe_none.ask(shapes_png, QUESTION, 1500)


def test_text_aware_batch_rows_equal_their_answers_alone(pipe_sz, shapes_png, tmp_path):
    """Prompts of different lengths: the vision graph sees right-padded text, the LLM left-padded rows."""
    from PIL import Image

    other = tmp_path / "flipped.png"
    Image.open(shapes_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    images, prompts = [shapes_png, other], [QUESTION, "Is there a large green triangle at the bottom right?"]
    rows = pipe_sz.ask_batch(images, prompts, 6)
    for image, prompt, row in zip(images, prompts, rows):
        alone = pipe_sz.ask(image, prompt, 6)
        assert row.kept_index == alone.kept_index and row.token_ids == alone.token_ids
        assert row.prompt_tokens == alone.prompt_tokens and row.kv_bytes == alone.kv_bytes
    assert rows[0].kv_bytes_allocated == rows[1].kv_bytes_allocated > rows[0].kv_bytes


def test_batch_needs_one_prompt_per_image(pipe_none, shapes_png):
    with pytest.raises(EngineError, match="one prompt per image, got 2 images and 1 prompts"):
        pipe_none.ask_batch([shapes_png, shapes_png], [QUESTION])
