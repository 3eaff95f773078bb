"""Weight-only quantisation of llm.onnx for ONNX Runtime: MatMulNBits, int4 or int8.

    quantize_llm(llm.onnx, llm.onnx, 4 | 8, embeddings=table) -> the manifest's record of it

Every MatMul with a constant weight (q/k/v/o and gate/up/down of each decoder
layer, and lm_head) becomes a com.microsoft MatMulNBits node: weights quantised
per block of `block_size` input channels with a scale and a zero point, by
onnxruntime's own quantizer (round to nearest). Activations, the KV cache and
the graph's inputs and outputs stay float, so the runtime loads the result as
it is. The attention MatMuls have no constant weight and stay float.

Choices, measured with benchmarks/quant.py on the random-init vitl-0.5b LLM
(24 layers, 1280 wide, 1.91 GB float32; sparsezip-64 engine, 64 visual tokens,
2 threads of an AVX512-VNNI EPYC, ORT 1.31.1; medians of interleaved fresh
processes, 32 new tokens; fidelity over 12 generated scenes, 16 tokens each):

    LLM weights          decode tok/s   prefill ms  llm.onnx  logits cos  forced top-1  greedy exact
    float32               20.9  1.00x      269      1910 MB       -           -             -
    int4, level 4         60.3  2.88x      208       307 MB     0.940       0.59          0.33
    int4, level 0         35.3  1.69x      265       307 MB     0.941       0.59          0.33
    int4 symmetric, 4     62.7  3.00x      210       300 MB     0.934       0.32          0.08
    int4, lm_head float   51.3  2.45x      213       309 MB     0.943       0.36          0.17
    int8, level 4         44.1  2.11x      182       553 MB     0.9997      0.95          0.75
    int8, level 0          2.9  0.16x      578       553 MB       -           -             -

- accuracy_level 4 (activations quantised to int8 per block, int8 dot products):
  1.7x the decode speed of the float-compute path at int4 and the same fidelity;
  at int8 without it ORT 1.31 has no fast CPU kernel (6x slower than float).
- asymmetric (a zero point per block): symmetric is 4% faster but its logits
  agreed half as often (forced top-1 0.32 against 0.59).
- lm_head quantised. At this vocabulary (1024) it is 0.07% of the weights and
  the two runs disagree on speed (51 against 60 tok/s above; 70 against 63
  decode steps/s with llm.onnx alone), fidelity within noise (logits cosine
  0.898 against 0.896 on 32 random-token prompts); at LLaVA-1.5-7B's
  (32000 x 4096, 2% of the weights) it is read once per token like every layer,
  so int4 saves its share of each step. `lm_head=False` keeps it float.
- The random model's logits are flat (top two often within the quantisation
  error), the worst case for agreement. On a model train/train.py wrote (at chance, issue 5; 3 layers,
  128 wide; 24 scenes): greedy exact match int4 0.83, int8 1.00; held-out accuracy
  (300 questions) float 24.7%, int4 22.3%, int8 24.3%.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sparsezip_deploy.runtime.backends.ort import open_graph

from .errors import CalibError

# The protobuf limit is 2 GiB: above this the weights go to `<file>.data` (the limit export/llm.py uses).
EXTERNAL_DATA_BYTES = 1_800_000_000
PRECISIONS = {4: "int4", 8: "int8"}
# Nodes between lm_head's MatMul and the `logits` output (a float16 graph casts its logits to float32).
PASS_THROUGH = ("Cast", "Identity")
# Worst logits cosine against the float graph that the check accepts, over its prompt rows. A broken
# graph (a transposed or misplaced weight) lands near 0; sound ones measured 0.90 (int4) and 0.9994
# (int8) on the random-init 0.5B LLM, whose flat logits make it the worst case: floors well below.
FLOORS = {4: 0.75, 8: 0.98}


@dataclass(frozen=True)
class LlmQuantConfig:
    bits: int = 4
    block_size: int = 32
    # 4: MatMulNBits quantises each activation block to int8 and runs int8 dot products (see the table above).
    accuracy_level: int = 4
    symmetric: bool = False
    lm_head: bool = True

    def __post_init__(self):
        if self.bits not in PRECISIONS:
            raise CalibError(f"LLM weights: {self.bits} bits is not one of {', '.join(map(str, PRECISIONS))}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise CalibError(f"block_size {self.block_size}: MatMulNBits needs a power of two >= 16")
        if self.accuracy_level not in range(5):
            raise CalibError(f"accuracy_level {self.accuracy_level}: 0 (unset) to 4 (int8 compute)")


def quantize_llm(src: Path, dst: Path, bits: int, block_size: int = LlmQuantConfig.block_size, *,
                 accuracy_level: int = LlmQuantConfig.accuracy_level, symmetric: bool = LlmQuantConfig.symmetric,
                 lm_head: bool = LlmQuantConfig.lm_head, embeddings: np.ndarray | None = None) -> dict:
    """Write the quantised `src` to `dst` (which may be `src`): its manifest record, with the files written.

    Ends with a check against the float graph (`check_logits`), which fails below FLOORS
    after `dst` is written (a build writes into a folder it deletes on failure);
    `embeddings` (the engine's table) makes the check's prompts out of real token rows.
    """
    config = LlmQuantConfig(bits, block_size, accuracy_level, symmetric, lm_head)
    src, dst = Path(src), Path(dst)
    feeds = check_feeds(onnx.load(str(src), load_external_data=False).graph, embeddings)
    reference = _run(src, feeds)  # before `dst` may overwrite `src`
    model = onnx.load(str(src))
    head = lm_head_node(model.graph)
    quantizer = _quantizer_class()(
        model, bits=config.bits, block_size=config.block_size, is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level or None, nodes_to_exclude=[] if config.lm_head else [head.name])
    quantizer.process()
    model = quantizer.model.model
    quantised = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    if not quantised:
        raise CalibError(f"{src}: no MatMul with a constant weight to quantise")
    files = save(model, dst)
    del model, quantizer  # the check loads the graph again: not on top of this copy (GBs at 7B)
    return {"precision": PRECISIONS[config.bits], "method": "MatMulNBits",
            "block_size": config.block_size, "accuracy_level": config.accuracy_level,
            "symmetric": config.symmetric, "lm_head": config.lm_head, "nodes_quantised": quantised,
            "fidelity": check_logits(reference, _run(dst, feeds), FLOORS[config.bits]), "files": files}


def _quantizer_class():
    """ORT's quantizer module calls logging.basicConfig(level=INFO) on import: keep the caller's root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)  # one INFO line per node
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def lm_head_node(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMul whose result is `logits`, through casts only: found by the graph, not by node names."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type in PASS_THROUGH:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        raise CalibError("llm.onnx: `logits` does not come from a MatMul (lm_head); not a decoder export")
    return node


def save(model: onnx.ModelProto, path: Path) -> list[str]:
    """`path`, plus `path.data` when the weights near the protobuf limit; the names written.

    A stale `path.data` is removed first: onnx appends to an existing data file.
    """
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if sum(t.ByteSize() for t in model.graph.initializer) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return [path.name]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path.name, data.name]


# -- the check against the float graph

def check_feeds(graph: onnx.GraphProto, embeddings: np.ndarray | None, seq: int = 12,
                seed: int = 0) -> dict[str, np.ndarray]:
    """A batch-2 prefill with an empty cache, row 0 left-padded, as export/llm.py's check feeds one.

    Prompt rows are random token rows of `embeddings`, or else unit-RMS noise.
    """
    rng = np.random.default_rng(seed)
    feeds = {"attention_mask": np.ones((2, seq), np.int64)}
    feeds["attention_mask"][0, :2] = 0
    feeds["position_ids"] = np.clip(feeds["attention_mask"].cumsum(-1) - 1, 0, None)
    for tensor in graph.input:
        dims = [d.dim_value for d in tensor.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.type.tensor_type.elem_type)
        if tensor.name == "inputs_embeds":
            rows = (embeddings[rng.integers(len(embeddings), size=2 * seq)] if embeddings is not None
                    else rng.standard_normal((2 * seq, dims[-1])))
            feeds[tensor.name] = rows.reshape(2, seq, dims[-1]).astype(dtype)
        elif tensor.name.startswith("past_key_values."):  # [past, batch, kv_heads, head_dim]
            feeds[tensor.name] = np.zeros((0, 2, dims[2], dims[3]), dtype)
    return feeds


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """logits [4, V] float32: each row's prefill, then one decode step on the prefill's own cache.

    Both, because MatMulNBits takes another kernel for one row (decode) than for many (prefill).
    """
    with open_graph(path) as graph:
        first = graph.run(feeds)
        step = {"inputs_embeds": feeds["inputs_embeds"][:, -1:],
                "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((2, 1), np.int64)], 1),
                "position_ids": feeds["position_ids"][:, -1:] + 1}
        # The past of the step: the prefill's (empty) past + its new positions.
        step.update({name: np.concatenate([feeds[name], first[name.replace("past_key_values.", "new_key_values.")]])
                     for name in feeds if name.startswith("past_key_values.")})
        second = graph.run(step)["logits"]
    return np.concatenate([first["logits"][:, -1], second[:, -1]]).astype(np.float32)


def check_logits(reference: np.ndarray, got: np.ndarray, floor: float) -> dict:
    """Cosine and top-1 agreement of the quantised logits, row by row; CalibError below `floor`."""
    a, b = reference.astype(np.float64), got.astype(np.float64)
    cosine = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    if not np.isfinite(got).all() or cosine.min() < floor:
        raise CalibError(f"quantised llm.onnx: logits cosine {cosine.min():.4f} against the float graph is below "
                         f"{floor} (a broken graph, not a drift)")
    return {"logits_cosine_min": round(float(cosine.min()), 6),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "floor": floor}
