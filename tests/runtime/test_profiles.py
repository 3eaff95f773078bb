"""TensorRT optimisation profiles and EP options, derived from the manifest (no GPU needed)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sparsezip_deploy.runtime import cli
from sparsezip_deploy.runtime.backends.ort import OrtBackend, OrtOptions
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import Limits, read_manifest, write_manifest
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.profiles import (graph_profiles, ort_tensorrt_options, shapes_string,
                                               tensorrt_cache_dir, typical_feeds)

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _cache(prefix: str, rows: int, length: int) -> str:
    # The tiny model: 2 layers, 2 kv heads of 16.
    return ",".join(f"{prefix}.{layer}.{kv}:{length}x{rows}x2x16" for layer in range(2) for kv in ("key", "value"))


def test_vision_profile_strings(engine_sparsezip):
    manifest = load_engine(engine_sparsezip).manifest
    assert manifest.limits == Limits(max_batch=8, max_positions=2048, max_text_len=512)
    (profile,) = graph_profiles(manifest, "vision", native=True)
    assert shapes_string(profile, "min") == "pixel_values:1x3x336x336,text_embeds:1x1x64,text_mask:1x1"
    assert shapes_string(profile, "opt") == "pixel_values:1x3x336x336,text_embeds:1x32x64,text_mask:1x32"
    assert shapes_string(profile, "max") == "pixel_values:8x3x336x336,text_embeds:8x512x64,text_mask:8x512"


def test_llm_profile_strings_for_the_ep(engine_sparsezip):
    """One range for prefill and decode (the EP stays on profile 0), tuned for a decode step after a prompt."""
    manifest = load_engine(engine_sparsezip).manifest
    (profile,) = graph_profiles(manifest, "llm", native=False)
    assert manifest.vision.num_slots + 32 == 81  # opt: the graph's 49 slots + a 32-token question
    assert shapes_string(profile, "min") == ("inputs_embeds:1x1x64,attention_mask:1x1,position_ids:1x1,"
                                             + _cache("past_key_values", 1, 0))
    assert shapes_string(profile, "opt") == ("inputs_embeds:1x1x64,attention_mask:1x82,position_ids:1x1,"
                                             + _cache("past_key_values", 1, 81))
    assert shapes_string(profile, "max") == ("inputs_embeds:8x2048x64,attention_mask:8x2048,position_ids:8x2048,"
                                             + _cache("past_key_values", 8, 2047))


def test_native_llm_profiles_split_prefill_and_decode(engine_sparsezip):
    prefill, decode = graph_profiles(load_engine(engine_sparsezip).manifest, "llm", native=True)
    assert prefill["inputs_embeds"].opt == (1, 81, 64) and prefill["past_key_values.0.key"].min[0] == 0
    assert decode["inputs_embeds"].min == (1, 1, 64) and decode["inputs_embeds"].max == (8, 1, 64)
    assert decode["past_key_values.1.value"].min == (1, 1, 2, 16)
    assert decode["attention_mask"].max == (8, 2048)


def test_profiles_follow_the_limits(engine_none, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(engine_none, folder)
    manifest = read_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, limits=Limits(2, 300, 300)))
    (profile,) = graph_profiles(read_manifest(folder), "llm", native=False)
    assert profile["attention_mask"].max == (2, 300) and profile["past_key_values.0.key"].max[0] == 299
    (vision,) = graph_profiles(read_manifest(folder), "vision", native=False)
    assert list(vision) == ["pixel_values"] and vision["pixel_values"].max == (2, 3, 336, 336)


def test_ep_options_and_cache_folder(tmp_path):
    assert tensorrt_cache_dir(Path("/e"), "NVIDIA Jetson AGX Orin", "8.7") == Path("/e/trt_cache/nvidia-jetson-agx-orin-sm87")
    assert tensorrt_cache_dir(Path("e"), "NVIDIA GeForce RTX 4090", "8.9").name == "nvidia-geforce-rtx-4090-sm89"


def test_typical_feeds_fit_the_graph(engine_sparsezip):
    engine = load_engine(engine_sparsezip)
    with Pipeline(engine_sparsezip) as pipe:
        seconds = pipe.warmup()
        assert set(seconds) == {"vision", "llm"}
        out = pipe.llm.run(typical_feeds(engine, "llm"))
        assert np.isfinite(out["logits"]).all()


@pytest.fixture
def fake_gpu_ort(monkeypatch):
    """ONNX Runtime that claims the GPU providers, records what it is asked for and runs on the CPU."""
    sessions = []
    real = ort.InferenceSession

    class Session:
        def __init__(self, model, sess_options=None, providers=None):
            sessions.append(providers)
            self.real = real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def run(self, names, feeds, run_options=None):  # its options name the cuda arena
            return self.real.run(names, feeds)

        def __getattr__(self, name):
            return getattr(self.real, name)


    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_PROVIDERS)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    return sessions


def test_ep_provider_list_carries_the_options(fake_gpu_ort):
    options = OrtOptions(provider="tensorrt", device_id=1, provider_options=(("trt_engine_cache_enable", "True"),))
    backend = OrtBackend(Path("x.onnx"), None, options)
    assert backend.device == "cuda" and backend.device_id == 1
    assert backend._provider_list() == [
        ("TensorrtExecutionProvider", {"device_id": "1", "trt_engine_cache_enable": "True"}),
        ("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]


def test_pipeline_gives_each_graph_its_profile(fake_gpu_ort, engine_sparsezip, tmp_path):
    with Pipeline(engine_sparsezip, provider="tensorrt", trt_cache=tmp_path / "cache") as pipe:
        pipe.warmup()
    vision, llm = (dict(providers[0][1]) for providers in fake_gpu_ort)
    assert fake_gpu_ort[0][0][0] == "TensorrtExecutionProvider"
    manifest = load_engine(engine_sparsezip).manifest
    for options, graph in ((vision, "vision"), (llm, "llm")):
        (profile,) = graph_profiles(manifest, graph, native=False)
        assert options == {"device_id": "0", **ort_tensorrt_options(profile, tmp_path / "cache")}
    assert llm["trt_profile_opt_shapes"].startswith("inputs_embeds:1x1x64,attention_mask:1x82,")
    assert llm["trt_engine_cache_path"] == llm["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert "trt_fp16_enable" not in llm  # strongly typed: precision from the ONNX
    assert (tmp_path / "cache").is_dir()


def test_warmup_build_command(fake_gpu_ort, engine_none, tmp_path, capsys):
    assert cli.main(["--engine", str(engine_none), "--provider", "tensorrt", "--trt-cache", str(tmp_path),
                     "--warmup-build"]) == 0
    err = capsys.readouterr().err
    assert "builds TensorRT engines" in err and "llm: ready in" in err and err.rstrip().splitlines()[-1].startswith("ready in")


def test_limits_are_enforced(engine_none, tmp_path, shapes_png):
    folder = tmp_path / "engine"
    shutil.copytree(engine_none, folder)
    write_manifest(folder, dataclasses.replace(read_manifest(folder), limits=Limits(1, 700, 64)))
    with Pipeline(folder) as pipe:
        with pytest.raises(EngineError, match="a batch of 2 exceeds the engine's max_batch 1"):
            pipe.ask_batch([shapes_png, shapes_png], ["a", "b"])
        with pytest.raises(EngineError, match="exceeds the engine's max_positions 700"):
            pipe.ask(shapes_png, "What is it?", max_new_tokens=200)


def test_limits_cannot_exceed_the_model(engine_none):
    manifest = read_manifest(engine_none)
    with pytest.raises(ValueError, match="limits.max_positions 4096 exceeds the LLM's max_position_embeddings 2048"):
        dataclasses.replace(manifest, limits=Limits(1, 4096, 64))
