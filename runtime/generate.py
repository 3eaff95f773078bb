"""The data path, as verbs: encode_images -> embed -> prefill -> decode_one_token -> generate.

B rows (conversations) at once; B = 1 is a single conversation. Shapes in the
comments use n = valid visual tokens of a row, D = LLM hidden size, T = tokens
fed in one call, V = vocabulary. Every LLM call goes through `forward`: the
cache's past stays on the backend's device, each row's positions continue from
its own `input_pos`, and a left-padded batch masks its padding out.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .errors import EngineError
from .kv_cache import KVCache
from .manifest import GROUP_MASK, VISUAL_START, LlmPruning
from .vision import VisionStage


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax), like transformers' do_sample=False
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    seed: int | None = None  # None: a fresh seed per conversation; else any int >= 0 (numpy takes big ones)

    def __post_init__(self):
        if not _is_int(self.max_new_tokens):
            raise EngineError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise EngineError(f"seed must be an integer >= 0 or None (a fresh one), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class VisualTokens:
    tokens: np.ndarray  # [n, D] float32, padding rows already dropped
    kept_index: np.ndarray  # [n] int64: source patch of each token, -1 for CLS / merged
    num_slots: int  # S, what the graph returns before dropping padding
    vision_ms: float  # the vision call that produced it (shared by a batch)
    slots: np.ndarray | None = None  # [S, D]: padding included (an LLM that prunes takes every slot)
    cached: bool = False  # the image came from the vision stage's cache (split: only the selector ran)


def text_features(table: np.ndarray, texts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """text_embeds [B,T,D] float32 + text_mask [B,T] int64 for a text-aware vision graph, right-padded.

    No words at all (an empty prompt) is a masked-out row: the graph's relevance
    is then zero everywhere, i.e. no text term, without a zero-length axis.
    """
    width = max([1, *map(len, texts)])
    embeds = np.zeros((len(texts), width, table.shape[1]), np.float32)
    mask = np.zeros((len(texts), width), np.int64)
    for row, ids in enumerate(texts):
        if ids:
            embeds[row, :len(ids)] = embed(table, ids)
            mask[row, :len(ids)] = 1
    return {"text_embeds": embeds, "text_mask": mask}


def encode_images(vision: VisionStage, pixel_values: np.ndarray,
                  text: dict[str, np.ndarray] | None = None) -> list[VisualTokens]:
    """pixel_values [B,3,H,W] (+ text_embeds [B,T,D], text_mask [B,T]) -> each row's valid visual tokens."""
    t0 = time.perf_counter()
    out, cached = vision.encode(pixel_values, text)
    vision_ms = (time.perf_counter() - t0) * 1e3
    slots = out["visual_tokens"].shape[1]  # visual_tokens: [B,S,D]
    rows = []
    for b, n in enumerate(out["num_tokens"].tolist()):
        if not 0 < n <= slots:
            raise EngineError(f"vision graph returned num_tokens {n} for {slots} slots")
        rows.append(VisualTokens(out["visual_tokens"][b, :n], out["kept_index"][b, :n], slots, vision_ms,
                                 out["visual_tokens"][b], cached[b]))
    return rows


def embed(table: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """ids [T] -> rows of the embedding table [T, D] (table dtype; the table may be memory-mapped)."""
    return np.asarray(table[np.asarray(ids, dtype=np.int64)])


def pad_left(rows: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts [T_b, D] (+ their masks [T_b], default all real) -> embeds [B, T, D] left-padded with
    zeros, mask [B, T] (1 = real token)."""
    width = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), width, rows[0].shape[1]), rows[0].dtype)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        embeds[b, width - len(r):] = r
        mask[b, width - len(r):] = 1 if masks is None else masks[b]
    return embeds, mask


def forward(llm: Backend, cache: KVCache, embeds: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """embeds [B,T,D] after what the cache holds, mask [B,T] (None: all real) -> last logits [B,V] float32."""
    if mask is None:
        mask = np.ones(embeds.shape[:2], np.int64)
    past, present = cache.bind(embeds.shape[1])
    feeds = {"inputs_embeds": embeds, **cache.attention_masks(mask), "position_ids": cache.position_ids(mask),
             **past}
    out = llm.run(feeds, outputs=present)
    cache.advance(mask)
    return out["logits"][:, -1].astype(np.float32)  # logits: [B,1,V]


def prefill_pruned(llm_prefill: Backend, cache: KVCache, pruning: LlmPruning, embeds: np.ndarray,
                   mask: np.ndarray, visual_start: np.ndarray) -> np.ndarray:
    """The image prompt [B,T,D] (each row's `pruning.visual_slots` visual positions from its
    `visual_start` on) into an empty cache, through the graph that drops visual tokens inside the
    LLM: cache group g receives T_g positions and their mask from the graph. -> last logits [B,V]."""
    assert cache.length == 0, "an image prefill starts the conversation"
    seqs = [pruning.group_seq(g, embeds.shape[1]) for g in range(len(cache.groups))]
    _, present = cache.bind(seqs)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": cache.position_ids(mask),
             VISUAL_START: visual_start}
    out = llm_prefill.run(feeds, outputs=present)
    cache.advance_groups([mask] + [out[GROUP_MASK % g] for g in range(1, len(seqs))])
    return out["logits"][:, -1].astype(np.float32)


def prefill(llm: Backend, cache: KVCache, embeds: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """A whole turn's prompts [B,T,D] (left-padded, `mask`) in one call -> logits of their last position [B,V]."""
    return forward(llm, cache, embeds, mask)


def decode_one_token(llm: Backend, cache: KVCache, table: np.ndarray, tokens: np.ndarray,
                     active: np.ndarray | None = None) -> np.ndarray:
    """The last sampled token of each row [B] -> logits for the next one [B,V].

    `active` [B] bool: rows that stopped feed a padding slot (masked, no position used).
    """
    mask = None if active is None else active.astype(np.int64)[:, None]
    return forward(llm, cache, embed(table, tokens)[:, None], mask)


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """logits [V] -> one token id: argmax, or temperature + top-p sampling from `rng`.

    Valid for any finite temperature > 0 and any logits: the maximum is subtracted
    before dividing, so z <= 0 and exp(z) in [0, 1] with 1 at the maximum (a tiny
    temperature cannot overflow to inf - inf = NaN; it tends to argmax). -inf and
    NaN logits are never drawn; +inf ones are the only candidates. Logits with no
    finite maximum at all (every one -inf or NaN) give the argmax of what is left.
    """
    if config.greedy:
        return int(np.argmax(logits))
    x = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, neginf=-np.inf, posinf=np.finfo(np.float64).max)
    top = x.max()
    if top == -np.inf:
        return int(np.argmax(x))
    with np.errstate(over="ignore", under="ignore"):
        probs = np.exp((x - top) / config.temperature)  # [V] in [0, 1], 1 at the argmax: sum >= 1
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        # The smallest set of most likely tokens whose mass reaches top_p (never empty).
        keep = order[np.cumsum(sorted_probs) - sorted_probs < config.top_p]
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))


def generate(llm: Backend, cache: KVCache, table: np.ndarray, logits: np.ndarray, config: GenerationConfig,
             eos_token_id: int, rngs: Sequence[np.random.Generator]) -> Iterator[np.ndarray]:
    """Yield each step's tokens [B] from the prefill's `logits` [B,V]; -1 marks a row that already stopped.

    A row stops after its EOS; all stop after max_new_tokens. A stopped row is fed
    a masked padding slot from then on (its outputs ignored, no position used), so
    that the others go on in one call and its cache holds what it would alone.
    The last yielded tokens are never fed back: they are not in the cache when
    this returns (a chat feeds them at the start of the next turn, unless EOS).
    """
    done = np.zeros(len(rngs), bool)
    for step in range(config.max_new_tokens):
        tokens = np.array([-1 if done[b] else sample(logits[b], config, rngs[b]) for b in range(len(rngs))],
                          np.int64)
        yield tokens
        done |= tokens == eos_token_id
        if done.all() or step == config.max_new_tokens - 1:
            return
        logits = decode_one_token(llm, cache, table, np.where(done, eos_token_id, tokens),
                                  None if not done.any() else ~done)
