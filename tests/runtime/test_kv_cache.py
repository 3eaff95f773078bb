"""runtime/kv_cache.py: device buffers written in place by position, explicit positions, bytes per group.

The last test runs the real decode loop through ONNX Runtime's IOBinding on the
CPU EP and proves that the past is bound where the cache keeps it, the new
positions are written in place, and nothing but the logits reaches the host.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from sparsezip_deploy.runtime.backends.ort import OrtBackend
from sparsezip_deploy.runtime.kv_cache import KVCache
from sparsezip_deploy.runtime.manifest import (CacheGroup, CacheLayout, GraphSpec, LlmInfo, LlmPruning, PruneStage,
                                               TensorSpec)
from sparsezip_deploy.runtime.pipeline import Pipeline

LAYERS, HEADS, HEAD_DIM = 3, 2, 4
SPEC = GraphSpec("none.onnx", {"x": TensorSpec("float32", (1,))}, {"y": TensorSpec("float32", (1,))})


def llm_info(dtype="float32", cache=None, pruning=None) -> LlmInfo:
    return LlmInfo(LAYERS, HEADS, HEAD_DIM, 8, 16, 64, dtype, "embed_tokens.npy",
                   cache or CacheLayout.single_group(LAYERS), pruning)


@pytest.fixture
def backend():
    return OrtBackend("none.onnx", SPEC)  # never activated: allocate / copy / to_host need no graph


def write(cache: KVCache, backend, new: np.ndarray) -> dict[str, np.ndarray]:
    """What a graph call does: write `new` [S, B, H, hd] (+ layer offsets) into every bound output."""
    past, out = cache.bind(new.shape[0])
    written = {}
    for i, (name, view) in enumerate(out.items()):
        host = np.frombuffer((np.ctypeslib.ctypes.c_byte * view.nbytes).from_address(view.ptr), view.dtype)
        host[:] = (new + i).ravel()
        written[name] = new + i
    cache.advance(np.ones((cache.batch, new.shape[0]), np.int64))
    return written


def test_views_are_contiguous_slices_of_one_buffer_per_tensor(backend):
    cache = KVCache(backend, llm_info(), batch=2, capacity=10)
    past, out = cache.bind(4)
    assert len(past) == len(out) == 2 * LAYERS
    key = "past_key_values.1.value"
    assert past[key].shape == (0, 2, HEADS, HEAD_DIM) and out["new_key_values.1.value"].shape == (4, 2, HEADS, HEAD_DIM)
    assert past[key].ptr == out["new_key_values.1.value"].ptr  # the new positions start where the past ends
    cache.advance(np.ones((2, 4), np.int64))
    past, out = cache.bind(1)
    slot = 2 * HEADS * HEAD_DIM * 4
    assert past[key].shape == (4, 2, HEADS, HEAD_DIM) and out["new_key_values.1.value"].ptr == past[key].ptr + 4 * slot
    assert cache.nbytes_allocated == 10 * slot * 2 * LAYERS


def test_written_positions_stay_where_they_were_written(backend):
    cache = KVCache(backend, llm_info(), batch=1, capacity=6)
    rng = np.random.default_rng(0)
    first = write(cache, backend, rng.standard_normal((4, 1, HEADS, HEAD_DIM)).astype(np.float32))
    second = write(cache, backend, rng.standard_normal((1, 1, HEADS, HEAD_DIM)).astype(np.float32))
    held = cache.host_copy("past_key_values.2.key")
    np.testing.assert_array_equal(held, np.concatenate([first["new_key_values.2.key"],
                                                        second["new_key_values.2.key"]]))
    assert cache.length == 5 and cache.capacity == 6


def test_positions_and_mask_of_a_left_padded_batch(backend):
    cache = KVCache(backend, llm_info(), batch=2, capacity=8)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(cache.position_ids(mask), [[0, 0, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(cache.attention_mask(mask), mask)
    cache.bind(4)
    cache.advance(mask)
    np.testing.assert_array_equal(cache.input_pos, [2, 4])
    step = np.ones((2, 1), np.int64)
    np.testing.assert_array_equal(cache.position_ids(step), [[2], [4]])
    np.testing.assert_array_equal(cache.attention_mask(step), [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    per_token = 2 * LAYERS * HEADS * HEAD_DIM * 4
    assert cache.per_token_bytes == per_token == llm_info().kv_bytes_per_token
    assert (cache.row_bytes(0), cache.row_bytes(1)) == (2 * per_token, 4 * per_token)
    assert cache.nbytes_used == 2 * 4 * per_token  # padding slots are held too


def test_growing_keeps_the_held_positions(backend):
    cache = KVCache(backend, llm_info("float16"), batch=1, capacity=4)
    data = write(cache, backend, np.arange(3 * HEADS * HEAD_DIM, dtype=np.float16).reshape(3, 1, HEADS, HEAD_DIM))
    assert not cache.reserve(4)
    assert cache.reserve(5)
    assert cache.capacity == 6  # by half the capacity at least: a long chat grows rarely
    np.testing.assert_array_equal(cache.host_copy("past_key_values.0.value"), data["new_key_values.0.value"])
    write(cache, backend, np.zeros((3, 1, HEADS, HEAD_DIM), np.float16))
    assert cache.length == 6


def test_each_group_keeps_its_own_length_and_mask(backend):
    layout = CacheLayout(groups=(CacheGroup((0,), "past"), CacheGroup.pruned(1, (1, 2))))
    pruning = LlmPruning("fastv", 2, (PruneStage(0, 1),), {"method": "fastv"})
    cache = KVCache(backend, llm_info(cache=layout, pruning=pruning), batch=2, capacity=8)
    # An image prefill of 4 slots: group 1 keeps 3 of them (the graph says which, and their mask).
    _, out = cache.bind([4, 3])
    assert out["new_key_values.0.key"].shape[0] == 4 and out["new_key_values.2.value"].shape[0] == 3
    cache.advance_groups([np.array([[0, 1, 1, 1], [1, 1, 1, 1]]), np.array([[0, 1, 1], [1, 1, 1]])])
    assert cache.input_pos.tolist() == [3, 4]
    past, _ = cache.bind(1)
    assert past["past_key_values.0.key"].shape[0] == 4 and past["past_key_values.2.key"].shape[0] == 3
    step = np.array([[1], [0]])
    masks = cache.attention_masks(step)
    assert masks["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert masks["attention_mask.1"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    state = cache.snapshot()
    cache.advance(step)
    slot = HEADS * HEAD_DIM * 4  # one position of one row of one tensor
    assert cache.nbytes_used == (5 * 2 + 4 * 4) * 2 * slot
    assert cache.group_bytes(0) == [4 * 2 * slot, 3 * 4 * slot] and cache.group_bytes(1) == [4 * 2 * slot, 3 * 4 * slot]
    assert cache.row_bytes(1) == sum(cache.group_bytes(1))
    cache.restore(state)
    assert [g.length for g in cache.groups] == [4, 3] and cache.input_pos.tolist() == [3, 4]
    assert cache.attention_masks(step)["attention_mask.1"].tolist() == masks["attention_mask.1"].tolist()


# -- the real decode loop, through IOBinding on the CPU EP

def test_decode_binds_the_cache_in_place_and_copies_only_logits_to_the_host(engine_none, shapes_png, monkeypatch):
    bound, host_copies = [], []
    real = {name: getattr(ort.IOBinding, name) for name in ("bind_input", "bind_output", "bind_cpu_input")}

    def spy(name):
        def record(self, tensor, *args):
            bound.append((name, tensor, args))
            return real[name](self, tensor, *args)
        return record

    for name in real:
        monkeypatch.setattr(ort.IOBinding, name, spy(name))
    real_numpy = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: host_copies.append(self.shape()) or real_numpy(self))

    with Pipeline(engine_none, threads=1) as pipe:
        chat = pipe.conversation(shapes_png)
        result = chat.ask("What colour is the circle?", max_new_tokens=8)
        cache = chat.cache
        buffers = {t.past_name: t.buffer for g in cache.groups for t in g.tensors}
        steps = len(result.token_ids)  # one prefill + a decode step per token but the last
        vocab = pipe.engine.llm.vocab_size
        slot = cache.slot_bytes

        past = [(args, tensor) for kind, tensor, args in bound if tensor.startswith("past_key_values.")]
        assert not [t for kind, t, _ in bound if kind == "bind_cpu_input" and t.startswith("past_key_values.")]
        assert len(past) == steps * len(buffers)
        held = [0] + [result.prompt_tokens + i for i in range(steps - 1)]  # past length of each call
        written = [result.prompt_tokens] + [1] * (steps - 1)
        for call, (length, count) in enumerate(zip(held, written)):
            for (device, _, _, shape, ptr), name in past[call * len(buffers):(call + 1) * len(buffers)]:
                assert device == "cpu" and ptr == buffers[name].ptr and shape[0] == length
        new = [(args, t) for kind, t, args in bound if kind == "bind_output" and t.startswith("new_key_values.")]
        assert len(new) == steps * len(buffers)
        for call, (length, count) in enumerate(zip(held, written)):
            for (device, _, _, shape, ptr), name in new[call * len(buffers):(call + 1) * len(buffers)]:
                base = buffers[name.replace("new_key_values.", "past_key_values.")].ptr
                assert device == "cpu" and ptr == base + length * slot and shape[0] == count
        # The host saw the logits of each call and nothing else: bound to host memory outside the cache,
        # written by the run itself; no output was fetched or copied afterwards.
        logits = [args for kind, t, args in bound if kind == "bind_output" and t == "logits"]
        assert len(logits) == steps and {tuple(shape) for _, _, _, shape, _ in logits} == {(1, 1, vocab)}
        inside = [(b.ptr, b.ptr + b.nbytes) for b in buffers.values()]
        assert not [ptr for *_, ptr in logits if any(lo <= ptr < hi for lo, hi in inside)]
        assert {t for kind, t, _ in bound if kind == "bind_output"} == {"logits", *(
            name.replace("past_key_values.", "new_key_values.") for name in buffers)}
        assert host_copies == []

        # Every fed position is held (what it holds is checked against transformers in test_oracle.py).
        assert cache.host_copy("past_key_values.0.key").shape[0] == result.prompt_tokens + steps - 1
