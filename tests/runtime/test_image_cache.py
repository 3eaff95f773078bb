"""runtime/vision.py: the split vision stage (trunk + selector) and the Pipeline's cache of recent images."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import (SELECTOR_GRAPH, TRUNK_GRAPH, TRUNK_OUTPUTS, VISION_GRAPH,
                                               read_manifest)
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.profiles import graph_profiles
from sparsezip_deploy.runtime.vision import ImageCache, pixel_key

QUESTIONS = ("What colour is the circle?", "Is there a blue square on the left of the picture?")
NEW_TOKENS = 8


def scene(seed: int) -> Image.Image:
    """A picture of its own per seed (noise: every patch differs)."""
    return Image.fromarray((np.random.default_rng(seed).random((300, 400, 3)) * 255).astype(np.uint8))


def count_runs(pipe: Pipeline, monkeypatch) -> dict[str, list[int]]:
    """Graph name -> the batch size of each of its runs from now on."""
    runs: dict[str, list[int]] = {name: [] for name in pipe.vision.backends}
    for name, backend in pipe.vision.backends.items():
        def run(feeds, *args, _run=backend.run, _name=name, **kwargs):
            runs[_name].append(len(next(iter(feeds.values()))))
            return _run(feeds, *args, **kwargs)
        monkeypatch.setattr(backend, "run", run)
    return runs


def test_split_folder_declares_trunk_and_selector(engine_split):
    manifest = read_manifest(engine_split)
    assert manifest.vision_split and manifest.vision_graphs == (TRUNK_GRAPH, SELECTOR_GRAPH)
    assert VISION_GRAPH not in manifest.graphs and "vision.onnx" not in manifest.artifacts
    trunk, selector = manifest.graphs[TRUNK_GRAPH], manifest.graphs[SELECTOR_GRAPH]
    assert (trunk.file, selector.file) == ("vision_trunk.onnx", "vision_selector.onnx")
    assert list(trunk.inputs) == ["pixel_values"] and tuple(trunk.outputs) == TRUNK_OUTPUTS
    assert {k: selector.inputs[k] for k in TRUNK_OUTPUTS} == dict(trunk.outputs)
    assert set(selector.inputs) == {*TRUNK_OUTPUTS, "text_embeds", "text_mask"}
    assert manifest.precision["vision"] == "float32"
    for graph in manifest.vision_graphs:  # TensorRT profiles come from the declared axes, as for vision.onnx
        (profile,) = graph_profiles(manifest, graph, native=True)
        assert profile["hidden_states" if graph == SELECTOR_GRAPH else "pixel_values"].max[0] == \
            manifest.serving_limits.max_batch


def test_split_answers_equal_the_fused_engine(engine_sparsezip, engine_split):
    images = [scene(1), scene(2)]
    with Pipeline(engine_sparsezip, threads=2) as fused, Pipeline(engine_split, threads=2) as split:
        for image in images:
            for question in QUESTIONS:
                a, b = (p.ask(image, question, NEW_TOKENS) for p in (fused, split))
                assert b.token_ids == a.token_ids and b.kept_index == a.kept_index
                assert b.visual_tokens_kept == a.visual_tokens_kept
        a, b = (p.ask_batch(images + images[:1], [*QUESTIONS, QUESTIONS[1]], NEW_TOKENS) for p in (fused, split))
        assert [r.token_ids for r in b] == [r.token_ids for r in a]
        assert set(fused.warmup()) == {VISION_GRAPH, "llm"}
        assert set(split.warmup()) == {TRUNK_GRAPH, SELECTOR_GRAPH, "llm"}


def test_second_question_runs_only_the_selector(engine_split, monkeypatch):
    with Pipeline(engine_split, threads=2) as pipe:
        runs = count_runs(pipe, monkeypatch)
        image = scene(3)
        first = pipe.ask(image, QUESTIONS[0], NEW_TOKENS)
        second = pipe.ask(image.copy(), QUESTIONS[1], NEW_TOKENS)  # another object, the same pixels
        assert runs == {TRUNK_GRAPH: [1], SELECTOR_GRAPH: [1, 1]}
        assert (first.vision_cached, second.vision_cached) == (False, True)
        assert json.loads(json.dumps(second.to_json()))["vision_cached"] is True
        other = pipe.ask(scene(4), QUESTIONS[1], NEW_TOKENS)
        assert not other.vision_cached and runs[TRUNK_GRAPH] == [1, 1]
        follow_up = pipe.conversation(image)
        follow_up.ask(QUESTIONS[0], NEW_TOKENS)
        later = follow_up.ask(QUESTIONS[1], NEW_TOKENS)  # the image tokens are reused: no vision at all
        assert later.vision_ms == 0 and not later.vision_cached
        assert runs == {TRUNK_GRAPH: [1, 1], SELECTOR_GRAPH: [1, 1, 1, 1]}
    with Pipeline(engine_split, threads=2, image_cache=0) as off:
        runs = count_runs(off, monkeypatch)
        again = [off.ask(image, q, NEW_TOKENS) for q in QUESTIONS]
        assert runs == {TRUNK_GRAPH: [1, 1], SELECTOR_GRAPH: [1, 1]} and not any(r.vision_cached for r in again)
        assert [r.token_ids for r in again] == [first.token_ids, second.token_ids]


def test_batch_runs_the_trunk_once_per_new_image(engine_split, monkeypatch):
    with Pipeline(engine_split, threads=2) as pipe:
        runs = count_runs(pipe, monkeypatch)
        a, b = scene(5), scene(6)
        pipe.ask(a, QUESTIONS[0], NEW_TOKENS)
        results = pipe.ask_batch([a, b, b, a], [*QUESTIONS, *QUESTIONS], NEW_TOKENS)
        assert runs == {TRUNK_GRAPH: [1, 1], SELECTOR_GRAPH: [1, 4]}  # only b ran, once
        assert [r.vision_cached for r in results] == [True, False, True, True]
        alone = [pipe.ask(image, q, NEW_TOKENS).token_ids for image, q in zip([a, b, b, a], [*QUESTIONS, *QUESTIONS])]
        assert [r.token_ids for r in results] == alone


def test_the_cache_is_bounded_least_recently_used_out(engine_split, monkeypatch):
    with Pipeline(engine_split, threads=2, image_cache=2) as pipe:
        runs = count_runs(pipe, monkeypatch)
        a, b, c = scene(7), scene(8), scene(9)
        for image in (a, b, a, c):  # c evicts b, the least recently used
            pipe.ask(image, QUESTIONS[0], 2)
        assert len(runs[TRUNK_GRAPH]) == 3 and len(pipe.vision.cache) == 2
        assert pipe.ask(a, QUESTIONS[1], 2).vision_cached
        assert not pipe.ask(b, QUESTIONS[1], 2).vision_cached
        assert len(runs[TRUNK_GRAPH]) == 4


def test_prompt_independent_output_is_cached_whole(engine_none, monkeypatch, shapes_png):
    with Pipeline(engine_none, threads=2) as pipe:
        runs = count_runs(pipe, monkeypatch)
        first = pipe.ask(shapes_png, QUESTIONS[0], NEW_TOKENS)
        second = pipe.ask(shapes_png, QUESTIONS[1], NEW_TOKENS)
        assert runs == {VISION_GRAPH: [1]} and second.vision_cached and not first.vision_cached
    with Pipeline(engine_none, threads=2, image_cache=0) as off:
        assert off.ask(shapes_png, QUESTIONS[1], NEW_TOKENS).token_ids == second.token_ids


def test_fused_text_aware_graph_caches_nothing(engine_sparsezip, monkeypatch, shapes_png):
    with Pipeline(engine_sparsezip, threads=2) as pipe:
        runs = count_runs(pipe, monkeypatch)
        results = [pipe.ask(shapes_png, q, 2) for q in QUESTIONS]
        assert runs == {VISION_GRAPH: [1, 1]} and not any(r.vision_cached for r in results)


def test_cache_key_and_size():
    pixels = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert pixel_key(pixels) == pixel_key(pixels.copy()) != pixel_key(pixels[:, :, ::-1])
    assert pixel_key(pixels) != pixel_key(pixels.astype(np.float64))
    assert pixel_key(pixels) != pixel_key(pixels.reshape(3, 4, 16))
    for bad in (-1, 1.5, True, 10**6):
        with pytest.raises(EngineError, match="image cache size"):
            ImageCache(bad)
    cache = ImageCache(1)
    cache.put("a", {})
    cache.put("b", {})
    assert cache.get("a") is None and cache.get("b") == {} and (cache.hits, cache.misses) == (1, 1)


def _edited(folder, tmp_path, edit):
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    out = tmp_path / "engine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["graphs"].pop(SELECTOR_GRAPH), "graphs: no vision graph (nor both vision_trunk and vision_selector)"),
    (lambda d: d["graphs"].update(vision=d["graphs"][SELECTOR_GRAPH]), "graphs: a vision graph or a vision_trunk"),
    (lambda d: d["graphs"][SELECTOR_GRAPH]["inputs"]["kmet"].update(shape=["batch", 577, 8]),
     "graphs.vision_selector.inputs.kmet: float32 ['batch', 577, 8], expected float32 ['batch', 577, 16]"),
    (lambda d: d["graphs"][TRUNK_GRAPH]["outputs"].pop("cls_attn"), "graphs.vision_trunk: inputs ['pixel_values']"),
    (lambda d: d["graphs"][TRUNK_GRAPH]["outputs"]["hidden_states"].update(shape=["batch", 576, 64]),
     "graphs.vision_trunk.outputs.hidden_states: float32 ['batch', 576, 64], expected float32 ['batch', 577, 64]"),
    (lambda d: d["artifacts"].pop("vision_trunk.onnx"), "artifacts: does not list vision_trunk.onnx"),
])
def test_inconsistent_split_manifest_is_refused(engine_split, tmp_path, edit, message):
    with pytest.raises(EngineError, match=f"manifest.json: {_escape(message)}"):
        load_engine(_edited(engine_split, tmp_path, edit), verify_checksums=False)


def _escape(text: str) -> str:
    import re
    return re.escape(text)


def test_bad_cache_size_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(EngineError, match=r"image cache size must be an integer in \[0, 4096\], got -1"):
        Pipeline(tmp_path / "no-engine", image_cache=-1)
