"""Plain, loop-based reference implementations: DESIGN.md written out literally.

One image at a time, numpy float64, Python loops and lists where the text says
"for each". Slow on purpose: the fixed-shape modules must agree with these on
indices exactly and on values within float tolerance.

Inputs per image: h [N,C], cls_attn [heads,N], kmet [N,hd]; optional text_vis
[T,C] (text embeddings already mapped to vision width; for sparsezip's forward text
form, the embeddings as they are, [T,D]) and text_mask [T]; `project`, the projector
as a function of one patch [C] -> [D] (forward form only).
Outputs are padded to the slot count S exactly as the graph pads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import MethodConfig, NoneConfig, SparseZipConfig, VisionZipConfig
from .modules import MERGE_WEIGHT_FLOOR
from .ops import EPS


@dataclass(frozen=True)
class Compressed:
    tokens: np.ndarray      # [S, C]
    num_tokens: int
    kept_index: np.ndarray  # [S] int64


def _normalize(v):
    return v / max(float(np.linalg.norm(v)), EPS)


def _minmax(x):
    return (x - x.min()) / (x.max() - x.min() + EPS)


def _entropy(logits):
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max()
    logp = z - math.log(np.exp(z).sum())
    return float(-(np.exp(logp) * logp).sum())


def _softmax(logits):
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _ranked(scores):
    """Patch indices by descending score, ties by lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _pack(rows, kept, num_slots, width):
    tokens = np.zeros((num_slots, width))
    kept_index = np.full(num_slots, -1, dtype=np.int64)
    for slot, (row, index) in enumerate(zip(rows, kept)):
        tokens[slot] = row
        kept_index[slot] = index
    return Compressed(tokens, len(rows), kept_index)


def _targets(remaining, m):
    step = max(1, len(remaining) // m)
    return remaining[::step][:m]


def text_relevance(patches, text_vis, text_mask, raters):
    width = patches.shape[1]
    valid = [t for t in range(len(text_vis)) if text_mask[t] > 0]
    logits = {t: [float(text_vis[t] @ patches[i]) / math.sqrt(width) for i in range(len(patches))]
              for t in valid}
    chosen = valid
    if raters and valid:
        per_token = {t: sum(logits[t]) / len(patches) for t in valid}
        mean = sum(per_token.values()) / len(valid)
        chosen = [t for t in valid if per_token[t] >= mean]
    relevance = np.zeros(len(patches))
    for t in chosen:
        relevance += _softmax(np.array(logits[t]))
    return relevance / max(len(chosen), 1)


def contrast(relevance):
    """1 - entropy / log n of the relevance as a distribution over its n patches."""
    p = relevance / max(relevance.sum(), EPS)
    h = -sum(float(q) * math.log(max(float(q), 1e-12)) for q in p)
    return min(max(1.0 - h / math.log(len(relevance)), 0.0), 1.0)


def fused(relevance, fusion):
    if fusion == "zscore":
        return (relevance - relevance.mean()) / (relevance.std() + EPS)
    gate = contrast(relevance) if fusion == "gated" else 1.0
    return gate * _minmax(relevance)


def text_term(h, visual, config: SparseZipConfig, text_vis, text_mask, project):
    """The fused relevance of each patch; forward form: of the `candidates` patches first by
    visual score, each projected into the LLM space, and 0 for the others."""
    patches = h[1:]
    if config.text_form == "transposed":
        return fused(text_relevance(patches, text_vis, text_mask, config.raters), config.fusion)
    picks = _ranked(visual)[:config.candidates]
    projected = np.stack([project(patches[i]) for i in picks])
    term = fused(text_relevance(projected, text_vis, text_mask, config.raters), config.fusion)
    out = np.zeros(len(patches))
    for i, t in zip(picks, term):
        out[i] = t
    return out


def sparsezip_scores(h, cls_attn, kmet, config: SparseZipConfig, text_vis=None, text_mask=None, project=None):
    num_patches = h.shape[0] - 1
    kn = [_normalize(kmet[1 + i]) for i in range(num_patches)]
    hd = len(kn[0])
    s_attn = np.array([cls_attn[:, 1 + i].mean() for i in range(num_patches)])
    ent = np.array([_entropy(kn[i] / config.tau_feat) / math.log(hd) for i in range(num_patches)])
    kn_all = np.stack(kn)
    mut = np.zeros(num_patches)
    for i in range(num_patches):
        others = np.delete(kn_all, i, axis=0)
        mut[i] = 1.0 - _entropy(others @ kn[i] / config.tau_sim) / math.log(num_patches - 1)
    s = (config.alpha_attn * _minmax(s_attn) + config.alpha_ent * _minmax(ent)
         + config.alpha_mut * _minmax(mut))
    if config.text_aware and text_vis is not None:
        s = s + config.beta * text_term(h, s, config, text_vis, text_mask, project)
    return s


def reference_none(h, cls_attn=None, kmet=None, config=None, text_vis=None, text_mask=None):
    num_patches = h.shape[0] - 1
    return _pack([h[1 + i] for i in range(num_patches)], list(range(num_patches)),
                 num_patches, h.shape[1])


def reference_visionzip(h, cls_attn, kmet, config: VisionZipConfig, text_vis=None, text_mask=None):
    num_patches, m = h.shape[0] - 1, config.contextual
    scores = [cls_attn[:, 1 + i].sum() for i in range(num_patches)]
    dominant = sorted(_ranked(scores)[:config.dominant - 1])
    remaining = [i for i in range(num_patches) if i not in set(dominant)]
    targets = _targets(remaining, m)
    kn = {i: _normalize(kmet[1 + i]) for i in remaining}
    members = {t: [] for t in targets}
    for i in remaining:
        if i in targets:
            continue
        sims = [float(kn[i] @ kn[t]) for t in targets]
        members[targets[int(np.argmax(sims))]].append(i)
    contextual = []
    for t in targets:
        merged = np.mean([h[1 + i] for i in members[t]], axis=0) if members[t] else 0.0
        contextual.append(h[1 + t] + merged)
    rows = [h[0]] + [h[1 + i] for i in dominant] + contextual
    kept = [-1] + dominant + [-1] * m
    return _pack(rows, kept, config.num_slots(num_patches), h.shape[1])


def reference_sparsezip(h, cls_attn, kmet, config: SparseZipConfig, text_vis=None, text_mask=None, project=None):
    num_patches, m = h.shape[0] - 1, config.contextual
    s = sparsezip_scores(h, cls_attn, kmet, config, text_vis, text_mask, project)
    if config.dynamic_k:
        k = round(config.k_offset + config.k_scale * math.log(s.var() + EPS))
        k = min(max(k, config.k_min), config.k_max)
    else:
        k = config.k_max
    dominant = sorted(_ranked(s)[:k])
    remaining = [i for i in range(num_patches) if i not in set(dominant)]
    targets = _targets(remaining, m)
    kn = {i: _normalize(kmet[1 + i]) for i in remaining}
    weight = {i: w + MERGE_WEIGHT_FLOOR for i, w in enumerate(_minmax(s))}

    def assign(centers):
        clusters = [[] for _ in centers]
        for i in remaining:
            clusters[int(np.argmax([float(kn[i] @ c) for c in centers]))].append(i)
        return clusters

    init = [kn[t] for t in targets]
    centers = list(init)
    for _ in range(config.kmeans_iters):
        clusters = assign(centers)
        centers = [_normalize(sum(weight[i] * kn[i] for i in cl)) if cl else init[j]
                   for j, cl in enumerate(clusters)]
    contextual = []
    for j, cl in enumerate(assign(centers)):
        if cl:
            contextual.append(sum(weight[i] * h[1 + i] for i in cl) / sum(weight[i] for i in cl))
        else:
            contextual.append(h[1 + targets[j]])
    rows = [h[0]] + [h[1 + i] for i in dominant] + contextual
    kept = [-1] + dominant + [-1] * m
    return _pack(rows, kept, config.num_slots(num_patches), h.shape[1])


def reference(config: MethodConfig, h, cls_attn, kmet, text_vis=None, text_mask=None, project=None) -> Compressed:
    h, cls_attn, kmet = (np.asarray(x, dtype=np.float64) for x in (h, cls_attn, kmet))
    if text_vis is not None:
        text_vis = np.asarray(text_vis, dtype=np.float64)
    if isinstance(config, SparseZipConfig):
        return reference_sparsezip(h, cls_attn, kmet, config, text_vis, text_mask, project)
    fn = {NoneConfig: reference_none, VisionZipConfig: reference_visionzip}[type(config)]
    return fn(h, cls_attn, kmet, config, text_vis, text_mask)


def reference_text_to_vision(text_embeds, linear_1_weight, linear_2_weight):
    """W1^T W2^T e for each text token, one token at a time."""
    w1, w2 = np.asarray(linear_1_weight, np.float64), np.asarray(linear_2_weight, np.float64)
    return np.stack([w1.T @ (w2.T @ np.asarray(e, np.float64)) for e in text_embeds])
