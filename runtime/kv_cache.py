"""The KV cache: one object per conversation, allocated once, written in place.

    keys[i], values[i]: [batch, kv_heads, capacity, head_dim]   (llm dtype)
    positions 0..length-1 are valid; the graph sees the views [:, :, :length].

Capacity is what this conversation needs (prompt + max_new_tokens), not the
model's context length: a 7B model's 4096 positions would be 2 GiB in fp16,
almost all of it never touched. After each LLM call only the new positions of
the `present` outputs are copied in; the past ones are already there.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .engine import LlmInfo, past_names, present_names


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: np.dtype | type, batch: int = 1):
        assert min(num_layers, kv_heads, head_dim, capacity, batch) >= 1
        self.num_layers, self.kv_heads, self.head_dim, self.batch = num_layers, kv_heads, head_dim, batch
        self.dtype = np.dtype(dtype)
        self.length = 0
        self.keys, self.values = self._allocate(capacity)

    @classmethod
    def for_llm(cls, llm: LlmInfo, capacity: int, batch: int = 1) -> KVCache:
        return cls(llm.num_layers, llm.num_kv_heads, llm.head_dim, capacity, llm.np_dtype, batch)

    def _allocate(self, capacity: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        # np.empty: positions past `length` are never read, so zeroing them is wasted work.
        return ([np.empty(shape, self.dtype) for _ in range(self.num_layers)],
                [np.empty(shape, self.dtype) for _ in range(self.num_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def per_token_bytes(self) -> int:
        """2 (K, V) x layers x kv_heads x head_dim x itemsize, times batch (1 in the runtime)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize * self.batch

    @property
    def nbytes_used(self) -> int:
        return self.length * self.per_token_bytes

    @property
    def nbytes_allocated(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def past_feeds(self) -> dict[str, np.ndarray]:
        """The graph's past_key_values.* inputs: views of the valid positions, no copy here.

        The views are strided along the capacity axis; ONNX Runtime copies a
        non-contiguous input into its own buffer, which costs the same order as
        the attention over it, and keeps this cache free of per-step allocations.
        """
        feeds = {}
        for i in range(self.num_layers):
            k, v = past_names(i)
            feeds[k] = self.keys[i][:, :, :self.length]
            feeds[v] = self.values[i][:, :, :self.length]
        return feeds

    def append(self, outputs: Mapping[str, np.ndarray], new: int) -> None:
        """Copy positions [length, length+new) of the present.* outputs in; length += new."""
        end = self.length + new
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions, capacity {self.capacity}")
        for i in range(self.num_layers):
            for name, store in zip(present_names(i), (self.keys[i], self.values[i])):
                present = outputs[name]
                # present: [batch, kv_heads, length+new, head_dim]
                assert present.shape == (self.batch, self.kv_heads, end, self.head_dim), (name, present.shape)
                store[:, :, self.length:end] = present[:, :, self.length:end]
        self.length = end

    def ensure_capacity(self, needed: int) -> bool:
        """Make room for `needed` positions in total; True if it had to grow.

        Only a chat's later turns get here: the first turn allocated exactly
        prompt + max_new_tokens, and the next user line is unknown until typed.
        Growing reallocates once to `needed` and copies the valid positions.
        """
        if needed <= self.capacity:
            return False
        keys, values = self._allocate(needed)
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, :self.length] = old[:, :, :self.length]
        self.keys, self.values = keys, values
        return True
