"""Inference backends behind one protocol (base.Backend), opened by name; each imports its library lazily.

    backend = open_backend("ort", path, spec, OrtOptions(provider="cuda"))

`ort` is ONNX Runtime with provider cpu | cuda | tensorrt. A native TensorRT
backend (plans built on the target device) takes the name `tensorrt`; this
version has none, and asking for it says so.
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
}
PLANNED = {"tensorrt": "native TensorRT plans (sparsezip-build-trt) are not in this version; "
                       "use --provider tensorrt for ONNX Runtime's TensorRT execution provider"}


def _module(name: str):
    if name not in BACKENDS:
        hint = PLANNED.get(name, f"choose one of {', '.join(BACKENDS)}")
        raise EngineError(f"unknown backend {name!r}: {hint}")
    return importlib.import_module(f"{__name__}.{BACKENDS[name][0]}")


def backend_options(name: str, **options: Any):
    """The options object of backend `name` (e.g. OrtOptions(provider=..., threads=...))."""
    return getattr(_module(name), BACKENDS[name][2])(**options)


def open_backend(name: str, path: str | Path, spec: GraphSpec, options: Any = None) -> Backend:
    """An inactive backend for one graph; `options` from backend_options (None: that backend's defaults)."""
    module = _module(name)
    cls = getattr(module, BACKENDS[name][1])
    return cls(Path(path), spec) if options is None else cls(Path(path), spec, options)
