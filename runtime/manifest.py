"""manifest.json: the one schema of an engine folder, torch-free.

export/build.py constructs a `Manifest` and writes it (`write_manifest`); the
runtime, calib and the benchmarks read it back (`read_manifest`). Reading
checks every field's type and range and the sections against each other, so a
corrupt or hand-edited manifest is one `EngineError` naming the field
(`manifest.json: llm.head_dim: 0 is below the minimum 1`), never an assert, a
TypeError or an absurd allocation later on.

Also here, once: the format version, the LLM cache's tensor-name templates
(onnxruntime-genai's `past_key_names` style: the runtime never builds a name
itself) and the symbolic axes. The annotation-driven parser is runtime/schema.py;
how the folder's files are opened (regular files only) and hashed, runtime/files.py.
"""
from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import numpy as np

from .errors import EngineError
from .files import open_regular, sha256_file
from .schema import Matches, OneOf, Range, Section, brief, clip, invalid

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOOLS = ("sparsezip-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")

# Manifest dtype names -> numpy; the graphs only use these.
DTYPES: Mapping[str, type] = MappingProxyType({
    "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
})
LLM_DTYPES = ("float32", "float16")
# The symbolic axes of the graphs (export names them, the runtime's feed checks read them).
BATCH, TEXT_LEN, SEQ, PAST, TOTAL = "batch", "text_len", "seq", "past", "total"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
# In-LLM pruning (llm.pruning): the image prefill's own graph, its extra input and, per pruned
# layer group g >= 1, which prompt slot each of its positions holds (-1: a merged token) and its mask.
PREFILL_GRAPH, VISUAL_START = "llm_prefill", "visual_start"
GROUP_SLOTS, GROUP_MASK = "group_slots.%d", "group_mask.%d"
PRUNE_METHODS = ("fastv", "sparsevlm")
# The vision stage is one graph ("vision": CLIP to l*, selection, projector) or, split, two: the
# prompt-independent trunk (CLIP to l*), whose outputs the runtime caches per image, and the
# selector (scores, text term, TopK, merging, projector), which reads them and runs per question.
VISION_GRAPH, TRUNK_GRAPH, SELECTOR_GRAPH = "vision", "vision_trunk", "vision_selector"
TRUNK_OUTPUTS = ("hidden_states", "cls_attn", "kmet")  # layer l*: [B,N,C], CLS attention row [B,heads,N], keys [B,N,hd]
NEW_KEY, NEW_VALUE = "new_key_values.%d.key", "new_key_values.%d.value"
PIL_RESAMPLING = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
# Serving limits of a folder whose manifest declares none (export/build.py writes them).
DEFAULT_MAX_BATCH, DEFAULT_MAX_TEXT_LEN = 8, 512
# A real manifest is ~10 KB; bigger is not one, and is not read whole into memory.
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32  # nesting of its JSON (the schema's deepest is 6): free-form records stay printable
# Elements of a tensor's static axes (Vicuna-7B's largest is 32000 x 4096 = 2^27): a graph
# declaring more is not one this runtime can allocate for.
MAX_STATIC_ELEMENTS = 1 << 32
# K and V of every layer per position (Vicuna-7B fp16: 512 KiB, Llama-2-70B without GQA: 2.5 MiB).
MAX_KV_BYTES_PER_TOKEN = 64 << 20


Count = Annotated[int, Range(1, 1 << 24)]  # widths, sizes, vocabulary, positions
Layers = Annotated[int, Range(1, 4096)]
Pixels = Annotated[int, Range(1, 8192)]  # image sides (preprocess.MAX_PIXELS is 8192^2)
TokenId = Annotated[int, Range(0, (1 << 31) - 1)]
# No separators, no control characters, at most 255 characters (NAME_MAX; longer fails in lstat).
FileName = Annotated[str, Matches(r"(?!\.\.?$)[^/\\\x00-\x1f]{1,255}", "a plain file name")]
Symbol = Annotated[str, Matches(r"[A-Za-z_][A-Za-z0-9_]*", "an axis name")]
Dim = Annotated[int, Range(1, 1 << 24)] | Symbol  # a static size or a symbolic axis
NameTemplate = Annotated[str, Matches(r"[^%]*%d[^%]*", "a name template with one %d")]


# -- the sections

@dataclass(frozen=True)
class TensorSpec(Section):
    dtype: Annotated[str, OneOf(tuple(DTYPES))]
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if len(self.shape) > 8:
            raise ValueError(f"shape: {len(self.shape)} axes, more than the 8 a graph here has")
        if math.prod(d for d in self.shape if isinstance(d, int)) > MAX_STATIC_ELEMENTS:
            raise ValueError(f"shape: {brief(list(self.shape))}: its static axes hold over "
                             f"{MAX_STATIC_ELEMENTS} elements")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])


@dataclass(frozen=True)
class GraphSpec(Section):
    """One graph's file and its inputs / outputs (name -> dtype and axes), declared once."""

    file: FileName
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    def __post_init__(self):
        if not self.inputs or not self.outputs:
            raise ValueError("a graph needs inputs and outputs")


@dataclass(frozen=True)
class Artifact(Section):
    bytes: Annotated[int, Range(0, 1 << 50)]
    sha256: Annotated[str, Matches(r"[0-9a-f]{64}", "a sha256 hex digest")]


@dataclass(frozen=True)
class ImageConfig(Section):
    """What preprocessing does to an image before `pixel_values`; never guessed.

    Order: optional pad to square (original LLaVA's `image_aspect_ratio: pad`), resize
    the shortest edge with PIL filter `resample`, optional center crop, multiply by
    `rescale_factor`, normalise with `mean` / `std`.
    """

    crop_height: Pixels
    crop_width: Pixels
    shortest_edge: Pixels
    resample: Annotated[int, OneOf(PIL_RESAMPLING)]  # 3 = bicubic for CLIP
    rescale_factor: Annotated[float, Range(0, 1, lo_open=True)]
    mean: tuple[Annotated[float, Range(-1e3, 1e3)], Annotated[float, Range(-1e3, 1e3)],
                Annotated[float, Range(-1e3, 1e3)]]
    std: tuple[Annotated[float, Range(0, 1e3, lo_open=True)], Annotated[float, Range(0, 1e3, lo_open=True)],
               Annotated[float, Range(0, 1e3, lo_open=True)]]
    do_center_crop: bool
    pad_to_square: bool

    @property
    def output_size(self) -> int | None:
        """The side of a preprocessed image when it is fixed (square crop), else None."""
        return self.crop_height if self.do_center_crop and self.crop_height == self.crop_width else None


@dataclass(frozen=True)
class VisionInfo(Section):
    image_size: Pixels
    patch_size: Pixels
    grid: tuple[Count, Count]  # rows, columns of the patch grid
    num_patches: Count
    hidden_size: Count
    feature_layer: Annotated[int, Range(-4096, 4096)]
    layers_run: Layers
    num_slots: Count  # S: rows of visual_tokens, valid ones first
    projector: Annotated[str, OneOf(("fused",))]
    out_width: Count
    text_aware: bool

    def __post_init__(self):
        if self.grid[0] * self.grid[1] != self.num_patches:
            raise ValueError(f"grid {list(self.grid)} does not hold {self.num_patches} patches")
        if max(self.grid) * self.patch_size > self.image_size:
            raise ValueError(f"grid {list(self.grid)} of {self.patch_size} px patches exceeds "
                             f"{self.image_size} px images")


@dataclass(frozen=True)
class CacheGroup(Section):
    """Decoder layers whose past has one length: their past inputs share the symbolic axis `past_axis`,
    and their attention covers past + new positions under the mask input `mask` [batch, total_axis]."""

    layers: tuple[Annotated[int, Range(0, 4095)], ...]
    past_axis: Symbol
    mask: Annotated[str, Matches(r"attention_mask(\.[0-9]{1,4})?", "attention_mask or attention_mask.<g>")] \
        = "attention_mask"
    total_axis: Symbol = TOTAL

    @staticmethod
    def pruned(index: int, layers: tuple[int, ...]) -> CacheGroup:
        """Group `index` >= 1 of a pruning method: its own past, mask and total axes."""
        return CacheGroup(layers, f"{PAST}_{index}", f"attention_mask.{index}", f"{TOTAL}_{index}")


@dataclass(frozen=True)
class CacheLayout(Section):
    """The LLM graph's cache tensors: name templates (`% layer`) and layer groups.

    Sequence-major and append-only: each layer's past is an input
    [past, batch, kv_heads, head_dim] (the first `past` positions of the
    runtime's cache buffer) and the graph outputs only the `seq` new positions,
    [seq, batch, kv_heads, head_dim], which the runtime binds in place right
    after them. One group today; a method that drops visual tokens inside the
    LLM keeps fewer positions in later layers, each group's past its own axis.
    """

    groups: tuple[CacheGroup, ...]
    past_key: NameTemplate = PAST_KEY
    past_value: NameTemplate = PAST_VALUE
    new_key: NameTemplate = NEW_KEY
    new_value: NameTemplate = NEW_VALUE

    @classmethod
    def single_group(cls, num_layers: int) -> CacheLayout:
        return cls(groups=(CacheGroup(tuple(range(num_layers)), PAST),))

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.past_key % layer, self.past_value % layer

    def new_names(self, layer: int) -> tuple[str, str]:
        return self.new_key % layer, self.new_value % layer

    def __post_init__(self):
        if not self.groups:
            raise ValueError("needs at least one layer group")
        if self.groups[0].mask != "attention_mask" or self.groups[0].total_axis != TOTAL:
            raise ValueError("the first layer group reads attention_mask [batch, total]")
        for field in ("past_axis", "mask", "total_axis"):
            names = [getattr(g, field) for g in self.groups]
            if len(set(names)) != len(names):
                raise ValueError(f"layer groups share a {field}: {names}")


@dataclass(frozen=True)
class PruneStage(Section):
    """After layer `after`, the visual tokens are cut to `keep` (+ `merged` recycled ones)."""

    after: Annotated[int, Range(0, 4094)]
    keep: Count
    merged: Annotated[int, Range(0, 1 << 24)] = 0


@dataclass(frozen=True)
class LlmPruning(Section):
    """Visual tokens dropped inside the LLM during the image prefill (graph llm_prefill).

    The prefill prompt carries `visual_slots` visual positions per row from the
    `visual_start` input on (the vision graph's slots, padding masked). Cache
    group g >= 1 holds the layers after stage g-1: the prompt minus what that
    stage dropped, then every later position. `config` is the method's config
    (llm_prune.config).
    """

    method: Annotated[str, OneOf(PRUNE_METHODS)]
    visual_slots: Count
    stages: tuple[PruneStage, ...]
    config: Mapping[str, Any]

    def __post_init__(self):
        if not self.stages:
            raise ValueError("needs at least one stage")
        if any(b.after <= a.after for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError("stages must follow each other (increasing `after`)")
        carried = self.visual_slots
        for stage in self.stages:
            if stage.keep >= carried:
                raise ValueError(f"stage after layer {stage.after}: keep {stage.keep} of {carried} visual tokens")
            carried = stage.keep + stage.merged

    def carried(self, group: int) -> int:
        """Visual positions the prompt keeps in cache group `group`."""
        return self.visual_slots if group == 0 else self.stages[group - 1].keep + self.stages[group - 1].merged

    def group_seq(self, group: int, seq: int) -> int:
        """Prompt positions group `group` keeps of a `seq`-slot image prefill."""
        return seq - self.visual_slots + self.carried(group)


@dataclass(frozen=True)
class LlmInfo(Section):
    num_layers: Layers
    num_kv_heads: Annotated[int, Range(1, 4096)]
    head_dim: Annotated[int, Range(1, 4096)]
    hidden_size: Count
    vocab_size: Count
    max_position_embeddings: Count
    dtype: Annotated[str, OneOf(LLM_DTYPES)]
    embed_tokens: FileName  # the [vocab, hidden] table, in `dtype`
    cache: CacheLayout
    pruning: LlmPruning | None = None  # FastV / SparseVLM; None: every layer keeps every position

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, batch 1 (Vicuna-7B fp16: 512 KiB)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize

    def __post_init__(self):
        if self.kv_bytes_per_token > MAX_KV_BYTES_PER_TOKEN:
            raise ValueError(f"num_layers {self.num_layers} x num_kv_heads {self.num_kv_heads} x head_dim "
                             f"{self.head_dim} needs {self.kv_bytes_per_token >> 20} MiB of KV cache per token, "
                             f"over the {MAX_KV_BYTES_PER_TOKEN >> 20} MiB limit")
        covered = sorted(layer for group in self.cache.groups for layer in group.layers)
        if covered != list(range(self.num_layers)):
            raise ValueError(f"cache groups must hold each of the {self.num_layers} layers once, "
                             f"got {covered[:8]}{' ...' if len(covered) > 8 else ''}")
        # Pruning decides the groups: layers up to each stage, and the rest; no pruning, one group.
        ends = [] if self.pruning is None else [s.after for s in self.pruning.stages]
        starts = [0] + [e + 1 for e in ends]
        want = [tuple(range(a, b + 1)) for a, b in zip(starts, ends + [self.num_layers - 1])]
        if [g.layers for g in self.cache.groups] != want:
            raise ValueError(f"cache groups {[list(g.layers) for g in self.cache.groups]} do not follow the "
                             f"pruning stages (expected {[list(w) for w in want]})")


@dataclass(frozen=True)
class TokenIds(Section):
    image_token_id: TokenId
    bos_token_id: TokenId
    eos_token_id: TokenId
    pad_token_id: TokenId

    @property
    def special(self) -> frozenset[int]:
        return frozenset((self.bos_token_id, self.image_token_id, self.eos_token_id, self.pad_token_id))


@dataclass(frozen=True)
class PromptTemplate(Section):
    first_turn: str  # "USER: <image>\n{prompt} ASSISTANT:"
    next_turn: str  # what follows an assistant answer: " USER: {prompt} ASSISTANT:"
    image_token: Annotated[str, Matches(r".+", "a non-empty string")]

    def __post_init__(self):
        if "{prompt}" not in self.first_turn or "{prompt}" not in self.next_turn:
            raise ValueError("first_turn and next_turn must both contain {prompt}")
        if self.first_turn.count(self.image_token) != 1:
            raise ValueError(f"first_turn must contain {self.image_token!r} exactly once")


@dataclass(frozen=True)
class Limits(Section):
    """The largest shapes the engine serves: TensorRT's optimisation profiles end there, the runtime refuses beyond."""

    max_batch: Annotated[int, Range(1, 1024)]  # rows of one ask_batch
    max_positions: Count  # prompt + answer, image tokens included, per row
    max_text_len: Count  # prompt tokens a text-aware vision graph reads

    def __post_init__(self):
        if self.max_text_len > self.max_positions:
            raise ValueError(f"max_text_len {self.max_text_len} exceeds max_positions {self.max_positions}")


Extent = Annotated[int, Range(0, 1 << 24)]  # a profile's dims: 0 is an empty past (TensorRT takes empty tensors)


@dataclass(frozen=True)
class ShapeRange(Section):
    """One input's TensorRT optimisation-profile shapes: valid from `min` to `max`, tuned for `opt`."""

    min: tuple[Extent, ...]
    opt: tuple[Extent, ...]
    max: tuple[Extent, ...]

    def __post_init__(self):
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError("min, opt and max must have the same rank")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"needs min <= opt <= max on every axis, got {list(self.min)} / "
                             f"{list(self.opt)} / {list(self.max)}")


Profile = Mapping[str, ShapeRange]  # input name -> its shapes, for every input with a symbolic axis


@dataclass(frozen=True)
class Plan(Section):
    """A serialized TensorRT engine built from one of the folder's ONNX graphs."""

    file: FileName
    onnx: FileName
    profiles: tuple[Profile, ...]  # profile i = the plan's optimisation profile i

    def __post_init__(self):
        if not self.profiles:
            raise ValueError("needs at least one optimisation profile")


@dataclass(frozen=True)
class TensorRTInfo(Section):
    """What sparsezip-build-trt built, and under which TensorRT and GPU: a plan runs only there."""

    version: Annotated[str, Matches(r"\d+(\.\d+)*\S*", "a version")]
    gpu: Annotated[str, Matches(r".+", "a GPU name")]
    compute_capability: Annotated[str, Matches(r"\d+\.\d+", "a compute capability such as 8.7")]
    plans: Mapping[str, Plan]  # graph name ("vision", "llm") -> its plan
    limits: Limits  # what the profiles span
    build_seconds: Annotated[float, Range(0, None)] = 0.0


@dataclass(frozen=True)
class Manifest(Section):
    """The whole file, parsed. `source`, `method`, `calibration` are free-form records."""

    format_version: Annotated[int, OneOf((FORMAT_VERSION,))]
    source: Mapping[str, Any]  # kind, path, name, weights_sha256
    method: Mapping[str, Any]  # the method config (sparsezip.config.config_to_dict)
    image: ImageConfig
    vision: VisionInfo
    llm: LlmInfo
    tokens: TokenIds
    prompt: PromptTemplate
    chat_template: str
    graphs: Mapping[str, GraphSpec]
    precision: Mapping[str, str]
    calibration: Mapping[str, Any]
    tools: Mapping[str, str]
    artifacts: Mapping[str, Artifact]
    limits: Limits | None = None  # None (folders built before it): derived, see `serving_limits`
    tensorrt: TensorRTInfo | None = None  # written by sparsezip-build-trt on the target device

    @property
    def method_name(self) -> str:
        return self.method["method"]

    @property
    def vision_split(self) -> bool:
        """The vision stage is a trunk and a selector graph (else the one fused `vision` graph)."""
        return TRUNK_GRAPH in self.graphs

    @property
    def vision_graphs(self) -> tuple[str, ...]:
        """The vision stage's graph names, in the order they run."""
        return (TRUNK_GRAPH, SELECTOR_GRAPH) if self.vision_split else (VISION_GRAPH,)

    @property
    def serving_limits(self) -> Limits:
        if self.limits is not None:
            return self.limits
        positions = self.llm.max_position_embeddings
        return Limits(DEFAULT_MAX_BATCH, positions, min(positions, DEFAULT_MAX_TEXT_LEN))

    def __post_init__(self):
        _check_consistency(self)


def _check_consistency(m: Manifest) -> None:
    """The sections must agree with each other before any graph is trusted with them."""
    if not isinstance(m.method.get("method"), str):
        raise ValueError("method.method: expected the method's name")
    if "llm" not in m.graphs:
        raise ValueError("graphs: no llm graph")
    split = {TRUNK_GRAPH, SELECTOR_GRAPH} & set(m.graphs)
    if VISION_GRAPH in m.graphs and split:
        raise ValueError(f"graphs: a {VISION_GRAPH} graph or a {TRUNK_GRAPH} + {SELECTOR_GRAPH} pair, not both")
    if VISION_GRAPH not in m.graphs and len(split) != 2:
        raise ValueError(f"graphs: no {VISION_GRAPH} graph (nor both {TRUNK_GRAPH} and {SELECTOR_GRAPH})")
    if m.image.output_size is not None and m.image.output_size != m.vision.image_size:
        raise ValueError(f"image: crops to {m.image.output_size} px but the vision graph takes "
                         f"{m.vision.image_size} px")
    if not m.image.do_center_crop and m.image.shortest_edge != m.vision.image_size:
        raise ValueError(f"image: resizes to {m.image.shortest_edge} px but the vision graph takes "
                         f"{m.vision.image_size} px")
    needed = {*(m.graphs[g].file for g in m.vision_graphs), m.graphs["llm"].file, m.llm.embed_tokens, TOKENIZER}
    if missing := sorted(needed - set(m.artifacts)):
        raise ValueError(f"artifacts: does not list {', '.join(missing)}")
    if bad := [n for n in m.artifacts if invalid(FileName, n)]:
        raise ValueError(f"artifacts: {bad[0]!r} is not a plain file name")
    for name in ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(m.tokens, name) >= m.llm.vocab_size:
            raise ValueError(f"tokens.{name}: {getattr(m.tokens, name)} is outside the vocabulary "
                             f"of {m.llm.vocab_size}")
    if m.vision.out_width != m.llm.hidden_size:
        raise ValueError(f"vision.out_width {m.vision.out_width} is not the LLM's hidden_size "
                         f"{m.llm.hidden_size} (the projector is fused)")
    if m.vision_split:
        _check_trunk_graph(m.graphs[TRUNK_GRAPH], m.vision)
        _check_vision_graph(m.graphs[SELECTOR_GRAPH], m.vision, m.graphs[TRUNK_GRAPH].outputs)
    else:
        _check_vision_graph(m.graphs[VISION_GRAPH], m.vision)
    _check_llm_graph(m.graphs["llm"], m.llm)
    if (PREFILL_GRAPH in m.graphs) != (m.llm.pruning is not None):
        raise ValueError(f"graphs: an {PREFILL_GRAPH} graph goes with llm.pruning, and only with it")
    if m.llm.pruning is not None:
        if m.llm.pruning.visual_slots != m.vision.num_slots:
            raise ValueError(f"llm.pruning.visual_slots {m.llm.pruning.visual_slots} is not the vision graph's "
                             f"{m.vision.num_slots} slots")
        if m.graphs[PREFILL_GRAPH].file not in m.artifacts:
            raise ValueError(f"artifacts: does not list {m.graphs[PREFILL_GRAPH].file}")
        _check_prefill_graph(m.graphs[PREFILL_GRAPH], m.llm)
    if m.limits is not None and m.limits.max_positions > m.llm.max_position_embeddings:
        raise ValueError(f"limits.max_positions {m.limits.max_positions} exceeds the LLM's "
                         f"max_position_embeddings {m.llm.max_position_embeddings}")
    if m.tensorrt is not None:
        for graph, plan in m.tensorrt.plans.items():
            if graph not in m.graphs or m.graphs[graph].file != plan.onnx:
                raise ValueError(f"tensorrt.plans.{graph}: built from {plan.onnx}, which is not a graph "
                                 "of this folder")
            if plan.file not in m.artifacts:
                raise ValueError(f"artifacts: does not list the plan {plan.file}")


def _check_vision_graph(g: GraphSpec, v: VisionInfo, features: Mapping[str, TensorSpec] | None = None) -> None:
    """The fused vision graph (pixel_values in), or with `features` (the trunk's outputs) the selector."""
    where = f"graphs.{VISION_GRAPH if features is None else SELECTOR_GRAPH}"
    image = {"pixel_values"} if features is None else set(features)
    want = image | ({"text_embeds", "text_mask"} if v.text_aware else set())
    if set(g.inputs) != want:
        raise ValueError(f"{where}: inputs {sorted(g.inputs)} do not match text_aware={v.text_aware} "
                         f"(expected {sorted(want)})")
    if features is None:
        _expect(g.inputs, f"{where}.inputs", "pixel_values", "float32", (BATCH, 3, v.image_size, v.image_size))
    for name, spec in (features or {}).items():
        _expect(g.inputs, f"{where}.inputs", name, spec.dtype, spec.shape)
    if v.text_aware:
        _expect(g.inputs, f"{where}.inputs", "text_embeds", "float32", (BATCH, TEXT_LEN, v.out_width))
        _expect(g.inputs, f"{where}.inputs", "text_mask", "int64", (BATCH, TEXT_LEN))
    _expect(g.outputs, f"{where}.outputs", "visual_tokens", "float32", (BATCH, v.num_slots, v.out_width))
    _expect(g.outputs, f"{where}.outputs", "num_tokens", "int64", (BATCH,))
    _expect(g.outputs, f"{where}.outputs", "kept_index", "int64", (BATCH, v.num_slots))


def _check_trunk_graph(g: GraphSpec, v: VisionInfo) -> None:
    """CLIP to l*: pixel_values in, TRUNK_OUTPUTS (float32, CLS + patches) out; text never enters it."""
    where = f"graphs.{TRUNK_GRAPH}"
    if set(g.inputs) != {"pixel_values"} or set(g.outputs) != set(TRUNK_OUTPUTS):
        raise ValueError(f"{where}: inputs {sorted(g.inputs)}, outputs {sorted(g.outputs)}; expected "
                         f"['pixel_values'], {sorted(TRUNK_OUTPUTS)}")
    _expect(g.inputs, f"{where}.inputs", "pixel_values", "float32", (BATCH, 3, v.image_size, v.image_size))
    tokens = 1 + v.num_patches
    _expect(g.outputs, f"{where}.outputs", "hidden_states", "float32", (BATCH, tokens, v.hidden_size))
    heads, head_dim = g.outputs["cls_attn"].shape[1], g.outputs["kmet"].shape[2]
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        raise ValueError(f"{where}.outputs: cls_attn's heads and kmet's head_dim must be static")
    _expect(g.outputs, f"{where}.outputs", "cls_attn", "float32", (BATCH, heads, tokens))
    _expect(g.outputs, f"{where}.outputs", "kmet", "float32", (BATCH, tokens, head_dim))


def _check_llm_graph(g: GraphSpec, llm: LlmInfo) -> None:
    where = "graphs.llm"
    _expect(g.inputs, f"{where}.inputs", "inputs_embeds", llm.dtype, (BATCH, SEQ, llm.hidden_size))
    _expect(g.inputs, f"{where}.inputs", "position_ids", "int64", (BATCH, SEQ))
    _expect(g.outputs, f"{where}.outputs", "logits", "float32", (BATCH, 1, llm.vocab_size))
    cache = llm.cache
    for group in cache.groups:
        _expect(g.inputs, f"{where}.inputs", group.mask, "int64", (BATCH, group.total_axis))
        for layer in group.layers:
            for name in cache.past_names(layer):
                _expect(g.inputs, f"{where}.inputs", name, llm.dtype,
                        (group.past_axis, BATCH, llm.num_kv_heads, llm.head_dim))
            for name in cache.new_names(layer):
                _expect(g.outputs, f"{where}.outputs", name, llm.dtype,
                        (SEQ, BATCH, llm.num_kv_heads, llm.head_dim))
    declared = {"inputs_embeds", "position_ids", *(group.mask for group in cache.groups),
                *(n for i in range(llm.num_layers) for n in cache.past_names(i))}
    if extra := sorted(set(g.inputs) - declared):
        raise ValueError(f"{where}.inputs: unexpected {', '.join(extra[:4])}")


def _check_prefill_graph(g: GraphSpec, llm: LlmInfo) -> None:
    """The image prefill of a pruning method: no past; group g's new positions on axis seq_g."""
    where = f"graphs.{PREFILL_GRAPH}"
    want = {"inputs_embeds", "attention_mask", "position_ids", VISUAL_START}
    if set(g.inputs) != want:
        raise ValueError(f"{where}.inputs: {sorted(g.inputs)}, expected {sorted(want)}")
    _expect(g.inputs, f"{where}.inputs", "inputs_embeds", llm.dtype, (BATCH, SEQ, llm.hidden_size))
    _expect(g.inputs, f"{where}.inputs", "attention_mask", "int64", (BATCH, SEQ))
    _expect(g.inputs, f"{where}.inputs", "position_ids", "int64", (BATCH, SEQ))
    _expect(g.inputs, f"{where}.inputs", VISUAL_START, "int64", (BATCH,))
    _expect(g.outputs, f"{where}.outputs", "logits", "float32", (BATCH, 1, llm.vocab_size))
    for index, group in enumerate(llm.cache.groups):
        seq = prefill_seq_axis(index)
        for layer in group.layers:
            for name in llm.cache.new_names(layer):
                _expect(g.outputs, f"{where}.outputs", name, llm.dtype,
                        (seq, BATCH, llm.num_kv_heads, llm.head_dim))
        if index:
            _expect(g.outputs, f"{where}.outputs", GROUP_SLOTS % index, "int64", (BATCH, seq))
            _expect(g.outputs, f"{where}.outputs", GROUP_MASK % index, "int64", (BATCH, seq))


def prefill_seq_axis(group: int) -> str:
    """The axis of group `group`'s positions in the image prefill's outputs (group 0: all of `seq`)."""
    return SEQ if group == 0 else f"{SEQ}_{group}"


def _expect(table: Mapping[str, TensorSpec], where: str, name: str, dtype: str, shape: tuple) -> None:
    spec = table.get(name)
    if spec is None:
        raise ValueError(f"{where}: lacks {name}")
    if spec.dtype != dtype or spec.shape != shape:
        raise ValueError(f"{where}.{name}: {spec.dtype} {list(spec.shape)}, expected {dtype} {list(shape)}")


# -- reading and writing

def read_manifest(folder: Path) -> Manifest:
    """`folder/manifest.json`, parsed and checked; every problem is one EngineError."""
    path = folder / MANIFEST
    try:
        with open_regular(path, MANIFEST) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise EngineError(f"{folder} has no {MANIFEST}: not an engine folder (or an interrupted build)") from None
    except OSError as e:
        raise EngineError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise EngineError(f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise EngineError(f"cannot read {path}: not UTF-8 ({e})") from None
    # ValueError: JSONDecodeError, and ints longer than Python's 4300-digit conversion limit.
    except (ValueError, RecursionError) as e:
        raise EngineError(f"{path} is not valid JSON ({clip(str(e))})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    if (where := _too_deep(data, MAX_DEPTH)) is not None:
        raise EngineError(f"{path}: {where}: nested deeper than {MAX_DEPTH} levels")
    # Checked before anything else: another layout would fail later with a misleading message.
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise EngineError(f"{path}: engine format_version {str(version)[:60]} is not supported; this runtime reads "
                          f"format_version {FORMAT_VERSION} (rebuild the engine with export/build.py)")
    try:
        return Manifest.from_dict(data)
    except EngineError as e:
        raise EngineError(f"{path}: {e}") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{brief(text)} overflows to infinity")
    return value


def _too_deep(data: Any, limit: int) -> str | None:
    """The path of the first value nested deeper than `limit`, or None (iterative: no recursion to exhaust)."""
    stack = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limit:
            return where or "top level"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(item, (dict, list)):
                step = f"[{key}]" if isinstance(key, int) else f".{key[:60]}" if where else key[:60]
                stack.append((item, where + step, depth + 1))
    return None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads would take NaN, Infinity, -Infinity


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys silently; a reader that keeps the first would see
    # another manifest than this one.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {brief(duplicate)}")
    return data


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write `manifest` after reading it back through the checks: a build never writes what cannot be read.

    Atomic (a sibling file renamed over it): a kill leaves the old manifest or the new one, never half.
    """
    data = manifest.to_dict()
    Manifest.from_dict(json.loads(json.dumps(data)))
    path = folder / MANIFEST
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
    return path


def artifact_entries(folder: Path, files: list[str]) -> dict[str, Artifact]:
    return {name: Artifact((folder / name).stat().st_size, sha256_file(folder / name)) for name in files}


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


