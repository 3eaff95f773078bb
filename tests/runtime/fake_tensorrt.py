"""Stand-ins for the `tensorrt` module and the CUDA runtime, so that the native TensorRT path runs on a CPU.

The builder side records what sparsezip-build-trt asks for; its "plan" is JSON
naming the ONNX graph and the profiles. The runtime side deserializes that
into an engine that executes the graph with ONNX Runtime CPU, reading its
inputs from and writing its outputs to the addresses it was given, and
refuses shapes outside the selected profile, as TensorRT does. "Device"
memory is host memory. This checks the backend's glue (staging, addresses,
in-place KV views, profile choice), not TensorRT itself.
"""
from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np
import onnxruntime as ort

from sparsezip_deploy.runtime import cuda
from sparsezip_deploy.runtime.cuda import Gpu

# NetworkDefinitionCreationFlag as each version's Python API documents it (names; the numbers differ).
FLAGS_10_3 = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
FLAGS_11 = enum.IntEnum("NetworkDefinitionCreationFlag",
                        {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1, "PREFER_JIT_PYTHON_PLUGINS": 2})
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeTensorRT(types.ModuleType):
    def __init__(self, fail_on: str | None = None, version: str = "10.3.0"):
        super().__init__("tensorrt")
        self.__version__, self.NetworkDefinitionCreationFlag = version, FLAGS_10_3
        self.calls, fake = [], self
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, severity: None})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                fake.calls.append(("parse", path.rsplit("/", 1)[-1]))
                self.network.path = path
                return fail_on is None or not path.endswith(fail_on)

            def get_error(self, i):
                return "In node 12 (TopK): K exceeds 3840"

        class Profile(dict):
            def set_shape(self, name, lo, opt, hi):
                self[name] = (lo, opt, hi)

        class Config:
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Builder:
            def __init__(self, logger):
                pass

            create_network = staticmethod(Network)
            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                profiles = [dict(p) for p in config.profiles]
                fake.calls.append(("build", profiles))
                return json.dumps({"onnx": network.path, "profiles": profiles}).encode()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return FakeEngine(json.loads(blob), fake)

        self.Builder, self.OnnxParser, self.Runtime = Builder, Parser, Runtime


class FakeEngine:
    def __init__(self, plan: dict, trt: FakeTensorRT):
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profiles, self.trt = plan["profiles"], trt
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(self.profiles)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        arg = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in arg.shape)

    def get_tensor_profile_shape(self, name, profile):
        return [tuple(s) for s in self.profiles[profile][name]]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.profile, self.shapes, self.addresses = engine, None, {}, {}
        self.executed = 0

    def set_optimization_profile_async(self, profile, stream):
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _symbols(self) -> dict[str, int]:
        return {d: size for name, arg in self.engine.inputs.items()
                for d, size in zip(arg.shape, self.shapes[name]) if isinstance(d, str)}

    def get_tensor_shape(self, name):
        symbols = self._symbols()
        return tuple(d if isinstance(d, int) else symbols[d] for d in self.engine.outputs[name].shape)

    def execute_async_v3(self, stream):
        ranges = self.engine.profiles[self.profile]
        for name, shape in self.shapes.items():
            lo, _, hi = ranges.get(name, (shape, shape, shape))
            if not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise RuntimeError(f"{name} {shape} outside profile {self.profile}")
        feeds = {name: _read(self.addresses[name], shape, _DTYPES[self.engine.inputs[name].type])
                 for name, shape in self.shapes.items()}
        for name, value in zip(self.engine.outputs, self.engine.session.run(None, feeds)):
            assert value.shape == self.get_tensor_shape(name), name
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.executed += 1
        return True


def _read(address: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype).reshape(shape).copy()


class _HostMemory:
    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.array = np.zeros(self.nbytes, np.uint8)
        self.ptr = self.array.ctypes.data


def fake_cuda(monkeypatch, gpu: Gpu = Gpu("Fake GPU", "8.7")) -> None:
    """runtime.cuda on host memory: copies are memmoves, streams are nothing."""
    success = types.SimpleNamespace(cudaSuccess=0)
    runtime = types.SimpleNamespace(cudaError_t=success, cudaSetDevice=lambda device: (0,),
                                    cudaStreamDestroy=lambda stream: (0,))
    monkeypatch.setattr(cuda, "cudart", lambda: runtime)
    monkeypatch.setattr(cuda, "gpu_info", lambda device_id=0: gpu)
    monkeypatch.setattr(cuda, "DeviceMemory", _HostMemory)
    monkeypatch.setattr(cuda, "stream_create", lambda: 1)
    monkeypatch.setattr(cuda, "stream_sync", lambda stream: None)
    monkeypatch.setattr(cuda, "memcpy", lambda dst, src, nbytes, kind, stream: ctypes.memmove(dst, src, nbytes))
