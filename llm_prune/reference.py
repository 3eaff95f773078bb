"""Plain, loop-based references of in-LLM pruning: the spec written out literally.

One row at a time, numpy float64, Python loops and lists where the spec says
"for each". Slow on purpose: the batched fixed-shape graph must agree with
these on indices exactly and on values within float tolerance.

A row's sequence between two stages is a `Tracked`: its hidden states and, for
each position, the prefill slot it came from (-1: merged), its mask, its
position id, whether it is a SparseVLM rater, and the positions of the
previous sequence it averages (`sources`, so that a run without a cache can
replay the stage on longer sequences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import SparseVLMConfig, Stage

METHODS = ("fastv", "sparsevlm")


@dataclass(frozen=True)
class Tracked:
    hidden: np.ndarray         # [S, D]: the next layer's input
    slots: list[int]           # the original prefill slot of each position; -1: a merged token
    mask: list[int]
    positions: list[int]
    raters: list[bool]         # SparseVLM's text raters (all False for FastV)
    vs: int                    # the visual span is [vs, vs + vc)
    vc: int
    sources: list[list[int]]   # positions of the previous sequence whose mean each position is


def _softmax(logits):
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _ranked(scores):
    """Indices by descending score, ties by lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown in-LLM pruning method {method!r}; known: {', '.join(METHODS)}")


def raters(x, m, vs: int, V: int) -> list[int]:
    """SparseVLM's text raters from the layer-0 input x [S, D]: slot indices, increasing.

    With no valid visual slot every r[t] is 0, so every text token rates.
    """
    x = np.asarray(x, dtype=np.float64)
    text = [t for t in range(vs + V, len(m)) if m[t]]
    visual = [vs + j for j in range(V) if m[vs + j]]
    r = {t: 0.0 for t in text}
    for v in visual:
        probs = _softmax(np.array([float(x[v] @ x[t]) for t in text]))
        for t, p in zip(text, probs):
            r[t] += p / len(visual)
    mean = sum(r.values()) / len(text)
    return [t for t in text if r[t] >= mean]


def visual_scores(P, m, vs: int, Vc: int, rows) -> np.ndarray:
    """P [H, S, S] one layer's attention probabilities -> [Vc]: what each visual slot receives,
    mean over heads, then mean over the query slots `rows`; invalid visual slots -inf."""
    P = np.asarray(P, dtype=np.float64)
    scores = np.full(Vc, -np.inf)
    for j in range(Vc):
        if m[vs + j]:
            scores[j] = sum(float(P[:, q, vs + j].mean()) for q in rows) / len(rows)
    return scores


def keep_indices(scores, keep: int) -> list[int]:
    """The `keep` highest scores (ties: lower index first), in increasing index order."""
    return sorted(_ranked(list(scores))[:keep])


def distances(X) -> np.ndarray:
    """[n, D] -> [n, n]: ||X_a - X_b|| / sqrt(D)."""
    X = np.asarray(X, dtype=np.float64)
    n, width = X.shape
    return np.array([[float(np.linalg.norm(X[a] - X[b])) / math.sqrt(width) for b in range(n)]
                     for a in range(n)])


def density_peaks(dist, c: int) -> tuple[list[float], list[float]]:
    """rho (from the c nearest, self included) and delta (distance to the nearest denser point;
    the densest: the largest distance of all) of each point. Equal densities rank by index, the
    lower denser (the paper's code breaks them with noise; with c = 1 every density is 1)."""
    n = len(dist)
    rho = [math.exp(-sum(sorted(float(d) ** 2 for d in dist[a])[:c]) / c) for a in range(n)]
    largest = max(float(d) for row in dist for d in row)

    def denser(b: int, a: int) -> bool:
        return rho[b] > rho[a] or (rho[b] == rho[a] and b < a)

    delta = [min((float(dist[a][b]) for b in range(n) if denser(b, a)), default=largest) for a in range(n)]
    return rho, delta


def dpc_knn(X, valid, c: int) -> tuple[list[int], list[int], np.ndarray, list[int]]:
    """Density-peak clustering of X [n, D] into c clusters; `valid` [n]: the points' masks.

    -> centres (indices into X, highest centre score first), assignment (each point's
    cluster, an index into centres), merged [c, D] (mean of each cluster's valid members,
    zeros if none), merged_valid (each centre's mask).
    """
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    if not 1 <= c <= n:
        raise ValueError(f"dpc_knn: {c} clusters out of {n} points")
    dist = distances(X)
    rho, delta = density_peaks(dist, c)
    centres = _ranked([delta[a] * rho[a] for a in range(n)])[:c]
    assignment = [centres.index(a) if a in centres else min(range(c), key=lambda k: (dist[a][centres[k]], k))
                  for a in range(n)]
    merged = np.zeros((c, X.shape[1]))
    for k in range(c):
        members = [X[a] for a in range(n) if assignment[a] == k and valid[a]]
        if members:
            merged[k] = np.mean(members, axis=0)
    return centres, assignment, merged, [int(valid[a]) for a in centres]


def track(x, m, p, vs: int, V: int, method: str) -> Tracked:
    """The prefill prompt of one row (x [S, D], mask m, positions p) as the first tracked sequence."""
    _check_method(method)
    x = np.asarray(x, dtype=np.float64)
    chosen = set(raters(x, m, vs, V)) if method == "sparsevlm" else set()
    S = len(m)
    return Tracked(x, list(range(S)), [int(v) for v in m], [int(v) for v in p],
                   [t in chosen for t in range(S)], vs, V, [[q] for q in range(S)])


def _carried(seq: Tracked, q: int):
    """Position q, unchanged: (hidden, slot, mask, position, rater, sources)."""
    return seq.hidden[q], seq.slots[q], seq.mask[q], seq.positions[q], seq.raters[q], [q]


def _recycled(seq: Tracked, scores, kept, stage: Stage, recycle: SparseVLMConfig):
    """The merged tokens of a stage, in centre order, as _carried's tuples."""
    dropped = [j for j in range(seq.vc) if j not in kept]
    # Candidates in score order, best first: the order dpc_knn's ties refer to.
    ranked = sorted(dropped, key=lambda j: (-scores[j], j))
    candidates = [seq.vs + j for j in ranked[:recycle.recycled_count(len(dropped))]]
    valid = [seq.mask[q] for q in candidates]
    centres, assignment, merged, merged_valid = dpc_knn(seq.hidden[candidates], valid, stage.merged)
    return [(merged[k], -1, merged_valid[k], seq.positions[candidates[centre]], False,
             [q for a, q in enumerate(candidates) if assignment[a] == k and valid[a]])
            for k, centre in enumerate(centres)]


def prune_stage(seq: Tracked, P, stage: Stage, method: str,
                recycle: Optional[SparseVLMConfig] = None) -> Tracked:
    """One stage on a row: `seq.hidden` is layer `stage.after`'s output, P [H, S, S] its attention.

    `recycle` (SparseVLM, needed when stage.merged > 0): its recycled_count sets how many
    dropped tokens are clustered.
    """
    _check_method(method)
    vs, vc, S = seq.vs, seq.vc, len(seq.mask)
    rows = [q for q in range(S) if (seq.raters[q] if method == "sparsevlm" else seq.mask[q])]
    scores = visual_scores(P, seq.mask, vs, vc, rows)
    kept = keep_indices(scores, stage.keep)
    merged = []
    if stage.merged:
        if recycle is None:
            raise ValueError("prune_stage: a stage that merges needs the SparseVLM config (recycle)")
        merged = _recycled(seq, scores, kept, stage, recycle)
    entries = ([_carried(seq, q) for q in range(vs)] + [_carried(seq, vs + j) for j in kept] + merged
               + [_carried(seq, q) for q in range(vs + vc, S)])
    hidden, slots, mask, positions, rater, sources = (list(field) for field in zip(*entries))
    return Tracked(np.stack(hidden), slots, mask, positions, rater, vs, len(kept) + len(merged), sources)
