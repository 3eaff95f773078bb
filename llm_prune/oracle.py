"""The Hugging Face oracle of in-LLM pruning: what the exported graph must reproduce.

A transformers Llama language model (a `LlavaForConditionalGeneration`'s) is run
layer by layer with its own modules: its `LlamaDecoderLayer`s, `norm`,
`rotary_emb` and the LLaVA `lm_head`, in HF's eager attention, whose
probabilities a forward hook takes from `self_attn`. At each stage the pruning
is decided by llm_prune/reference.py (loops, float64) on those probabilities
and on the layer's output; the next layers run on the shorter sequence that
decision gathers.

It shares nothing with the exported graph but the spec: no fixed-shape torch
pruning modules, no TopK, no exported attention, and no KV cache. Each decode
step recomputes every layer over each group's prefill sequence plus all the new
tokens, replaying the prefill's decision (the same kept slots; merged tokens
re-averaged from that layer's outputs, which causality leaves as they were at
the prefill). Rows are run one at a time, so a batch is its rows alone.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import reference
from .config import SparseVLMConfig, Stage


@dataclass(frozen=True)
class OracleResult:
    # Per group after a stage (index k: the sequence the layers after stages[k] run on), per row,
    # per position: its original prefill slot (-1: merged), its mask, its position id.
    slots: list[list[np.ndarray]]
    masks: list[list[np.ndarray]]
    positions: list[list[np.ndarray]]
    prefill_logits: np.ndarray     # [B, V]: the last prompt slot's
    step_logits: list[np.ndarray]  # per decode step [B, V]: after feeding tokens[:, step]
    tokens: np.ndarray             # [B, steps]: greedy; tokens[:, 0] from the prefill logits


@contextmanager
def _eager(lm):
    """HF's eager attention (the only one that returns its probabilities), restored afterwards."""
    before = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def _additive_mask(mask: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[S] -> [1, 1, S, S]: slot a attends slot b iff b <= a and mask[b] = 1."""
    m = torch.tensor(mask, dtype=torch.bool)
    allowed = torch.tril(torch.ones(len(mask), len(mask), dtype=torch.bool)) & m[None, :]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


def _layer(lm, layer, h: torch.Tensor, mask: list[int], positions: list[int]):
    """One decoder layer on h [1, S, D] -> (its output [1, S, D], its attention probabilities [1, H, S, S])."""
    probs = []
    handle = layer.self_attn.register_forward_hook(lambda module, args, out: probs.append(out[1]))
    position_ids = torch.tensor([positions])
    try:
        out = layer(h, attention_mask=_additive_mask(mask, h.dtype), position_ids=position_ids,
                    position_embeddings=lm.rotary_emb(h, position_ids))
    finally:
        handle.remove()
    return out, probs[0]


def _gather(h: torch.Tensor, sources: list[list[int]]) -> torch.Tensor:
    """h [S, D] -> [len(sources), D]: each new position the mean of its sources (zeros if none)."""
    return torch.stack([h[src].mean(0) if src else h.new_zeros(h.shape[1]) for src in sources])


def _forward_row(lm, head, x: torch.Tensor, new: torch.Tensor, first: reference.Tracked, stages, method: str,
                 recycle: Optional[SparseVLMConfig], n_real: int, plan: Optional[list[reference.Tracked]]):
    """Every layer on one row: prompt x [S, D] then the new tokens new [T, D].

    plan None (a prefill, T = 0): each stage is decided here; otherwise `plan` (the sequences
    a prefill decided) is replayed. -> (last position's logits [V], the sequences after each stage).
    """
    after = {stage.after: stage for stage in stages}
    assert plan is None or len(plan) == len(stages)
    assert plan is not None or len(new) == 0, "pruning is decided at the prefill only"
    T = len(new)
    new_positions = [n_real + t for t in range(T)]
    h, seq, groups = torch.cat([x, new])[None], first, []
    for i, layer in enumerate(lm.layers):
        h, probs = _layer(lm, layer, h, seq.mask + [1] * T, seq.positions + new_positions)
        if i not in after:
            continue
        if plan is None:
            decided = dataclasses.replace(seq, hidden=h[0].double().numpy())
            nxt = reference.prune_stage(decided, probs[0].double().numpy(), after[i], method, recycle)
        else:
            nxt = plan[len(groups)]
        prompt = len(seq.mask)
        h = torch.cat([_gather(h[0, :prompt], nxt.sources), h[0, prompt:]])[None]
        seq = nxt
        groups.append(seq)
    return head(lm.norm(h[0, -1])), groups


def _run_row(lm, head, x, m, p, vs, visual, method, stages, recycle, steps):
    """One row: prefill, then `steps` greedy decode steps -> (groups, prefill logits, step logits, tokens)."""
    first = reference.track(x.double().numpy(), m, p, vs, visual, method)
    n_real = sum(m)
    logits, groups = _forward_row(lm, head, x, x[:0], first, stages, method, recycle, n_real, None)
    prefill, step_logits, tokens = logits, [], []
    for _ in range(steps):
        tokens.append(int(torch.argmax(logits)))
        new = lm.embed_tokens(torch.tensor(tokens)).to(x.dtype)
        logits, _ = _forward_row(lm, head, x, new, first, stages, method, recycle, n_real, groups)
        step_logits.append(logits)
    return groups, prefill, step_logits, tokens


def run(llava, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, visual_start: torch.Tensor,
        visual_slots: int, method: str, stages: tuple[Stage, ...], recycle_config: Optional[SparseVLMConfig],
        steps: int) -> OracleResult:
    """embeds [B,S,D], mask [B,S] (1 = real), positions [B,S], visual_start [B]; the visual span of row b
    is [visual_start[b], visual_start[b] + visual_slots). stages=(): no pruning."""
    lm, head = llava.model.language_model, llava.lm_head
    afters = [stage.after for stage in stages]
    if afters != sorted(set(afters)) or (afters and not 0 <= afters[0] <= afters[-1] < len(lm.layers)):
        raise ValueError(f"oracle: stages after layers {afters} must be increasing, in [0, {len(lm.layers) - 1}]")
    dtype = next(lm.parameters()).dtype
    rows = []
    with _eager(lm), torch.no_grad():
        for b in range(embeds.shape[0]):
            rows.append(_run_row(lm, head, embeds[b].to(dtype), [int(v) for v in mask[b]],
                                 [int(v) for v in positions[b]], int(visual_start[b]), visual_slots, method,
                                 stages, recycle_config, steps))

    def per_group(field):
        return [[np.asarray(getattr(groups[k], field), np.int64) for groups, *_ in rows]
                for k in range(len(stages))]

    def batch(logits):
        return np.stack([t.float().numpy() for t in logits])

    return OracleResult(
        slots=per_group("slots"), masks=per_group("mask"), positions=per_group("positions"),
        prefill_logits=batch([r[1] for r in rows]),
        step_logits=[batch([r[2][s] for r in rows]) for s in range(steps)],
        tokens=np.array([r[3] for r in rows], np.int64).reshape(len(rows), steps),
    )
