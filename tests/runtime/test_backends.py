"""runtime/backends: the feed checks of the base class and the ORT backend's providers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sparsezip_deploy.runtime.backends.base import check_feeds
from sparsezip_deploy.runtime.backends.ort import OrtBackend, OrtOptions, resolve_providers
from sparsezip_deploy.runtime.engine import GraphSpec, TensorSpec
from sparsezip_deploy.runtime.errors import EngineError

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


def test_feeds_that_match_pass():
    check_feeds("g", SPEC.inputs, feeds())


@pytest.mark.parametrize("bad,message", [
    (dict(x=np.ones((2, 3), np.float64)), "input x is float64, declared float32"),
    (dict(x=np.ones((2, 3, 1), np.float32)), "input x has shape [2, 3, 1], declared ['batch', 3]"),
    (dict(x=np.ones((2, 4), np.float32)), "input x axis 1 is 4, declared 3"),
    (dict(y=np.ones((5, 3), np.float32)), "axis 'batch' is 5 in y but 2 in x"),
    (dict(w=np.ones((2, 3), np.float32)), "unexpected ['w']"),
    (dict(x=[[1.0, 2.0, 3.0]]), "not a numpy array"),
])
def test_feed_errors(bad, message):
    with pytest.raises(EngineError) as info:
        check_feeds("g", SPEC.inputs, {**feeds(), **bad})
    assert message in str(info.value)


def test_missing_feed():
    with pytest.raises(EngineError, match=r"missing \['y'\]"):
        check_feeds("g", SPEC.inputs, {"x": np.ones((2, 3), np.float32)})


def test_unavailable_provider_names_the_available_ones():
    with pytest.raises(EngineError) as info:
        resolve_providers("cuda", available=["AzureExecutionProvider", "CPUExecutionProvider"])
    assert str(info.value) == ("provider cuda needs CUDAExecutionProvider, which this onnxruntime build "
                               "lacks; available: AzureExecutionProvider, CPUExecutionProvider")


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
