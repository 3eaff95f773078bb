"""Stage 1 of training: the vision tower, its probes and its attention guides.

A tower trained from scratch on per-patch targets alone read a patch's colour and size
well but its shape's kind (49%), side of the image (55%) and kind count (54%) barely
better than priors: those need the patch to gather what the rest of its shape shows,
and the tower did not find where to look in 700 steps. Two attention guides lay out
that circuit, as the LLM's guides do for its two hops:

- group (layer `group_layer`): a patch on a shape looks at the patches of its own shape
  and at CLS, uniformly. It gathers the shape's outline (kind), its centroid (side),
  and, from the mass left on CLS, 1 / (1 + its area in patches) (size).
- count (layer `count_layer`): a patch on a shape looks at CLS and at every shape of its
  kind, one share per shape, spread over that shape's patches. The mass left on CLS is
  1 / (1 + the number of shapes of its kind): a count per patch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from sparsezip_deploy.train.data import CLS_TARGETS, PATCH_CLASSES, PATCH_TARGETS, Batch


def feature_layer_states(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor,
                         attention: bool = False):
    """[B, 3, H, W] -> hidden states of `vision_feature_layer` [B, 1 + P, C], later layers skipped;
    with `attention`, also every layer's attention probabilities [B, heads, 1 + P, 1 + P] and
    every layer's output [B, 1 + P, C] (the last is the feature layer)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    used = len(layers) + 1 + model.config.vision_feature_layer  # hidden_states[k] = output of k layers
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    if not attention:
        for layer in layers[:used]:
            hidden = layer(hidden, None)
        return hidden
    probs, states = [], []
    for layer in layers[:used]:
        hidden, p = layer_with_attention(layer, hidden)
        probs.append(p)
        states.append(hidden)
    return hidden, probs, states


def layer_with_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPEncoderLayer.forward, step by step, keeping the attention probabilities it drops
    (eager attention returns them)."""
    attended, probs = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)
    hidden = hidden + attended
    return hidden + layer.mlp(layer.layer_norm2(hidden)), probs


class Heads(torch.nn.Module):
    """Training-only linear probes, not part of the saved model: CLS targets on the feature
    layer, patch targets on the output of every layer the features use (`patch[-1]`: the
    feature layer's)."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, CLS_TARGETS)
        self.patch = torch.nn.ModuleList(torch.nn.Linear(width, sum(PATCH_CLASSES)) for _ in range(layers))


def patch_loss(probe: torch.nn.Module, batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """Per patch target, the cross-entropy over patches on shapes plus that over the others:
    shapes cover a tenth of an image, and over all patches alike the background (right from
    the first steps) all but hid what was still wrong on them."""
    on_shape = batch.patch_owner > 0
    loss = 0
    for i, logits in enumerate(probe(hidden[:, 1:]).split(PATCH_CLASSES, -1)):
        ce = F.cross_entropy(logits.transpose(1, 2), batch.patch_targets[..., i], reduction="none")  # [B, P]
        loss = loss + ce[on_shape].mean() + ce[~on_shape].mean()
    return loss


def vision_losses(heads: Heads, batch: Batch, states: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLS and patch losses on the feature layer (`states[-1]`), and `deep`: the patch
    loss on the earlier layers' outputs, so that each layer gets its share of the targets
    directly: the first what one patch shows of its shape's outline, the group layer what
    the shape shows (train/vision.py's docstring), not only through the layers after it."""
    hidden = states[-1]
    cls = F.binary_cross_entropy_with_logits(heads.cls(hidden[:, 0]), batch.cls_targets)
    deep = sum(patch_loss(probe, batch, h) for probe, h in zip(heads.patch[:-1], states[:-1]))
    return {"cls": cls, "patch": patch_loss(heads.patch[-1], batch, hidden), "deep": deep / max(1, len(states) - 1)}


def sincos_positions(tower: torch.nn.Module, grid: int, gain: float) -> None:
    """Start the patch position embeddings as 2-D sine-cosine ones (MAE's; CLS zero), at
    `gain` times the rms of the patch embeddings of an image of noise: CLIP's init (std
    0.02) is a few hundredths of the patch content, and a tower trained from it had not
    learnt where a patch is (which side of the image its shape is on) after 800 steps."""
    weight = tower.embeddings.position_embedding.weight
    width = weight.shape[1]
    quarter = width // 4
    omega = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # periods 6 .. 600 patches
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.flatten()[:, None] * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, 1)  # [P, 4 * quarter]
    with torch.no_grad():
        probe = torch.randn(1, 3, grid * tower.config.patch_size, grid * tower.config.patch_size,
                            generator=torch.Generator().manual_seed(0))
        content = tower.embeddings.patch_embedding(probe).pow(2).mean().sqrt()
        weight.zero_()
        weight[1:, : table.shape[1]] = table / table.pow(2).mean().sqrt() * content * gain


@torch.no_grad()
def probe_accuracy(heads: Heads, batch: Batch, hidden: torch.Tensor) -> dict[str, float]:
    """Per target, how often the probe reads a patch on a shape right (background excluded)."""
    on_shape = batch.patch_owner > 0
    logits = heads.patch[-1](hidden[:, 1:]).split(PATCH_CLASSES, -1)
    return {name: float((lg.argmax(-1) == batch.patch_targets[..., i])[on_shape].float().mean())
            for i, (name, lg) in enumerate(zip(PATCH_TARGETS, logits))}


def guide_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The group and count attention distributions [B, P, 1 + P] (key 0 = CLS) of each
    patch; rows of background patches are zero (unguided)."""
    owner = batch.patch_owner
    kind = batch.patch_targets[..., PATCH_TARGETS.index("kind")]
    on_shape = (owner > 0)[..., None]
    same_shape = ((owner[:, :, None] == owner[:, None, :]) & on_shape).float()  # [B, P, P]
    area = same_shape.sum(-1)  # [B, P] patches of the patch's own shape (0 off shapes)
    group = torch.cat([torch.ones_like(area)[..., None], same_shape], -1) / (area + 1)[..., None]
    same_kind = ((kind[:, :, None] == kind[:, None, :]) & on_shape).float()
    share = same_kind / area.clamp_min(1)[:, None, :]  # each shape of the kind sums to 1
    shapes = share.sum(-1, keepdim=True)  # [B, P, 1] shapes of the patch's kind
    count = torch.cat([torch.ones_like(shapes), share], -1) / (shapes + 1)
    return group * on_shape, count * on_shape


def guide_loss(probs: torch.Tensor, target: torch.Tensor, heads: int) -> torch.Tensor:
    """KL(target || attention) of the patch rows of `probs` [B, H, 1 + P, 1 + P] (mean of the
    first `heads` heads), target [B, P, 1 + P], over the rows that have one: 0 when exact."""
    p = probs[:, :heads, 1:].mean(1)
    used = target.sum(-1) > 0
    kl = torch.xlogy(target, target) - target * (p + 1e-6).log()
    return kl.sum(-1)[used].mean()


def tower_guide_losses(probs: list[torch.Tensor], batch: Batch, group_layer: int, count_layer: int,
                       heads: int) -> dict[str, torch.Tensor]:
    group, count = guide_targets(batch)
    return {"group": guide_loss(probs[group_layer], group, heads),
            "count": guide_loss(probs[count_layer], count, heads)}
