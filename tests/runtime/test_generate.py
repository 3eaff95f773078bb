"""runtime/generate.py against a scripted numpy LLM: positions, masks, cache flow, stopping, sampling."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from sparsezip_deploy.runtime.backends.base import Backend
from sparsezip_deploy.runtime.engine import GraphSpec, TensorSpec
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.generate import (GenerationConfig, decode_one_token, embed, generate, prefill,
                                               sample)
from sparsezip_deploy.runtime.kv_cache import KVCache

VOCAB, D, LAYERS, HEADS, HEAD_DIM, EOS = 16, 4, 2, 1, 2, 2


def llm_spec() -> GraphSpec:
    inputs = {"inputs_embeds": TensorSpec("float32", ("batch", "seq", D)),
              "attention_mask": TensorSpec("int64", ("batch", "total")),
              "position_ids": TensorSpec("int64", ("batch", "seq"))}
    outputs = {"logits": TensorSpec("float32", ("batch", 1, VOCAB))}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = TensorSpec("float32", ("batch", HEADS, "past", HEAD_DIM))
            outputs[f"present.{i}.{kind}"] = TensorSpec("float32", ("batch", HEADS, "total", HEAD_DIM))
    return GraphSpec("fake.onnx", inputs, outputs)


class ScriptedLLM(Backend):
    """Checks what a real decoder relies on, then predicts `script(position of the last input)`.

    Its "keys" are the first HEAD_DIM embedding values of each position and its
    "values" the position itself, so a past that is not exactly what it produced
    earlier (lost, shifted or stale cache) is caught.
    """

    def __init__(self, script):
        super().__init__("fake.onnx", llm_spec())
        self.script, self.calls, self.history = script, [], []  # history: embeds row per position

    def _load(self):
        pass

    def _unload(self):
        pass

    def _infer(self, feeds):
        embeds, positions = feeds["inputs_embeds"][0], feeds["position_ids"][0]
        past = feeds["past_key_values.0.key"].shape[2]
        assert past == len(self.history)
        np.testing.assert_array_equal(positions, np.arange(past, past + len(embeds)))
        np.testing.assert_array_equal(feeds["attention_mask"], np.ones((1, past + len(embeds))))
        out = {}
        for i in range(LAYERS):
            k, v = feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]
            if past:
                np.testing.assert_array_equal(k[0, 0], np.stack(self.history)[:, :HEAD_DIM])
                np.testing.assert_array_equal(v[0, 0, :, 0], np.arange(past))
            new_k = embeds[None, None, :, :HEAD_DIM]
            new_v = np.repeat(positions[None, None, :, None], HEAD_DIM, -1).astype(np.float32)
            # The past part of present is garbage on purpose: the cache must only take the new part.
            out[f"present.{i}.key"] = np.concatenate([np.full_like(k, 7.0), new_k], 2)
            out[f"present.{i}.value"] = np.concatenate([np.full_like(v, 7.0), new_v], 2)
        self.history.extend(embeds)
        self.calls.append(len(embeds))
        logits = np.zeros((1, 1, VOCAB), np.float32)
        logits[0, 0, self.script(int(positions[-1]))] = 1.0
        return {"logits": logits, **out}


def table() -> np.ndarray:
    return np.arange(VOCAB * D, dtype=np.float32).reshape(VOCAB, D)


def run(script, prompt_len=5, max_new_tokens=6):
    llm = ScriptedLLM(script).activate()
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, prompt_len + max_new_tokens, np.float32)
    prompt = np.random.default_rng(0).standard_normal((1, prompt_len, D)).astype(np.float32)
    logits = prefill(llm, cache, prompt)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    tokens = list(generate(llm, cache, table(), logits, config, EOS, np.random.default_rng(0)))
    return tokens, llm, cache


def test_generate_feeds_each_token_back_until_max_new_tokens():
    tokens, llm, cache = run(lambda pos: 3 + pos % 10, prompt_len=5, max_new_tokens=6)
    assert tokens == [3 + p % 10 for p in range(4, 10)]
    assert llm.calls == [5, 1, 1, 1, 1, 1]  # one prefill, then one token per call
    # The fed rows are the embedding rows of the sampled tokens; the last one is never fed.
    np.testing.assert_array_equal(np.stack(llm.history[5:]), table()[tokens[:-1]])
    assert cache.length == 5 + 6 - 1


def test_generate_stops_after_eos():
    tokens, llm, cache = run(lambda pos: EOS if pos == 7 else 9, prompt_len=5, max_new_tokens=20)
    assert tokens == [9, 9, 9, EOS]
    assert len(llm.calls) == 4 and cache.length == 5 + 3


def test_decode_one_token_continues_the_cache():
    llm = ScriptedLLM(lambda pos: 4).activate()
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, 8, np.float32)
    prefill(llm, cache, np.ones((1, 3, D), np.float32))
    logits = decode_one_token(llm, cache, table(), 11)
    assert logits.shape == (VOCAB,) and int(logits.argmax()) == 4 and cache.length == 4
    np.testing.assert_array_equal(embed(table(), [11, 0]), table()[[11, 0]])


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert sample(logits, GenerationConfig(), np.random.default_rng()) == 1


def test_sampling_is_deterministic_with_a_seed():
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    config = GenerationConfig(temperature=1.0, seed=3)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, config, rng) for _ in range(40)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert len(set(draws(3))) > 5  # it does sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    counts = Counter(sample(logits, GenerationConfig(temperature=1.0, top_p=0.7), rng) for _ in range(2000))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the kept set
    counts = Counter(sample(logits, GenerationConfig(temperature=1.0, top_p=0.81), rng) for _ in range(2000))
    assert set(counts) == {0, 1, 2}
    assert {sample(logits, GenerationConfig(temperature=1.0, top_p=0.01), rng) for _ in range(50)} == {0}


def test_low_temperature_approaches_greedy():
    logits = np.array([1.0, 1.5, 0.5], np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, GenerationConfig(temperature=0.01), rng) for _ in range(100)} == {1}


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(EngineError, match=message):
        GenerationConfig(**kwargs)
