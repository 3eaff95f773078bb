"""Each graph's inputs and outputs, declared once.

A `GraphIO` names every tensor with its dtype and axes (an int is a static
size, a str a symbolic one). The export call's dynamic shapes, the manifest's
I/O table (which the runtime checks its feeds against) and TensorRT
optimisation profiles are all derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BATCH, TEXT_LEN = "batch", "text_len"


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphIO:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {k: v.to_dict() for k, v in self.inputs.items()},
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()}}

    def dynamic_shapes(self) -> dict[str, dict[int, torch.export.Dim]]:
        """torch.export dynamic shapes, one Dim object per symbolic axis name."""
        dims: dict[str, torch.export.Dim] = {}
        return {name: {axis: dims.setdefault(size, torch.export.Dim(size))
                       for axis, size in enumerate(spec.shape) if isinstance(size, str)}
                for name, spec in self.inputs.items()}


def vision_io(image_size: int, num_slots: int, out_width: int, text_width: int | None) -> GraphIO:
    """Vision graph (CLIP up to l* + compression + fused projector); text inputs iff text-aware."""
    inputs = {"pixel_values": TensorSpec("float32", (BATCH, 3, image_size, image_size))}
    if text_width is not None:
        inputs["text_embeds"] = TensorSpec("float32", (BATCH, TEXT_LEN, text_width))
        inputs["text_mask"] = TensorSpec("int64", (BATCH, TEXT_LEN))
    outputs = {
        "visual_tokens": TensorSpec("float32", (BATCH, num_slots, out_width)),
        "num_tokens": TensorSpec("int64", (BATCH,)),
        "kept_index": TensorSpec("int64", (BATCH, num_slots)),
    }
    return GraphIO(inputs, outputs)
