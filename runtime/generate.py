"""The data path, as verbs: encode_image -> embed -> prefill -> decode_one_token -> generate.

Batch 1 throughout (one image, one conversation). Shapes in the comments use
n = valid visual tokens, D = LLM hidden size, T = tokens fed in one call,
V = vocabulary. Every LLM call goes through `forward`, which feeds the cache's
valid positions as the past, contiguous positions after them, and writes the
new positions of `present.*` back into the cache.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .errors import EngineError
from .kv_cache import KVCache


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax), like transformers' do_sample=False
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    seed: int | None = None  # None: a fresh seed per conversation

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class VisualTokens:
    tokens: np.ndarray  # [n, D] float32, padding rows already dropped
    kept_index: np.ndarray  # [n] int64: source patch of each token, -1 for CLS / merged
    num_slots: int  # S, what the graph returns before dropping padding
    vision_ms: float


def text_features(table: np.ndarray, text_ids: list[int] | tuple[int, ...]) -> dict[str, np.ndarray]:
    """text_embeds [1,T,D] float32 + text_mask [1,T] int64 for a text-aware vision graph.

    No words at all (an empty prompt) is one masked-out row: the graph's relevance
    is then zero everywhere, i.e. no text term, without a zero-length axis.
    """
    if not text_ids:
        return {"text_embeds": np.zeros((1, 1, table.shape[1]), np.float32),
                "text_mask": np.zeros((1, 1), np.int64)}
    rows = embed(table, text_ids).astype(np.float32)
    return {"text_embeds": rows[None], "text_mask": np.ones((1, len(text_ids)), np.int64)}


def encode_image(vision: Backend, pixel_values: np.ndarray,
                 text: dict[str, np.ndarray] | None = None) -> VisualTokens:
    """pixel_values [1,3,H,W] (+ text_embeds [1,T,D], text_mask [1,T]) -> the valid visual tokens."""
    t0 = time.perf_counter()
    out = vision.run({"pixel_values": pixel_values, **(text or {})})
    vision_ms = (time.perf_counter() - t0) * 1e3
    slots = out["visual_tokens"].shape[1]  # visual_tokens: [1,S,D]
    n = int(out["num_tokens"][0])
    if not 0 < n <= slots:
        raise EngineError(f"vision graph returned num_tokens {n} for {slots} slots")
    return VisualTokens(out["visual_tokens"][0, :n], out["kept_index"][0, :n], slots, vision_ms)


def embed(table: np.ndarray, ids: list[int] | tuple[int, ...]) -> np.ndarray:
    """ids [T] -> rows of the embedding table [T, D] (table dtype; the table may be memory-mapped)."""
    return np.asarray(table[np.asarray(ids, dtype=np.int64)])


def forward(llm: Backend, cache: KVCache, embeds: np.ndarray) -> np.ndarray:
    """embeds [1,T,D] after the cache's `length` positions -> logits of the last position [V] float32."""
    past, seq = cache.length, embeds.shape[1]
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
        **cache.past_feeds(),
    }
    out = llm.run(feeds)
    cache.append(out, seq)
    return out["logits"][0, -1].astype(np.float32)  # logits: [1,1,V]


def prefill(llm: Backend, cache: KVCache, embeds: np.ndarray) -> np.ndarray:
    """A whole turn's prompt [1,T,D] in one call -> logits of its last position [V]."""
    return forward(llm, cache, embeds)


def decode_one_token(llm: Backend, cache: KVCache, table: np.ndarray, token: int) -> np.ndarray:
    """The last sampled token -> logits for the next one [V]."""
    return forward(llm, cache, embed(table, [token])[None])


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """logits [V] -> one token id: argmax, or temperature + top-p sampling from `rng`."""
    if config.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / config.temperature
    probs = np.exp(z - z.max())
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
             eos_token_id: int, rng: np.random.Generator) -> Iterator[int]:
    """Yield tokens as produced, starting from the prefill's `logits`; stop after EOS or max_new_tokens.

    The last yielded token is never fed back: it is not in the cache when this
    returns (a chat feeds it at the start of the next turn, unless it is EOS).
    """
    for step in range(config.max_new_tokens):
        token = sample(logits, config, rng)
        yield token
        if token == eos_token_id or step == config.max_new_tokens - 1:
            return
        logits = decode_one_token(llm, cache, table, token)
