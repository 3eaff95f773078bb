"""Native TensorRT backend: a plan built on this device by sparsezip-build-trt, run on one CUDA stream.

    deserialize_cuda_engine -> one execution context per optimisation profile
    run:  pick the profile whose ranges hold the feeds' shapes, set_input_shape +
          set_tensor_address per input, addresses for the outputs,
          execute_async_v3(stream), copy the outputs not pre-bound to the host

Device memory is cudaMalloc'd through cuda-python (runtime/cuda.py), so a
KV-cache buffer is bound by address like any other: the past and the new
positions of runtime/kv_cache.py are views of one buffer, written in place.
Host feeds go through per-input staging buffers that grow and are reused.

One code path for TensorRT 10.3 (JetPack 6) and 11.x: network flags by name
(`network_flags`), the tensor-name API only (no bindings), no precision
builder flags (fp16 comes from an fp16 ONNX, the network is strongly typed).
A plan is valid for one TensorRT version and one GPU model: `check_plan`
refuses any other with one line naming both.

This needs `tensorrt` and cuda-python, imported when the backend is opened;
without them the error says how to install them. Nothing here was run on a GPU
in this repository's CI (there is none): the CPU tests cover the flag and
refusal logic and the profile choice against fakes.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import cuda
from ..errors import EngineError
from ..manifest import GraphSpec, TensorRTInfo
from .base import Backend, DeviceBuffer, TensorView

TENSORRT_HINT = ("x86: pip install tensorrt-cu12 cuda-python; Jetson (JetPack 6): TensorRT 10.3 comes with "
                 "JetPack (sudo apt install python3-libnvinfer), then pip install 'cuda-python>=12.6,<13'")
MIN_VERSION = (10, 3)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineError(f"the tensorrt backend needs the TensorRT Python package: {TENSORRT_HINT}") from None
    return tensorrt


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); a suffix ends it ('11.0.0b1' -> (11, 0, 0))."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):
            break
    return tuple(parts)


def network_flags(trt) -> int:
    """create_network() flags for a strongly typed network, chosen by enum name, never by number.

    TensorRT 10.x: STRONGLY_TYPED is opt-in (EXPLICIT_BATCH is deprecated and
    ignored: set nothing for it). TensorRT 11: strong typing is always on and the
    flag is deprecated and ignored, so nothing is set. The member's number
    differs between them (10.x: 1, after EXPLICIT_BATCH; 11: 0).
    """
    version = version_tuple(trt.__version__)
    if version[:2] < MIN_VERSION:
        raise EngineError(f"TensorRT {trt.__version__} is too old: this backend needs 10.3 or newer")
    if version[0] >= 11:
        return 0
    return 1 << int(getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))


def check_plan(plan: str, built: TensorRTInfo, version: str, gpu: cuda.Gpu) -> None:
    """A plan runs only under the TensorRT version and on the GPU model that built it."""
    here = (version, gpu.name, gpu.compute_capability)
    if (built.version, built.gpu, built.compute_capability) != here:
        raise EngineError(
            f"{plan} was built with TensorRT {built.version} on {built.gpu} (compute {built.compute_capability}); "
            f"this is TensorRT {version} on {gpu.name} (compute {gpu.compute_capability}): rebuild the plans "
            "here with sparsezip-build-trt ENGINE_DIR")


def choose_profile(ranges: Sequence[Mapping[str, tuple[tuple[int, ...], ...]]],
                   shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The narrowest profile whose (min, opt, max) hold every fed shape (a decode step fits the prefill
    profile too, but its own was tuned for it); inputs a profile does not list are static."""
    holding = [index for index, profile in enumerate(ranges)
               if all(all(lo <= s <= hi for s, lo, hi in zip(shape, profile[name][0], profile[name][2]))
                      for name, shape in shapes.items() if name in profile)]
    if not holding:
        raise EngineError(f"no optimisation profile of the plan holds these shapes "
                          f"({', '.join(f'{n} {list(s)}' for n, s in list(shapes.items())[:3])}, ...): the "
                          "engine's limits (export/build.py --max-batch / --max-positions) are smaller")
    return min(holding, key=lambda i: sum(hi - lo for r in ranges[i].values() for lo, hi in zip(r[0], r[2])))


@dataclass(frozen=True)
class TensorRTOptions:
    built: TensorRTInfo | None = None  # the manifest's facts of the plans; None: not checked (tools, tests)
    device_id: int = 0

    def __post_init__(self):
        if self.device_id < 0:
            raise EngineError(f"device_id must be >= 0, got {self.device_id}")


class TensorRTBackend(Backend):
    device = "cuda"

    def __init__(self, path: Path, spec: GraphSpec, options: TensorRTOptions = TensorRTOptions()):
        if spec is None:
            raise EngineError("the tensorrt backend needs the graph's manifest entry")
        super().__init__(path, spec)
        self.options, self.device_id = options, options.device_id
        self._staging: dict[str, cuda.DeviceMemory] = {}

    def _load(self) -> None:
        trt = import_tensorrt()
        rt = cuda.cudart()
        cuda._call(rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        if self.options.built is not None:
            check_plan(self.path.name, self.options.built, trt.__version__, cuda.gpu_info(self.device_id))
        self.stream = cuda.stream_create()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise EngineError(f"cannot read {self.path}: {e.strerror}") from None
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineError(f"{self.path.name}: TensorRT {trt.__version__} cannot deserialize it "
                              "(a plan of another TensorRT version?): rebuild with sparsezip-build-trt")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(self.spec.inputs) or not set(self.spec.outputs) <= set(names):
            raise EngineError(f"{self.path.name}: plan tensors {sorted(names)} differ from the manifest's graph")
        self._outputs = [n for n in names if n not in inputs]
        dynamic = [n for n in inputs if -1 in tuple(self.engine.get_tensor_shape(n))]
        self._ranges = [{n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in dynamic}
                        for p in range(self.engine.num_optimization_profiles)]
        self._contexts = []
        # Each context stays on its profile: memory for that profile's shapes, not the largest of all.
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        for p in range(self.engine.num_optimization_profiles):
            context = (self.engine.create_execution_context() if strategy is None
                       else self.engine.create_execution_context(strategy))
            if not context.set_optimization_profile_async(p, self.stream):
                raise EngineError(f"{self.path.name}: cannot select optimisation profile {p}")
            self._contexts.append(context)
        cuda.stream_sync(self.stream)

    def allocate(self, nbytes: int) -> DeviceBuffer:
        memory = cuda.DeviceMemory(nbytes)
        return DeviceBuffer(memory.ptr, int(nbytes), "cuda", self.device_id, memory)

    def copy(self, src: DeviceBuffer, dst: DeviceBuffer, nbytes: int) -> None:
        if nbytes > min(src.nbytes, dst.nbytes):
            raise ValueError(f"copy of {nbytes} bytes between buffers of {src.nbytes} and {dst.nbytes}")
        cuda.memcpy(dst.ptr, src.ptr, nbytes, "d2d", self.stream)
        cuda.stream_sync(self.stream)

    def to_host(self, view: TensorView) -> np.ndarray:
        host = np.empty(view.shape, view.dtype)
        cuda.memcpy(cuda.host_address(host), view.ptr, view.nbytes, "d2h", self.stream)
        cuda.stream_sync(self.stream)
        return host

    def _stage(self, name: str, nbytes: int) -> int:
        memory = self._staging.get(name)
        if memory is None or memory.nbytes < nbytes:
            memory = self._staging[name] = cuda.DeviceMemory(max(nbytes, 2 * (memory.nbytes if memory else 0)))
        return memory.ptr

    def _infer(self, feeds: Mapping[str, Any], outputs: Mapping[str, TensorView],
               symbols: Mapping[str, int]) -> dict[str, np.ndarray]:
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        context = self._contexts[choose_profile(self._ranges, shapes)]
        keep = []  # host feeds must outlive the async copies
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value)
                keep.append(value)
                address = self._stage(name, value.nbytes)
                cuda.memcpy(address, cuda.host_address(value), value.nbytes, "h2d", self.stream)
            elif value.buffer.device == "cuda":
                address = value.ptr
            else:
                raise EngineError(f"{self.path.name}: input {name} is on {value.buffer.device}, not the GPU")
            context.set_input_shape(name, shapes[name])
            context.set_tensor_address(name, address)
        host = {}
        for name in self._outputs:
            if name in outputs:
                context.set_tensor_address(name, outputs[name].ptr)
                continue
            host[name] = np.empty(tuple(context.get_tensor_shape(name)), self.spec.outputs[name].np_dtype)
            context.set_tensor_address(name, self._stage(name, host[name].nbytes))
        if not context.execute_async_v3(self.stream):
            raise EngineError(f"{self.path.name}: TensorRT execution failed (see its log above)")
        for name, array in host.items():
            cuda.memcpy(cuda.host_address(array), self._staging[name].ptr, array.nbytes, "d2h", self.stream)
        cuda.stream_sync(self.stream)
        return host

    def _unload(self) -> None:
        cuda.stream_sync(self.stream)
        self._contexts, self.engine, self._staging = [], None, {}
        cuda._call(cuda.cudart().cudaStreamDestroy(self.stream), "cudaStreamDestroy")
