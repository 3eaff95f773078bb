"""Native TensorRT: what can be checked without a GPU (flags by name, plan refusal, profile choice, the plan
build's manifest update against a fake `tensorrt`), and a parity run that needs one and skips without it."""
from __future__ import annotations

import contextlib
import enum
import io
import json
import shutil
import sys
import types

import pytest

from sparsezip_deploy.runtime import build_trt, cli
from sparsezip_deploy.runtime.backends import tensorrt as trt_backend
from sparsezip_deploy.runtime.backends.tensorrt import check_plan, choose_profile, network_flags, version_tuple
from sparsezip_deploy.runtime.cuda import Gpu
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import read_manifest
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.profiles import graph_profiles

from .fake_tensorrt import FLAGS_10_3, FLAGS_11, FakeTensorRT, fake_cuda

def _trt(version: str, flags=FLAGS_10_3):
    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)


def test_network_flags_by_name():
    assert network_flags(_trt("10.3.0.30", FLAGS_10_3)) == 1 << FLAGS_10_3.STRONGLY_TYPED == 2
    assert network_flags(_trt("10.13.2", FLAGS_10_3)) == 2
    assert network_flags(_trt("11.4.1", FLAGS_11)) == 0  # always strongly typed; the flag is ignored
    renumbered = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 3})
    assert network_flags(_trt("10.7.0", renumbered)) == 8  # the name decides, not a number
    with pytest.raises(EngineError, match="TensorRT 8.6.1 is too old: this backend needs 10.3 or newer"):
        network_flags(_trt("8.6.1"))
    with pytest.raises(EngineError, match="too old"):
        network_flags(_trt("10.2.0"))


def test_version_tuple():
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert version_tuple("11.0.0b1") == (11, 0, 0)
    assert version_tuple("10.3.0+cuda12") == (10, 3, 0)


def _built(version="10.3.0", gpu="Orin", cc="8.7"):
    return types.SimpleNamespace(version=version, gpu=gpu, compute_capability=cc)


def test_a_plan_runs_only_where_it_was_built():
    check_plan("llm-1.plan", _built(), "10.3.0", Gpu("Orin", "8.7"))
    with pytest.raises(EngineError) as e:
        check_plan("llm-1.plan", _built(), "10.7.0", Gpu("Orin", "8.7"))
    assert str(e.value).startswith("llm-1.plan was built with TensorRT 10.3.0 on Orin (compute 8.7); this is "
                                   "TensorRT 10.7.0 on Orin (compute 8.7): rebuild")
    with pytest.raises(EngineError, match=r"on Orin \(compute 8.7\); this is TensorRT 10.3.0 on "
                                          r"NVIDIA GeForce RTX 4090 \(compute 8.9\)"):
        check_plan("vision-1.plan", _built(), "10.3.0", Gpu("NVIDIA GeForce RTX 4090", "8.9"))


def test_profile_choice(engine_sparsezip):
    manifest = load_engine(engine_sparsezip).manifest
    ranges = [{name: (r.min, r.opt, r.max) for name, r in p.items()}
              for p in graph_profiles(manifest, "llm", native=True)]
    past = {f"past_key_values.{i}.{kv}": None for i in range(2) for kv in ("key", "value")}

    def shapes(rows, seq, past_len):
        return {"inputs_embeds": (rows, seq, 64), "attention_mask": (rows, past_len + seq),
                "position_ids": (rows, seq), **{n: (past_len, rows, 2, 16) for n in past}}

    assert choose_profile(ranges, shapes(1, 81, 0)) == 0  # prefill
    assert choose_profile(ranges, shapes(2, 7, 90)) == 0  # a chat turn's prefill after the first
    assert choose_profile(ranges, shapes(1, 1, 81)) == 1  # decode: both hold it, the narrower wins
    with pytest.raises(EngineError, match="no optimisation profile of the plan holds these shapes"):
        choose_profile(ranges, shapes(9, 1, 81))


def test_missing_tensorrt_is_one_line(monkeypatch, engine_none, shapes_png, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli.main(["--engine", str(engine_none), "--image", str(shapes_png), "--prompt", "hi",
                     "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the TensorRT Python package" in err and "pip install tensorrt-cu12" in err
    assert build_trt.main([str(engine_none)]) == 1
    assert "pip install tensorrt-cu12" in capsys.readouterr().err


def test_pipeline_without_plans_says_how_to_build_them(engine_none):
    with pytest.raises(EngineError, match=f"has no TensorRT plan for vision: run sparsezip-build-trt {engine_none}"):
        Pipeline(engine_none, backend="tensorrt")


@pytest.fixture
def folder(engine_sparsezip, tmp_path, monkeypatch):
    monkeypatch.setattr(build_trt, "gpu_info", lambda device_id=0: Gpu("Fake GPU", "8.7"))
    out = tmp_path / "engine"
    shutil.copytree(engine_sparsezip, out)
    return out


def test_build_trt_records_plans_and_facts(folder, monkeypatch, capsys):
    fake = FakeTensorRT()
    monkeypatch.setattr(build_trt, "import_tensorrt", lambda: fake)
    assert build_trt.main([str(folder), "--workspace-gib", "0.5"]) == 0
    manifest = read_manifest(folder)
    info = manifest.tensorrt
    assert (info.version, info.gpu, info.compute_capability) == ("10.3.0", "Fake GPU", "8.7")
    assert info.limits == manifest.serving_limits
    assert set(info.plans) == {"vision", "llm"}
    assert [p.onnx for p in info.plans.values()] == ["vision.onnx", "llm.onnx"]
    assert info.plans["llm"].profiles == graph_profiles(manifest, "llm", native=True)
    builds = [c[1] for c in fake.calls if c[0] == "build"]
    assert [len(b) for b in builds] == [1, 2]  # vision: one profile; llm: prefill and decode
    assert builds[1][1]["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (8, 1, 64))
    assert ("create_network", 2) in fake.calls and ("workspace", 2**29) in fake.calls
    load_engine(folder)  # plans listed as artifacts, checksums right
    first = {p.file for p in info.plans.values()}
    assert [json.loads((folder / f).read_bytes())["onnx"] for f in sorted(first)] == \
        [str(folder / "llm.onnx"), str(folder / "vision.onnx")]
    assert f"sparsezip-run --engine {folder} --backend tensorrt" in capsys.readouterr().out

    # A rebuild replaces the plans: the old ones go once the new manifest is in place.
    assert build_trt.main([str(folder)]) == 0
    second = {p.file for p in read_manifest(folder).tensorrt.plans.values()}
    assert second.isdisjoint(first) and not any((folder / f).exists() for f in first)
    assert all((folder / f).exists() for f in second)


def test_build_trt_failure_leaves_the_folder_as_it_was(folder, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setattr(build_trt, "import_tensorrt", lambda: FakeTensorRT(fail_on="llm.onnx"))
    assert build_trt.main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == ("error: TensorRT 10.3.0 cannot parse llm.onnx: In node 12 (TopK): K exceeds 3840 "
                   "(sparsezip-lint-trt lists every node it would refuse)\n")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def _gpu_tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401

        from sparsezip_deploy.runtime.cuda import gpu_info
        gpu_info(0)
    except (ImportError, EngineError) as e:
        pytest.skip(f"needs TensorRT, cuda-python and a GPU ({str(e).splitlines()[0][:80]})")


def test_native_plans_answer_like_onnx_runtime(engine_sparsezip, tmp_path, shapes_png):
    """On a GPU machine with TensorRT: the plans' greedy answer equals the ORT CPU engine's."""
    _gpu_tensorrt_or_skip()
    folder = tmp_path / "engine"
    shutil.copytree(engine_sparsezip, folder)
    assert build_trt.main([str(folder)]) == 0
    with Pipeline(folder) as cpu, Pipeline(folder, backend="tensorrt") as gpu:
        want = cpu.ask(shapes_png, "What is in the picture?", max_new_tokens=16)
        got = gpu.ask(shapes_png, "What is in the picture?", max_new_tokens=16)
    assert got.token_ids == want.token_ids


def build_fake_plans(folder, monkeypatch):
    """`folder` with plans from the fake builder, and the fake TensorRT + CUDA in place for running them."""
    fake = FakeTensorRT()
    monkeypatch.setattr(build_trt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    fake_cuda(monkeypatch)
    with contextlib.redirect_stdout(io.StringIO()):
        assert build_trt.main([str(folder)]) == 0
    return folder


@pytest.fixture
def native(folder, monkeypatch):
    return build_fake_plans(folder, monkeypatch)


def test_native_backend_glue_answers_like_onnx_runtime(native, shapes_png):
    """Staging, addresses, the KV views bound in place and the profile choice, end to end (fake TensorRT)."""
    with Pipeline(native) as cpu, Pipeline(native, backend="tensorrt") as gpu:
        assert gpu.llm.device == "cuda"
        prompt = "What is in the picture?"
        want, got = cpu.conversation(shapes_png), gpu.conversation(shapes_png)
        steps = 0  # decode calls: every answer token but the last is fed back
        for question in (prompt, "And what colour is it?"):  # a follow-up prefills after the past
            a, b = want.ask(question, max_new_tokens=6), got.ask(question, max_new_tokens=6)
            assert b.token_ids == a.token_ids and b.kept_index == a.kept_index
            steps += len(b.token_ids) - 1
        questions = [prompt, "How many shapes?"]
        rows = gpu.ask_batch([shapes_png, shapes_png], questions, max_new_tokens=5)
        alone = cpu.ask_batch([shapes_png, shapes_png], questions, max_new_tokens=5)
        assert [r.token_ids for r in rows] == [r.token_ids for r in alone]
        steps += max(len(r.token_ids) for r in rows) - 1
        prefill_context, decode_context = gpu.llm._contexts
        assert (prefill_context.executed, decode_context.executed) == (3, steps)


def test_a_plan_from_another_gpu_is_refused_on_load(native, monkeypatch):
    fake_cuda(monkeypatch, Gpu("NVIDIA GeForce RTX 4090", "8.9"))
    with pytest.raises(EngineError, match=r"built with TensorRT 10.3.0 on Fake GPU \(compute 8.7\); this is "
                                          r"TensorRT 10.3.0 on NVIDIA GeForce RTX 4090 \(compute 8.9\)"):
        Pipeline(native, backend="tensorrt")


def test_cuda_python_12_and_13_layouts(monkeypatch):
    from sparsezip_deploy.runtime import cuda

    old, new = types.ModuleType("cuda.cudart"), types.ModuleType("cuda.bindings.runtime")
    package = types.ModuleType("cuda")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "cuda", package)
    try:
        package.cudart = old  # cuda-python 12 before 12.6: no cuda.bindings
        monkeypatch.setitem(sys.modules, "cuda.cudart", old)
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        cuda.cudart.cache_clear()
        assert cuda.cudart() is old
        bindings = types.ModuleType("cuda.bindings")  # cuda-python 13 (and 12.6+)
        bindings.__path__, bindings.runtime = [], new
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", new)
        cuda.cudart.cache_clear()
        assert cuda.cudart() is new
        monkeypatch.setitem(sys.modules, "cuda", None)
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        cuda.cudart.cache_clear()
        with pytest.raises(EngineError, match=r"the CUDA runtime bindings are missing: pip install cuda-python"):
            cuda.cudart()
    finally:
        cuda.cudart.cache_clear()


def test_split_engine_gets_a_plan_per_vision_graph(engine_split, tmp_path, monkeypatch, shapes_png):
    """vision_trunk and vision_selector each get their plan (one profile each) and run through the cache."""
    monkeypatch.setattr(build_trt, "gpu_info", lambda device_id=0: Gpu("Fake GPU", "8.7"))
    folder = tmp_path / "engine"
    shutil.copytree(engine_split, folder)
    build_fake_plans(folder, monkeypatch)
    info = read_manifest(folder).tensorrt
    assert list(info.plans) == ["vision_trunk", "vision_selector", "llm"]
    assert [len(p.profiles) for p in info.plans.values()] == [1, 1, 2]
    with Pipeline(folder) as cpu, Pipeline(folder, backend="tensorrt") as gpu:
        questions = ("What is in the picture?", "How many shapes?")
        want = [cpu.ask(shapes_png, q, max_new_tokens=5) for q in questions]
        got = [gpu.ask(shapes_png, q, max_new_tokens=5) for q in questions]
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.vision_cached for r in got] == [False, True]
