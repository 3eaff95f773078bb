"""ONNX Runtime backend: one InferenceSession per graph, IOBinding for tensors on the device.

`--provider` names map to ORT execution providers; tensorrt and cuda keep the
next ones as fallbacks for nodes they cannot place, as ORT recommends. A
provider this onnxruntime build lacks is refused up front (ORT itself would only
warn and silently run on the CPU, which makes every timing a lie).

Device buffers are ORT allocations (`OrtValue.ortvalue_from_shape_and_type`) on
the provider's device: "cpu" for the CPU EP, "cuda" for the CUDA and TensorRT
EPs. Views into them are bound by pointer and shape (`bind_input` /
`bind_output` with `buffer_ptr`), so a graph reads its past from, and writes its
present into, memory that never leaves the device. The code path is the same
for both devices; only the allocation's device name differs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import EngineError
from ..manifest import DTYPES, GraphSpec, TensorSpec
from .base import Backend, DeviceBuffer, TensorView

PROVIDERS: Mapping[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
DEVICES: Mapping[str, str] = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}
GPU_HINT = ("install onnxruntime-gpu instead of onnxruntime (x86: pip install onnxruntime-gpu tensorrt-cu12; "
            "Jetson: the onnxruntime-gpu wheel of the Jetson AI Lab index for JetPack 6)")
# OrtValue.data_type() names of the dtypes the graphs use.
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class OrtOptions:
    provider: str = "cpu"
    threads: int | None = None  # intra-op threads; None: os.cpu_count()
    # Idle intra-op threads spin-wait for the next op: right for a graph run many times in a
    # row (the decoder). A graph that runs once and hands over to another (the vision graph)
    # would leave its threads spinning on the cores the next one needs: measured on 2 cores,
    # +35-55 ms on every prefill that followed the vision graph.
    spin: bool = True
    # Give the arena's free chunks back after each run: right for a graph run once per image (the
    # vision graph), whose activations would otherwise stay resident under the LLM's.
    shrink_arena: bool = False
    profile_prefix: str | None = None  # ORT's per-node profile, written on close (benchmarks)
    device_id: int = 0  # the GPU of the cuda and tensorrt providers
    # Options of the first provider (the TensorRT EP's profiles and caches: runtime/profiles.py), as pairs.
    provider_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.device_id < 0:
            raise EngineError(f"device_id must be >= 0, got {self.device_id}")
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
        raise EngineError(f"provider {provider} needs {wanted[0]}, which this onnxruntime build lacks "
                          f"(available: {', '.join(available)}); {GPU_HINT}")
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
    """`spec` None: read from the graph itself. `model`: the graph's bytes, when it is not a file at `path`."""

    def __init__(self, path: Path, spec: GraphSpec | None, options: OrtOptions = OrtOptions(),
                 model: bytes | None = None):
        super().__init__(path, spec)
        self.options, self.model = options, model
        self.providers = resolve_providers(options.provider)
        self.device = DEVICES[options.provider]
        self.device_id = options.device_id if self.device == "cuda" else 0
        self.session: ort.InferenceSession | None = None
        self._output_names: list[str] = []
        self._run_options = ort.RunOptions()
        if options.shrink_arena:
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                   f"{self.device}:{self.device_id}")

    def _load(self) -> None:
        self.session = self._open()
        if self.spec is None:
            self.spec = GraphSpec(self.path.name, *({t.name: _spec(t) for t in side} for side in
                                                    (self.session.get_inputs(), self.session.get_outputs())))
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(self.spec.inputs):
            raise EngineError(f"{self.path.name}: graph inputs {names} differ from the manifest's "
                              f"{list(self.spec.inputs)}")
        self._output_names = [o.name for o in self.session.get_outputs()]
        if missing := sorted(set(self.spec.outputs) - set(self._output_names)):
            raise EngineError(f"{self.path.name}: graph lacks the outputs {missing} the manifest declares")
        release_free_heap()

    def _open(self) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads or os.cpu_count() or 1
        # The graphs are one chain of ops: a second pool only competes for the same cores.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin else "0")
        so.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
        if self.options.profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = self.options.profile_prefix
        try:
            return ort.InferenceSession(self.model if self.model is not None else str(self.path),
                                        sess_options=so, providers=self._provider_list())
        except Exception as e:  # ORT raises its own pybind types (Fail, InvalidProtobuf, ...)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"cannot load {self.path}: {first_line}") from None

    def _provider_list(self) -> list:
        """(name, options) pairs: the GPU providers get the device id, the first one its own options too."""
        listed = []
        for i, name in enumerate(self.providers):
            if name == "CPUExecutionProvider":
                listed.append(name)
                continue
            options = {"device_id": str(self.options.device_id)}
            if i == 0:
                options.update(self.options.provider_options)
            listed.append((name, options))
        return listed

    def end_profiling(self) -> str:
        """The profile's path (only with `profile_prefix`)."""
        return self.session.end_profiling()

    def allocate(self, nbytes: int) -> DeviceBuffer:
        value = ort.OrtValue.ortvalue_from_shape_and_type([max(int(nbytes), 1)], np.uint8, self.device,
                                                          self.device_id)
        return DeviceBuffer(value.data_ptr(), int(nbytes), self.device, self.device_id, value)

    def copy(self, src: DeviceBuffer, dst: DeviceBuffer, nbytes: int) -> None:
        if nbytes > min(src.nbytes, dst.nbytes):
            raise ValueError(f"copy of {nbytes} bytes between buffers of {src.nbytes} and {dst.nbytes}")
        if src.device == dst.device == "cpu":
            ctypes.memmove(dst.ptr, src.ptr, nbytes)
            return
        # ORT's Python API has no device-to-device copy: through host memory, once per cache growth.
        host = np.zeros(dst.owner.shape()[0], np.uint8)
        host[:nbytes] = src.owner.numpy()[:nbytes]
        dst.owner.update_inplace(host)

    def to_host(self, view: TensorView) -> np.ndarray:
        if view.buffer.device != "cpu":
            raise EngineError("to_host reads CPU buffers only")
        raw = (ctypes.c_byte * view.nbytes).from_address(view.ptr)
        return np.frombuffer(raw, view.dtype).reshape(view.shape).copy()

    def _describe(self, value: Any) -> tuple[np.dtype, tuple[int, ...]] | None:
        if isinstance(value, ort.OrtValue):
            return np.dtype(_ORT_DTYPES.get(value.data_type(), np.void)), tuple(value.shape())
        return super()._describe(value)

    def _infer(self, feeds: Mapping[str, Any], outputs: Mapping[str, TensorView],
               symbols: Mapping[str, int]) -> dict[str, np.ndarray]:
        if not outputs and all(isinstance(v, np.ndarray) for v in feeds.values()):
            try:
                values = self.session.run(self._output_names, dict(feeds), self._run_options)
            except Exception as e:  # ORT's pybind types (InvalidArgument, Fail, RuntimeException, ...)
                raise _run_error(self.path, e) from None
            return dict(zip(self._output_names, values))
        binding = self.session.io_binding()
        host_feeds = []  # bound by address: they must outlive the run
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                host_feeds.append(np.ascontiguousarray(value))
                binding.bind_cpu_input(name, host_feeds[-1])
            elif isinstance(value, TensorView):
                binding.bind_input(name, value.buffer.device, value.buffer.device_id, value.dtype,
                                   list(value.shape), value.ptr)
            else:
                binding.bind_ortvalue_input(name, value)
        # The outputs not pre-bound come back in host arrays made here and bound by address, so the run
        # writes them in place (from the device if need be) and nothing is fetched or wrapped after it.
        host, fetched = {}, []
        for name in self._output_names:
            view = outputs.get(name)
            if view is not None:
                binding.bind_output(name, view.buffer.device, view.buffer.device_id, view.dtype,
                                    list(view.shape), view.ptr)
                continue
            spec = self.spec.outputs.get(name)
            shape = None if spec is None else [d if isinstance(d, int) else symbols.get(d) for d in spec.shape]
            if shape is None or None in shape:  # an axis the feeds do not fix: ORT allocates it
                binding.bind_output(name, "cpu")
                fetched.append(name)
                continue
            host[name] = np.empty(shape, spec.np_dtype)
            binding.bind_output(name, "cpu", 0, spec.np_dtype, shape, host[name].ctypes.data)
        try:
            self.session.run_with_iobinding(binding, self._run_options)
        except Exception as e:
            raise _run_error(self.path, e) from None
        if fetched:
            values = dict(zip(self._output_names, binding.get_outputs()))  # every output, in binding order
            host.update({name: values[name].numpy() for name in fetched})
        return host

    def _unload(self) -> None:
        self.session = None


def open_graph(source: Path | bytes, options: OrtOptions = OrtOptions()) -> OrtBackend:
    """An active backend for a graph outside any engine folder (calib's checks), its I/O read from the graph."""
    if isinstance(source, bytes):
        return OrtBackend(Path("graph.onnx"), None, options, model=source).activate()
    return OrtBackend(Path(source), None, options).activate()


def _run_error(path: Path, error: Exception) -> EngineError:
    """A graph that loads but fails while running (a corrupted weight, an out-of-range index): one line."""
    text = str(error).strip()
    return EngineError(f"{path.name} failed while running: {text.splitlines()[0][:300] if text else type(error).__name__} "
                       "(a corrupted or altered graph? drop --skip-checksums to check the artifacts)")


def _spec(arg) -> TensorSpec:
    # An axis ORT knows no name for gets one of its own: it is checked for nothing but rank.
    shape = tuple(d if isinstance(d, int) else d or f"unnamed_{arg.name}_{i}" for i, d in enumerate(arg.shape))
    return TensorSpec(next(k for k, v in DTYPES.items() if np.dtype(v) == _ORT_DTYPES[arg.type]), shape)
