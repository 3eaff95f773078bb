"""runtime/kv_cache.py: allocated once, written in place, bytes accounted exactly."""
from __future__ import annotations

import numpy as np
import pytest

from sparsezip_deploy.runtime.kv_cache import KVCache

LAYERS, HEADS, HEAD_DIM = 3, 2, 4


def presents(cache: KVCache, new: int, seed: int, stale: float = np.nan) -> dict[str, np.ndarray]:
    """present.* outputs for `new` positions; the past positions hold `stale` junk, which must not be copied."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            a = rng.standard_normal((1, HEADS, cache.length + new, HEAD_DIM)).astype(cache.dtype)
            a[:, :, :cache.length] = stale
            out[f"present.{i}.{kind}"] = a
    return out


def test_allocated_once_and_written_in_place():
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, capacity=10, dtype=np.float16)
    buffers = [a.__array_interface__["data"][0] for a in cache.keys + cache.values]
    first = presents(cache, 4, seed=0)
    cache.append(first, 4)
    second = presents(cache, 1, seed=1)  # its past positions are NaN junk
    cache.append(second, 1)
    assert cache.length == 5 and cache.capacity == 10
    assert [a.__array_interface__["data"][0] for a in cache.keys + cache.values] == buffers
    np.testing.assert_array_equal(cache.keys[2][:, :, :4], first["present.2.key"])
    np.testing.assert_array_equal(cache.values[0][:, :, 4:5], second["present.0.value"][:, :, 4:5])
    assert not np.isnan(cache.keys[1][:, :, :5]).any()


def test_past_feeds_are_views_of_the_valid_positions():
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, capacity=8, dtype=np.float32)
    feeds = cache.past_feeds()
    assert set(feeds) == {f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")}
    assert feeds["past_key_values.0.key"].shape == (1, HEADS, 0, HEAD_DIM)
    cache.append(presents(cache, 3, seed=0), 3)
    feeds = cache.past_feeds()
    assert feeds["past_key_values.2.value"].shape == (1, HEADS, 3, HEAD_DIM)
    assert np.shares_memory(feeds["past_key_values.2.value"], cache.values[2])


def test_bytes():
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, capacity=8, dtype=np.float16)
    per_token = 2 * LAYERS * HEADS * HEAD_DIM * 2
    assert cache.per_token_bytes == per_token
    assert cache.nbytes_allocated == 8 * per_token
    cache.append(presents(cache, 5, seed=0), 5)
    assert cache.nbytes_used == 5 * per_token


def test_overflow_is_refused():
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, capacity=4, dtype=np.float32)
    cache.append(presents(cache, 3, seed=0), 3)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(presents(cache, 2, seed=1), 2)
    assert cache.length == 3


def test_ensure_capacity_grows_once_and_keeps_the_data():
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, capacity=4, dtype=np.float32)
    cache.append(presents(cache, 3, seed=0), 3)
    before = [a[:, :, :3].copy() for a in cache.keys + cache.values]
    assert not cache.ensure_capacity(4)
    assert cache.ensure_capacity(9)
    assert cache.capacity == 9 and cache.length == 3
    for old, new in zip(before, cache.keys + cache.values):
        np.testing.assert_array_equal(new[:, :, :3], old)
    cache.append(presents(cache, 6, seed=1), 6)
    assert cache.length == 9
