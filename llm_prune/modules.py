"""The in-LLM pruning steps as fixed-shape torch functions, batched, for the exported prefill graph.

Each follows llm_prune/reference.py (the loop version) on a batch [B, ...]:
constant counts (a stage's keep / recycled / merged counts are build
constants), rankings by pairwise comparison and gathers instead of boolean
indexing, sizes derived from input shapes only, so the graph has no
data-dependent shapes and TensorRT can build it. Equal scores rank by index,
the lower first, in every runtime; scores that must never win (invalid slots,
kept slots among the dropped) are pushed below every real one.
"""
from __future__ import annotations

import torch

# Attention probabilities are in [0, 1]: an invalid visual slot scores INVALID (below every real score),
# a kept one KEPT (below those) when the dropped ones are ranked; equal ones rank by index.
INVALID, KEPT = -1.0, -3.0
EPS = 1e-6


def row_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,S,...] at index [B,K] along axis 1 -> [B,K,...]."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.reshape(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def visual_columns(visual_start: torch.Tensor, count: int) -> torch.Tensor:
    """[B] -> [B, count]: the slots of the visual span."""
    return visual_start.unsqueeze(1) + torch.arange(count, device=visual_start.device).unsqueeze(0)


def raters(x: torch.Tensor, mask: torch.Tensor, visual_start: torch.Tensor, visual: int) -> torch.Tensor:
    """SparseVLM's text raters from the layer-0 input x [B,S,D] -> [B,S] bool.

    softmax over the text tokens (after the image) of x_v . x_t, averaged over
    the valid visual slots; a rater is a text token at or above the text mean.
    """
    seq = x.shape[1]
    cols = visual_columns(visual_start, visual)
    slot = torch.arange(seq, device=x.device).unsqueeze(0)
    text = (slot >= (visual_start + visual).unsqueeze(1)) & (mask > 0)  # [B,S]
    h = x.float()
    logits = torch.matmul(row_gather(h, cols), h.transpose(1, 2))  # [B,V,S]
    logits = logits.masked_fill(~text.unsqueeze(1), torch.finfo(torch.float32).min)
    relevance = torch.softmax(logits, dim=-1)
    valid = (row_gather(mask, cols) > 0).float().unsqueeze(-1)  # [B,V,1]
    r = (relevance * valid).sum(1) / valid.sum(1).clamp_min(1)  # [B,S]
    mean = (r * text).sum(1, keepdim=True) / text.sum(1, keepdim=True).clamp_min(1)
    return text & (r >= mean)


def visual_scores(probs: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, visual_start: torch.Tensor,
                  visual: int) -> torch.Tensor:
    """probs [B,H,S,S] (one layer's, per query head), rows [B,S] bool (the query slots that rate)
    -> [B, visual]: the attention each visual slot receives, mean over heads then over the rows."""
    received = probs.float().mean(1)  # [B,S(q),S(k)]
    w = rows.float().unsqueeze(-1)
    received = (received * w).sum(1) / w.sum(1).clamp_min(1)  # [B,S]
    cols = visual_columns(visual_start, visual)
    return torch.where(row_gather(mask, cols) > 0, row_gather(received, cols), INVALID)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """[B,n] -> [B,n] int64: how many entries beat each one (higher, or equal and earlier).

    Pairwise comparisons rather than TopK: equal scores rank by index in PyTorch
    exactly as in ONNX Runtime and TensorRT (torch.topk leaves ties unordered).
    """
    n = scores.shape[1]
    slot = torch.arange(n, device=scores.device)
    higher = scores.unsqueeze(1) > scores.unsqueeze(2)  # [B,a,b]: b beats a
    tied_earlier = (scores.unsqueeze(1) == scores.unsqueeze(2)) & (slot.view(1, 1, n) < slot.view(1, n, 1))
    return (higher | tied_earlier).long().sum(-1)


def pick(selected: torch.Tensor, order: torch.Tensor, count: int) -> torch.Tensor:
    """The indices whose `order` [B,n] is 0..count-1 (each once among `selected` [B,n] bool) -> [B,count]."""
    n = order.shape[1]
    hit = (order.unsqueeze(1) == torch.arange(count, device=order.device).view(1, count, 1)) & selected.unsqueeze(1)
    return (hit.long() * torch.arange(n, device=order.device).view(1, 1, n)).sum(-1)


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B,n] -> [B,count]: the best, best first (ties: lower index)."""
    order = ranks(scores)
    return pick(order < count, order, count)


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """[B,V] -> [B,keep] int64: the `keep` best, in increasing order."""
    kept = ranks(scores) < keep
    # A float CumSum (exact below 2^24): TensorRT's takes no integers.
    return pick(kept, (kept.float().cumsum(1) - 1).long(), keep)


def dropped_best(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best visual slots that were not kept -> [B,count] (best first)."""
    slot = torch.arange(scores.shape[1], device=scores.device)
    is_kept = (kept.unsqueeze(-1) == slot).any(1)  # [B,V]
    return top(torch.where(is_kept, KEPT, scores), count)


def dpc_knn(x: torch.Tensor, valid: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering of x [B,n,D] into `clusters` tokens (SparseVLM's recycling).

    -> merged [B,c,D] (mean of each cluster's valid members), centres [B,c]
    (indices into n, best centre first), member [B,n,c] one-hot assignment.
    """
    n, width = x.shape[1], x.shape[2]
    h = x.float()
    sq = (h * h).sum(-1)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * torch.matmul(h, h.transpose(1, 2))).clamp_min(0)
    eye = torch.eye(n, dtype=torch.bool, device=x.device).unsqueeze(0)
    dist = torch.where(eye, 0.0, torch.sqrt(d2)) / width ** 0.5  # [B,n,n]
    # Exactly symmetric: a mutually nearest pair must tie in density in every runtime (then the index
    # decides), not by the last bit of a matmul that differs between ORT and PyTorch.
    dist = (dist + dist.transpose(1, 2)) * 0.5
    nearest = -torch.topk(-dist, clusters, dim=-1).values  # the c smallest, self included
    density = torch.exp(-(nearest * nearest).mean(-1))  # [B,n]
    # [B,a,b]: b is denser than a, equal densities ranked by index (with c = 1 every density is 1).
    slot = torch.arange(n, device=x.device)
    earlier = slot.view(1, 1, n) < slot.view(1, n, 1)
    denser = (density.unsqueeze(1) > density.unsqueeze(2)) | ((density.unsqueeze(1) == density.unsqueeze(2))
                                                              & earlier)
    farthest = dist.amax(dim=(1, 2), keepdim=True)
    delta = torch.where(denser, dist, farthest).amin(-1)
    centres = top(delta * density, clusters)  # [B,c]
    to_centre = torch.gather(dist, 2, centres.unsqueeze(1).expand(-1, n, -1))  # [B,n,c]
    nearest_centre = torch.nn.functional.one_hot(to_centre.argmin(-1), clusters).bool()
    is_centre = centres.unsqueeze(1) == slot.view(1, n, 1)  # [B,n,c]
    centre = is_centre.any(-1, keepdim=True)
    member = (is_centre & centre) | (nearest_centre & ~centre)  # (not Where: ORT has no bool Where)
    weight = member.float() * valid.float().unsqueeze(-1)  # [B,n,c]
    merged = torch.matmul(weight.transpose(1, 2), h) / weight.sum(1).clamp_min(EPS).unsqueeze(-1)
    return merged.to(x.dtype), centres, member
