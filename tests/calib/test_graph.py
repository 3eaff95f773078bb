"""calib/graph.py: the encoder's linear layers and the selection path, found from the graph's structure."""
from __future__ import annotations

import ast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsezip_deploy.calib.errors import CalibError
from sparsezip_deploy.calib.graph import find_linears


def toy_block(with_topk: bool) -> onnx.ModelProto:
    """x -> LN -> q, k, v -> softmax(q k^T) v -> out -> x + .; the softmax's first row -> TopK (optionally)."""
    c = 8
    arrays = {"wq": np.eye(c), "wk": np.eye(c), "wv": np.eye(c), "wo": np.eye(c), "g": np.ones(c), "b": np.zeros(c)}
    weights = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()]
    weights += [numpy_helper.from_array(np.array([i], np.int64), name) for name, i in (("row", 0), ("k", 2))]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)]
    nodes += [helper.make_node("MatMul", ["y", f"w{n}"], [n], name=f"proj_{n}") for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[1, 0]),
              helper.make_node("MatMul", ["q", "kt"], ["logits"], name="scores"),
              helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
              helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="context"),
              helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="proj_o"),
              helper.make_node("Add", ["x", "o"], ["h"], name="residual")]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [4, c])]
    if with_topk:
        nodes += [helper.make_node("Gather", ["probs", "row"], ["cls"], name="cls_row", axis=0),
                  helper.make_node("TopK", ["cls", "k"], ["top", "top_index"], name="topk")]
        outputs.append(helper.make_tensor_value_info("top_index", TensorProto.INT64, [1, 2]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, c])],
                              outputs, weights)
    return helper.make_model(graph)


def test_the_rule_on_a_toy_block():
    linears = find_linears(toy_block(with_topk=True))
    assert sorted(linears.selection) == ["proj_k", "proj_q"]
    assert sorted(linears.quantize) == ["proj_o", "proj_v"]
    without = find_linears(toy_block(with_topk=False))
    assert without.selection == () and sorted(without.quantize) == ["proj_k", "proj_o", "proj_q", "proj_v"]


def test_a_graph_without_blocks_is_refused():
    model = toy_block(with_topk=False)
    del model.graph.node[-1]  # no residual Add: no block, no encoder
    model.graph.output[0].name = "o"
    with pytest.raises(CalibError, match="no encoder linear layers"):
        find_linears(model)


def test_exported_graph_agrees_with_the_exporters_own_names(engine_fp32):
    """The exporter's metadata (module scopes) is the oracle; graph.py never reads it."""
    model = onnx.load(str(engine_fp32 / "vision.onnx"))
    scopes = {n.name: next(p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
              for n in model.graph.node if n.op_type == "MatMul"}
    scope = {name: ast.literal_eval(value)[-2] for name, value in scopes.items()}  # the module, e.g. layers.0.mlp.fc1
    linears = find_linears(model)
    assert sorted(scope[n] for n in linears.selection) == ["last.self_attn.k_proj", "last.self_attn.q_proj"]
    expected = {s for s in scope.values() if s.startswith(("layers.", "last.")) and s.rsplit(".", 1)[-1]
                in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}
    assert {scope[n] for n in linears.quantize} == expected - {"last.self_attn.k_proj", "last.self_attn.q_proj"}
    assert len(linears.quantize) == 6 * 3 - 2  # layers_run = 3
