"""The vision graph: CLIP up to layer l*, compression, projector; and its ONNX export.

    pixel_values [B,3,H,W] (+ text_embeds [B,T,D], text_mask [B,T] when text-aware)
    -> visual_tokens [B,S,D] (LLM space, projector fused), num_tokens [B], kept_index [B,S]

Layers after l* are never computed. Layer l* itself is written out here so
that its CLS attention row and head-averaged keys come from the same q/k
that produce its output, with no attention map leaving the graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsezip_deploy.runtime.backends import open_backend
from sparsezip_deploy.runtime.manifest import GraphSpec
from sparsezip_deploy.sparsezip.config import MethodConfig, SparseZipConfig
from sparsezip_deploy.sparsezip.modules import build_compressor, project_text_to_vision

from .errors import ExportError
from .graph_io import dynamic_shapes, vision_io
from .parity import check_visual_tokens

OPSET = 18


def layers_to_run(feature_layer: int, num_layers: int) -> int:
    """How many encoder layers produce hidden_states[feature_layer] (HF indexing: 0 = embeddings)."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ExportError(f"vision_feature_layer {feature_layer} is outside a {num_layers}-layer tower")
    count = feature_layer % (num_layers + 1)
    if count < 1:
        raise ExportError("vision_feature_layer must select the output of an encoder layer, not the embeddings")
    return count


class VisionGraph(nn.Module):
    def __init__(self, llava, method: MethodConfig):
        super().__init__()
        config = llava.config
        if not isinstance(config.vision_feature_layer, int):
            raise ExportError("only a single vision_feature_layer is supported")
        if config.vision_feature_select_strategy != "default":
            raise ExportError(
                f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: only 'default' (CLS dropped) is supported")
        tower = llava.model.vision_tower.vision_model if hasattr(llava.model.vision_tower, "vision_model") \
            else llava.model.vision_tower
        count = layers_to_run(config.vision_feature_layer, len(tower.encoder.layers))
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(tower.encoder.layers[:count - 1])
        self.last = tower.encoder.layers[count - 1]
        self.projector = llava.model.multi_modal_projector
        self.method = method
        self.compressor = build_compressor(method)
        vc = config.vision_config
        self.image_size, self.patch_size = vc.image_size, vc.patch_size
        self.num_patches = (vc.image_size // vc.patch_size) ** 2
        self.layers_run = count
        self.text_aware = isinstance(method, SparseZipConfig) and method.text_aware
        method.validate(self.num_patches)

    @property
    def num_slots(self) -> int:
        return self.method.num_slots(self.num_patches)

    @property
    def out_width(self) -> int:
        return self.projector.linear_2.out_features

    def io(self) -> GraphSpec:
        return vision_io(self.image_size, self.num_slots, self.out_width,
                         self.out_width if self.text_aware else None)

    def encode(self, pixel_values: torch.Tensor):
        """-> h [B,N,C] of layer l*, cls_attn [B,heads,N], kmet [B,N,hd]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            x = layer(x, None)
        attn, layer = self.last.self_attn, self.last
        y = layer.layer_norm1(x)

        def heads(t):  # [B,N,C] -> [B,heads,N,hd]
            return t.view(*t.shape[:2], attn.num_heads, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj(y)), heads(attn.k_proj(y)), heads(attn.v_proj(y))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1)
        o = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape)
        x = x + attn.out_proj(o)
        x = x + layer.mlp(layer.layer_norm2(x))
        return x, probs[:, :, 0], k.mean(1)

    def forward(self, pixel_values, text_embeds=None, text_mask=None):
        h, cls_attn, kmet = self.encode(pixel_values)
        text_vis = None
        if self.text_aware:
            text_vis = project_text_to_vision(text_embeds, self.projector.linear_1.weight,
                                              self.projector.linear_2.weight)
        tokens, num, kept = self.compressor(h, cls_attn, kmet, text_vis, text_mask)
        visual = self.projector(tokens)
        valid = torch.arange(visual.shape[1], device=visual.device).unsqueeze(0) < num.unsqueeze(-1)
        return visual * valid.unsqueeze(-1).to(visual.dtype), num, kept


def example_inputs(graph: VisionGraph, batch: int = 2, text_len: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs for tracing and parity; batch and text length differ from every static axis."""
    g = torch.Generator().manual_seed(seed)
    feeds = {"pixel_values": torch.randn(batch, 3, graph.image_size, graph.image_size, generator=g)}
    if graph.text_aware:
        feeds["text_embeds"] = torch.randn(batch, text_len, graph.out_width, generator=g) * 0.05
        mask = torch.ones(batch, text_len, dtype=torch.int64)
        mask[0, text_len - 2:] = 0
        feeds["text_mask"] = mask
    return feeds


def export_vision(graph: VisionGraph, path: Path) -> GraphSpec:
    """Export `graph` to ONNX (torch dynamo exporter, opset 18); dynamic batch and text length."""
    io = graph.io()
    feeds = example_inputs(graph)
    with torch.no_grad():
        torch.onnx.export(
            graph.eval(), (), str(path), kwargs=feeds, dynamo=True, opset_version=OPSET,
            input_names=list(io.inputs), output_names=list(io.outputs),
            dynamic_shapes=dynamic_shapes(io), external_data=False, verbose=False)
    return io


def run_onnx(path: Path, feeds: dict[str, torch.Tensor], spec: GraphSpec | None = None) -> dict[str, np.ndarray]:
    """The exported graph on the runtime's own ORT backend (CPU), feeds checked against `spec`
    (None: against the graph's own declaration)."""
    with open_backend("ort", path, spec) as backend:
        return backend.run({k: v.numpy() for k, v in feeds.items()})


def check_vision(graph: VisionGraph, path: Path) -> list[str]:
    """ORT vs PyTorch on the example inputs: indices and counts exact, tokens within tolerance."""
    feeds = example_inputs(graph, seed=1)
    with torch.no_grad():
        expected = dict(zip(graph.io().outputs, (t.numpy() for t in graph(**feeds))))
    return [str(c) for c in check_visual_tokens(expected, run_onnx(path, feeds, graph.io()))]
