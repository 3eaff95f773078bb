"""The LLM graph: Llama decoder + lm_head with an append-only KV cache, and its ONNX export.

    inputs_embeds [B,S,D], attention_mask [B,P+S] (1 = attend), position_ids [B,S],
    past_key_values.{i}.key|value [P,B,kv_heads,head_dim]
    (+ attention_mask.{g} [B,P_g+S] per later layer group g, whose layers' pasts are [P_g,...])
    -> logits [B,1,V] (last position only, float32),
       new_key_values.{i}.key|value [S,B,kv_heads,head_dim] (the S new positions only)

Layer groups exist when a method prunes inside the LLM (export/llm_prune.py):
its image prefill leaves fewer positions in later layers, so each group has
its own past length and mask; one group otherwise.

Why sequence-major and new-only: the runtime keeps one buffer per cache tensor,
laid out [capacity, B, kv_heads, head_dim]. Its first P positions are one
contiguous view (fed as the past) and positions P..P+S the next one (bound as
this call's output, so the graph writes the new keys and values in place).
No call copies the cache: a Concat decoder (present = past + new) rewrites the
whole past every step, three passes over the KV per token where one (the
attention's read) is needed. Inside, the past is read through transposed views,
which ONNX Runtime folds into its MatMuls (FusedMatMul transBatchB) and
TensorRT into its GEMM strides; scores against the past and the new keys are
computed apart and joined for one softmax, so past and new keys are never
concatenated either.

The decoder layers are written out over the HF modules' weights (projections,
MLP and rotary embedding are the HF modules themselves) so the cache is plain
tensors in and out: no cache object has to survive tracing. RMSNorm is written
as x / sqrt(mean(x^2) + eps) (HF: x * rsqrt(...)), the form ONNX Runtime fuses
into one SimplifiedLayerNormalization kernel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsezip_deploy.runtime.backends import open_backend
from sparsezip_deploy.runtime.manifest import BATCH, PAST, SEQ, TOTAL, CacheLayout, GraphSpec, TensorSpec

from .errors import ExportError, ParityError
from .graph_io import dynamic_shapes
from .parity import check

OPSET = 18
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Above this the protobuf limit (2 GiB) is near: weights go to llm.onnx.data.
EXTERNAL_DATA_BYTES = 1_800_000_000


class DecoderGraph(nn.Module):
    """The decoder of `llava` in `dtype`; converts llava's language model and lm_head in place."""

    def __init__(self, llava, dtype: str = "float32", cache: CacheLayout | None = None):
        super().__init__()
        if dtype not in DTYPES:
            raise ExportError(f"--llm-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        lm = llava.model.language_model.to(DTYPES[dtype])
        llava.lm_head.to(DTYPES[dtype])
        config = lm.config
        if getattr(config, "model_type", "llama") != "llama":
            raise ExportError(f"LLM {config.model_type!r} is not supported (Llama / Vicuna only)")
        self.layers, self.norm, self.rotary = lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = llava.lm_head
        self.dtype_name = dtype
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = self.lm_head.out_features
        self.max_positions = config.max_position_embeddings
        # One group, or the groups of an in-LLM pruning method (export/llm_prune.py).
        self.cache = cache or CacheLayout.single_group(self.num_layers)
        self.group_of = {layer: g for g, group in enumerate(self.cache.groups) for layer in group.layers}

    def io(self) -> GraphSpec:
        dtype = self.dtype_name
        groups = self.cache.groups
        inputs = {
            "inputs_embeds": TensorSpec(dtype, (BATCH, SEQ, self.hidden_size)),
            "attention_mask": TensorSpec("int64", (BATCH, TOTAL)),
            "position_ids": TensorSpec("int64", (BATCH, SEQ)),
        }
        outputs = {"logits": TensorSpec("float32", (BATCH, 1, self.vocab_size))}
        for i in range(self.num_layers):
            past_axis = groups[self.group_of[i]].past_axis
            for past, new in zip(self.cache.past_names(i), self.cache.new_names(i)):
                inputs[past] = TensorSpec(dtype, (past_axis, BATCH, self.num_kv_heads, self.head_dim))
                outputs[new] = TensorSpec(dtype, (SEQ, BATCH, self.num_kv_heads, self.head_dim))
        for group in groups[1:]:
            inputs[group.mask] = TensorSpec("int64", (BATCH, group.total_axis))
        return GraphSpec("llm.onnx", inputs, outputs)

    def attention_bias(self, attention_mask, seq: int, groups: int, dtype) -> torch.Tensor:
        """[B,1,groups*S,P+S] additive bias: causal over cache positions, padding from attention_mask;
        repeated for the query heads of each kv head (rows ordered like the grouped queries)."""
        total = attention_mask.shape[1]
        query_pos = torch.arange(seq, device=attention_mask.device).unsqueeze(-1) + (total - seq)
        causal = torch.arange(total, device=attention_mask.device).unsqueeze(0) <= query_pos
        allowed = causal.unsqueeze(0) & (attention_mask > 0).unsqueeze(1)
        # A finite minimum, not -inf: a fully padded row must give zeros, not NaN.
        bias = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).unsqueeze(1)  # [B,1,S,P+S]
        return bias.repeat(1, 1, groups, 1) if groups > 1 else bias

    @staticmethod
    def rotate(x, cos, signed_sin):
        """HF's rotary embedding x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written
        as [x2, x1] * [-sin1, sin2] (exact; the signed sin is made once for all layers): two ops fewer."""
        x1, x2 = x.split(x.shape[-1] // 2, dim=-1)
        return x * cos + torch.cat([x2, x1], dim=-1) * signed_sin

    @staticmethod
    def rms_norm(norm, x):
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def layer(self, layer, x, cos, signed_sin, bias, past_k=None, past_v=None):
        """x [B,S,D], past_k|v [P,B,Hkv,hd] (None: no past) -> x, new k|v [S,B,Hkv,hd],
        attention probabilities [B,Hkv,groups*S,P+S] (query head j*groups + r's rows at r*S)."""
        attn = layer.self_attn
        batch, seq = x.shape[:2]
        h = self.rms_norm(layer.input_layernorm, x)
        q = attn.q_proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,Hq,S,hd]
        k = attn.k_proj(h).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [B,Hkv,S,hd]
        v = attn.v_proj(h).view(batch, seq, -1, self.head_dim)  # [B,S,Hkv,hd]
        q, k = self.rotate(q, cos, signed_sin), self.rotate(k, cos, signed_sin)
        heads, kv_heads = q.shape[1], k.shape[1]
        # Query head j*groups + r reads kv head j (repeat_kv's order): [B,Hkv,groups*S,hd], no kv copies.
        qg = q.reshape(batch, kv_heads, heads // kv_heads * seq, self.head_dim)
        # Each product scaled on its own, as HF scales q.k (ORT folds the scale into the MatMul).
        scores = torch.matmul(qg, k.transpose(2, 3)) * attn.scaling  # [B,Hkv,gS,S]
        if past_k is not None:
            scores = torch.cat([torch.matmul(qg, past_k.permute(1, 2, 3, 0)) * attn.scaling, scores], dim=-1)
        probs = torch.softmax((scores + bias).float(), dim=-1).to(q.dtype)
        if past_k is None:
            o = torch.matmul(probs, v.transpose(1, 2))  # [B,Hkv,gS,hd]
        else:
            probs_past, probs_new = torch.split(probs, [past_k.shape[0], seq], dim=-1)
            o = (torch.matmul(probs_past, past_v.permute(1, 2, 0, 3))
                 + torch.matmul(probs_new, v.transpose(1, 2)))
        o = o.view(batch, heads, seq, self.head_dim).transpose(1, 2).reshape(batch, seq, -1)
        x = x + attn.o_proj(o)
        x = x + layer.mlp(self.rms_norm(layer.post_attention_layernorm, x))
        return x, k.permute(2, 0, 1, 3), v.transpose(0, 1), probs

    def rope(self, x, position_ids):
        """cos, signed sin [B,1,S,hd] for `rotate` (made once per position set, shared by the layers)."""
        cos, sin = self.rotary(x, position_ids)  # [B,S,hd]
        sin1, sin2 = sin.split(sin.shape[-1] // 2, dim=-1)
        return cos.unsqueeze(1), torch.cat([-sin1, sin2], dim=-1).unsqueeze(1)

    @property
    def kv_groups(self) -> int:
        return self.layers[0].self_attn.num_key_value_groups

    def head(self, x):
        return self.lm_head(self.rms_norm(self.norm, x[:, -1:])).float()

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor],
                group_masks: list[torch.Tensor] = ()):
        """`group_masks`: the masks of cache groups 1.. (each over its own past + the S new positions)."""
        x = inputs_embeds
        cos, sin = self.rope(x, position_ids)
        biases = [self.attention_bias(mask, x.shape[1], self.kv_groups, x.dtype)
                  for mask in (attention_mask, *group_masks)]
        new = []
        for i, layer in enumerate(self.layers):
            x, k, v, _ = self.layer(layer, x, cos, sin, biases[self.group_of[i]], past[2 * i], past[2 * i + 1])
            new += [k, v]
        return (self.head(x), *new)


def example_inputs(graph: DecoderGraph, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0):
    """Deterministic feeds with every axis a different size; row 0 has left padding.
    Group g >= 1 (a pruning method's) holds past + 2g positions when past > 0: every past axis a
    different size, none 1 (the exporter would specialise it)."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[graph.dtype_name]
    lengths = [past] + [past + 2 * g if past else 0 for g in range(1, len(graph.cache.groups))]
    embeds = (torch.randn(batch, seq, graph.hidden_size, generator=g) * 0.5).to(dtype)
    masks = []
    for length in lengths:
        mask = torch.ones(batch, length + seq, dtype=torch.int64)
        mask[0, :1] = 0
        masks.append(mask)
    positions = (masks[0].cumsum(-1) - 1).clamp_min(0)[:, past:]
    cache = [(torch.randn(lengths[graph.group_of[i // 2]], batch, graph.num_kv_heads, graph.head_dim,
                          generator=g) * 0.5).to(dtype)
             for i in range(2 * graph.num_layers)]
    feeds = {"inputs_embeds": embeds, "attention_mask": masks[0], "position_ids": positions, "past": cache}
    if len(masks) > 1:
        feeds["group_masks"] = masks[1:]
    return feeds


def flat_feeds(graph: DecoderGraph, feeds: dict) -> dict[str, np.ndarray]:
    """example_inputs as the graph's named numpy feeds."""
    flat = {k: v.numpy() for k, v in feeds.items() if k not in ("past", "group_masks")}
    names = [n for i in range(graph.num_layers) for n in graph.cache.past_names(i)]
    flat.update({name: t.numpy() for name, t in zip(names, feeds["past"])})
    flat.update({group.mask: m.numpy() for group, m in zip(graph.cache.groups[1:], feeds.get("group_masks", ()))})
    return flat


def export_llm(graph: DecoderGraph, path: Path) -> tuple[GraphSpec, bool]:
    """Export with the dynamo exporter (traced with S > 1 and P > 0); returns (io, external data?)."""
    io = graph.io()
    shapes = dynamic_shapes(io)
    past_names = [n for i in range(graph.num_layers) for n in graph.cache.past_names(i)]
    dynamic = {name: shapes[name] for name in ("inputs_embeds", "attention_mask", "position_ids")}
    dynamic["past"] = [shapes[name] for name in past_names]
    if len(graph.cache.groups) > 1:
        dynamic["group_masks"] = [shapes[group.mask] for group in graph.cache.groups[1:]]
    nbytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    external = nbytes > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        torch.onnx.export(graph.eval(), (), str(path), kwargs=example_inputs(graph), dynamo=True,
                          opset_version=OPSET, input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_shapes=dynamic, external_data=external, verbose=False)
    return io, external


def check_llm(graph: DecoderGraph, path: Path) -> list[str]:
    """The runtime's ORT backend vs PyTorch on a prefill (empty cache) and a decode step after it."""
    names = list(graph.io().outputs)
    prefill = example_inputs(graph, batch=2, seq=6, past=0, seed=1)
    lines = []
    with open_backend("ort", path, graph.io()) as backend:
        for step in ("prefill", "decode"):
            with torch.no_grad():
                expected = dict(zip(names, (t.float().numpy() for t in graph(**prefill))))
            got = {k: v.astype(np.float32) for k, v in backend.run(flat_feeds(graph, prefill)).items()}
            results = check(expected, got, graph.dtype_name)
            if (expected["logits"].argmax(-1) != got["logits"].argmax(-1)).any():
                raise ParityError(f"llm parity ({step}): greedy token differs between ORT and PyTorch")
            worst = max(results, key=lambda r: r.max_abs_err / max(r.bound, 1e-30))
            lines.append(f"{step}: {len(results)} outputs ok, worst {worst}")
            # The decode step's past: the prefill's past (empty) + its new positions, from ORT.
            dtype = DTYPES[graph.dtype_name]
            past = [torch.cat([p, torch.from_numpy(got[n]).to(dtype)])
                    for p, n in zip(prefill["past"], names[1:])]
            prefill = {"inputs_embeds": prefill["inputs_embeds"][:, -1:] * 0.5,
                       "attention_mask": _grow(prefill["attention_mask"]),
                       "position_ids": prefill["position_ids"][:, -1:] + 1, "past": past,
                       **({"group_masks": [_grow(m) for m in prefill["group_masks"]]}
                          if "group_masks" in prefill else {})}
    return lines


def _grow(mask: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B,T+1]: one more real position."""
    return torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)


def save_embeddings(llava, path: Path, dtype: str) -> None:
    table = llava.model.language_model.embed_tokens.weight.detach().to(DTYPES[dtype]).numpy()
    np.save(path, table)
