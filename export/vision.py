"""The vision graph: CLIP up to layer l*, compression, projector; and its ONNX export.

    pixel_values [B,3,H,W] float32 (+ text_embeds [B,T,D] float32, text_mask [B,T] when text-aware)
    -> visual_tokens [B,S,D] float32 (LLM space, projector fused), num_tokens [B], kept_index [B,S]

Layers after l* are never computed. Layer l* itself is written out here so
that its CLS attention row and head-averaged keys come from the same q/k
that produce its output, with no attention map leaving the graph.

Precision (`dtype`): the CLIP tower and the projector run in `dtype`; the
selection path (scores, text relevance, TopK, dynamic K, merging) always runs
in float32, on the tower's hidden states, keys and CLS attention row cast up,
so that a float16 graph keeps what the float32 one keeps wherever the scores
are not within float16 rounding of a tie. The I/O is float32 whatever `dtype`
is: preprocessing and the text embeddings are float32 numpy, and the runtime
casts visual_tokens to the LLM's dtype when it joins them with the embedding
table (an S x D copy it makes anyway), so the manifest's vision contract is the
same for every precision.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsezip_deploy.runtime.backends import open_backend
from sparsezip_deploy.runtime.manifest import TRUNK_OUTPUTS, GraphSpec
from sparsezip_deploy.sparsezip.config import MethodConfig, SparseZipConfig
from sparsezip_deploy.sparsezip.modules import build_compressor, project_text_to_vision

from .errors import ExportError
from .graph_io import SELECTOR_FILE, TRUNK_FILE, dynamic_shapes, trunk_io, vision_io
from .llm import DTYPES
from .parity import Comparison, SelectionError, check, check_selection, check_visual_tokens

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
    """The vision graph of `llava` with `method`.

    Converts llava's vision tower and projector to `dtype` in place (as DecoderGraph does its LLM).
    """

    def __init__(self, llava, method: MethodConfig, dtype: str = "float32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ExportError(f"--vision-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        config = llava.config
        if not isinstance(config.vision_feature_layer, int):
            raise ExportError("only a single vision_feature_layer is supported")
        if config.vision_feature_select_strategy != "default":
            raise ExportError(
                f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}: only 'default' (CLS dropped) is supported")
        tower = llava.model.vision_tower.vision_model if hasattr(llava.model.vision_tower, "vision_model") \
            else llava.model.vision_tower
        count = layers_to_run(config.vision_feature_layer, len(tower.encoder.layers))
        tower.to(DTYPES[dtype])
        llava.model.multi_modal_projector.to(DTYPES[dtype])
        self.dtype_name = dtype
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(tower.encoder.layers[:count - 1])
        self.last = tower.encoder.layers[count - 1]
        self.projector = llava.model.multi_modal_projector
        self.method = method
        self.compressor = build_compressor(method, self.project_float32)
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
        """pixel_values [B,3,H,W] float32 -> h [B,N,C] of layer l*, cls_attn [B,heads,N], kmet [B,N,hd],
        all float32 (the selection's inputs) whatever the tower's dtype."""
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(DTYPES[self.dtype_name])))
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
        # Cast before the head mean: from here on the arithmetic is the selection's, float32.
        return x.float(), probs[:, :, 0].float(), k.float().mean(1)

    def forward(self, pixel_values, text_embeds=None, text_mask=None):
        return self.compress(*self.encode(pixel_values), text_embeds, text_mask)

    def project_float32(self, patches: torch.Tensor) -> torch.Tensor:
        """The projector on float32 selection inputs (sparsezip's forward text form)."""
        return self.projector(patches.to(DTYPES[self.dtype_name])).float()

    def text_to_vision(self, text_embeds):
        """The prompt as the text term reads it: mapped to vision width through the projector
        transposed, or (forward form) left in the LLM space for the projected candidates."""
        if not self.text_aware:
            return None
        if self.method.text_form == "forward":
            return text_embeds
        return project_text_to_vision(text_embeds, self.projector.linear_1.weight.float(),
                                      self.projector.linear_2.weight.float())

    def selection_scores(self, h, cls_attn, kmet, text_embeds=None, text_mask=None):
        """[B,P] what the method ranks patches by (None: it selects nothing)."""
        return self.compressor.selection_scores(h, cls_attn, kmet, self.text_to_vision(text_embeds), text_mask)

    def compress(self, h, cls_attn, kmet, text_embeds=None, text_mask=None, dominant=None):
        """encode's float32 features -> visual_tokens [B,S,D] float32, num_tokens [B], kept_index [B,S]:
        selection in float32, the projector in the tower's dtype. `dominant` [B,P] bool: these
        patches instead of the method's own choice (parity checks)."""
        tokens, num, kept = self.compressor(h, cls_attn, kmet, self.text_to_vision(text_embeds), text_mask,
                                            dominant=dominant)
        visual = self.projector(tokens.to(DTYPES[self.dtype_name])).float()
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
    return _export(graph, example_inputs(graph), path)


def run_onnx(path: Path, feeds: dict[str, torch.Tensor], spec: GraphSpec | None = None) -> dict[str, np.ndarray]:
    """The exported graph on the runtime's own ORT backend (CPU), feeds checked against `spec`
    (None: against the graph's own declaration)."""
    with open_backend("ort", path, spec) as backend:
        return backend.run({k: v.numpy() for k, v in feeds.items()})


class Trunk(nn.Module):
    """`encode` of a VisionGraph alone, as a graph of its own: what the selection reads, and the
    same for every prompt (the split engine's vision_trunk.onnx; the float16 parity check)."""

    def __init__(self, vision: VisionGraph):
        super().__init__()
        self.vision = vision  # not `graph`: torch.fx's GraphModule owns that name

    def io(self) -> GraphSpec:
        v, attn = self.vision, self.vision.last.self_attn
        return trunk_io(v.image_size, 1 + v.num_patches, attn.embed_dim, attn.num_heads, attn.head_dim)

    def forward(self, pixel_values):
        return self.vision.encode(pixel_values)


class Selector(nn.Module):
    """`compress` of a VisionGraph alone: the trunk's features (+ the prompt's words) -> the visual
    tokens (the split engine's vision_selector.onnx, run once per question)."""

    def __init__(self, vision: VisionGraph):
        super().__init__()
        self.vision = vision

    def io(self) -> GraphSpec:
        v = self.vision
        return vision_io(v.image_size, v.num_slots, v.out_width, v.out_width if v.text_aware else None,
                         features=Trunk(v).io())

    def forward(self, hidden_states, cls_attn, kmet, text_embeds=None, text_mask=None):
        return self.vision.compress(hidden_states, cls_attn, kmet, text_embeds, text_mask)


def _export(module: nn.Module, feeds: dict[str, torch.Tensor], path: Path) -> GraphSpec:
    """`module` to ONNX (torch dynamo exporter, opset 18), with its io()'s dynamic axes."""
    io = module.io()
    with torch.no_grad():
        torch.onnx.export(
            module.eval(), (), str(path), kwargs=feeds, dynamo=True, opset_version=OPSET,
            input_names=list(io.inputs), output_names=list(io.outputs),
            dynamic_shapes=dynamic_shapes(io), external_data=False, verbose=False)
    return io


def export_trunk(graph: VisionGraph, path: Path) -> GraphSpec:
    """Export `graph`'s tower up to l* alone (opset 18, dynamic batch), as export_vision exports the whole."""
    return _export(Trunk(graph), {"pixel_values": example_inputs(graph)["pixel_values"]}, path)


def export_selector(graph: VisionGraph, path: Path) -> GraphSpec:
    """Export `graph`'s selection and projector alone, traced on the tower's own features of example_inputs."""
    feeds = example_inputs(graph)
    with torch.no_grad():
        features = graph.encode(feeds.pop("pixel_values"))
    return _export(Selector(graph), {**dict(zip(TRUNK_OUTPUTS, features)), **feeds}, path)


def export_split(graph: VisionGraph, folder: Path) -> tuple[GraphSpec, GraphSpec]:
    """The trunk and the selector into `folder`, under their graph_io file names."""
    return export_trunk(graph, folder / TRUNK_FILE), export_selector(graph, folder / SELECTOR_FILE)


# Two prompts of different lengths (the shorter one padded) that name objects, as users' do.
PARITY_PROMPTS = ("What colour is the small circle?", "Is there a red square to the left of the blue triangle?")


def parity_inputs(graph: VisionGraph, images, image_config, tokenizer, table: np.ndarray) -> dict[str, torch.Tensor]:
    """The vision graph's feeds for real content: `images` (PIL) through the runtime's own
    preprocessing and, when text-aware, PARITY_PROMPTS as the runtime embeds them (their
    words, rows of `table` [V,D]; tokenizer: a tokenizers.Tokenizer)."""
    from sparsezip_deploy.runtime.generate import text_features
    from sparsezip_deploy.runtime.preprocess import preprocess_batch

    feeds = {"pixel_values": torch.from_numpy(preprocess_batch(images, image_config))}
    if graph.text_aware:
        prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(len(images))]
        text = text_features(np.asarray(table, np.float32),
                             [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts])
        feeds.update({name: torch.from_numpy(value) for name, value in text.items()})
    return feeds


def _unrounded_k(graph: VisionGraph, scores: torch.Tensor) -> np.ndarray | None:
    method = graph.method
    if isinstance(method, SparseZipConfig) and method.dynamic_k:
        return graph.compressor.unrounded_k(scores).numpy()
    return None


def _check_compressed(graph: VisionGraph, features, feeds, actual: dict[str, np.ndarray],
                      dtype: str) -> list[Comparison]:
    """The whole graph's ORT outputs against torch's selection and projector on `features`
    (h, cls_attn, kmet): selected patches exact but for the reference's own top-K ties,
    then everything against the reference run on ORT's selection."""
    io = graph.io()
    text = (feeds.get("text_embeds"), feeds.get("text_mask"))
    expected = dict(zip(io.outputs, (t.numpy() for t in graph.compress(*features, *text))))
    scores = graph.selection_scores(*features, *text)
    results = []
    if scores is not None:
        selection, dominant = check_selection(expected["kept_index"], actual["kept_index"], scores.numpy(),
                                              _unrounded_k(graph, scores))
        results.append(selection)
        if dominant is not None:
            expected = dict(zip(io.outputs, (t.numpy() for t in graph.compress(
                *features, *text, dominant=torch.from_numpy(dominant)))))
    return results + check_visual_tokens(expected, actual, dtype)


def check_vision(graph: VisionGraph, path: Path, feeds: dict[str, torch.Tensor] | None = None) -> list[str]:
    """ORT vs PyTorch on `feeds` (default: example_inputs, random pixels), best real content
    (parity_inputs): counts and selected patches exact but for top-K ties of the reference's
    own scores (reported, parity.check_selection), tokens within tolerance.

    A float16 tower in ORT and in torch rounds differently (ORT CPU has float16
    kernels for few ops and runs the rest in float32 between inserted casts), by
    about 1e-3 of each feature: enough to swap near-tied patches at the top-K
    boundary or near-tied tokens between clusters, which says nothing about the
    export. So a float16 graph is checked in two parts that together cover it:
    the tower (exported alone) against torch within float16 tolerance, then the
    whole graph against torch's selection and projector fed ORT's own tower
    features, where indices must match as in float32.

    A deep float32 tower can round enough for the same (ViT-L's 24 layers moved
    a patch 9.5e-5 from the top-K threshold, outside the 8.3e-5 tie window of
    its score range): when the selection differs beyond the tie window on
    torch's features (parity.SelectionError), the float32 graph is checked in
    the same two parts, and the report says so. Every other mismatch fails at
    once.
    """
    feeds = example_inputs(graph, seed=1) if feeds is None else feeds
    io = graph.io()
    actual = run_onnx(path, feeds, io)
    with torch.no_grad():
        if graph.dtype_name == "float32":
            features = graph.encode(feeds["pixel_values"])
            try:
                return [str(c) for c in _check_compressed(graph, features, feeds, actual, "float32")]
            except SelectionError as direct:
                moved = f"selection on torch's own tower features: {direct}; checked on ORT's tower instead"
        else:
            moved = None
        with tempfile.TemporaryDirectory() as tmp:
            trunk_spec = export_trunk(graph, Path(tmp) / TRUNK_FILE)
            results, features = _check_trunk(graph, Path(tmp) / TRUNK_FILE, trunk_spec, feeds)
        results += _check_compressed(graph, features, feeds, actual, graph.dtype_name)
    return ([moved] if moved else []) + [str(c) for c in results]


def _check_trunk(graph: VisionGraph, path: Path, spec: GraphSpec, feeds) -> tuple[list[Comparison], tuple]:
    """The trunk graph at `path` against torch's encode, within its dtype's tolerance; and ORT's features."""
    trunk = run_onnx(path, {"pixel_values": feeds["pixel_values"]}, spec)
    wanted = dict(zip(spec.outputs, (t.numpy() for t in graph.encode(feeds["pixel_values"]))))
    return check(wanted, trunk, graph.dtype_name), tuple(torch.from_numpy(trunk[name]) for name in spec.outputs)


def check_split(graph: VisionGraph, trunk: Path, selector: Path, feeds: dict[str, torch.Tensor] | None = None,
                ) -> list[str]:
    """A split engine's two graphs, as check_vision's float16 branch checks the fused one (for every
    dtype): the trunk against torch's encode within tolerance, then the selector, fed ORT's own
    trunk features, against torch's selection and projector on those same features (kept patches
    exact but for the reference's top-K ties). Together they cover what the runtime runs."""
    feeds = example_inputs(graph, seed=1) if feeds is None else feeds
    with torch.no_grad():
        results, features = _check_trunk(graph, trunk, Trunk(graph).io(), feeds)
        text = {name: feeds[name] for name in ("text_embeds", "text_mask") if name in feeds}
        actual = run_onnx(selector, {**dict(zip(TRUNK_OUTPUTS, features)), **text}, Selector(graph).io())
        results += _check_compressed(graph, features, feeds, actual, graph.dtype_name)
    return [str(c) for c in results]
