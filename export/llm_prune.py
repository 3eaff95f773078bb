"""The image prefill of an in-LLM pruning method (FastV, SparseVLM): llm_prefill.onnx, and its check.

    inputs_embeds [B,S,D], attention_mask [B,S], position_ids [B,S], visual_start [B]
    -> logits [B,1,V],
       new_key_values.{i}.key|value [S_g,B,kv_heads,head_dim] for layer i of cache group g,
       group_slots.{g} [B,S_g] (the prompt slot each position holds, -1 merged), group_mask.{g} [B,S_g]

The first turn's prompt, with no past: every row carries the vision graph's
`visual_slots` positions from `visual_start` on (padding slots masked). After
each stage's layer the visual span is cut in-graph (llm_prune/modules.py) and
the later layers run on the shorter sequence, so cache group g's layers write
S_g = S - visual_slots + keep_g + merged_g positions, a size known from the
shapes alone. Kept tokens keep their positions (RoPE ids); decoding goes on at
the unpruned count, in llm.onnx (export/llm.py), which reads one past and one
mask per group. The layers are DecoderGraph's own, so the two graphs compute
the same decoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsezip_deploy.llm_prune.config import PruneConfig, Stage, prune_to_dict
from sparsezip_deploy.llm_prune.modules import (dpc_knn, dropped_best, keep_indices, raters, row_gather,
                                                visual_scores)
from sparsezip_deploy.runtime.backends import open_backend
from sparsezip_deploy.runtime.manifest import (BATCH, GROUP_MASK, GROUP_SLOTS, PAST, PREFILL_GRAPH, SEQ,
                                               VISUAL_START,
                                               CacheGroup, CacheLayout, GraphSpec, LlmPruning, PruneStage,
                                               TensorSpec, prefill_seq_axis)

from .graph_io import dynamic_shapes
from .llm import DTYPES, EXTERNAL_DATA_BYTES, OPSET, DecoderGraph
from .parity import ParityError, check


def pruned_layout(num_layers: int, stages: tuple[Stage, ...]) -> CacheLayout:
    """Group 0: the layers up to the first stage; group g: the layers after stage g-1, up to stage g."""
    ends = [s.after for s in stages] + [num_layers - 1]
    starts = [0] + [s.after + 1 for s in stages]
    layers = [tuple(range(a, b + 1)) for a, b in zip(starts, ends)]
    return CacheLayout(groups=(CacheGroup(layers[0], PAST),
                               *(CacheGroup.pruned(g, group) for g, group in enumerate(layers[1:], 1))))


class PrefillGraph(nn.Module):
    """`decoder`'s layers with `config`'s stages, for prompts carrying `visual_slots` visual positions."""

    def __init__(self, decoder: DecoderGraph, config: PruneConfig, visual_slots: int):
        super().__init__()
        self.decoder, self.config, self.visual_slots = decoder, config, visual_slots
        self.stages = config.stages(decoder.num_layers, visual_slots)
        self.by_layer = {stage.after: stage for stage in self.stages}
        self.trace: list[torch.Tensor] | None = None  # check_prefill: each stage's visual scores
        assert decoder.cache == pruned_layout(decoder.num_layers, self.stages), "decoder built for other stages"

    @property
    def pruning(self) -> LlmPruning:
        return LlmPruning(self.config.method, self.visual_slots,
                          tuple(PruneStage(s.after, s.keep, s.merged) for s in self.stages),
                          prune_to_dict(self.config))

    def io(self) -> GraphSpec:
        d = self.decoder
        inputs = {
            "inputs_embeds": TensorSpec(d.dtype_name, (BATCH, SEQ, d.hidden_size)),
            "attention_mask": TensorSpec("int64", (BATCH, SEQ)),
            "position_ids": TensorSpec("int64", (BATCH, SEQ)),
            VISUAL_START: TensorSpec("int64", (BATCH,)),
        }
        outputs = {"logits": TensorSpec("float32", (BATCH, 1, d.vocab_size))}
        for i in range(d.num_layers):
            seq = prefill_seq_axis(d.group_of[i])
            for name in d.cache.new_names(i):
                outputs[name] = TensorSpec(d.dtype_name, (seq, BATCH, d.num_kv_heads, d.head_dim))
        for g in range(1, len(d.cache.groups)):
            outputs[GROUP_SLOTS % g] = TensorSpec("int64", (BATCH, prefill_seq_axis(g)))
            outputs[GROUP_MASK % g] = TensorSpec("int64", (BATCH, prefill_seq_axis(g)))
        return GraphSpec(f"{PREFILL_GRAPH}.onnx", inputs, outputs)

    def forward(self, inputs_embeds, attention_mask, position_ids, visual_start):
        d = self.decoder
        x, mask, pos = inputs_embeds, attention_mask, position_ids
        batch, seq = x.shape[:2]
        slots = torch.arange(seq, device=x.device).unsqueeze(0).expand(batch, -1)  # [B,S]: prompt slot
        # The query rows that rate the visual tokens: SparseVLM's raters, FastV's every real token.
        rates = raters(x, mask, visual_start, self.visual_slots) if self.config.method == "sparsevlm" else None
        visual = self.visual_slots
        cos, sin = d.rope(x, pos)
        bias = d.attention_bias(mask, seq, d.kv_groups, x.dtype)
        new, tracked = [], []
        for i, layer in enumerate(d.layers):
            x, k, v, probs = d.layer(layer, x, cos, sin, bias)
            new += [k, v]
            stage = self.by_layer.get(i)
            if stage is None:
                continue
            current = x.shape[1]
            probs = probs.reshape(batch, -1, current, current)  # [B,Hq,S,S]: the grouped rows are head-major
            scores = visual_scores(probs, mask > 0 if rates is None else rates, mask, visual_start, visual)
            if self.trace is not None:
                self.trace.append(scores)
            x, mask, pos, slots, rates = self.cut(stage, scores, x, mask, pos, slots, rates, visual_start, visual)
            visual = stage.carried
            cos, sin = d.rope(x, pos)
            bias = d.attention_bias(mask, x.shape[1], d.kv_groups, x.dtype)
            tracked += [slots, mask]
        return (d.head(x), *new, *tracked)

    def cut(self, stage: Stage, scores, x, mask, pos, slots, rates, visual_start, visual: int):
        """One stage: [before | kept visual | merged | after] from [before | visual | after], per row."""
        kept = keep_indices(scores, stage.keep)  # [B,keep], increasing
        j = torch.arange(x.shape[1] - visual + stage.carried, device=x.device).unsqueeze(0)  # [1,S']
        rel = j - visual_start.unsqueeze(1)  # [B,S']: position within the visual span
        in_kept = (rel >= 0) & (rel < stage.keep)
        in_merged = (rel >= stage.keep) & (rel < stage.carried)
        from_kept = visual_start.unsqueeze(1) + torch.gather(kept, 1, rel.clamp(0, stage.keep - 1))
        src = torch.where(rel < 0, j, torch.where(in_kept, from_kept, j - stage.carried + visual))
        src = src.clamp(0, x.shape[1] - 1)  # merged positions: any slot, replaced below
        out_x, out_mask, out_pos = row_gather(x, src), row_gather(mask, src), row_gather(pos, src)
        out_slots = torch.where(in_merged, -1, row_gather(slots, src))
        out_rates = None if rates is None else row_gather(rates, src) & ~in_merged
        if stage.merged:
            count = self.config.recycled_count(visual - stage.keep)
            candidates = visual_start.unsqueeze(1) + dropped_best(scores, kept, count)  # [B,n] slots
            valid = row_gather(mask, candidates) > 0
            merged, centres, _ = dpc_knn(row_gather(x, candidates), valid, stage.merged)
            centre_slots = torch.gather(candidates, 1, centres)  # [B,c]
            m = (rel - stage.keep).clamp(0, stage.merged - 1)
            out_x = torch.where(in_merged.unsqueeze(-1), row_gather(merged, m), out_x)
            out_mask = torch.where(in_merged, row_gather(row_gather(mask, centre_slots), m), out_mask)
            out_pos = torch.where(in_merged, row_gather(row_gather(pos, centre_slots), m), out_pos)
        return out_x, out_mask, out_pos, out_slots, out_rates


def example_prefill(graph: PrefillGraph, batch: int = 2, before: int = 3, after: int = 4, seed: int = 0):
    """An image prefill with every axis a different size: row 0 left-padded by one, row 1's last
    visual slots masked (a vision graph's padding), a few visual tokens far from the rest."""
    g = torch.Generator().manual_seed(seed)
    d = graph.decoder
    seq = before + graph.visual_slots + after
    embeds = torch.randn(batch, seq, d.hidden_size, generator=g) * 0.5
    visual = slice(before, before + graph.visual_slots)
    embeds[:, visual] += torch.randn(batch, graph.visual_slots, 1, generator=g).abs()  # uneven norms
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, 0] = 0
    mask[1, before + graph.visual_slots - min(2, graph.visual_slots - 1):before + graph.visual_slots] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"inputs_embeds": embeds.to(DTYPES[d.dtype_name]), "attention_mask": mask, "position_ids": positions,
            VISUAL_START: torch.full((batch,), before, dtype=torch.int64)}


def export_prefill(graph: PrefillGraph, path: Path) -> tuple[GraphSpec, bool]:
    io = graph.io()
    shapes = dynamic_shapes(io)
    nbytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    external = nbytes > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        torch.onnx.export(graph.eval(), (), str(path), kwargs=example_prefill(graph), dynamo=True,
                          opset_version=OPSET, input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_shapes={name: shapes[name] for name in io.inputs}, external_data=external,
                          verbose=False)
    return io, external


# Scores this close (relative to the largest) can rank either way in ORT and in PyTorch.
TIE_MARGIN = 1e-4


def selection_margin(graph: PrefillGraph, feeds: dict) -> float:
    """The smallest gap, relative to the top score, between neighbours in each stage's ranking, over
    the ranks that decide something (the kept, the recycled and the first one left out)."""
    graph.trace = []
    try:
        with torch.no_grad():
            graph(**feeds)
        margins = []
        for stage, scores in zip(graph.stages, graph.trace):
            decided = stage.keep + graph.config.recycled_count(scores.shape[1] - stage.keep) + 1 \
                if stage.merged else stage.keep + 1
            for row in scores:
                valid = torch.sort(row[row >= 0], descending=True).values[:decided]
                if len(valid) > 1:
                    margins.append(float((valid[:-1] - valid[1:]).min() / valid[0].clamp_min(1e-30)))
        return min(margins, default=1.0)
    finally:
        graph.trace = None


def check_prefill(graph: PrefillGraph, path: Path, tries: int = 8) -> list[str]:
    """ORT vs PyTorch on an image prefill: kept slots exactly, logits and new keys / values within tolerance.

    A random-init or any model's attention on made-up prompts can be nearly flat: of `tries` example
    prompts the one whose rankings are least tied is checked, and its margin is reported.
    """
    names = list(graph.io().outputs)
    candidates = [example_prefill(graph, batch=2, before=2, after=5, seed=seed) for seed in range(1, tries + 1)]
    margins = [selection_margin(graph, feeds) for feeds in candidates]
    best = int(np.argmax(margins))
    feeds, margin = candidates[best], margins[best]
    with torch.no_grad():
        expected = {n: t.float().numpy() if t.is_floating_point() else t.numpy()
                    for n, t in zip(names, graph(**feeds))}
    with open_backend("ort", path, graph.io()) as backend:
        got = backend.run({k: v.numpy() for k, v in feeds.items()})
    for name in names:
        if name.startswith(GROUP_SLOTS.split("%")[0]) and not np.array_equal(expected[name], got[name]):
            tied = " (its rankings are within float noise: a tie, not necessarily a bug)" \
                if margin < TIE_MARGIN else ""
            raise ParityError(f"{PREFILL_GRAPH} parity: {name} (the kept prompt slots) differs between ORT "
                              f"and PyTorch; smallest ranking gap {margin:.2g}{tied}")
    results = check(expected, {n: got[n].astype(np.float32) if got[n].dtype.kind == "f" else got[n]
                               for n in expected}, graph.decoder.dtype_name)
    if (expected["logits"].argmax(-1) != got["logits"].argmax(-1)).any():
        raise ParityError(f"{PREFILL_GRAPH} parity: greedy token differs between ORT and PyTorch")
    worst = max(results, key=lambda r: r.max_abs_err / max(r.bound, 1e-30))
    kept = ", ".join(f"group {g}: {graph.pruning.group_seq(g, feeds['inputs_embeds'].shape[1])} positions"
                     for g in range(1, len(graph.stages) + 1))
    return [f"image prefill: {len(results)} outputs ok, worst {worst}; {kept}; smallest ranking gap "
            f"{margin:.2g} of the top score"]
