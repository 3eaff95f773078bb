"""Lint ONNX graphs against the ONNX-TensorRT parser's documented limits, on CPU.

No TensorRT needed: every node (If/Loop/Scan bodies included) is checked against
the supported operators and restrictions that onnx/onnx-tensorrt `docs/operators.md`
states for a target. Neither target's own revision could be had here, so each
table comes from the nearest one, stated:

    tensorrt-10.3  JetPack 6. The onnx-tensorrt snapshot ends at tag release/10.1-GA
                   (96e7811, 2024-06-17), no 10.2/10.3 revision: that table, opsets 9-20.
    tensorrt-11    No TensorRT 11 revision either: the newest text found is the 10.15 GA
                   operators.md (opsets 9-24), read from the code index, its commit not
                   identified. Over 10.1-GA it adds Attention (10.14), RMSNormalization,
                   RotaryEmbedding, TensorScatter (10.15), the window ops and STFT; Pow
                   takes INT32/INT64; Slice and Pad lose their `axes` restriction.

Checked per node: the op is supported; inputs the table wants constant (TopK K,
CumSum axis, Reduce*/Squeeze/Unsqueeze axes, OneHot depth; Slice/Pad axes for 10.3)
are initializers or Constant outputs, which the parser imports as weights (10.15's
"build-time constant" / "resolvable to a constant" is read the same: nothing is
folded here); TopK K < 3840 and sorted=1; float-only ops (Softmax, Erf, Sqrt, Einsum,
CumSum, NonZero, Pow); ScatterND reduction 'none'; LayerNormalization's Mean and
InvStdDev unused; If branches of equal rank and distinct output names; Q/DQ zero
points 0; Attention's unsupported inputs, outputs and attributes. Per tensor: UINT8
only as a network input/output; DOUBLE is a violation (the parser casts it down to
FLOAT, clamping: export float32). Types come from `onnx.shape_inference`; a tensor
of unknown type is not judged.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from sparsezip_deploy.export.errors import ExportError

# Supported ("Y") operators of operators.md at release/10.1-GA.
_OPS_10_1 = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization
    IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization
    LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero
    Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign
    Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
    Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split())
# Added by the 10.15 GA text; the release that added each, where a changelog names it.
_ADDED_BY_10_15 = {"Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15",
                   "TensorScatter": "10.15", "BlackmanWindow": None, "HammingWindow": None,
                   "HannWindow": None, "STFT": None}

_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_INTS = frozenset({TensorProto.INT32, TensorProto.INT64})
TOPK_K_LIMIT = 3840


@dataclass(frozen=True)
class _Table:
    """One target's limits, read from one revision of operators.md."""

    source: str
    opset_max: int
    ops: frozenset
    pow_types: frozenset = _FLOATS
    # op -> (input index, input name) that must be an initializer or a Constant output
    constant_inputs: dict = field(default_factory=dict)


# TopK's K: operators.md 10.x only bounds it (< 3840; 8.x said "must be an initializer"); a computed K
# is reported all the same, since nothing can show it stays under the bound.
_CONSTANT_INPUTS = {"TopK": (1, "K"), "CumSum": (1, "axis"), "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"),
                    "OneHot": (1, "depth"), **{op: (1, "axes") for op in _OPS_10_1 if op.startswith("Reduce")}}
_TABLES = {
    "tensorrt-10.3": _Table("onnx-tensorrt docs/operators.md @ release/10.1-GA (96e7811)", 20, _OPS_10_1,
                           constant_inputs={**_CONSTANT_INPUTS, "Slice": (3, "axes"), "Pad": (3, "axes")}),
    "tensorrt-11": _Table("onnx-tensorrt docs/operators.md, TensorRT 10.15 GA text", 24,
                         _OPS_10_1 | set(_ADDED_BY_10_15), _FLOATS | _INTS, _CONSTANT_INPUTS),
}
TARGETS = tuple(_TABLES)
# Float-only ops (FP32/FP16/BF16 in both tables; NonZero has no BF16); Pow's types are per target.
_FLOAT_ONLY = {"Softmax": _FLOATS, "Erf": _FLOATS, "Sqrt": _FLOATS, "Einsum": _FLOATS, "CumSum": _FLOATS,
               "NonZero": frozenset({TensorProto.FLOAT, TensorProto.FLOAT16})}
# Ops that ONNX Runtime's quantisers emit and TensorRT does not parse: what to build instead.
_HINTS = {("com.microsoft", "MatMulNBits"): "ORT-only contrib op: build without --llm-quant for TensorRT",
          ("", "DynamicQuantizeLinear"): "ORT dynamic int8: build with --vision-int8 tensorrt (Q/DQ) instead",
          ("", "MatMulInteger"): "ORT dynamic int8: build with --vision-int8 tensorrt (Q/DQ) instead",
          ("", "ConvInteger"): "ORT dynamic int8: build with --vision-int8 tensorrt (Q/DQ) instead"}


@dataclass(frozen=True)
class Violation:
    node: str
    op_type: str
    rule: str

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op_type}): {self.rule}"


def _table(target: str) -> _Table:
    if target not in _TABLES:
        raise ExportError(f"unknown TensorRT target {target!r}; known: {', '.join(TARGETS)}")
    return _TABLES[target]


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from ((attr.name, g) for g in attr.graphs)


def _walk(graph: onnx.GraphProto, prefix: str = ""):
    """(qualified name, node) of every node, subgraphs' nodes named `parent/attribute/name`."""
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"{node.op_type}#{i}")
        yield name, node
        for attr, sub in _subgraphs(node):
            yield from _walk(sub, f"{name}/{attr}/")


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for _, sub in _subgraphs(node):
            yield from _graphs(sub)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


class _Facts:
    """What the checks need to know of every tensor of the model, all scopes together."""

    def __init__(self, model: onnx.ModelProto):
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, ValueError):
            pass  # an uninferable graph is still linted, with the types it declares
        self.dtype: dict[str, int] = {}
        self.rank: dict[str, int] = {}
        # Initializers and Constant outputs: the parser's Constant importer hands its value on as
        # weights (onnxOpImporters.cpp, 10.1-GA), so "must be an initializer" holds for both.
        self.const: dict[str, TensorProto] = {}
        self.boundary: set[str] = set()  # initializers and graph inputs of every scope: no producer node
        self.used: set[str] = set()
        top = model.graph
        self.network_io = {v.name for v in (*top.input, *top.output)}
        for graph in _graphs(top):
            for v in (*graph.input, *graph.output, *graph.value_info):
                t = v.type.tensor_type
                if t.elem_type:
                    self.dtype[v.name] = t.elem_type
                if t.HasField("shape"):
                    self.rank[v.name] = len(t.shape.dim)
            for t in graph.initializer:
                self.const[t.name], self.dtype[t.name], self.rank[t.name] = t, t.data_type, len(t.dims)
            self.boundary |= {v.name for v in graph.input} | {t.name for t in graph.initializer}
            self.used |= {v.name for v in graph.output}
            for node in graph.node:
                self.used |= set(node.input)
                if node.op_type == "Constant" and not _domain(node):
                    for attr in node.attribute:
                        value = onnx.helper.get_attribute_value(attr)
                        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                            value = onnx.numpy_helper.from_array(
                                np.array(value, np.int64 if "int" in attr.name else np.float32))
                        if isinstance(value, TensorProto):  # not sparse_value / value_string(s)
                            self.const[node.output[0]] = value
                            self.dtype.setdefault(node.output[0], value.data_type)
                            self.rank.setdefault(node.output[0], len(value.dims))

    def value(self, name: str) -> np.ndarray | None:
        """A constant's value, or None when its bytes are external data (not loaded)."""
        t = self.const[name]
        if t.data_location == TensorProto.EXTERNAL:
            return None
        return onnx.numpy_helper.to_array(t)


def _type_name(dtype: int) -> str:
    return TensorProto.DataType.Name(dtype)


def _present(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    value = found[0] if found else default
    return value.decode() if isinstance(value, bytes) else value


def _check_node(node: onnx.NodeProto, spec: _Table, facts: _Facts) -> list[str]:
    op, domain = node.op_type, _domain(node)
    if (domain, op) in _HINTS:
        return [_HINTS[domain, op]]
    if domain:
        return [f"custom-domain op ({domain}): TensorRT parses it only through a registered plugin"]
    if op not in spec.ops:
        since = _ADDED_BY_10_15.get(op)
        return [f"not supported by the parser; supported from TensorRT {since} on" if since else
                f"not among the parser's supported operators ({spec.source})"]
    rules = []
    if op in spec.constant_inputs:
        index, what = spec.constant_inputs[op]
        name = _present(node, index)
        if name is not None and name not in facts.const:
            why = f", so that K < {TOPK_K_LIMIT} is known" if op == "TopK" else ""
            rules.append(f"{what} must be an initializer or Constant{why} (input {name!r} is computed)")
    if op == "TopK":
        k = facts.value(node.input[1]) if node.input[1] in facts.const else None
        if k is not None and int(k.max()) >= TOPK_K_LIMIT:
            rules.append(f"K={int(k.max())} must be < {TOPK_K_LIMIT}")
        if _attr(node, "sorted", 1) != 1:
            rules.append("sorted=0 is unsupported: sorted must be 1")
    types = spec.pow_types if op == "Pow" else _FLOAT_ONLY.get(op)
    if types is not None:
        inputs = node.input if op == "Einsum" else node.input[:1]
        bad = [f"{i} is {_type_name(facts.dtype[i])}" for i in inputs if facts.dtype.get(i, 0) not in (0, *types)]
        if bad:
            rules.append(f"takes {'/'.join(_type_name(t) for t in sorted(types))} only: {', '.join(bad)}")
    if op == "ScatterND" and _attr(node, "reduction", "none") != "none":
        rules.append(f"reduction={_attr(node, 'reduction')} is unsupported: only 'none'")
    if op == "LayerNormalization":
        extra = [o for o in node.output[1:] if o and o in facts.used]
        if extra:
            rules.append(f"only output Y is supported: Mean/InvStdDev {', '.join(extra)} are used")
    if op == "If":
        rules += _check_if(node, facts)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        zero = _present(node, 2)
        if zero is not None and (zero not in facts.const or
                                 (facts.value(zero) is not None and np.any(facts.value(zero)))):
            rules.append("zero point must be a constant 0 (symmetric quantisation)")
    if op == "Attention":
        rules += _check_attention(node, facts)
    return rules


def _check_if(node: onnx.NodeProto, facts: _Facts) -> list[str]:
    branches = dict(_subgraphs(node))
    then, other = [o.name for o in branches["then_branch"].output], [o.name for o in branches["else_branch"].output]
    rules = []
    for a, b in zip(then, other):
        if a in facts.rank and b in facts.rank and facts.rank[a] != facts.rank[b]:
            rules.append(f"then/else outputs must have equal rank: {a} is rank {facts.rank[a]}, "
                         f"{b} rank {facts.rank[b]}")
    shared = sorted(set(then) & set(other))
    if shared:
        rules.append(f"then/else outputs must have different names: both output {', '.join(shared)}")
    return rules


def _check_attention(node: onnx.NodeProto, facts: _Facts) -> list[str]:
    parts = [f"input {name}" for i, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen"))
             if _present(node, i)]
    parts += [f"output {name}" for i, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output"))
              if len(node.output) > i and node.output[i] in facts.used]
    parts += [f"attribute {a}" for a in ("qk_matmul_output_mode", "softcap") if _attr(node, a)]
    rules = [f"unsupported by the parser: {', '.join(parts)}"] if parts else []
    return rules + [f"{what} must be 4D, is rank {facts.rank[name]}" for what, name in zip("QKV", node.input[:3])
                    if facts.rank.get(name, 4) != 4]


def _check_tensors(node: onnx.NodeProto, facts: _Facts) -> list[str]:
    """UINT8 and DOUBLE, on the tensors this node is the first to carry: its outputs and its boundary inputs."""
    tensors = [t for t in (*node.output, *(i for i in node.input if i in facts.boundary)) if t]
    uint8 = [t for t in tensors if facts.dtype.get(t) == TensorProto.UINT8 and t not in facts.network_io]
    double = [t for t in tensors if facts.dtype.get(t) == TensorProto.DOUBLE]
    rules = [f"UINT8 is supported only as a network input or output: {', '.join(uint8)}"] if uint8 else []
    if double:
        rules.append(f"DOUBLE tensors are cast down to FLOAT by the parser; export float32: {', '.join(double)}")
    return rules


def _lint(model: onnx.ModelProto, target: str) -> tuple[int, list[Violation]]:
    spec = _table(target)
    facts = _Facts(model)
    found = [Violation("<model>", "opset_import", f"default-domain opset {o.version} is outside the parser's "
                                                  f"opsets 9-{spec.opset_max} ({spec.source})")
             for o in model.opset_import if o.domain in ("", "ai.onnx") and not 9 <= o.version <= spec.opset_max]
    count = 0
    for name, node in _walk(model.graph):
        count += 1
        rules = _check_node(node, spec, facts)
        if not _domain(node) and node.op_type in spec.ops:
            rules += _check_tensors(node, facts)  # of an op that does not parse, that is all there is to say
        found += [Violation(name, node.op_type, rule) for rule in rules]
    return count, found


def lint_model(model: onnx.ModelProto, target: str) -> list[Violation]:
    """Every violation of `target`'s documented parser limits in `model`, in graph order."""
    return _lint(model, target)[1]


def _lint_path(path: Path, target: str) -> tuple[int, list[Violation]]:
    _table(target)
    try:
        model = onnx.load(str(path), load_external_data=False)  # the weights are not needed
    except (OSError, DecodeError) as e:
        raise ExportError(f"{path}: not a readable ONNX file ({e})") from None
    if not model.ir_version:  # protobuf parses some non-ONNX bytes, an empty file among them
        raise ExportError(f"{path}: not an ONNX model")
    return _lint(model, target)


def lint_file(path: str | Path, target: str) -> list[Violation]:
    """lint_model of an .onnx file, read without its external data."""
    return _lint_path(Path(path), target)[1]


def _onnx_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise ExportError(f"{folder} holds no *.onnx graph to lint")
    return files


def check_folder(folder: str | Path, target: str) -> list[str]:
    """Lint every *.onnx of an engine folder: one line per violation, empty when clean."""
    _table(target)
    return [f"{path.name}: {v}" for path in _onnx_files(Path(folder)) for v in lint_file(path, target)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsezip-lint-trt", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, metavar="ENGINE_DIR_OR_ONNX")
    p.add_argument("--target", default=TARGETS[0], help=f"one of {', '.join(TARGETS)} (default {TARGETS[0]})")
    args = p.parse_args(argv)
    try:
        _table(args.target)
        files = [f for path in args.paths for f in (_onnx_files(path) if path.is_dir() else [path])]
        nodes, found = 0, 0
        for path in files:
            count, violations = _lint_path(path, args.target)
            nodes, found = nodes + count, found + len(violations)
            for v in violations:
                print(f"{path}: {v}")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verdict = f"{found} violation{'s' * (found != 1)}" if found else "no violations"
    print(f"{nodes} node{'s' * (nodes != 1)} checked, {verdict} for {args.target}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
