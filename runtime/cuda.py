"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python, imported on first use.

cuda-python moved its runtime module between major versions: 12.x has
`from cuda import cudart`, 13.x `from cuda.bindings import runtime` (12.x
also has the new path from 12.6 on). Every call returns a tuple whose first
item is a `cudaError_t`; `_call` turns a failure into one EngineError line.
Also here: which GPU this is (name, compute capability), with nvidia-smi as the
fallback when cuda-python is absent (ONNX Runtime's EPs do not need it).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from functools import cache
from typing import NamedTuple

import numpy as np

from .errors import EngineError

CUDA_PYTHON_HINT = "pip install cuda-python (JetPack 6: pip install 'cuda-python>=12.6,<13')"


@cache
def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python 13, and 12.6+
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # cuda-python 12 before 12.6
        return runtime
    except ImportError:
        raise EngineError(f"the CUDA runtime bindings are missing: {CUDA_PYTHON_HINT}") from None


def _call(result, what: str):
    """(err, *values) -> values; a CUDA error is one line naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise EngineError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


class Gpu(NamedTuple):
    name: str
    compute_capability: str  # "8.7"


def gpu_info(device_id: int = 0) -> Gpu:
    """The GPU's name and compute capability: from cuda-python, else nvidia-smi."""
    try:
        rt = cudart()
    except EngineError:
        return _nvidia_smi(device_id)
    props = _call(rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name.split(b"\0")[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return Gpu(name, f"{props.major}.{props.minor}")


def _nvidia_smi(device_id: int) -> Gpu:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineError(f"cannot tell which GPU this is: no nvidia-smi and no cuda-python ({CUDA_PYTHON_HINT})")
    out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", str(device_id)],
                         capture_output=True, text=True, timeout=30)
    name, _, cc = out.stdout.strip().rpartition(",")
    if out.returncode != 0 or not name:
        raise EngineError(f"nvidia-smi found no GPU {device_id}: {(out.stderr or out.stdout).strip()[:200]}")
    return Gpu(name.strip(), cc.strip())


class DeviceMemory:
    """One cudaMalloc'd block, freed when collected (the DeviceBuffer's owner)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_call(cudart().cudaMalloc(self.nbytes), "cudaMalloc"))

    def __del__(self):
        if getattr(self, "ptr", 0):
            cudart().cudaFree(self.ptr)
            self.ptr = 0


def stream_create() -> int:
    return int(_call(cudart().cudaStreamCreate(), "cudaStreamCreate"))


def stream_sync(stream: int) -> None:
    _call(cudart().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def memcpy(dst: int, src: int, nbytes: int, kind: str, stream: int) -> None:
    """Async copy on `stream`; `kind` "h2d" | "d2h" | "d2d"."""
    rt = cudart()
    kinds = {"h2d": rt.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             "d2d": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}
    if nbytes:
        _call(rt.cudaMemcpyAsync(dst, src, nbytes, kinds[kind], stream), f"cudaMemcpyAsync {kind}")


def host_address(array: np.ndarray) -> int:
    assert array.flags.c_contiguous
    return array.ctypes.data_as(ctypes.c_void_p).value or 0
