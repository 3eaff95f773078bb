"""The LLM graph: Llama decoder + lm_head with a KV cache, and its ONNX export.

    inputs_embeds [B,S,D], attention_mask [B,P+S] (1 = attend), position_ids [B,S],
    past_key_values.{i}.key|value [B,kv_heads,P,head_dim]
    -> logits [B,1,V] (last position only, float32), present.{i}.key|value [B,kv_heads,P+S,head_dim]

The decoder layers are written out over the HF modules' weights (projections,
norms, rotary embedding, MLP are the HF modules themselves) so the cache is
plain tensors in and out: no cache object has to survive tracing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .errors import ExportError
from .graph_io import BATCH, GraphIO, TensorSpec
from .parity import check

OPSET = 18
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Above this the protobuf limit (2 GiB) is near: weights go to llm.onnx.data.
EXTERNAL_DATA_BYTES = 1_800_000_000
SEQ, PAST, TOTAL = "seq", "past", "total"


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    return [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(num_layers)]


class DecoderGraph(nn.Module):
    """The decoder of `llava` in `dtype`; converts llava's language model and lm_head in place."""

    def __init__(self, llava, dtype: str = "float32"):
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

    def io(self) -> GraphIO:
        dtype = self.dtype_name
        cache = (BATCH, self.num_kv_heads, PAST, self.head_dim)
        present = (BATCH, self.num_kv_heads, TOTAL, self.head_dim)
        inputs = {
            "inputs_embeds": TensorSpec(dtype, (BATCH, SEQ, self.hidden_size)),
            "attention_mask": TensorSpec("int64", (BATCH, TOTAL)),
            "position_ids": TensorSpec("int64", (BATCH, SEQ)),
        }
        outputs = {"logits": TensorSpec("float32", (BATCH, 1, self.vocab_size))}
        for i, (k, v) in enumerate(cache_names(self.num_layers)):
            inputs[k] = inputs[v] = TensorSpec(dtype, cache)
            outputs[f"present.{i}.key"] = outputs[f"present.{i}.value"] = TensorSpec(dtype, present)
        return GraphIO(inputs, outputs)

    def attention_bias(self, attention_mask, seq: int, dtype) -> torch.Tensor:
        """[B,1,S,P+S] additive bias: causal over cache positions, and padding from attention_mask."""
        total = attention_mask.shape[1]
        query_pos = torch.arange(seq, device=attention_mask.device).unsqueeze(-1) + (total - seq)
        causal = torch.arange(total, device=attention_mask.device).unsqueeze(0) <= query_pos
        allowed = causal.unsqueeze(0) & (attention_mask > 0).unsqueeze(1)
        # A finite minimum, not -inf: a fully padded row must give zeros, not NaN.
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).unsqueeze(1)

    def layer(self, layer, x, cos, sin, bias, past_k, past_v):
        attn = layer.self_attn
        h = layer.input_layernorm(x)

        def heads(t):  # [B,S,H*hd] -> [B,H,S,hd]
            return t.view(*t.shape[:2], -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = attn.num_key_value_groups
        scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * attn.scaling + bias
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        o = torch.matmul(probs, repeat_kv(v, groups)).transpose(1, 2).reshape(*x.shape[:2], -1)
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, k, v

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        x = inputs_embeds
        cos, sin = self.rotary(x, position_ids)
        bias = self.attention_bias(attention_mask, x.shape[1], x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = self.layer(layer, x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        logits = self.lm_head(self.norm(x[:, -1:])).float()
        return (logits, *presents)


def example_inputs(graph: DecoderGraph, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0):
    """Deterministic feeds with every axis a different size; row 0 has left padding."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[graph.dtype_name]
    embeds = (torch.randn(batch, seq, graph.hidden_size, generator=g) * 0.5).to(dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    mask[0, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
    cache = [(torch.randn(batch, graph.num_kv_heads, past, graph.head_dim, generator=g) * 0.5).to(dtype)
             for _ in range(2 * graph.num_layers)]
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "past": cache}


def _flat_feeds(graph: DecoderGraph, feeds: dict) -> dict[str, np.ndarray]:
    flat = {k: v.numpy() for k, v in feeds.items() if k != "past"}
    names = [n for pair in cache_names(graph.num_layers) for n in pair]
    flat.update({name: t.numpy() for name, t in zip(names, feeds["past"])})
    return flat


def export_llm(graph: DecoderGraph, path: Path) -> tuple[GraphIO, bool]:
    """Export with the dynamo exporter (traced with S > 1 and P > 0); returns (io, external data?)."""
    io = graph.io()
    dims = {name: torch.export.Dim(name) for name in (BATCH, SEQ, PAST, TOTAL)}
    cache_axes = {0: dims[BATCH], 2: dims[PAST]}
    dynamic = {
        "inputs_embeds": {0: dims[BATCH], 1: dims[SEQ]},
        "attention_mask": {0: dims[BATCH], 1: dims[TOTAL]},
        "position_ids": {0: dims[BATCH], 1: dims[SEQ]},
        "past": [cache_axes] * (2 * graph.num_layers),
    }
    nbytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    external = nbytes > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        torch.onnx.export(graph.eval(), (), str(path), kwargs=example_inputs(graph), dynamo=True,
                          opset_version=OPSET, input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_shapes=dynamic, external_data=external, verbose=False)
    return io, external


def check_llm(graph: DecoderGraph, path: Path) -> list[str]:
    """ORT vs PyTorch on a prefill (empty cache) and a decode step fed the prefill's cache."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = list(graph.io().outputs)
    prefill = example_inputs(graph, batch=2, seq=6, past=0, seed=1)
    lines = []
    for step in ("prefill", "decode"):
        with torch.no_grad():
            expected = dict(zip(names, (t.float().numpy() for t in graph(**prefill))))
        got = dict(zip(names, session.run(names, _flat_feeds(graph, prefill))))
        got = {k: v.astype(np.float32) for k, v in got.items()}
        results = check(expected, got, graph.dtype_name)
        if (expected["logits"].argmax(-1) != got["logits"].argmax(-1)).any():
            raise ExportError(f"llm parity ({step}): greedy token differs between ORT and PyTorch")
        worst = max(results, key=lambda r: r.max_abs_err / max(r.bound, 1e-30))
        lines.append(f"{step}: {len(results)} outputs ok, worst {worst}")
        dtype = DTYPES[graph.dtype_name]
        cache = [torch.from_numpy(got[n]).to(dtype) for n in names[1:]]
        mask = torch.cat([prefill["attention_mask"], torch.ones(2, 1, dtype=torch.int64)], 1)
        prefill = {"inputs_embeds": prefill["inputs_embeds"][:, -1:] * 0.5, "attention_mask": mask,
                   "position_ids": prefill["position_ids"][:, -1:] + 1, "past": cache}
    return lines


def save_embeddings(llava, path: Path, dtype: str) -> None:
    table = llava.model.language_model.embed_tokens.weight.detach().to(DTYPES[dtype]).numpy()
    np.save(path, table)
