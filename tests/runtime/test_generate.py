"""runtime/generate.py against a scripted numpy LLM: positions, masks, cache flow, stopping, batches, sampling."""
from __future__ import annotations

import ctypes
from collections import Counter

import numpy as np
import pytest

from sparsezip_deploy.runtime.backends.base import Backend, DeviceBuffer, TensorView
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.generate import (GenerationConfig, decode_one_token, embed, generate, pad_left,
                                               prefill, sample)
from sparsezip_deploy.runtime.kv_cache import KVCache
from sparsezip_deploy.runtime.manifest import CacheLayout, GraphSpec, LlmInfo, TensorSpec

VOCAB, D, LAYERS, HEADS, HEAD_DIM, EOS = 16, 4, 2, 1, 2, 2
LAYOUT = CacheLayout.single_group(LAYERS)
LLM = LlmInfo(LAYERS, HEADS, HEAD_DIM, D, VOCAB, 64, "float32", "embed_tokens.npy", LAYOUT)


def llm_spec() -> GraphSpec:
    inputs = {"inputs_embeds": TensorSpec("float32", ("batch", "seq", D)),
              "attention_mask": TensorSpec("int64", ("batch", "total")),
              "position_ids": TensorSpec("int64", ("batch", "seq"))}
    outputs = {"logits": TensorSpec("float32", ("batch", 1, VOCAB))}
    for i in range(LAYERS):
        for past, new in zip(LAYOUT.past_names(i), LAYOUT.new_names(i)):
            inputs[past] = TensorSpec("float32", ("past", "batch", HEADS, HEAD_DIM))
            outputs[new] = TensorSpec("float32", ("seq", "batch", HEADS, HEAD_DIM))
    return GraphSpec("fake.onnx", inputs, outputs)


def host(view: TensorView) -> np.ndarray:
    """The view's memory as a numpy array (the fake's device is the host)."""
    raw = (ctypes.c_byte * view.nbytes).from_address(view.ptr)
    return np.frombuffer(raw, view.dtype).reshape(view.shape)


class ScriptedLLM(Backend):
    """Checks what a real decoder relies on, then predicts `script(row, position of its last input)`.

    Its "keys" are the first HEAD_DIM embedding values of each position and its
    "values" the position id itself, so a past that is not exactly what it wrote
    earlier (lost, shifted or stale cache) is caught; positions must continue
    each row's own count, and the mask must mark the left padding.
    """

    def __init__(self, script, batch: int = 1):
        super().__init__("fake.onnx", llm_spec())
        self.script, self.calls = script, []
        self.history = [[] for _ in range(batch)]  # per row: (embedding row, position, real?) per slot
        self._memory = []

    def _load(self):
        pass

    def _unload(self):
        pass

    def allocate(self, nbytes):
        memory = np.zeros(nbytes, np.uint8)
        self._memory.append(memory)
        return DeviceBuffer(memory.ctypes.data, nbytes, "cpu", 0, memory)

    def copy(self, src, dst, nbytes):
        ctypes.memmove(dst.ptr, src.ptr, nbytes)

    def _infer(self, feeds, outputs, symbols):
        embeds, positions, mask = feeds["inputs_embeds"], feeds["position_ids"], feeds["attention_mask"]
        batch, seq = embeds.shape[:2]
        past = feeds["past_key_values.0.key"].shape[0]
        assert isinstance(feeds["past_key_values.0.key"], TensorView), "the past must come from the device"
        for b, slots in enumerate(self.history):
            assert past == len(slots)
            np.testing.assert_array_equal(mask[b, :past], [real for _, _, real in slots])
            real = [p for _, p, r in slots if r]
            np.testing.assert_array_equal(real, np.arange(len(real)))  # a row's positions count its tokens only
            new_real = mask[b, past:] > 0
            np.testing.assert_array_equal(positions[b][new_real], np.arange(len(real), len(real) + new_real.sum()))
        for i in range(LAYERS):
            k, v = host(feeds[f"past_key_values.{i}.key"]), host(feeds[f"past_key_values.{i}.value"])
            for b, slots in enumerate(self.history):
                if slots:
                    np.testing.assert_array_equal(k[:, b, 0], np.stack([e for e, _, _ in slots])[:, :HEAD_DIM])
                    np.testing.assert_array_equal(v[:, b, 0, 0], [p for _, p, _ in slots])
            host(outputs[f"new_key_values.{i}.key"])[:] = embeds.transpose(1, 0, 2)[:, :, None, :HEAD_DIM]
            host(outputs[f"new_key_values.{i}.value"])[:] = positions.T[:, :, None, None]
        for b in range(batch):
            self.history[b] += [(embeds[b, j], positions[b, j], mask[b, past + j]) for j in range(seq)]
        self.calls.append(seq)
        logits = np.zeros((batch, 1, VOCAB), np.float32)
        for b in range(batch):
            logits[b, 0, self.script(b, int(positions[b, -1]))] = 1.0
        return {"logits": logits}


def table() -> np.ndarray:
    return np.arange(VOCAB * D, dtype=np.float32).reshape(VOCAB, D)


def run(script, prompt_lens=(5,), max_new_tokens=6):
    llm = ScriptedLLM(script, len(prompt_lens)).activate()
    rng = np.random.default_rng(0)
    prompts = [rng.standard_normal((n, D)).astype(np.float32) for n in prompt_lens]
    embeds, mask = pad_left(prompts)
    cache = KVCache(llm, LLM, len(prompts), embeds.shape[1] + max_new_tokens)
    logits = prefill(llm, cache, embeds, mask)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    rngs = [np.random.default_rng(0) for _ in prompts]
    steps = [tokens.tolist() for tokens in generate(llm, cache, table(), logits, config, EOS, rngs)]
    return steps, llm, cache


def test_generate_feeds_each_token_back_until_max_new_tokens():
    steps, llm, cache = run(lambda row, pos: 3 + pos % 10, prompt_lens=(5,), max_new_tokens=6)
    tokens = [s[0] for s in steps]
    assert tokens == [3 + p % 10 for p in range(4, 10)]
    assert llm.calls == [5, 1, 1, 1, 1, 1]  # one prefill, then one token per call
    # The fed rows are the embedding rows of the sampled tokens; the last one is never fed.
    np.testing.assert_array_equal(np.stack([e for e, _, _ in llm.history[0][5:]]), table()[tokens[:-1]])
    assert cache.length == 5 + 6 - 1


def test_generate_stops_after_eos():
    steps, llm, cache = run(lambda row, pos: EOS if pos == 7 else 9, prompt_lens=(5,), max_new_tokens=20)
    assert [s[0] for s in steps] == [9, 9, 9, EOS]
    assert len(llm.calls) == 4 and cache.length == 5 + 3


def test_batch_rows_keep_their_own_positions_and_stops():
    # Row 0 (prompt 3, left-padded by 4) stops at its position 5; row 1 (prompt 7) runs to the end.
    steps, llm, cache = run(lambda row, pos: EOS if (row, pos) == (0, 5) else 4 + row, prompt_lens=(3, 7),
                            max_new_tokens=5)
    assert [s[0] for s in steps] == [4, 4, 4, EOS, -1]  # -1: the row had stopped
    assert [s[1] for s in steps] == [5, 5, 5, 5, 5]
    assert llm.calls == [7, 1, 1, 1, 1]
    # Row 0 holds its prompt and the three tokens fed before its EOS; its last slot is padding.
    np.testing.assert_array_equal(cache.input_pos, [3 + 3, 7 + 4])
    assert cache.row_bytes(0) == 6 * cache.per_token_bytes and cache.length == 7 + 4


def test_decode_one_token_continues_the_cache():
    llm = ScriptedLLM(lambda row, pos: 4).activate()
    cache = KVCache(llm, LLM, 1, 8)
    prefill(llm, cache, np.ones((1, 3, D), np.float32))
    logits = decode_one_token(llm, cache, table(), np.array([11]))
    assert logits.shape == (1, VOCAB) and int(logits[0].argmax()) == 4 and cache.length == 4
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
