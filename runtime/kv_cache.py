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
next position id and a group's `mask[b, j]` says whether its slot j of row b
holds a real token (left padding of a batch does not). Each layer group
(manifest `llm.cache.groups`) keeps its own length and mask: one group unless
the method drops tokens inside the LLM (FastV, SparseVLM), whose image prefill
leaves fewer positions in the later layers' groups (`advance_groups`); every
call after it appends the same new positions to all groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Backend, DeviceBuffer, TensorView
from .manifest import CacheGroup, LlmInfo


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
    masks: tuple[np.ndarray, ...]  # per group [B, length]


@dataclass
class _Group:
    spec: CacheGroup
    tensors: list[_Tensor]
    mask: np.ndarray  # [B, capacity]: 1 = real token
    length: int = 0  # slots held (real or padding), the same for every row


class KVCache:
    def __init__(self, backend: Backend, llm: LlmInfo, batch: int, capacity: int):
        assert batch >= 1 and capacity >= 1
        self.backend, self.batch = backend, batch
        self.kv_heads, self.head_dim, self.dtype = llm.num_kv_heads, llm.head_dim, llm.np_dtype
        layout = llm.cache
        self.groups = [_Group(g, [_Tensor(past, new)
                                  for layer in g.layers
                                  for past, new in zip(layout.past_names(layer), layout.new_names(layer))],
                              np.zeros((batch, 0), np.int64))
                       for g in layout.groups]
        self.capacity = 0  # positions every buffer holds
        self.input_pos = np.zeros(batch, np.int64)  # [B]: next position id of each row
        self.reserve(capacity)

    # -- sizes

    @property
    def length(self) -> int:
        """Slots held by the first group (every position of the conversation, never pruned)."""
        return self.groups[0].length

    @property
    def mask(self) -> np.ndarray:
        """[B, capacity]: the first group's (slots up to `length` are meaningful)."""
        return self.groups[0].mask

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
        """The real (not padding) positions row `row` holds, in every group: K and V of its layers."""
        return sum(int(g.mask[row, :g.length].sum()) * len(g.tensors) for g in self.groups) \
            * self.slot_bytes // self.batch

    def group_bytes(self, row: int) -> list[int]:
        """`row_bytes` per group."""
        return [int(g.mask[row, :g.length].sum()) * len(g.tensors) * self.slot_bytes // self.batch
                for g in self.groups]

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
            mask[:, :group.length] = group.mask[:, :group.length]
            group.mask = mask
        self.capacity = positions
        return True

    def bind(self, new: int | list[int]) -> tuple[dict[str, TensorView], dict[str, TensorView]]:
        """The past feeds (the L slots held) and the new-position outputs (the next `new` slots;
        a list: that many per group, as a pruning method's image prefill writes)."""
        news = [new] * len(self.groups) if isinstance(new, int) else new
        assert len(news) == len(self.groups)
        self.reserve(max(g.length + n for g, n in zip(self.groups, news)))
        past, out = {}, {}
        for group, count in zip(self.groups, news):
            for t in group.tensors:
                past[t.past_name] = self._view(t.buffer, 0, group.length)
                out[t.new_name] = self._view(t.buffer, group.length, count)
        return past, out

    def advance(self, mask: np.ndarray) -> None:
        """After the call bound by `bind(new)`: its slots' mask [B, new] (1 = real) is recorded."""
        self.advance_groups([mask] * len(self.groups))

    def advance_groups(self, masks: list[np.ndarray]) -> None:
        """After a call bound with one count per group: each group's slots' mask [B, new_g]; the first
        group's real tokens advance the positions (the later groups hold a subset of them)."""
        for group, mask in zip(self.groups, masks, strict=True):
            group.mask[:, group.length:group.length + mask.shape[1]] = mask
            group.length += mask.shape[1]
        self.input_pos += masks[0].sum(axis=1)

    def attention_masks(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Each group's mask input [B, L_g + new]: the slots it holds, then this call's `mask` [B, new]."""
        return {g.spec.mask: np.concatenate([g.mask[:, :g.length], mask], axis=1) for g in self.groups}

    def attention_mask(self, mask: np.ndarray) -> np.ndarray:
        """The first group's (`attention_masks`)."""
        return np.concatenate([self.mask[:, :self.length], mask], axis=1)

    def position_ids(self, mask: np.ndarray) -> np.ndarray:
        """[B, new]: each row's real tokens continue at its next position; padding slots get 0."""
        return np.maximum(self.input_pos[:, None] + np.cumsum(mask, axis=1) - 1, 0)

    # -- undoing a failed turn

    def snapshot(self) -> CacheState:
        return CacheState(tuple(g.length for g in self.groups), self.input_pos.copy(),
                          tuple(g.mask[:, :g.length].copy() for g in self.groups))

    def restore(self, state: CacheState) -> None:
        """Back to `state` (taken from this cache): the slots written since are free again.

        The buffers stay as they are (a turn may have grown them; capacity only grows).
        """
        for group, length, mask in zip(self.groups, state.lengths, state.masks, strict=True):
            group.length = length
            group.mask[:] = 0
            group.mask[:, :length] = mask
        self.input_pos[:] = state.input_pos

    def _view(self, buffer: DeviceBuffer, start: int, count: int) -> TensorView:
        return buffer.view((count, self.batch, self.kv_heads, self.head_dim), self.dtype, start * self.slot_bytes)

    def host_copy(self, name: str) -> np.ndarray:
        """The held part of past tensor `name` (e.g. past_key_values.0.key) on the host: tests only."""
        for group in self.groups:
            for t in group.tensors:
                if t.past_name == name:
                    return self.backend.to_host(self._view(t.buffer, 0, group.length))
        raise KeyError(name)
