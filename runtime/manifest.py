"""manifest.json: the one schema of an engine folder, torch-free.

export/build.py constructs a `Manifest` and writes it (`write_manifest`); the
runtime, calib and the benchmarks read it back (`read_manifest`). Reading
checks every field's type and range and the sections against each other, so a
corrupt or hand-edited manifest is one `EngineError` naming the field
(`manifest.json: llm.head_dim: 0 is below the minimum 1`), never an assert, a
TypeError or an absurd allocation later on.

Also here, once: the format version, the LLM cache's tensor-name templates
(onnxruntime-genai's `past_key_names` style: the runtime never builds a name
itself), the symbolic axes and sha256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import numpy as np

from .errors import EngineError

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
NEW_KEY, NEW_VALUE = "new_key_values.%d.key", "new_key_values.%d.value"
PIL_RESAMPLING = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
# Serving limits of a folder whose manifest declares none (export/build.py writes them).
DEFAULT_MAX_BATCH, DEFAULT_MAX_TEXT_LEN = 8, 512


# -- field constraints, read from the annotations by the parser below

@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded

    def check(self, value) -> str | None:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"{value!r} is {'not above' if self.lo_open else 'below'} the minimum {self.lo:g}"
        if self.hi is not None and value > self.hi:
            return f"{value!r} is above the maximum {self.hi:g}"
        return None


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def check(self, value) -> str | None:
        return None if value in self.values else f"{value!r} is not one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Matches:
    pattern: str
    what: str

    def check(self, value) -> str | None:
        return None if re.fullmatch(self.pattern, value) else f"{value!r} is not {self.what}"


Count = Annotated[int, Range(1, 1 << 24)]  # widths, sizes, vocabulary, positions
Layers = Annotated[int, Range(1, 4096)]
Pixels = Annotated[int, Range(1, 8192)]  # image sides (preprocess.MAX_PIXELS is 8192^2)
TokenId = Annotated[int, Range(0, (1 << 31) - 1)]
FileName = Annotated[str, Matches(r"(?!\.\.?$)[^/\\\x00]+", "a plain file name")]
Symbol = Annotated[str, Matches(r"[A-Za-z_][A-Za-z0-9_]*", "an axis name")]
Dim = Annotated[int, Range(1, 1 << 24)] | Symbol  # a static size or a symbolic axis
NameTemplate = Annotated[str, Matches(r"[^%]*%d[^%]*", "a name template with one %d")]


# -- the sections

class Section:
    """JSON in and out for every section: `from_dict` checks what `to_dict` writes."""

    @classmethod
    def from_dict(cls, data: Any):
        """Type-, range- and consistency-checked; an error names the field (`llm.head_dim: ...`)."""
        return _parse(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return _to_json(self)


@dataclass(frozen=True)
class TensorSpec(Section):
    dtype: Annotated[str, OneOf(tuple(DTYPES))]
    shape: tuple[Dim, ...]

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
    """Decoder layers whose past has one length: their past inputs share the symbolic axis `past_axis`."""

    layers: tuple[Annotated[int, Range(0, 4095)], ...]
    past_axis: Symbol


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

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, batch 1 (Vicuna-7B fp16: 512 KiB)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize

    def __post_init__(self):
        covered = sorted(layer for group in self.cache.groups for layer in group.layers)
        if covered != list(range(self.num_layers)):
            raise ValueError(f"cache groups must hold each of the {self.num_layers} layers once, "
                             f"got {covered[:8]}{' ...' if len(covered) > 8 else ''}")


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
    if missing := sorted({"vision", "llm"} - set(m.graphs)):
        raise ValueError(f"graphs: no {' or '.join(missing)} graph")
    if m.image.output_size is not None and m.image.output_size != m.vision.image_size:
        raise ValueError(f"image: crops to {m.image.output_size} px but the vision graph takes "
                         f"{m.vision.image_size} px")
    if not m.image.do_center_crop and m.image.shortest_edge != m.vision.image_size:
        raise ValueError(f"image: resizes to {m.image.shortest_edge} px but the vision graph takes "
                         f"{m.vision.image_size} px")
    needed = {m.graphs["vision"].file, m.graphs["llm"].file, m.llm.embed_tokens, TOKENIZER}
    if missing := sorted(needed - set(m.artifacts)):
        raise ValueError(f"artifacts: does not list {', '.join(missing)}")
    if bad := [n for n in m.artifacts if _invalid(FileName, n)]:
        raise ValueError(f"artifacts: {bad[0]!r} is not a plain file name")
    for name in ("image_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(m.tokens, name) >= m.llm.vocab_size:
            raise ValueError(f"tokens.{name}: {getattr(m.tokens, name)} is outside the vocabulary "
                             f"of {m.llm.vocab_size}")
    if m.vision.out_width != m.llm.hidden_size:
        raise ValueError(f"vision.out_width {m.vision.out_width} is not the LLM's hidden_size "
                         f"{m.llm.hidden_size} (the projector is fused)")
    _check_vision_graph(m.graphs["vision"], m.vision)
    _check_llm_graph(m.graphs["llm"], m.llm)
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


def _check_vision_graph(g: GraphSpec, v: VisionInfo) -> None:
    want = {"pixel_values"} | ({"text_embeds", "text_mask"} if v.text_aware else set())
    if set(g.inputs) != want:
        raise ValueError(f"graphs.vision: inputs {sorted(g.inputs)} do not match text_aware={v.text_aware} "
                         f"(expected {sorted(want)})")
    _expect(g.inputs, "graphs.vision.inputs", "pixel_values", "float32", (BATCH, 3, v.image_size, v.image_size))
    if v.text_aware:
        _expect(g.inputs, "graphs.vision.inputs", "text_embeds", "float32", (BATCH, TEXT_LEN, v.out_width))
        _expect(g.inputs, "graphs.vision.inputs", "text_mask", "int64", (BATCH, TEXT_LEN))
    _expect(g.outputs, "graphs.vision.outputs", "visual_tokens", "float32", (BATCH, v.num_slots, v.out_width))
    _expect(g.outputs, "graphs.vision.outputs", "num_tokens", "int64", (BATCH,))
    _expect(g.outputs, "graphs.vision.outputs", "kept_index", "int64", (BATCH, v.num_slots))


def _check_llm_graph(g: GraphSpec, llm: LlmInfo) -> None:
    where = "graphs.llm"
    _expect(g.inputs, f"{where}.inputs", "inputs_embeds", llm.dtype, (BATCH, SEQ, llm.hidden_size))
    _expect(g.inputs, f"{where}.inputs", "attention_mask", "int64", (BATCH, TOTAL))
    _expect(g.inputs, f"{where}.inputs", "position_ids", "int64", (BATCH, SEQ))
    _expect(g.outputs, f"{where}.outputs", "logits", "float32", (BATCH, 1, llm.vocab_size))
    cache = llm.cache
    for group in cache.groups:
        for layer in group.layers:
            for name in cache.past_names(layer):
                _expect(g.inputs, f"{where}.inputs", name, llm.dtype,
                        (group.past_axis, BATCH, llm.num_kv_heads, llm.head_dim))
            for name in cache.new_names(layer):
                _expect(g.outputs, f"{where}.outputs", name, llm.dtype,
                        (SEQ, BATCH, llm.num_kv_heads, llm.head_dim))
    declared = {"inputs_embeds", "attention_mask", "position_ids",
                *(n for i in range(llm.num_layers) for n in cache.past_names(i))}
    if extra := sorted(set(g.inputs) - declared):
        raise ValueError(f"{where}.inputs: unexpected {', '.join(extra[:4])}")


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineError(f"{folder} has no {MANIFEST}: not an engine folder (or an interrupted build)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read {path}: {e}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise EngineError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    # Checked before anything else: another layout would fail later with a misleading message.
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise EngineError(f"{path}: engine format_version {version} is not supported; this runtime reads "
                          f"format_version {FORMAT_VERSION} (rebuild the engine with export/build.py)")
    try:
        return Manifest.from_dict(data)
    except EngineError as e:
        raise EngineError(f"{path}: {e}") from None


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


# -- the parser: JSON -> frozen dataclasses, checked against the annotations

def _parse(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _parse(args[0], value, where)
        for mark in args[1:]:
            if (problem := mark.check(value)) is not None:
                raise _error(where, problem)
        return value
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(hint, value, where)
    if hint is type(None):
        if value is not None:
            raise _error(where, f"expected null, got {_kind(value)}")
        return None
    if hint is Any:
        return value
    if hint in (bool, int, float, str):
        return _parse_scalar(hint, value, where)
    if origin in (types.UnionType, typing.Union):
        problems = []
        for option in args:
            try:
                return _parse(option, value, where)
            except EngineError as e:
                problems.append(str(e).removeprefix(f"{where}: "))
        raise _error(where, " or ".join(problems))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _error(where, f"expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise _error(where, f"expected {len(args)} values, got {len(value)}")
        return tuple(_parse(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise _error(where, f"expected an object, got {_kind(value)}")
        return MappingProxyType({k: _parse(args[1], v, f"{where}.{k}" if where else k) for k, v in value.items()})
    raise TypeError(f"the manifest schema has an unsupported annotation {hint!r}")


def _parse_scalar(hint: type, value, where: str):
    ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise _error(where, f"expected {want}, got {_kind(value)}")
    if hint is float and not math.isfinite(value):
        raise _error(where, f"expected a finite number, got {value}")
    return value


def _parse_dataclass(cls, value, where: str):
    if not isinstance(value, dict):
        raise _error(where, f"expected an object, got {_kind(value)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if missing := [n for n in required if n not in value]:
        raise _error(where, f"lacks {', '.join(missing)}")
    # Unknown keys are ignored: additions within a format version.
    parsed = {f.name: _parse(hints[f.name], value[f.name], f"{where}.{f.name}" if where else f.name)
              for f in fields if f.name in value}
    try:
        return cls(**parsed)
    except ValueError as e:
        raise _error(where, str(e)) from None


def _error(where: str, problem: str) -> EngineError:
    return EngineError(f"{where}: {problem}" if where else problem)


def _invalid(hint, value) -> bool:
    try:
        _parse(hint, value, "")
    except EngineError:
        return True
    return False


def _kind(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value
