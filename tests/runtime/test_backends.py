"""runtime/backends: the registry, the feed checks of the base class, the ORT backend's providers and device tensors."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxruntime as ort

from sparsezip_deploy.runtime.backends import backend_options, open_backend
from sparsezip_deploy.runtime.backends.base import check_feeds, compile_checks
from sparsezip_deploy.runtime.backends.ort import OrtBackend, OrtOptions, open_graph, resolve_providers
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import GraphSpec, TensorSpec

SPEC = GraphSpec(
    file="add.onnx",
    inputs={"x": TensorSpec("float32", ("batch", 3)), "y": TensorSpec("float32", ("batch", 3))},
    outputs={"z": TensorSpec("float32", ("batch", 3))},
)


@pytest.fixture
def add_onnx(tmp_path):
    """z = x + y with a symbolic batch axis: the smallest real graph for the backend."""
    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add",
                              [value("x"), value("y")], [value("z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "add.onnx"
    onnx.save(model, path)
    return path


def feeds(batch_x=2, batch_y=2, dtype=np.float32):
    return {"x": np.ones((batch_x, 3), dtype), "y": np.ones((batch_y, 3), dtype)}


CHECKS = compile_checks(SPEC)


def test_feeds_that_match_pass():
    assert check_feeds("g", CHECKS, feeds()) == {"batch": 2}


@pytest.mark.parametrize("bad,message", [
    (dict(x=np.ones((2, 3), np.float64)), "input x is float64, declared float32"),
    (dict(x=np.ones((2, 3, 1), np.float32)), "input x has shape [2, 3, 1], declared ['batch', 3]"),
    (dict(x=np.ones((2, 4), np.float32)), "input x axis 1 is 4, declared 3"),
    (dict(y=np.ones((5, 3), np.float32)), "axis 'batch' is 5 in y but 2 in x"),
    (dict(w=np.ones((2, 3), np.float32)), "unexpected ['w']"),
    (dict(x=[[1.0, 2.0, 3.0]]), "input x is a list, not a tensor this backend takes"),
])
def test_feed_errors(bad, message):
    with pytest.raises(EngineError) as info:
        check_feeds("g", CHECKS, {**feeds(), **bad})
    assert message in str(info.value)


def test_missing_feed():
    with pytest.raises(EngineError, match=r"missing \['y'\]"):
        check_feeds("g", CHECKS, {"x": np.ones((2, 3), np.float32)})


def test_unavailable_provider_names_the_available_ones():
    with pytest.raises(EngineError) as info:
        resolve_providers("cuda", available=["AzureExecutionProvider", "CPUExecutionProvider"])
    assert str(info.value) == ("provider cuda needs CUDAExecutionProvider, which this onnxruntime build "
                               "lacks (available: AzureExecutionProvider, CPUExecutionProvider); install "
                               "onnxruntime-gpu instead of onnxruntime (x86: pip install onnxruntime-gpu "
                               "tensorrt-cu12; Jetson: the onnxruntime-gpu wheel of the Jetson AI Lab index "
                               "for JetPack 6)")


def test_provider_fallbacks():
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("tensorrt", available=every) == every
    assert resolve_providers("tensorrt", available=every[::2]) == every[::2]
    assert resolve_providers("cuda", available=every) == every[1:]
    assert resolve_providers("cpu", available=every) == ["CPUExecutionProvider"]


def test_unknown_provider_and_threads():
    with pytest.raises(EngineError, match="unknown provider 'rocm'"):
        OrtOptions(provider="rocm")
    with pytest.raises(EngineError, match="threads must be >= 1"):
        OrtOptions(threads=0)


def test_ort_backend_runs_and_checks(add_onnx):
    with OrtBackend(add_onnx, SPEC, OrtOptions(threads=1)) as backend:
        assert list(backend.inputs) == ["x", "y"] and backend.inputs["x"].dtype == np.float32
        out = backend.run(feeds(batch_x=4, batch_y=4))
        np.testing.assert_array_equal(out["z"], np.full((4, 3), 2, np.float32))
        with pytest.raises(EngineError, match="declared float32"):
            backend.run(feeds(dtype=np.float16))
    assert not backend.active


def test_ort_backend_refuses_a_graph_that_differs_from_the_manifest(add_onnx):
    spec = GraphSpec("add.onnx", {"x": SPEC.inputs["x"], "other": SPEC.inputs["y"]}, SPEC.outputs)
    with pytest.raises(EngineError, match="differ from the manifest"):
        OrtBackend(add_onnx, spec).activate()


def test_ort_backend_unloadable_file_is_one_line(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf")
    with pytest.raises(EngineError) as info:
        OrtBackend(path, SPEC).activate()
    assert str(info.value).startswith(f"cannot load {path}") and "\n" not in str(info.value)


def test_backends_are_opened_by_name(add_onnx, monkeypatch):
    with open_backend("ort", add_onnx, SPEC, backend_options("ort", threads=1)) as backend:
        assert isinstance(backend, OrtBackend) and backend.device == "cpu"
    native = open_backend("tensorrt", add_onnx, SPEC)  # cheap: TensorRT is imported on activate
    assert native.device == "cuda"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="the tensorrt backend needs the TensorRT Python package: x86: pip"):
        native.activate()
    with pytest.raises(EngineError, match="unknown backend 'tvm': choose one of ort, tensorrt"):
        backend_options("tvm")


def test_device_tensors_in_and_pre_bound_outputs_written_in_place(add_onnx):
    with OrtBackend(add_onnx, SPEC, OrtOptions(threads=1)) as backend:
        memory = backend.allocate(3 * 3 * 4 * 4)  # room for a few [batch, 3] float32 tensors
        x = memory.view((2, 3), np.float32)
        z = memory.view((2, 3), np.float32, offset=2 * 3 * 4)
        host_x = np.arange(6, dtype=np.float32).reshape(2, 3)
        raw = (np.ctypeslib.ctypes.c_byte * x.nbytes).from_address(x.ptr)
        np.frombuffer(raw, np.float32)[:] = host_x.ravel()
        y = ort.OrtValue.ortvalue_from_numpy(np.ones((2, 3), np.float32))
        out = backend.run({"x": x, "y": y}, outputs={"z": z})
        assert out == {}  # z was written on the device, nothing came back
        np.testing.assert_array_equal(backend.to_host(z), host_x + 1)
        with pytest.raises(EngineError, match=r"output z bound as \[3, 3\], the feeds make it \[2, 3\]"):
            backend.run({"x": x, "y": y}, outputs={"z": memory.view((3, 3), np.float32)})
        with pytest.raises(ValueError, match="does not fit"):
            memory.view((4, 3), np.float32, offset=memory.nbytes - 24)
        grown = backend.allocate(memory.nbytes * 2)
        backend.copy(memory, grown, memory.nbytes)
        np.testing.assert_array_equal(backend.to_host(grown.view((2, 3), np.float32)), host_x)


def test_a_graph_outside_an_engine_folder_declares_its_own_io(add_onnx):
    with open_graph(add_onnx, OrtOptions(threads=1)) as graph:
        assert graph.spec.inputs["x"] == TensorSpec("float32", ("batch", 3))
        np.testing.assert_array_equal(graph.run(feeds(batch_x=3, batch_y=3))["z"], np.full((3, 3), 2, np.float32))
        with pytest.raises(EngineError, match="axis 'batch' is 2 in y but 3 in x"):
            graph.run(feeds(batch_x=3, batch_y=2))
    with open_graph(add_onnx.read_bytes()) as graph:  # from bytes: calib's in-memory probes
        assert list(graph.spec.outputs) == ["z"]


def test_an_output_the_feeds_do_not_size_is_fetched_beside_pre_bound_ones(tmp_path):
    """z = x + y pre-bound, w = x * y declared with an axis no feed fixes: ORT allocates w, fetched after."""
    def value(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"]), helper.make_node("Mul", ["x", "y"], ["w"])],
                              "two", [value("x", ["batch", 3]), value("y", ["batch", 3])],
                              [value("z", ["batch", 3]), value("w", ["rows", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "two.onnx")
    spec = GraphSpec("two.onnx", SPEC.inputs, {"z": SPEC.outputs["z"], "w": TensorSpec("float32", ("rows", 3))})
    with OrtBackend(tmp_path / "two.onnx", spec, OrtOptions(threads=1)) as backend:
        z = backend.allocate(2 * 3 * 4).view((2, 3), np.float32)
        x = np.full((2, 3), 3, np.float32)
        out = backend.run({"x": x, "y": np.full((2, 3), 2, np.float32)}, outputs={"z": z})
        assert set(out) == {"w"}
        np.testing.assert_array_equal(out["w"], np.full((2, 3), 6, np.float32))
        np.testing.assert_array_equal(backend.to_host(z), np.full((2, 3), 5, np.float32))
