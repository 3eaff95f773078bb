"""The backend protocol every graph runner follows (Polygraphy's runner, trimmed).

    backend = SomeBackend(path, spec, ...)   # cheap: nothing loaded yet
    backend.activate()                       # load the graph (idempotent)
    outputs = backend.run({name: ndarray})   # feeds checked against the manifest first
    backend.close()

The feed check lives here, once, so that every backend refuses a wrong dtype,
rank, static size or inconsistent symbolic axis with the same one-line error
instead of whatever its library would say (or silently cast).
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import GraphSpec, TensorSpec
from ..errors import EngineError


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


class Backend(abc.ABC):
    """One graph of an engine folder; `spec` is that graph's entry in manifest.json."""

    def __init__(self, path: Path, spec: GraphSpec):
        self.path = Path(path)
        self.spec = spec
        self.active = False

    # -- the protocol

    def activate(self) -> Backend:
        if not self.active:
            self._load()
            self.active = True
        return self

    def close(self) -> None:
        if self.active:
            self._unload()
            self.active = False

    @property
    def inputs(self) -> dict[str, TensorMeta]:
        return _metas(self.spec.inputs)

    @property
    def outputs(self) -> dict[str, TensorMeta]:
        return _metas(self.spec.outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{self.path.name}: run() before activate()")
        check_feeds(self.path.name, self.spec.inputs, feeds)
        return self._infer(feeds)

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a backend implements

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _unload(self) -> None: ...


def _metas(table: Mapping[str, TensorSpec]) -> dict[str, TensorMeta]:
    return {name: TensorMeta(name, spec.np_dtype, spec.shape) for name, spec in table.items()}


def check_feeds(graph: str, declared: Mapping[str, TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Names, dtypes, ranks and static sizes as declared; a symbolic axis has one size across feeds."""
    if set(feeds) != set(declared):
        missing, extra = sorted(set(declared) - set(feeds)), sorted(set(feeds) - set(declared))
        raise EngineError(f"{graph}: feeds do not match the declared inputs "
                          f"(missing {missing}, unexpected {extra})")
    symbols: dict[str, tuple[int, str]] = {}
    for name, spec in declared.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise EngineError(f"{graph}: input {name} is a {type(array).__name__}, not a numpy array")
        if array.dtype != spec.np_dtype:
            raise EngineError(f"{graph}: input {name} is {array.dtype}, declared {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise EngineError(f"{graph}: input {name} has shape {list(array.shape)}, declared {list(spec.shape)}")
        for axis, (size, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int):
                if size != want:
                    raise EngineError(f"{graph}: input {name} axis {axis} is {size}, declared {want}")
            elif symbols.setdefault(want, (size, name))[0] != size:
                seen, other = symbols[want]
                raise EngineError(f"{graph}: axis {want!r} is {size} in {name} but {seen} in {other}")
