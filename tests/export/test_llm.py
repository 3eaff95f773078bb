"""llm.onnx: the decoder graph against transformers, and ORT against the graph."""
import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsezip_deploy.export import llm
from sparsezip_deploy.export.llm import DecoderGraph, check_llm, example_inputs, export_llm


def hf_last_logits(tiny, feeds):
    with torch.no_grad():
        out = tiny.model.model.language_model(inputs_embeds=feeds["inputs_embeds"],
                                               attention_mask=feeds["attention_mask"],
                                               position_ids=feeds["position_ids"])
        return tiny.model.lm_head(out.last_hidden_state[:, -1:]).numpy()


def test_decoder_equals_transformers_prefill_then_decode(tiny):
    graph = DecoderGraph(tiny.model).eval()
    full = example_inputs(graph, batch=2, seq=9, past=0, seed=4)
    with torch.no_grad():
        logits = graph(**full)[0].numpy()
    np.testing.assert_allclose(logits, hf_last_logits(tiny, full), atol=1e-5, rtol=1e-5)

    # The same sequence as prefill of 8 + one decode step through the cache.
    head = {"inputs_embeds": full["inputs_embeds"][:, :8], "attention_mask": full["attention_mask"][:, :8],
            "position_ids": full["position_ids"][:, :8], "past": full["past"]}
    with torch.no_grad():
        out = graph(**head)
        assert out[1].shape == (8, 2, graph.num_kv_heads, graph.head_dim)  # the new positions only, seq-major
        past = [torch.cat([p, new]) for p, new in zip(full["past"], out[1:])]
        step = {"inputs_embeds": full["inputs_embeds"][:, 8:], "attention_mask": full["attention_mask"],
                "position_ids": full["position_ids"][:, 8:], "past": past}
        np.testing.assert_allclose(graph(**step)[0].numpy(), logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    graph = DecoderGraph(tiny.model).eval()
    path = tmp_path_factory.mktemp("llm") / "llm.onnx"
    io, external = export_llm(graph, path)
    assert not external
    return graph, path, io


def test_ort_graph_io_is_the_declared_contract(exported):
    graph, path, io = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(io.inputs)
    assert [o.name for o in session.get_outputs()] == list(io.outputs)
    assert list(io.inputs)[3:5] == list(graph.cache.past_names(0))
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["past_key_values.1.value"] == ["past", "batch", graph.num_kv_heads, graph.head_dim]
    assert shapes["attention_mask"] == ["batch", "total"]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["new_key_values.1.key"] == ["seq", "batch", graph.num_kv_heads, graph.head_dim]


def test_ort_prefill_from_empty_cache_and_decode(exported):
    graph, path, _ = exported
    assert len(check_llm(graph, path)) == 2


def test_parity_failure_is_an_error(exported, monkeypatch):
    graph, path, _ = exported
    with torch.no_grad():
        graph.lm_head.weight[0] += 1.0  # the torch side now disagrees with the exported file
    try:
        with pytest.raises(llm.ExportError):
            check_llm(graph, path)
    finally:
        with torch.no_grad():
            graph.lm_head.weight[0] -= 1.0


def test_float16_graph_runs_in_ort(tiny, tmp_path):
    graph = DecoderGraph(copy.deepcopy(tiny.model), "float16").eval()
    assert graph.lm_head.weight.dtype == torch.float16
    export_llm(graph, tmp_path / "llm.onnx")
    check_llm(graph, tmp_path / "llm.onnx")
    session = ort.InferenceSession(str(tmp_path / "llm.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs() if i.name.startswith("past")} == {"tensor(float16)"}
    assert {o.type for o in session.get_outputs() if o.name.startswith("new_key")} == {"tensor(float16)"}


def test_large_models_get_external_data(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(llm, "EXTERNAL_DATA_BYTES", 1000)
    graph = DecoderGraph(tiny.model).eval()
    _, external = export_llm(graph, tmp_path / "llm.onnx")
    assert external and (tmp_path / "llm.onnx.data").stat().st_size > 100_000
    check_llm(graph, tmp_path / "llm.onnx")


def test_unknown_dtype_is_an_error(tiny):
    with pytest.raises(llm.ExportError, match="--llm-dtype"):
        DecoderGraph(tiny.model, "int3")


def test_grouped_query_attention_reads_each_kv_head_for_its_query_heads(tmp_path):
    """GQA (TinyLlama-style 4:1): the graph must match transformers without repeating the cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()
    llava = type("Llava", (), {})()
    llava.model = type("Model", (), {"language_model": lm.model})()
    llava.lm_head = lm.lm_head
    graph = DecoderGraph(llava).eval()
    feeds = example_inputs(graph, batch=2, seq=7, past=0, seed=2)
    with torch.no_grad():
        want = lm(inputs_embeds=feeds["inputs_embeds"], attention_mask=feeds["attention_mask"],
                  position_ids=feeds["position_ids"]).logits[:, -1:].numpy()
        np.testing.assert_allclose(graph(**feeds)[0].numpy(), want, atol=1e-5, rtol=1e-5)
    export_llm(graph, tmp_path / "llm.onnx")
    assert len(check_llm(graph, tmp_path / "llm.onnx")) == 2
