"""ONNX Runtime backend: one InferenceSession per graph.

`--provider` names map to ORT execution providers; tensorrt and cuda keep the
next ones as fallbacks for nodes they cannot place, as ORT recommends. A
provider this onnxruntime build lacks is refused up front (ORT itself would only
warn and silently run on the CPU, which makes every timing a lie).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..engine import GraphSpec
from ..errors import EngineError
from .base import Backend

PROVIDERS: Mapping[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


@dataclass(frozen=True)
class OrtOptions:
    provider: str = "cpu"
    threads: int | None = None  # intra-op threads; None: os.cpu_count()
    # Idle intra-op threads spin-wait for the next op: right for a graph run many times in a
    # row (the decoder). A graph that runs once and hands over to another (the vision graph)
    # would leave its threads spinning on the cores the next one needs: measured on 2 cores,
    # +35-55 ms on every prefill that followed the vision graph.
    spin: bool = True

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise EngineError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.threads is not None and self.threads < 1:
            raise EngineError(f"threads must be >= 1, got {self.threads}")


def resolve_providers(provider: str, available: list[str] | None = None) -> list[str]:
    """ORT provider list for a `--provider` name; the first one must be in this build."""
    if provider not in PROVIDERS:
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = list(ort.get_available_providers() if available is None else available)
    wanted = PROVIDERS[provider]
    if wanted[0] not in available:
        raise EngineError(f"provider {provider} needs {wanted[0]}, which this onnxruntime build lacks; "
                          f"available: {', '.join(available)}")
    return [p for p in wanted if p in available]


def release_free_heap() -> None:
    """Give the heap memory freed while loading a graph back to the OS (glibc only; elsewhere a no-op).

    ORT parses a graph with inline weights (vision.onnx, 1.2 GB at ViT-L) into a
    protobuf on the heap, copies the initializers out and frees it. The pieces
    are below glibc's mmap threshold, so glibc keeps most of them: measured at
    ViT-L + 0.5B, up to ~700 MB of dead heap stayed resident after the vision
    session loaded, and the LLM's load stacked on top of it (peak RSS 3.50 GiB
    instead of 2.96 GiB; the weights are 2.88 GiB).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # musl has no malloc_trim
        trim(0)


class OrtBackend(Backend):
    def __init__(self, path: Path, spec: GraphSpec, options: OrtOptions = OrtOptions()):
        super().__init__(path, spec)
        self.options = options
        self.providers = resolve_providers(options.provider)
        self.session: ort.InferenceSession | None = None
        self._output_names: list[str] = []

    def _load(self) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads or os.cpu_count() or 1
        # The graphs are one chain of ops: a second pool only competes for the same cores.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin else "0")
        so.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
        try:
            session = ort.InferenceSession(str(self.path), sess_options=so, providers=self.providers)
        except Exception as e:  # ORT raises its own pybind types (Fail, InvalidProtobuf, ...)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"cannot load {self.path}: {first_line}") from None
        names = [i.name for i in session.get_inputs()]
        if sorted(names) != sorted(self.spec.inputs):
            raise EngineError(f"{self.path.name}: graph inputs {names} differ from the manifest's "
                              f"{list(self.spec.inputs)}")
        self._output_names = [o.name for o in session.get_outputs()]
        if missing := sorted(set(self.spec.outputs) - set(self._output_names)):
            raise EngineError(f"{self.path.name}: graph lacks the outputs {missing} the manifest declares")
        self.session = session
        release_free_heap()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, dict(feeds))))

    def _unload(self) -> None:
        self.session = None
