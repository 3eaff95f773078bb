"""Small tensor ops shared by the fixed-shape modules, each exporting to standard ONNX ops."""
from __future__ import annotations

import torch

EPS = 1e-6


def topk_first(x: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the top-k along the last axis, ties broken by the lower index.

    That is ONNX TopK's rule. Eager torch.topk does not promise it, so outside
    export a stable sort stands in; under export the graph gets one TopK with a
    constant K, which TensorRT builds as is.
    """
    if torch.compiler.is_exporting():
        return torch.topk(x, k, dim=-1, largest=largest, sorted=True).indices
    return torch.sort(x, dim=-1, descending=largest, stable=True).indices[..., :k]


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row min-max normalisation over the last axis."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo + EPS)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis; masked-out entries take no part."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    plogp = logp.exp() * logp
    if mask is not None:
        plogp = plogp.masked_fill(~mask, 0.0)
    return -plogp.sum(dim=-1)


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """Float one-hot of integer `index` [...] -> [..., n], by comparison (no scatter)."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(torch.float32)
