"""Load and validate an engine folder: manifest.json is the only thing the runtime reads.

Every check here fails with a one-line `EngineError` naming the folder and what is
wrong (missing folder, unreadable manifest, unknown format version, missing
section, missing or altered artifact), so that a bad folder is refused before any
graph is loaded rather than half way through a generation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .errors import EngineError
from .preprocess import ImageConfig, PreprocessError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"

# Manifest dtype names -> numpy; the graphs only use these.
DTYPES: Mapping[str, type] = MappingProxyType({
    "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
})
LLM_DTYPES = ("float32", "float16")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int | str, ...]  # int: static size, str: symbolic axis name

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


@dataclass(frozen=True)
class Artifact:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class VisionInfo:
    image_size: int
    patch_size: int
    grid: tuple[int, int]  # rows, columns of the patch grid
    num_patches: int
    hidden_size: int
    feature_layer: int
    layers_run: int
    num_slots: int  # S: rows of visual_tokens, valid ones first
    projector: str
    out_width: int
    text_aware: bool


@dataclass(frozen=True)
class LlmInfo:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    embed_tokens: str  # file name of the [vocab, hidden] table, in `dtype`

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, batch 1 (Vicuna-7B fp16: 512 KiB)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize


@dataclass(frozen=True)
class TokenIds:
    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    @property
    def special(self) -> frozenset[int]:
        return frozenset((self.bos_token_id, self.image_token_id, self.eos_token_id, self.pad_token_id))


@dataclass(frozen=True)
class PromptTemplate:
    first_turn: str  # "USER: <image>\n{prompt} ASSISTANT:"
    next_turn: str  # what follows an assistant answer: " USER: {prompt} ASSISTANT:"
    image_token: str


@dataclass(frozen=True)
class Engine:
    """A validated engine folder; the sections of its manifest, parsed."""

    folder: Path
    method: Mapping[str, Any]
    image: ImageConfig
    vision: VisionInfo
    llm: LlmInfo
    tokens: TokenIds
    prompt: PromptTemplate
    graphs: Mapping[str, GraphSpec]
    artifacts: Mapping[str, Artifact]
    manifest: Mapping[str, Any]  # the whole file, for reporting (source, tools, ...)

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def method_name(self) -> str:
        return str(self.method.get("method"))


def load_engine(folder: str | Path, verify_checksums: bool = True) -> Engine:
    """Read `folder/manifest.json`, check every artifact (size always, sha256 unless told not to)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    where = folder / MANIFEST
    artifacts = {name: _parse(Artifact, entry, f"artifacts[{name!r}]", where)
                 for name, entry in _section(manifest, "artifacts", where).items()}
    try:
        image = ImageConfig.from_dict(_section(manifest, "image", where))
    except PreprocessError as e:
        raise EngineError(f"{where}: image: {e}") from None
    graphs = {name: _parse_graph(_section(manifest, "graphs", where).get(name), name, where)
              for name in ("vision", "llm")}
    engine = Engine(
        folder=folder,
        method=MappingProxyType(dict(_section(manifest, "method", where))),
        image=image,
        vision=_parse(VisionInfo, _section(manifest, "vision", where), "vision", where),
        llm=_parse(LlmInfo, _section(manifest, "llm", where), "llm", where),
        tokens=_parse(TokenIds, _section(manifest, "tokens", where), "tokens", where),
        prompt=_parse(PromptTemplate, _section(manifest, "prompt", where), "prompt", where),
        graphs=MappingProxyType(graphs),
        artifacts=MappingProxyType(artifacts),
        manifest=MappingProxyType(manifest),
    )
    _check_consistency(engine, where)
    for name, artifact in artifacts.items():
        _verify_artifact(folder, name, artifact, verify_checksums)
    return engine


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise EngineError(f"engine folder {folder} does not exist")
    if not folder.is_dir():
        raise EngineError(f"engine {folder} is not a folder")
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineError(f"{folder} has no {MANIFEST}: not an engine folder (or an interrupted build)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read {path}: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} is not a JSON object")
    # Checked before anything else: a newer layout would fail later with a misleading message.
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format_version {version} is not supported; this runtime reads "
                          f"format_version {FORMAT_VERSION} (rebuild the engine with the matching export)")
    return manifest


def _section(manifest: Mapping[str, Any], key: str, where: Path) -> dict[str, Any]:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise EngineError(f"{where} has no {key!r} section (built by an older or partial export?)")
    return value


def _parse(cls, data: Any, what: str, where: Path):
    """Build a frozen section from its dict; unknown keys are ignored (additions within a format version)."""
    if not isinstance(data, dict):
        raise EngineError(f"{where}: {what} is not an object")
    names = [f.name for f in dataclasses.fields(cls)]
    if missing := [n for n in names if n not in data]:
        raise EngineError(f"{where}: {what} lacks {', '.join(missing)}")
    values = {n: tuple(data[n]) if isinstance(data[n], list) else data[n] for n in names}
    return cls(**values)


def _parse_graph(data: Any, name: str, where: Path) -> GraphSpec:
    if not isinstance(data, dict) or not isinstance(data.get("file"), str):
        raise EngineError(f"{where}: graphs has no {name!r} entry with a file")
    tables = {}
    for side in ("inputs", "outputs"):
        table = data.get(side)
        if not isinstance(table, dict) or not table:
            raise EngineError(f"{where}: graphs.{name} has no {side}")
        specs = {}
        for tensor, spec in table.items():
            if (not isinstance(spec, dict) or spec.get("dtype") not in DTYPES
                    or not isinstance(spec.get("shape"), list)):
                raise EngineError(f"{where}: graphs.{name}.{side}.{tensor} needs a dtype in "
                                  f"{list(DTYPES)} and a shape list")
            specs[tensor] = TensorSpec(spec["dtype"], tuple(spec["shape"]))
        tables[side] = MappingProxyType(specs)
    return GraphSpec(data["file"], tables["inputs"], tables["outputs"])


def _check_consistency(engine: Engine, where: Path) -> None:
    """The sections must agree with each other before any graph is trusted with them."""
    llm, vision = engine.llm, engine.vision
    if llm.dtype not in LLM_DTYPES:
        raise EngineError(f"{where}: llm dtype {llm.dtype!r} is not one of {', '.join(LLM_DTYPES)}")
    needed = {engine.graphs["vision"].file, engine.graphs["llm"].file, llm.embed_tokens, TOKENIZER}
    if missing := sorted(needed - set(engine.artifacts)):
        raise EngineError(f"{where}: artifacts does not list {', '.join(missing)}")
    if "{prompt}" not in engine.prompt.first_turn or "{prompt}" not in engine.prompt.next_turn:
        raise EngineError(f"{where}: prompt first_turn and next_turn must both contain {{prompt}}")
    if engine.prompt.first_turn.count(engine.prompt.image_token) != 1:
        raise EngineError(f"{where}: prompt first_turn must contain {engine.prompt.image_token!r} exactly once")
    if vision.grid[0] * vision.grid[1] != vision.num_patches:
        raise EngineError(f"{where}: vision grid {list(vision.grid)} does not hold {vision.num_patches} patches")
    vision_in = set(engine.graphs["vision"].inputs)
    want = {"pixel_values"} | ({"text_embeds", "text_mask"} if vision.text_aware else set())
    if vision_in != want:
        raise EngineError(f"{where}: vision graph inputs {sorted(vision_in)} do not match "
                          f"text_aware={vision.text_aware} (expected {sorted(want)})")
    _require(engine.graphs["vision"].outputs, ["visual_tokens", "num_tokens", "kept_index"], "vision outputs", where)
    layers = range(llm.num_layers)
    _require(engine.graphs["llm"].inputs, ["inputs_embeds", "attention_mask", "position_ids",
                                           *(n for i in layers for n in past_names(i))], "llm inputs", where)
    _require(engine.graphs["llm"].outputs, ["logits", *(n for i in layers for n in present_names(i))],
             "llm outputs", where)


def _require(table: Mapping[str, Any], names: list[str], what: str, where: Path) -> None:
    if missing := [n for n in names if n not in table]:
        raise EngineError(f"{where}: {what} lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")


def _verify_artifact(folder: Path, name: str, artifact: Artifact, verify_checksum: bool) -> None:
    # Artifact names are plain file names: a manifest must not point outside its folder.
    if Path(name).name != name or name in (".", ".."):
        raise EngineError(f"{folder / MANIFEST}: artifact name {name!r} is not a plain file name")
    path = folder / name
    if not path.is_file():
        raise EngineError(f"{folder}: artifact {name} is missing")
    size = path.stat().st_size
    if size != artifact.bytes:
        raise EngineError(f"{path}: {size} bytes, the manifest says {artifact.bytes} (truncated or replaced?)")
    if verify_checksum and sha256_file(path) != artifact.sha256:
        raise EngineError(f"{path}: sha256 differs from the manifest (corrupted or replaced; "
                          "--skip-checksums skips this check)")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
