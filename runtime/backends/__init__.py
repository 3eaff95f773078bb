"""Inference backends behind one protocol (base.Backend), opened by name; each imports its library lazily.

    backend = open_backend("ort", path, spec, OrtOptions(provider="cuda"))

`ort` is ONNX Runtime with provider cpu | cuda | tensorrt (its execution
providers). `tensorrt` is native TensorRT: plans built on the target device by
sparsezip-build-trt, run through the TensorRT and cuda-python packages, which
are imported only when it is opened.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import EngineError
from ..manifest import GraphSpec
from .base import Backend

# name -> (module, class, options class): imported only when that backend is opened.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "ort": ("ort", "OrtBackend", "OrtOptions"),
    "tensorrt": ("tensorrt", "TensorRTBackend", "TensorRTOptions"),
}


def _module(name: str):
    if name not in BACKENDS:
        raise EngineError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{BACKENDS[name][0]}")


def backend_options(name: str, **options: Any):
    """The options object of backend `name` (e.g. OrtOptions(provider=..., threads=...))."""
    return getattr(_module(name), BACKENDS[name][2])(**options)


def open_backend(name: str, path: str | Path, spec: GraphSpec, options: Any = None) -> Backend:
    """An inactive backend for one graph; `options` from backend_options (None: that backend's defaults)."""
    module = _module(name)
    cls = getattr(module, BACKENDS[name][1])
    return cls(Path(path), spec) if options is None else cls(Path(path), spec, options)
