"""Dynamic-K budget calibration: fit the offset `c` of the dynamic-K law so the mean K is a target.

A sparsezip graph built with `--dynamic-k` keeps, per image,

    K = clamp(round(c + g * log(var(s) + eps)), k_min, k_max)

dominant patches (DESIGN.md step 3; `s` the patch scores). Users think in budgets
("about 32 patches on average"), not in `c`, and var(s) depends on the model and the
images, so `c` is fitted on a calibration set, on the deployed ONNX graph itself (after
any quantisation, which moves var(s) a little), with ONNX Runtime and no torch:

1. probe: a copy of the graph with c = 0, g = PROBE_SCALE and the clamp opened wide;
   its `num_tokens - 1 - m` is round(PROBE_SCALE * log var(s)), log var(s) to 1e-3;
2. fit: mean K is a non-decreasing step function of c, so bisection finds the c whose
   mean K is nearest the target. Fitting `c` alone always lands within half a token
   (each step moves the mean by at most one); `g`, how much K varies between images,
   stays the user's choice;
3. write c into the graph and run the calibration set through it again: the mean K
   measured there is what the manifest records, and more than one token off is an error.

The law is found by its structure (Log -> Mul g -> Add c -> Round -> Clip -> Cast), not
by names: the exporter names constants after their first use and shares equal-valued
ones (k_max and c were one initializer when both were 53), so the four constants get
fresh initializers of their own before any is changed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparsezip_deploy.runtime.backends.ort import open_graph

from .errors import CalibError

PROBE_SCALE = 1000.0
WIDE = 1e9
NEAR = 0.25  # tokens: how much closeness fit_offset trades for an offset far from rounding edges
TOLERANCE = 1.0  # tokens: |achieved mean K - target| allowed by the final check
NAMES = ("dynamic_k.offset", "dynamic_k.scale", "dynamic_k.min", "dynamic_k.max")


@dataclass(frozen=True)
class Law:
    offset: float
    scale: float
    k_min: float
    k_max: float


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _law_nodes(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]:
    """(Mul g, Add c, Clip) of the one Log -> Mul -> Add -> Round -> Clip chain; CalibError otherwise."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constants(model)
    found = []
    for rnd in (n for n in model.graph.node if n.op_type == "Round"):
        add = producer.get(rnd.input[0])
        clips = [n for n in consumers.get(rnd.output[0], []) if n.op_type == "Clip"]
        if add is None or add.op_type != "Add" or len(clips) != 1:
            continue
        mul = next((producer.get(x) for x in add.input if x not in constants), None)
        if mul is None or mul.op_type != "Mul" or not any(
                producer.get(x) is not None and producer[x].op_type == "Log" for x in mul.input):
            continue
        if all(any(x in constants for x in n.input) for n in (mul, add)) and len(clips[0].input) == 3:
            found.append((mul, add, clips[0]))
    if len(found) != 1:
        raise CalibError("the vision graph has no dynamic-K law (build it with --method sparsezip --dynamic-k)"
                         if not found else "the vision graph has more than one dynamic-K law")
    return found[0]


def read_law(model: onnx.ModelProto) -> Law:
    constants = _constants(model)
    mul, add, clip = _law_nodes(model)

    def constant(node: onnx.NodeProto) -> float:
        return float(next(constants[x] for x in node.input if x in constants))

    return Law(constant(add), constant(mul), float(constants[clip.input[1]]), float(constants[clip.input[2]]))


def write_law(model: onnx.ModelProto, law: Law) -> None:
    """Point the law's four inputs at fresh initializers holding `law` (in place)."""
    constants = _constants(model)
    mul, add, clip = _law_nodes(model)
    slots = [(add, next(i for i, x in enumerate(add.input) if x in constants)),
             (mul, next(i for i, x in enumerate(mul.input) if x in constants)), (clip, 1), (clip, 2)]
    known = {i.name for i in model.graph.initializer}
    for (node, index), name, value in zip(slots, NAMES, (law.offset, law.scale, law.k_min, law.k_max)):
        dtype = constants[node.input[index]].dtype
        tensor = numpy_helper.from_array(np.array(value, dtype=dtype), name)
        if name in known:
            next(i for i in model.graph.initializer if i.name == name).CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
            known.add(name)
        node.input[index] = name


def _kept(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], contextual: int) -> np.ndarray:
    """K per image: num_tokens - 1 - m, from ONNX Runtime CPU."""
    with open_graph(model.SerializeToString()) as graph:
        counts = [graph.run(feed)["num_tokens"].reshape(-1) for feed in feeds]
    if not counts:
        raise CalibError("no calibration images")
    return np.concatenate(counts).astype(np.float64) - 1 - contextual


def probe_log_var(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], contextual: int) -> np.ndarray:
    """log(var(s) + eps) per image, to 1 / PROBE_SCALE, from a probe copy of the graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    write_law(probe, Law(0.0, PROBE_SCALE, -WIDE, WIDE))
    return _kept(probe, feeds, contextual) / PROBE_SCALE


def mean_k(offset: float, log_var: np.ndarray, law: Law) -> float:
    return float(np.clip(np.round(offset + law.scale * log_var), law.k_min, law.k_max).mean())


def fit_offset(log_var: np.ndarray, target: float, law: Law) -> float:
    """An offset whose mean K over `log_var` is within NEAR of the nearest achievable to
    `target`: the middle of the widest such interval of offsets. The probe knows log var(s)
    only to 1e-3, and an offset next to a rounding edge could round the other way in the
    final graph."""
    if not law.k_min <= target <= law.k_max:
        raise CalibError(f"target mean K {target:g} is outside [k_min, k_max] = [{law.k_min:g}, {law.k_max:g}]")
    spread = law.scale * log_var
    # Image i's K steps from n - 1 to n where offset + spread_i = n - 0.5; between two
    # consecutive edges of all images, mean K is constant.
    steps = np.arange(law.k_min + 1, law.k_max + 1)
    edges = np.unique((steps[None, :] - 0.5 - spread[:, None]).ravel())
    bounds = np.concatenate([[edges[0] - 2.0], edges, [edges[-1] + 2.0]])
    middles, widths = (bounds[:-1] + bounds[1:]) / 2, np.diff(bounds)
    means = np.concatenate([
        np.clip(np.round(chunk[:, None] + spread[None, :]), law.k_min, law.k_max).mean(1)
        for chunk in np.array_split(middles, max(1, middles.size * spread.size // 4_000_000 + 1))])
    # Within a quarter token of the nearest achievable mean, the widest interval is the safest.
    miss = np.abs(means - target)
    near = np.flatnonzero(miss <= miss.min() + NEAR)
    return round(float(middles[near[np.argmax(widths[near])]]), 4)


def calibrate_budget(vision: Path, feeds: Iterable[dict[str, np.ndarray]], target: float,
                     contextual: int) -> dict:
    """Fit and write the dynamic-K offset of `vision` (an ONNX file, rewritten in place) so the
    mean K over `feeds` is `target`; returns what the manifest records. `feeds` is iterated
    twice (probe, then the check): pass a list or a re-iterable reader."""
    feeds = list(feeds)
    model = onnx.load(vision)
    law = read_law(model)
    log_var = probe_log_var(model, feeds, contextual)
    offset = fit_offset(log_var, target, law)
    write_law(model, Law(offset, law.scale, law.k_min, law.k_max))
    achieved = _kept(model, feeds, contextual)
    if abs(achieved.mean() - target) > TOLERANCE:
        raise CalibError(f"budget calibration missed: mean K {achieved.mean():.2f} for target {target:g}")
    onnx.save(model, vision)
    return {"target_mean_k": target, "k_offset": offset, "k_scale": law.scale,
            "k_min": law.k_min, "k_max": law.k_max, "achieved_mean_k": round(float(achieved.mean()), 3),
            "k_std": round(float(achieved.std()), 3), "k_range": [int(achieved.min()), int(achieved.max())],
            "images": len(feeds)}
