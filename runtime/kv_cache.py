"""The LLM's KV cache: one device buffer per cache tensor, written in place by the graph, positions explicit.

    buffer (one per layer, K and V):  [capacity, B, kv_heads, head_dim]   on the backend's device
    past feed:    its first L positions   [L, B, kv_heads, head_dim]   (a view: offset 0)
    new output:   the next S positions    [S, B, kv_heads, head_dim]   (a view: offset L)

The decoder graph (export/llm.py) is append-only and sequence-major: it reads
its past and writes only the S new positions. Both are contiguous views of the
same buffer, bound by pointer through the backend, so nothing is copied per
call and nothing crosses to the host but the logits. (A Concat decoder's
`present` has L + S positions and cannot be bound to a max-capacity buffer;
binding it to a second buffer that swaps roles with the first each step would
rewrite the whole cache every token and keep two copies of it.)

Positions are state of their own, not the occupancy: `input_pos[b]` is row b's
next position id and `mask[b, j]` says whether slot j of row b holds a real
token (left padding of a batch does not). Each layer group (manifest
`llm.cache.groups`) keeps its own length: one group today; a method that drops
tokens inside the LLM keeps fewer positions in its later layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Backend, DeviceBuffer, TensorView
from .manifest import LlmInfo


@dataclass
class _Tensor:
    """One cache tensor (a layer's K or V): its graph names and its buffer."""

    past_name: str
    new_name: str
    buffer: DeviceBuffer | None = None


@dataclass(frozen=True)
class CacheState:
    """What `KVCache.snapshot` keeps: positions and lengths, not the device data (slots past a
    length are only ever appended to, so restoring the lengths undoes whatever was written after)."""

    lengths: tuple[int, ...]  # per group
    input_pos: np.ndarray  # [B]
    mask: np.ndarray  # [B, lengths[0]]


@dataclass
class _Group:
    tensors: list[_Tensor]
    length: int = 0  # slots held (real or padding), the same for every row


class KVCache:
    def __init__(self, backend: Backend, llm: LlmInfo, batch: int, capacity: int):
        assert batch >= 1 and capacity >= 1
        self.backend, self.batch = backend, batch
        self.kv_heads, self.head_dim, self.dtype = llm.num_kv_heads, llm.head_dim, llm.np_dtype
        layout = llm.cache
        self.groups = [_Group([_Tensor(past, new)
                                         for layer in g.layers
                                         for past, new in zip(layout.past_names(layer), layout.new_names(layer))])
                       for g in layout.groups]
        self.capacity = 0  # positions every buffer holds
        self.input_pos = np.zeros(batch, np.int64)  # [B]: next position id of each row
        self.mask = np.zeros((batch, 0), np.int64)  # [B, capacity]: 1 = real token
        self.reserve(capacity)

    # -- sizes

    @property
    def length(self) -> int:
        """Slots held by the first group (the one the attention mask covers)."""
        return self.groups[0].length

    @property
    def slot_bytes(self) -> int:
        """One position of every row in one cache tensor: B x kv_heads x head_dim x itemsize."""
        return self.batch * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def per_token_bytes(self) -> int:
        """One position of one row, K and V of every layer (LlmInfo.kv_bytes_per_token)."""
        return sum(len(g.tensors) for g in self.groups) * self.slot_bytes // self.batch

    @property
    def nbytes_used(self) -> int:
        """The slots every group holds, padding included, all rows."""
        return sum(g.length * len(g.tensors) for g in self.groups) * self.slot_bytes

    def row_bytes(self, row: int) -> int:
        """The real (not padding) positions row `row` holds, K and V of every layer."""
        return int(self.mask[row, :self.length].sum()) * self.per_token_bytes

    @property
    def nbytes_allocated(self) -> int:
        return sum(t.buffer.nbytes for g in self.groups for t in g.tensors)

    # -- one LLM call

    def reserve(self, positions: int) -> bool:
        """Make room for `positions` slots in all; True if the buffers had to grow.

        Only a chat's later turns grow (the first turn allocates prompt +
        max_new_tokens; the next user line is unknown until typed), by half the
        capacity at least so that a long chat grows rarely. Growing copies the
        held slots device to device, once.
        """
        if positions <= self.capacity:
            return False
        if self.capacity:
            positions = max(positions, self.capacity + self.capacity // 2)
        for group in self.groups:
            held = group.length * self.slot_bytes
            for t in group.tensors:
                old, t.buffer = t.buffer, self.backend.allocate(positions * self.slot_bytes)
                if old is not None and held:
                    self.backend.copy(old, t.buffer, held)
        mask = np.zeros((self.batch, positions), np.int64)
        mask[:, :self.length] = self.mask[:, :self.length]
        self.mask, self.capacity = mask, positions
        return True

    def bind(self, new: int) -> tuple[dict[str, TensorView], dict[str, TensorView]]:
        """The past feeds (the L slots held) and the new-position outputs (the next `new` slots)."""
        self.reserve(self.length + new)
        past, out = {}, {}
        for group in self.groups:
            for t in group.tensors:
                past[t.past_name] = self._view(t.buffer, 0, group.length)
                out[t.new_name] = self._view(t.buffer, group.length, new)
        return past, out

    def advance(self, mask: np.ndarray) -> None:
        """After the call bound by `bind`: its slots' mask [B, new] (1 = real) is recorded."""
        new = mask.shape[1]
        self.mask[:, self.length:self.length + new] = mask
        self.input_pos += mask.sum(axis=1)
        for group in self.groups:
            group.length += new

    def attention_mask(self, mask: np.ndarray) -> np.ndarray:
        """[B, L + new]: the slots held so far, then this call's `mask` [B, new]."""
        return np.concatenate([self.mask[:, :self.length], mask], axis=1)

    def position_ids(self, mask: np.ndarray) -> np.ndarray:
        """[B, new]: each row's real tokens continue at its next position; padding slots get 0."""
        return np.maximum(self.input_pos[:, None] + np.cumsum(mask, axis=1) - 1, 0)

    # -- undoing a failed turn

    def snapshot(self) -> CacheState:
        return CacheState(tuple(g.length for g in self.groups), self.input_pos.copy(),
                          self.mask[:, :self.length].copy())

    def restore(self, state: CacheState) -> None:
        """Back to `state` (taken from this cache): the slots written since are free again.

        The buffers stay as they are (a turn may have grown them; capacity only grows).
        """
        for group, length in zip(self.groups, state.lengths, strict=True):
            group.length = length
        self.input_pos[:] = state.input_pos
        self.mask[:] = 0
        self.mask[:, :state.mask.shape[1]] = state.mask

    def _view(self, buffer: DeviceBuffer, start: int, count: int) -> TensorView:
        return buffer.view((count, self.batch, self.kv_heads, self.head_dim), self.dtype, start * self.slot_bytes)

    def host_copy(self, name: str) -> np.ndarray:
        """The held part of past tensor `name` (e.g. past_key_values.0.key) on the host: tests only."""
        for group in self.groups:
            for t in group.tensors:
                if t.past_name == name:
                    return self.backend.to_host(self._view(t.buffer, 0, group.length))
        raise KeyError(name)
