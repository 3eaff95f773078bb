"""Each graph's inputs and outputs, declared once, in the manifest's own types.

A graph is a `GraphSpec` (runtime/manifest.py): every tensor with its dtype and
axes (an int is a static size, a str a symbolic one). The export call's dynamic
shapes (here), the manifest's I/O table (which the runtime checks its feeds
against) and TensorRT optimisation profiles are all derived from it.
"""
from __future__ import annotations

import torch

from sparsezip_deploy.runtime.manifest import BATCH, TEXT_LEN, TRUNK_OUTPUTS, GraphSpec, TensorSpec

TRUNK_FILE, SELECTOR_FILE = "vision_trunk.onnx", "vision_selector.onnx"


def dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, torch.export.Dim]]:
    """torch.export dynamic shapes of the inputs, one Dim object per symbolic axis name."""
    dims: dict[str, torch.export.Dim] = {}
    return {name: {axis: dims.setdefault(size, torch.export.Dim(size))
                   for axis, size in enumerate(t.shape) if isinstance(size, str)}
            for name, t in spec.inputs.items()}


def vision_io(image_size: int, num_slots: int, out_width: int, text_width: int | None,
              features: GraphSpec | None = None) -> GraphSpec:
    """Vision graph (CLIP up to l* + compression + fused projector); text inputs iff text-aware.
    With `features` (trunk_io's spec), the selector instead: the trunk's outputs in, not pixels."""
    inputs = {"pixel_values": TensorSpec("float32", (BATCH, 3, image_size, image_size))} if features is None \
        else dict(features.outputs)
    if text_width is not None:
        inputs["text_embeds"] = TensorSpec("float32", (BATCH, TEXT_LEN, text_width))
        inputs["text_mask"] = TensorSpec("int64", (BATCH, TEXT_LEN))
    outputs = {
        "visual_tokens": TensorSpec("float32", (BATCH, num_slots, out_width)),
        "num_tokens": TensorSpec("int64", (BATCH,)),
        "kept_index": TensorSpec("int64", (BATCH, num_slots)),
    }
    return GraphSpec("vision.onnx" if features is None else SELECTOR_FILE, inputs, outputs)


def trunk_io(image_size: int, num_tokens: int, width: int, heads: int, head_dim: int) -> GraphSpec:
    """The vision tower up to l* alone (export/vision.py Trunk): the features the selection reads, float32."""
    inputs = {"pixel_values": TensorSpec("float32", (BATCH, 3, image_size, image_size))}
    shapes = {"hidden_states": (BATCH, num_tokens, width), "cls_attn": (BATCH, heads, num_tokens),
              "kmet": (BATCH, num_tokens, head_dim)}
    return GraphSpec(TRUNK_FILE, inputs, {name: TensorSpec("float32", shapes[name]) for name in TRUNK_OUTPUTS})
