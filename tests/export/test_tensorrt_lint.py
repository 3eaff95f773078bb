"""export/tensorrt_lint.py: each rule broken and kept on one-node graphs, the shipped graphs, the CLI."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.tensorrt_lint import TARGETS, Violation, check_folder, lint_file, lint_model, main
from sparsezip_deploy.sparsezip.config import CONFIGS

OLD, NEW = TARGETS
BOTH = (OLD, NEW)


def vi(name: str, dtype: int, shape=None) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, dtype, shape)


def graph(nodes, inputs, outputs, inits=(), name="g") -> onnx.GraphProto:
    return oh.make_graph(nodes, name, [vi(*i) for i in inputs], [vi(*o) for o in outputs],
                         initializer=[numpy_helper.from_array(np.asarray(v), n) for n, v in inits])


def model(nodes, inputs, outputs, inits=(), opset=18, domains=()) -> onnx.ModelProto:
    return oh.make_model(graph(nodes, inputs, outputs, inits),
                         opset_imports=[oh.make_opsetid("", opset), *(oh.make_opsetid(d, 1) for d in domains)])


def node(op: str, inputs, outputs, **attrs) -> onnx.NodeProto:
    return oh.make_node(op, inputs, outputs, name="n", **attrs)


def const(name: str, value) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.asarray(value)))


def unary(op: str, dtype: int, out_dtype: int | None = None, **attrs) -> onnx.ModelProto:
    return model([node(op, ["x"], ["y"], **attrs)], [("x", dtype, [2, 8])], [("y", out_dtype or dtype)])


def topk(k_source: str, k: int = 53, **attrs) -> onnx.ModelProto:
    """TopK of a [2, 5000] input, K an initializer, a Constant node or a graph input."""
    nodes = [const("k", [k])] if k_source == "constant" else []
    inputs = [("x", T.FLOAT, [2, 5000])] + ([("k", T.INT64, [1])] if k_source == "input" else [])
    return model(nodes + [node("TopK", ["x", "k"], ["v", "i"], **attrs)], inputs,
                 [("v", T.FLOAT), ("i", T.INT64)], [("k", np.array([k]))] if k_source == "init" else ())


def axes_op(op: str, source: str, dtype: int = T.FLOAT) -> onnx.ModelProto:
    """`op` on a [2, 1, 8] input with its axes (CumSum: axis) an initializer, a Constant or a graph input."""
    value = np.array(1) if op == "CumSum" else np.array([1])
    extra = {"Slice": ["starts", "ends"]}.get(op, [])
    nodes = [const("axes", value)] if source == "constant" else []
    inputs = [("x", dtype, [2, 1, 8])] + ([("axes", T.INT64, list(value.shape))] if source == "input" else [])
    inits = [("starts", np.array([0])), ("ends", np.array([1]))] if extra else []
    inits += [("axes", value)] if source == "init" else []
    return model(nodes + [node(op, ["x", *extra, "axes"], ["y"])], inputs, [("y", dtype)], inits)


def casts(via: int, source: int = T.FLOAT) -> onnx.ModelProto:
    return model([node("Cast", ["x"], ["t"], to=via), oh.make_node("Cast", ["t"], ["y"], name="back", to=T.FLOAT)],
                 [("x", source, [2, 8])], [("y", T.FLOAT)])


def scatter_nd(reduction: str) -> onnx.ModelProto:
    return model([node("ScatterND", ["data", "idx", "upd"], ["y"], reduction=reduction)],
                 [("data", T.FLOAT, [4, 3]), ("idx", T.INT64, [2, 1]), ("upd", T.FLOAT, [2, 3])], [("y", T.FLOAT)])


def layer_norm(mean_used: bool) -> onnx.ModelProto:
    return model([node("LayerNormalization", ["x", "scale"], ["y", "mean"])], [("x", T.FLOAT, [2, 8])],
                 [("y", T.FLOAT)] + ([("mean", T.FLOAT)] if mean_used else []), [("scale", np.ones(8, np.float32))])


def if_node(else_shape=(2, 8), then_out="a", else_out="b") -> onnx.ModelProto:
    """If whose then-branch gives a [2, 8] zero, its else-branch a zero of `else_shape`; an output
    named "x" passes the outer input through instead."""
    def branch(name, out, shape):
        nodes = [] if out == "x" else [const(out, np.zeros(shape, np.float32))]
        return graph(nodes, [], [(out, T.FLOAT, list(shape))], name=name)
    return model([node("If", ["c"], ["y"], then_branch=branch("then", then_out, (2, 8)),
                       else_branch=branch("else", else_out, else_shape))],
                 [("c", T.BOOL, []), ("x", T.FLOAT, [2, 8])], [("y", T.FLOAT)])


def rms_norm(native: bool) -> onnx.ModelProto:
    """RMSNormalization (opset 23), or what an exporter writes for it at opset 18."""
    io = dict(inputs=[("x", T.FLOAT, [2, 8])], outputs=[("y", T.FLOAT)])
    if native:
        return model([node("RMSNormalization", ["x", "scale"], ["y"])], **io,
                     inits=[("scale", np.ones(8, np.float32))], opset=23)
    names = [("Mul", ["x", "x"]), ("ReduceMean", ["sq", "axes"]), ("Add", ["ms", "eps"]), ("Sqrt", ["ms_eps"]),
             ("Div", ["x", "rms"]), ("Mul", ["normed", "scale"])]
    outs = ["sq", "ms", "ms_eps", "rms", "normed", "y"]
    nodes = [oh.make_node(op, ins, [out], name=f"n{i}") for i, ((op, ins), out) in enumerate(zip(names, outs))]
    return model(nodes, **io, inits=[("axes", np.array([-1])), ("eps", np.float32(1e-6)),
                                     ("scale", np.ones(8, np.float32))])


QKV = [("q", T.FLOAT, [2, 4, 5, 8]), ("k", T.FLOAT, [2, 4, 5, 8]), ("v", T.FLOAT, [2, 4, 5, 8])]


def attention(native: bool, past: bool = False) -> onnx.ModelProto:
    """Attention (opset 23, past key/value optional), or MatMul-Softmax-MatMul at opset 18."""
    if native:
        inputs = ["q", "k", "v"] + (["", "pk", "pv"] if past else [])
        outputs = ["y"] + (["present_k", "present_v"] if past else [])
        pasts = [("pk", T.FLOAT, [2, 4, 3, 8]), ("pv", T.FLOAT, [2, 4, 3, 8])] if past else []
        return model([node("Attention", inputs, outputs)], QKV + pasts,
                     [("y", T.FLOAT)] + [(o, T.FLOAT) for o in outputs[1:]], opset=23)
    nodes = [oh.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 1, 3, 2]),
             oh.make_node("MatMul", ["q", "kt"], ["s"], name="qk"), oh.make_node("Softmax", ["s"], ["p"], name="sm"),
             oh.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    return model(nodes, QKV, [("y", T.FLOAT)])


def matmul_nbits(contrib: bool) -> onnx.ModelProto:
    if contrib:
        return model([oh.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="n", domain="com.microsoft",
                                   K=16, N=4, bits=4, block_size=16)],
                     [("x", T.FLOAT, [2, 16])], [("y", T.FLOAT)],
                     [("w", np.zeros((4, 1, 8), np.uint8)), ("s", np.ones(4, np.float32))], domains=["com.microsoft"])
    return model([node("MatMul", ["x", "w"], ["y"])], [("x", T.FLOAT, [2, 16])], [("y", T.FLOAT)],
                 [("w", np.zeros((16, 4), np.float32))])


def qdq(zero_point: int) -> onnx.ModelProto:
    """QuantizeLinear with the zero point given, DequantizeLinear with 0."""
    return model([node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                  oh.make_node("DequantizeLinear", ["q", "s", "zero"], ["y"], name="dq")],
                 [("x", T.FLOAT, [2, 8])], [("y", T.FLOAT)],
                 [("s", np.float32(0.1)), ("zp", np.int8(zero_point)), ("zero", np.int8(0))])


def in_subgraph(dtype: int) -> onnx.ModelProto:
    """A CumSum inside an If's then-branch, on an outer-scope input."""
    then = graph([oh.make_node("CumSum", ["x", "axis"], ["a"], name="n")], [], [("a", dtype, [2, 8])],
                 [("axis", np.array(1))], name="then")
    other = graph([oh.make_node("Identity", ["x"], ["b"], name="id")], [], [("b", dtype, [2, 8])], name="else")
    return model([oh.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
                 [("c", T.BOOL, []), ("x", dtype, [2, 8])], [("y", dtype)])


@dataclass(frozen=True)
class Case:
    bad: Callable[[], onnx.ModelProto]
    good: Callable[[], onnx.ModelProto]
    expect: dict  # target -> a part of the rule the bad graph breaks there; None: it passes there
    node: str = "n"


def both(rule: str) -> dict:
    return {OLD: rule, NEW: rule}


FLOAT_ONLY = "takes FLOAT/FLOAT16/BFLOAT16 only: x is INT32"
CASES = {
    "topk-k-over-limit": Case(lambda: topk("init", 4000), lambda: topk("init", 3839), both("K=4000 must be < 3840")),
    "topk-k-computed": Case(lambda: topk("input"), lambda: topk("constant"),
                            both("K must be an initializer or Constant, so that K < 3840 is known")),
    "topk-unsorted": Case(lambda: topk("init", sorted=0), lambda: topk("init", sorted=1), both("sorted must be 1")),
    "cumsum-int": Case(lambda: axes_op("CumSum", "init", T.INT64), lambda: axes_op("CumSum", "init"),
                       both("takes FLOAT/FLOAT16/BFLOAT16 only: x is INT64")),
    "cumsum-axis-computed": Case(lambda: axes_op("CumSum", "input"), lambda: axes_op("CumSum", "constant"),
                                 both("axis must be an initializer or Constant")),
    "reducemean-axes-computed": Case(lambda: axes_op("ReduceMean", "input"), lambda: axes_op("ReduceMean", "init"),
                                     both("axes must be an initializer or Constant")),
    "squeeze-axes-computed": Case(lambda: axes_op("Squeeze", "input"), lambda: axes_op("Squeeze", "constant"),
                                  both("axes must be an initializer or Constant")),
    "unsqueeze-axes-computed": Case(lambda: axes_op("Unsqueeze", "input"), lambda: axes_op("Unsqueeze", "init"),
                                    both("axes must be an initializer or Constant")),
    # 10.15's table dropped the restriction on Slice.
    "slice-axes-computed": Case(lambda: axes_op("Slice", "input"), lambda: axes_op("Slice", "constant"),
                                {OLD: "axes must be an initializer or Constant", NEW: None}),
    "nonzero-int": Case(lambda: unary("NonZero", T.INT32, T.INT64), lambda: unary("NonZero", T.FLOAT16, T.INT64),
                        both("takes FLOAT/FLOAT16 only: x is INT32")),
    "nonzero-bf16": Case(lambda: unary("NonZero", T.BFLOAT16, T.INT64), lambda: unary("NonZero", T.FLOAT, T.INT64),
                         both("takes FLOAT/FLOAT16 only: x is BFLOAT16")),
    **{f"{op.lower()}-int": Case(lambda op=op: unary(op, T.INT32), lambda op=op: unary(op, T.BFLOAT16),
                                 both(FLOAT_ONLY)) for op in ("Softmax", "Erf", "Sqrt")},
    "einsum-int": Case(lambda: unary("Einsum", T.INT32, equation="ij->ji"),
                       lambda: unary("Einsum", T.FLOAT16, equation="ij->ji"), both(FLOAT_ONLY)),
    # 10.15's table lets Pow take INT32/INT64.
    "pow-int": Case(lambda: model([node("Pow", ["x", "x"], ["y"])], [("x", T.INT32, [2, 8])], [("y", T.INT32)]),
                    lambda: model([node("Pow", ["x", "x"], ["y"])], [("x", T.FLOAT, [2, 8])], [("y", T.FLOAT)]),
                    {OLD: "takes FLOAT/FLOAT16/BFLOAT16 only: x is INT32", NEW: None}),
    "scatternd-reduction": Case(lambda: scatter_nd("add"), lambda: scatter_nd("none"),
                                both("reduction=add is unsupported")),
    "layernorm-mean-used": Case(lambda: layer_norm(True), lambda: layer_norm(False),
                                both("only output Y is supported: Mean/InvStdDev mean are used")),
    "if-ranks-differ": Case(lambda: if_node((8,)), lambda: if_node((3, 8)),
                            both("then/else outputs must have equal rank: a is rank 2, b rank 1")),
    "if-same-output-names": Case(lambda: if_node(then_out="x", else_out="x"), lambda: if_node(),
                                 both("then/else outputs must have different names: both output x")),
    "rms-normalization": Case(lambda: rms_norm(True), lambda: rms_norm(False),
                              {OLD: "supported from TensorRT 10.15 on", NEW: None}),
    "attention": Case(lambda: attention(True), lambda: attention(False),
                      {OLD: "supported from TensorRT 10.14 on", NEW: None}),
    "attention-past-key": Case(lambda: attention(True, past=True), lambda: attention(True),
                               {NEW: "unsupported by the parser: input past_key, input past_value, output present_key"}),
    "uint8-intermediate": Case(lambda: casts(T.UINT8), lambda: casts(T.FLOAT16, source=T.UINT8),
                               both("UINT8 is supported only as a network input or output: t")),
    "double": Case(lambda: casts(T.DOUBLE), lambda: casts(T.FLOAT16),
                   both("DOUBLE tensors are cast down to FLOAT by the parser; export float32: t")),
    "unsupported-op": Case(lambda: unary("Det", T.FLOAT), lambda: unary("Identity", T.FLOAT),
                           both("not among the parser's supported operators")),
    "matmulnbits": Case(lambda: matmul_nbits(True), lambda: matmul_nbits(False),
                        both("ORT-only contrib op: build without --llm-quant for TensorRT")),
    "custom-domain": Case(lambda: model([oh.make_node("Foo", ["x"], ["y"], name="n", domain="my.plugins")],
                                        [("x", T.FLOAT, [2])], [("y", T.FLOAT)], domains=["my.plugins"]),
                          lambda: unary("Identity", T.FLOAT), both("only through a registered plugin")),
    "qdq-zero-point": Case(lambda: qdq(3), lambda: qdq(0), both("zero point must be a constant 0")),
    "subgraph-node": Case(lambda: in_subgraph(T.INT64), lambda: in_subgraph(T.FLOAT),
                          both("takes FLOAT/FLOAT16/BFLOAT16 only: x is INT64"), node="if/then_branch/n"),
    "opset-21": Case(lambda: model([node("Relu", ["x"], ["y"])], [("x", T.FLOAT, [2])], [("y", T.FLOAT)], opset=21),
                     lambda: model([node("Relu", ["x"], ["y"])], [("x", T.FLOAT, [2])], [("y", T.FLOAT)], opset=20),
                     {OLD: "default-domain opset 21 is outside the parser's opsets 9-20", NEW: None}, node="<model>"),
}


@pytest.mark.parametrize("name,target", [(name, target) for name, case in CASES.items() for target in case.expect])
def test_rule_is_caught_and_its_compliant_variant_passes(name, target):
    case = CASES[name]
    rule = case.expect[target]
    # An opset-23 graph also breaks 10.3's opset range; each case looks at its own rule.
    found = [v for v in lint_model(case.bad(), target) if v.node != "<model>" or case.node == "<model>"]
    if rule is None:
        assert found == []
    else:
        assert len(found) == 1, [str(v) for v in found]
        assert found[0].node == case.node and rule in found[0].rule, str(found[0])
    assert lint_model(case.good(), target) == []


def test_violation_reads_as_one_line():
    assert str(Violation("TopK_12", "TopK", "K=4000 must be < 3840")) == "node 'TopK_12' (TopK): K=4000 must be < 3840"
    (v,) = lint_model(topk("init", 4000), OLD)
    assert (v.node, v.op_type) == ("n", "TopK")


def test_unknown_target_and_unreadable_file_are_user_errors(tmp_path):
    with pytest.raises(ExportError, match=r"unknown TensorRT target 'tensorrt-9'; known: tensorrt-10.3, tensorrt-11"):
        lint_model(topk("init"), "tensorrt-9")
    (tmp_path / "junk.onnx").write_bytes(b"\xff not a protobuf")
    with pytest.raises(ExportError, match="junk.onnx: not a readable ONNX file"):
        lint_file(tmp_path / "junk.onnx", OLD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="empty holds no"):
        check_folder(tmp_path / "empty", OLD)
    with pytest.raises(ExportError, match="unknown TensorRT target"):
        check_folder(tmp_path / "empty", "tensorrt")


# The shipped graphs: every method's vision.onnx and the llm.onnx, exported from the tiny model.
@pytest.fixture(scope="module")
def shipped(tiny, tmp_path_factory) -> dict[str, Path]:
    from sparsezip_deploy.export.llm import DecoderGraph, export_llm
    from sparsezip_deploy.export.vision import VisionGraph, export_vision

    folder = tmp_path_factory.mktemp("shipped")
    paths = {f"vision-{m}": folder / f"vision-{m}.onnx" for m in CONFIGS}
    for method, cls in CONFIGS.items():
        export_vision(VisionGraph(tiny.model, cls()).eval(), paths[f"vision-{method}"])
    paths["llm"] = folder / "llm.onnx"
    export_llm(DecoderGraph(tiny.model, "float32").eval(), paths["llm"])
    return paths


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", [*(f"vision-{m}" for m in CONFIGS), "llm"])
def test_shipped_graphs_pass(shipped, name, target):
    found = lint_file(shipped[name], target)
    assert not found, [str(v) for v in found]


def test_int4_llm_names_the_build_option(shipped, tmp_path):
    from sparsezip_deploy.calib.llm_quant import quantize_llm

    quantize_llm(shipped["llm"], tmp_path / "llm.onnx", 4)
    nbits = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp_path / "llm.onnx")).graph.node)
    for target in TARGETS:
        found = lint_file(tmp_path / "llm.onnx", target)
        assert len(found) == nbits > 0
        assert {(v.op_type, v.rule) for v in found} == {
            ("MatMulNBits", "ORT-only contrib op: build without --llm-quant for TensorRT")}


def test_cli_exit_codes_and_lines(tmp_path, capsys):
    engine = tmp_path / "engine"
    engine.mkdir()
    onnx.save(topk("init"), engine / "vision.onnx")
    onnx.save(rms_norm(False), engine / "llm.onnx")
    assert main([str(engine), "--target", OLD]) == 0
    assert capsys.readouterr().out == "7 nodes checked, no violations for tensorrt-10.3\n"
    assert check_folder(engine, NEW) == []

    onnx.save(topk("init", 4000), engine / "vision.onnx")
    assert main([str(engine), str(engine / "vision.onnx")]) == 1  # the default target is tensorrt-10.3
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{engine / 'vision.onnx'}: node 'n' (TopK): K=4000 must be < 3840"] * 2 + [
        "8 nodes checked, 2 violations for tensorrt-10.3"]
    assert check_folder(engine, OLD) == ["vision.onnx: node 'n' (TopK): K=4000 must be < 3840"]

    assert main([str(engine), "--target", "tensorrt-9"]) == 1
    assert capsys.readouterr().err == "error: unknown TensorRT target 'tensorrt-9'; known: tensorrt-10.3, tensorrt-11\n"
    assert main([str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.onnx: not a readable ONNX file" in err and err.count("\n") == 1


def test_console_script_is_installed(tmp_path):
    script = shutil.which("sparsezip-lint-trt")
    assert script, "pip install -e . puts sparsezip-lint-trt on PATH"
    onnx.save(topk("init"), tmp_path / "vision.onnx")
    run = subprocess.run([script, str(tmp_path), "--target", NEW], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "1 node checked, no violations for tensorrt-11\n")
