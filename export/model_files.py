"""A model folder's files, read defensively: JSON configs, weight files and their checksum.

Every problem a file can have (missing, not UTF-8, not a JSON object, a field of the
wrong type, a safetensors header that lies, a pickle that needs code to load) is one
ExportError naming the file, raised before transformers or torch see it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .errors import ExportError


def weight_files(folder: Path) -> list[Path]:
    for index_name, pattern in (("model.safetensors.index.json", "model*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = field(read_json(index, ""), "weight_map", dict, index) or {}
            if not all(isinstance(name, str) for name in weight_map.values()):
                raise ExportError(f"{index}: weight_map values must be file names")
            names = sorted(set(weight_map.values()))
            absent = [name for name in names if not (folder / name).is_file()]
            if absent or not names:
                raise ExportError(f"{index} lists missing weight files: {', '.join(absent) or 'none listed'}")
            return [folder / name for name in names]
        files = sorted(path for path in folder.glob(pattern) if path.is_file())
        if files:
            return files
    raise ExportError(f"{folder} has no weights (model*.safetensors or pytorch_model*.bin)")


def check_weight_files(files: list[Path]) -> None:
    """Header checks before anything is loaded: one line naming the file, not a library's traceback."""
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def check_safetensors(path: Path) -> None:
    # Layout: u64 little-endian header length, a JSON header, the tensor bytes.
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise ExportError(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header "
                          "length (truncated?)")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
        raise ExportError(f"{path} is not a valid safetensors file: its header claims {length} bytes but the "
                          f"file has {size} (truncated, or not a safetensors file)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise ExportError(f"{path} is not a valid safetensors file: {error} (truncated or corrupt?)") from None


def pickle_refused(where: Path, error: Exception) -> str:
    return (f"{where}: a pickle checkpoint (.bin) that holds more than plain tensors is refused, since "
            f"loading it could run arbitrary code ({type(error).__name__}); convert it in an environment "
            "you trust: load the model there and save_pretrained(folder, safe_serialization=True), which "
            "writes model.safetensors")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
            with safe_open(str(path), framework="pt") as weights:
                for name in weights.keys():
                    yield name, weights.get_tensor(name)
        else:
            # weights_only: the restricted unpickler, plain tensors only; never the full pickle.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                raise ExportError(pickle_refused(path, error)) from None
            except Exception as error:  # zip / EOF / OS errors come in many types
                raise ExportError(f"cannot read {path}: {type(error).__name__}: {error}") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ExportError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
            yield from state.items()
            del state  # free this shard before the next one is read


def sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ExportError(f"{path} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise ExportError(f"cannot read {path}: {error.strerror}") from None


def read_json(path: Path, missing_message: str) -> dict[str, Any]:
    """A JSON object; every config file the loaders read is one."""
    if not path.is_file():
        raise ExportError(missing_message or f"{path} does not exist")
    try:
        value = json.loads(read_text(path))
    except ValueError as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a JSON object (it holds a {json_type(value)})")
    return value


def field(config: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """config[key] if it has the JSON type `kind`; None if absent or null."""
    value = config.get(key)
    if value is not None and not isinstance(value, kind):
        raise ExportError(f"{path}: {key} must be a JSON {json_type(kind())}, got {json_type(value)} "
                          f"{json.dumps(value)[:60]}")
    return value


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_json_if_exists(path: Path) -> dict[str, Any]:
    return read_json(path, "") if path.is_file() else {}
