"""Which nodes of a vision graph are quantised: found from its structure, not its node names.

The exporter names nodes with counters, and ORT's pre-processing renames what it
fuses, so names say nothing. The structure does:

- a residual block is a LayerNormalization L and the Add R that joins L's input
  back (x -> L -> ... -> R(x, .)); its branch is every node between L and R;
- the encoder's linear layers are the MatMul / Gemm nodes with a constant 2-D
  weight inside some branch. The text projection and the projector are in no
  branch: they, like everything after layer l*, stay float;
- a linear layer is on the selection path when the TopK is reachable from it by a
  path that leaves its branch other than through R. Those are layer l*'s q and k:
  the CLS attention row and the head-averaged keys read from them are what the
  scores are made of. Every other linear layer reaches the scores only through
  the residual stream. A graph without TopK (method none) selects nothing.
  A split engine's trunk has no TopK: there the selection path is what feeds its
  cls_attn and kmet outputs (runtime/manifest.py TRUNK_OUTPUTS), which the
  selector's scores are made of.
"""
from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from .errors import CalibError

LINEAR_OPS = ("MatMul", "Gemm")
SELECTION_OUTPUTS = ("cls_attn", "kmet")  # a trunk's outputs that only the scores read


@dataclass(frozen=True)
class Linears:
    quantize: tuple[str, ...]  # encoder linear layers, node names
    selection: tuple[str, ...]  # layer l*'s q and k: left in float


class _Graph:
    """Node-index adjacency of an ONNX graph (producers and consumers by tensor name)."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.constants = {t.name for t in graph.initializer} | \
            {o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.ranks = {t.name: len(t.dims) for t in graph.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for name in set(n.input):
                self.consumers[name].append(i)

    def successors(self, i: int) -> Iterable[int]:
        return (j for o in self.nodes[i].output for j in self.consumers.get(o, ()))

    def predecessors(self, i: int, skip: str | None = None) -> Iterable[int]:
        return (self.producer[t] for t in self.nodes[i].input if t != skip and t in self.producer)

    def walk(self, starts: Iterable[int], step, stop: frozenset[int] = frozenset()) -> set[int]:
        """Every node reachable from `starts` by `step`, not expanding past `stop`."""
        seen, todo = set(starts), deque(starts)
        while todo:
            i = todo.popleft()
            if i in stop:
                continue
            for j in step(i):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def is_linear(self, i: int) -> bool:
        n = self.nodes[i]
        return n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in self.constants \
            and self.ranks.get(n.input[1], 2) == 2 and n.input[0] not in self.constants


def residual_blocks(g: _Graph) -> list[tuple[int, int, set[int]]]:
    """(L, R, branch) for every LayerNormalization whose input an Add also reads directly."""
    blocks = []
    for norm, node in enumerate(g.nodes):
        if node.op_type != "LayerNormalization":
            continue
        x = node.input[0]
        joins = [j for j in g.consumers.get(x, ()) if g.nodes[j].op_type == "Add"]
        if len(joins) != 1:
            continue  # the embeddings' pre-norm: nothing adds its input back
        join = joins[0]
        after = g.walk([norm], g.successors, stop=frozenset([join]))
        # Backwards from R, not through x itself: the rest of the graph is not the branch.
        before = g.walk([join], lambda i: g.predecessors(i, skip=x) if i == join else g.predecessors(i),
                        stop=frozenset([norm]))
        blocks.append((norm, join, (after & before) - {norm, join}))
    return blocks


def find_linears(model: onnx.ModelProto) -> Linears:
    """The encoder's linear layers, split into those to quantise and the selection path's."""
    g = _Graph(model.graph)
    topk = [i for i, n in enumerate(g.nodes) if n.op_type == "TopK"] or \
        [g.producer[o.name] for o in model.graph.output if o.name in SELECTION_OUTPUTS and o.name in g.producer]
    feeds_topk = g.walk(topk, g.predecessors) if topk else set()
    quantize, selection = [], []
    for _, join, branch in residual_blocks(g):
        for i in sorted(i for i in branch if g.is_linear(i)):
            inside = g.walk([i], lambda k: (j for j in g.successors(k) if j in branch), stop=frozenset([join]))
            leaves = {j for k in inside for j in g.successors(k)} - branch - {join}
            (selection if leaves & feeds_topk else quantize).append(g.nodes[i].name)
    if not quantize:
        raise CalibError("found no encoder linear layers in the vision graph (not a graph export/vision.py wrote?)")
    if topk and not selection:
        raise CalibError("the vision graph has a TopK (or a trunk's cls_attn / kmet) but no linear layer of "
                         "layer l* feeds it sideways: cannot tell the selection path from the encoder")
    return Linears(tuple(quantize), tuple(selection))
