"""Fixed-shape compression modules: what goes into the exported vision graph.

Every module maps the features of layer l* to packed slots:

    h        [B, N, C]     hidden states output by layer l* (index 0 = CLS, N = 1 + P)
    cls_attn [B, heads, N] the CLS row of layer l*'s attention probabilities
    kmet     [B, N, hd]    layer l*'s keys averaged over heads
    -> tokens [B, S, C], num_tokens [B] int64, kept_index [B, S] int64

Valid tokens are packed at the front of each row; padding slots are zero with
kept_index -1. Shapes never depend on data: a dynamic K only changes which
slots are valid. See DESIGN.md for the algorithms, reference.py for the same
algorithms written as plain loops.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import MethodConfig, NoneConfig, SparseZipConfig, VisionZipConfig
from .ops import EPS, entropy, l2_normalize, minmax, one_hot, topk_first

# Score-weighted merging must not drop the lowest-scored token outright
# (its min-max score is exactly 0), so every weight gets this floor.
MERGE_WEIGHT_FLOOR = 1e-2

Output = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def project_text_to_vision(text_embeds: torch.Tensor, linear_1_weight: torch.Tensor,
                           linear_2_weight: torch.Tensor) -> torch.Tensor:
    """Map LLM-space text embeddings [B,T,D] to vision width [B,T,C]: W1^T W2^T e.

    The projector is y = W2 gelu(W1 x + b1) + b2; its transpose, biases and
    GELU ignored, carries a text token back to where CLIP features live.
    """
    # W2 @ W1 first: a constant the graph folds, so each text token costs one D x C product.
    return text_embeds @ (linear_2_weight @ linear_1_weight)


def _rank(mask: torch.Tensor) -> torch.Tensor:
    """[B,P] bool -> [B,P] int64: members before each position, minus one (a member's rank).

    The running count is a float CumSum: TensorRT's parser takes CumSum on floats only
    (onnx-tensorrt docs/operators.md), and counts up to P < 2^24 are exact in float32.
    """
    return mask.to(torch.float32).cumsum(-1).to(torch.int64) - 1


def _slot_one_hot(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[B,P] bool -> [B,P,n]: member i of `mask` goes to slot (its rank among members), others nowhere."""
    pos = _rank(mask)
    return one_hot(pos, n) * mask.unsqueeze(-1).to(torch.float32)


def _index_of_slots(slots: torch.Tensor) -> torch.Tensor:
    """[B,P,n] one-hot slots -> [B,n] the patch index in each slot (0 where the slot is empty)."""
    # A reduction, not `slots^T @ arange`: ORT 1.31's fused Transpose+MatMul gets a 1-D
    # right operand wrong at ORT_ENABLE_ALL.
    arange = torch.arange(slots.shape[1], device=slots.device, dtype=torch.float32)
    return (slots * arange.unsqueeze(-1)).sum(1).round().to(torch.int64)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,P,C], index [B,n] -> [B,n,C]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def select_dominant(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """[B,P] bool: the top-k patches by score (ties: lower index), k [B] <= k_max."""
    top = topk_first(scores, k_max)
    in_k = torch.arange(k_max, device=scores.device).unsqueeze(0) < k.unsqueeze(-1)
    return (one_hot(top, scores.shape[-1]) * in_k.unsqueeze(-1).to(torch.float32)).sum(1) > 0


def spatial_index(dominant: torch.Tensor, k_max: int) -> torch.Tensor:
    """[B,P] bool with <= k_max members -> [B,k_max] their indices in spatial order (then 0, not valid)."""
    return _index_of_slots(_slot_one_hot(dominant, k_max))


def contextual_targets(remaining: torch.Tensor, m: int) -> torch.Tensor:
    """VisionZip's targets: every step-th remaining token in index order, the first m.

    step = max(1, R // m), R = remaining count per image. Returns [B,P,m] one-hot
    (target j in column j).
    """
    pos = _rank(remaining)
    step = (remaining.to(torch.int64).sum(-1, keepdim=True) // m).clamp_min(1)
    slot = pos // step
    is_target = remaining & (slot * step == pos) & (slot < m)
    return one_hot(slot, m) * is_target.unsqueeze(-1).to(torch.float32)


class NoneCompressor(nn.Module):
    """LLaVA baseline: the P patch tokens, CLS dropped."""

    def selection_scores(self, h, cls_attn, kmet, text_vis=None, text_mask=None) -> None:
        return None  # nothing is selected

    def forward(self, h, cls_attn, kmet, text_vis=None, text_mask=None, dominant=None) -> Output:
        tokens = h[:, 1:]
        batch, num_patches = tokens.shape[:2]
        kept = torch.arange(num_patches, device=h.device).unsqueeze(0).expand(batch, -1)
        num = torch.full((batch,), num_patches, dtype=torch.int64, device=h.device)
        return tokens, num, kept


class VisionZipCompressor(nn.Module):
    def __init__(self, config: VisionZipConfig):
        super().__init__()
        self.config = config

    def selection_scores(self, h, cls_attn, kmet, text_vis=None, text_mask=None) -> torch.Tensor:
        """[B,P]: what the dominant patches are ranked by."""
        return cls_attn[:, :, 1:].sum(1)

    def forward(self, h, cls_attn, kmet, text_vis=None, text_mask=None, dominant=None) -> Output:
        """`dominant` [B,P] bool (dominant - 1 per row): use it instead of selecting (parity checks)."""
        d, m = self.config.dominant - 1, self.config.contextual
        patches, batch = h[:, 1:], h.shape[0]
        if dominant is None:
            k = torch.full((batch,), d, dtype=torch.int64, device=h.device)
            dominant = select_dominant(self.selection_scores(h, cls_attn, kmet), k, d)
        dom_index = spatial_index(dominant, d)

        kn = l2_normalize(kmet[:, 1:])
        remaining = ~dominant
        targets = contextual_targets(remaining, m)
        target_kn = targets.transpose(1, 2) @ kn
        others = remaining & (targets.sum(-1) == 0)
        assign = one_hot((kn @ target_kn.transpose(1, 2)).argmax(-1), m) * others.unsqueeze(-1).to(torch.float32)
        count = assign.sum(1).clamp_min(1.0).unsqueeze(-1)
        contextual = targets.transpose(1, 2) @ patches + (assign.transpose(1, 2) @ patches) / count

        tokens = torch.cat([h[:, :1], _gather_rows(patches, dom_index), contextual], 1)
        minus = torch.full((batch, 1), -1, dtype=torch.int64, device=h.device)
        kept = torch.cat([minus, dom_index, minus.expand(-1, m)], 1)
        num = torch.full((batch,), d + 1 + m, dtype=torch.int64, device=h.device)
        return tokens, num, kept


class SparseZipCompressor(nn.Module):
    """`project` [B,n,C] -> [B,n,D] float32: the projector, which the forward text form runs
    on its candidates (VisionGraph passes it; the transposed form needs none)."""

    def __init__(self, config: SparseZipConfig, project=None):
        super().__init__()
        self.config = config
        self.project = project

    def visual_scores(self, h, cls_attn, kmet) -> torch.Tensor:
        """[B,P] of DESIGN.md step 1: CLS attention, entropy and mutual information, each min-max."""
        c = self.config
        kn = l2_normalize(kmet[:, 1:])
        s = c.alpha_attn * minmax(cls_attn[:, :, 1:].mean(1))
        if c.alpha_ent > 0:
            s = s + c.alpha_ent * minmax(entropy(kn / c.tau_feat) / math.log(kn.shape[-1]))
        if c.alpha_mut > 0:
            num_patches = kn.shape[1]
            off_diagonal = ~torch.eye(num_patches, dtype=torch.bool, device=kn.device)
            h_sim = entropy(kn @ kn.transpose(1, 2) / c.tau_sim, off_diagonal) / math.log(num_patches - 1)
            s = s + c.alpha_mut * minmax(1.0 - h_sim)
        return s

    def selection_scores(self, h, cls_attn, kmet, text_vis=None, text_mask=None) -> torch.Tensor:
        """s [B,P] of DESIGN.md step 1-2. `text_vis`: the prompt's embeddings mapped to vision
        width (transposed form) or as they are, in the LLM space (forward form)."""
        c = self.config
        s = self.visual_scores(h, cls_attn, kmet)
        if c.text_aware and text_vis is not None:
            s = s + c.beta * self.text_term(s, h[:, 1:], text_vis, text_mask)
        return s

    def text_term(self, visual, patches, text, text_mask) -> torch.Tensor:
        """[B,P] the fused relevance (before beta). The forward form rates only the
        `candidates` patches the visual score ranks first; the others get 0."""
        c = self.config
        if c.text_form == "transposed":
            return fuse(text_relevance(patches, text, text_mask, c.raters), c.fusion)
        if self.project is None:
            raise ValueError("sparsezip: the forward text form needs the projector")
        picks = topk_first(visual, c.candidates)  # [B,n], any order: the softmax does not care
        projected = self.project(_gather_rows(patches, picks))
        term = fuse(text_relevance(projected, text, text_mask, c.raters), c.fusion)
        return (term.unsqueeze(1) @ one_hot(picks, patches.shape[1])).squeeze(1)

    def unrounded_k(self, s: torch.Tensor) -> torch.Tensor:
        """[B] float: c + g log(var(s) + eps), the dynamic K before rounding and clamping."""
        c = self.config
        return c.k_offset + c.k_scale * torch.log(s.var(-1, unbiased=False) + EPS)

    def num_dominant(self, s: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not c.dynamic_k:
            return torch.full(s.shape[:1], c.k_max, dtype=torch.int64, device=s.device)
        return torch.round(self.unrounded_k(s)).clamp(c.k_min, c.k_max).to(torch.int64)

    def merge(self, patches, kn, remaining, weights) -> torch.Tensor:
        """Score-weighted spherical k-means of the remaining tokens -> [B,m,C]."""
        targets = contextual_targets(remaining, self.config.contextual)
        init = targets.transpose(1, 2) @ kn
        live = remaining.unsqueeze(-1).to(torch.float32)

        def assign(centers):
            return one_hot((kn @ centers.transpose(1, 2)).argmax(-1), centers.shape[1]) * live

        centers = init
        for _ in range(self.config.kmeans_iters):
            a = assign(centers)
            empty = a.sum(1).unsqueeze(-1) == 0
            centers = torch.where(empty, init, l2_normalize(a.transpose(1, 2) @ (weights * kn)))
        a = assign(centers) * weights
        mass = a.sum(1).unsqueeze(-1)
        merged = (a.transpose(1, 2) @ patches) / mass.clamp_min(EPS)
        return torch.where(mass > 0, merged, targets.transpose(1, 2) @ patches)

    def forward(self, h, cls_attn, kmet, text_vis=None, text_mask=None, dominant=None) -> Output:
        """`dominant` [B,P] bool (k_min..k_max per row): use it instead of selecting (parity checks)."""
        c = self.config
        patches, batch = h[:, 1:], h.shape[0]
        s = self.selection_scores(h, cls_attn, kmet, text_vis, text_mask)
        if dominant is None:
            k = self.num_dominant(s)
            dominant = select_dominant(s, k, c.k_max)
        else:
            k = dominant.sum(-1)
        dom_index = spatial_index(dominant, c.k_max)
        weights = (minmax(s) + MERGE_WEIGHT_FLOOR).unsqueeze(-1)
        contextual = self.merge(patches, l2_normalize(kmet[:, 1:]), ~dominant, weights)

        # Candidates [CLS, k_max dominant, m contextual]; slot t takes candidate t while
        # t <= K, then the contextual ones, then padding.
        candidates = torch.cat([h[:, :1], _gather_rows(patches, dom_index), contextual], 1)
        minus = torch.full((batch, 1), -1, dtype=torch.int64, device=h.device)
        cand_kept = torch.cat([minus, dom_index, minus.expand(-1, c.contextual)], 1)
        slot = torch.arange(candidates.shape[1], device=h.device).unsqueeze(0)
        kk = k.unsqueeze(-1)
        num = 1 + k + c.contextual
        valid = slot < num.unsqueeze(-1)
        source = torch.where(slot <= kk, slot, slot - kk + c.k_max) * valid
        tokens = _gather_rows(candidates, source) * valid.unsqueeze(-1).to(h.dtype)
        kept = torch.where(valid, cand_kept.gather(1, source), -1)
        return tokens, num, kept


def fuse(relevance: torch.Tensor, fusion: str) -> torch.Tensor:
    """[B,n] relevance -> the text term [B,n] (SparseZipConfig.fusion).

    "gated": min-max like the visual terms, times `contrast`, so a flat relevance adds
    nothing and a noisy one (near-flat: a prompt the image does not answer, or a
    projector not aligned with the word embeddings) adds little, however min-max
    stretches it. "zscore" divides by the relevance's own spread, so the same noise
    comes out as large as a real signal and outranks the visual score."""
    if fusion == "zscore":
        return zscore(relevance)
    term = minmax(relevance)
    return term if fusion == "minmax" else contrast(relevance) * term


def contrast(relevance: torch.Tensor) -> torch.Tensor:
    """[B,n] -> [B,1] in [0,1]: 1 - entropy / log n of the relevance as a distribution
    over the patches: 0 when flat, 1 when all on one patch."""
    p = relevance / relevance.sum(-1, keepdim=True).clamp_min(EPS)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1, keepdim=True)
    return (1.0 - h / math.log(relevance.shape[-1])).clamp(0.0, 1.0)


def zscore(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()
    return (x - mean) / (std + EPS)


def text_relevance(patches: torch.Tensor, text_vis: torch.Tensor, text_mask: torch.Tensor,
                   raters: bool) -> torch.Tensor:
    """Relevance [B,P] of each patch to the prompt (DESIGN.md, sparsezip step 2).

    Per text token, a softmax over patches of e~_t . h_i / sqrt(C); averaged over
    the valid text tokens, or only over the raters: the tokens whose mean logit
    over the image is at least the mean over valid tokens (SparseVLM).
    """
    logits = text_vis @ patches.transpose(1, 2) / math.sqrt(patches.shape[-1])
    valid = text_mask > 0
    chosen = valid
    if raters:
        per_token = logits.mean(-1)
        mean = (per_token * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
        chosen = valid & (per_token >= mean)
    w = chosen.to(torch.float32)
    return (torch.softmax(logits, -1) * w.unsqueeze(-1)).sum(1) / w.sum(-1, keepdim=True).clamp_min(1.0)


def build_compressor(config: MethodConfig, project=None) -> nn.Module:
    """`project`: the projector as a float32 function, for sparsezip's forward text form."""
    if isinstance(config, NoneConfig):
        return NoneCompressor()
    if isinstance(config, VisionZipConfig):
        return VisionZipCompressor(config)
    if isinstance(config, SparseZipConfig):
        return SparseZipCompressor(config, project)
    raise TypeError(f"no compressor for {type(config).__name__}")
