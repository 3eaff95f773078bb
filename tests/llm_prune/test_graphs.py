"""FastV / SparseVLM inside the exported graphs: the fixed-shape modules against the loop reference,
the engine's graphs under ONNX Runtime against the Hugging Face oracle (prefill and 16 decode steps),
and the runtime end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsezip_deploy.export import build
from sparsezip_deploy.export.models import load_model
from sparsezip_deploy.export.tiny import TinyConfig, build_tiny
from sparsezip_deploy.llm_prune import modules, oracle, reference
from sparsezip_deploy.llm_prune.config import SparseVLMConfig, Stage, prune_from_dict
from sparsezip_deploy.runtime.backends import open_backend
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.generate import decode_one_token, prefill_pruned
from sparsezip_deploy.runtime.kv_cache import KVCache
from sparsezip_deploy.runtime.manifest import GROUP_MASK, GROUP_SLOTS, PREFILL_GRAPH
from sparsezip_deploy.runtime.pipeline import Pipeline

LAYERS = 4
STEPS = 16
SHAPES_PNG = str(Path(__file__).resolve().parents[2] / "examples" / "shapes.png")


# -- the fixed-shape modules against the loop reference (no export)

def scores_with_ties(rng, batch=3, n=20):
    s = rng.random((batch, n)).round(1)  # many exact ties
    s[0, 3:6] = modules.INVALID  # masked slots
    return torch.tensor(s, dtype=torch.float32)


def test_rankings_break_ties_towards_the_lower_index_like_the_reference():
    scores = scores_with_ties(np.random.default_rng(0))
    for keep in (1, 7, 19):
        got = modules.keep_indices(scores, keep).tolist()
        assert got == [reference.keep_indices(row.double().numpy(), keep) for row in scores]
    best = modules.top(scores, 5).tolist()
    for row, picked in zip(scores.tolist(), best):
        assert picked == sorted(range(len(row)), key=lambda j: (-row[j], j))[:5]


@pytest.mark.parametrize("clusters", [1, 2, 3])
def test_dpc_knn_module_equals_the_reference(clusters):
    rng = np.random.default_rng(clusters)
    x = rng.normal(size=(2, 9, 6)).astype(np.float32)
    x[1, 4] = x[1, 2]  # a duplicate: equal densities, the index decides
    valid = np.ones((2, 9), bool)
    valid[0, [1, 5]] = False
    merged, centres, member = modules.dpc_knn(torch.tensor(x), torch.tensor(valid), clusters)
    for b in range(2):
        ref_centres, assignment, ref_merged, _ = reference.dpc_knn(x[b], valid[b].astype(int), clusters)
        assert centres[b].tolist() == ref_centres
        assert member[b].long().argmax(-1).tolist() == assignment
        np.testing.assert_allclose(merged[b].numpy(), ref_merged, atol=1e-5)


def test_raters_and_visual_scores_modules_equal_the_reference():
    rng = np.random.default_rng(3)
    batch, seq, visual = 2, 14, 6
    x = rng.normal(size=(batch, seq, 8)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    mask[0, 0], mask[1, 4] = 0, 0  # left padding; a masked visual slot
    vs = np.array([2, 3])
    rates = modules.raters(torch.tensor(x), torch.tensor(mask), torch.tensor(vs), visual)
    probs = torch.softmax(torch.tensor(rng.normal(size=(batch, 3, seq, seq)) * 3, dtype=torch.float32), -1)
    scores = modules.visual_scores(probs, rates, torch.tensor(mask), torch.tensor(vs), visual)
    for b in range(batch):
        want = reference.raters(x[b], mask[b], int(vs[b]), visual)
        assert np.flatnonzero(rates[b].numpy()).tolist() == want
        ref = reference.visual_scores(probs[b].double().numpy(), mask[b], int(vs[b]), visual, want)
        valid = np.isfinite(ref)
        np.testing.assert_allclose(scores[b].numpy()[valid], ref[valid], atol=1e-6)
        assert (scores[b].numpy()[~valid] < 0).all()


# -- an engine: sparsezip to its 64 slots, then SparseVLM in two stages with recycling

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # q and k scaled up: random-init attention is nearly flat, and the rankings must not be ties.
    return build_tiny(tmp_path_factory.mktemp("tiny-llm4") / "model", 0,
                      TinyConfig(llm_layers=LAYERS, llm_qk_scale=6.0))


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "svlm"
    assert build.main(["--model", str(model_dir), "--method", "sparsezip", "--llm-prune", "sparsevlm",
                       "--prune-layers", "0,2", "--prune-keep", "30,12", "--out", str(out)]) == 0
    return out


def test_the_manifest_declares_the_groups_and_stages(engine):
    manifest = load_engine(engine).manifest
    pruning = manifest.llm.pruning
    assert pruning.method == "sparsevlm" and pruning.visual_slots == manifest.vision.num_slots == 64
    # 64 -> 30 kept + int(int(34 * 0.3 + 1) * 0.1) + 1 = 2 merged -> 12 + 1 merged
    assert [(s.after, s.keep, s.merged) for s in pruning.stages] == [(0, 30, 2), (2, 12, 1)]
    assert [g.layers for g in manifest.llm.cache.groups] == [(0,), (1, 2), (3,)]
    assert [g.past_axis for g in manifest.llm.cache.groups] == ["past", "past_1", "past_2"]
    assert prune_from_dict(dict(pruning.config)).stages(LAYERS, 64) == \
        (Stage(0, 30, 2), Stage(2, 12, 1))
    # text-aware sparsezip under it: the vision stage split, as build.py does by default
    assert set(manifest.graphs) == {"vision_trunk", "vision_selector", "llm", PREFILL_GRAPH}
    assert manifest.graphs[PREFILL_GRAPH].outputs["new_key_values.3.key"].shape[0] == "seq_2"


@pytest.mark.parametrize("target", ["tensorrt-10.3", "tensorrt-11"])
def test_every_graph_is_tensorrt_lint_clean(engine, target):
    from sparsezip_deploy.export.tensorrt_lint import check_folder
    assert check_folder(engine, target) == []


def synthetic_prompt(table, visual, pads=(2, 0), before=(3, 5), after=(6, 6), seed=0):
    """Two left-padded rows [pad | text | visual slots (row 1's last three masked) | text]."""
    rng = np.random.default_rng(seed)
    width = pads[0] + before[0] + visual + after[0]
    embeds = np.zeros((2, width, table.shape[1]), np.float32)
    mask = np.zeros((2, width), np.int64)
    for b in range(2):
        ids = rng.integers(3, table.shape[0], size=before[b] + after[b])
        start = pads[b] + before[b]
        embeds[b, pads[b]:start] = table[ids[:before[b]]]
        embeds[b, start:start + visual] = rng.normal(size=(visual, table.shape[1])) * 0.05
        embeds[b, start + visual:] = table[ids[before[b]:]]
        mask[b, pads[b]:] = 1
    mask[1, pads[1] + before[1] + visual - 3:pads[1] + before[1] + visual] = 0
    return embeds, mask, np.array([p + b for p, b in zip(pads, before)], np.int64)


def test_the_graphs_under_ort_equal_the_transformers_oracle(engine, model_dir):
    folder = load_engine(engine)
    manifest = folder.manifest
    pruning, llm = manifest.llm.pruning, manifest.llm
    table = np.load(folder.path(llm.embed_tokens))
    embeds, mask, visual_start = synthetic_prompt(table, pruning.visual_slots)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    stages = tuple(Stage(s.after, s.keep, s.merged) for s in pruning.stages)
    want = oracle.run(load_model(model_dir).model, torch.tensor(embeds), torch.tensor(mask), torch.tensor(positions),
                      torch.tensor(visual_start), pruning.visual_slots, "sparsevlm", stages,
                      prune_from_dict(dict(pruning.config)), steps=STEPS)

    with open_backend("ort", folder.path("llm_prefill.onnx"), manifest.graphs[PREFILL_GRAPH]) as prefill, \
            open_backend("ort", folder.path("llm.onnx"), manifest.graphs["llm"]) as decoder:
        # The kept slots, exactly, from a plain run of the prefill graph.
        out = prefill.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                           "visual_start": visual_start})
        for g in range(1, len(stages) + 1):
            for b in range(2):
                assert out[GROUP_SLOTS % g][b].tolist() == want.slots[g - 1][b].tolist(), (g, b)
                assert out[GROUP_MASK % g][b].tolist() == want.masks[g - 1][b].tolist(), (g, b)
        assert (want.slots[0][0] == -1).sum() == 2 and (want.slots[1][1] == -1).sum() == 1  # merged kept
        # The runtime's data path: the cache per group, in place; then 16 greedy steps.
        cache = KVCache(decoder, llm, batch=2, capacity=embeds.shape[1] + STEPS)
        logits = prefill_pruned(prefill, cache, pruning, embeds, mask, visual_start)
        np.testing.assert_allclose(logits, want.prefill_logits, atol=2e-4, rtol=1e-4)
        for step in range(STEPS):
            tokens = logits.argmax(1)
            assert tokens.tolist() == want.tokens[:, step].tolist(), step
            logits = decode_one_token(decoder, cache, table, tokens)
            np.testing.assert_allclose(logits, want.step_logits[step], atol=2e-4, rtol=1e-4)
        real = mask.sum(1)
        for g, group in enumerate(cache.groups):
            held = real if g == 0 else np.array([int(want.masks[g - 1][b].sum()) for b in range(2)])
            assert group.mask[:, :group.length].sum(1).tolist() == (held + STEPS).tolist()


def test_kv_bytes_are_positions_times_per_token_bytes_summed_over_groups(engine):
    with Pipeline(engine, threads=1) as pipe:
        result = pipe.ask(SHAPES_PNG, "Where is the circle?", max_new_tokens=6)
        chat = pipe.conversation(SHAPES_PNG)
        again = chat.ask("Where is the circle?", max_new_tokens=6)
        pipe_cache = chat.cache
    assert again.token_ids == result.token_ids
    llm = load_engine(engine).manifest.llm
    per_layer = 2 * llm.num_kv_heads * llm.head_dim * np.dtype(llm.dtype).itemsize
    positions = [int(g.mask[0, :g.length].sum()) for g in pipe_cache.groups]
    assert list(result.kv_bytes_groups) == [p * len(g.spec.layers) * per_layer
                                            for p, g in zip(positions, pipe_cache.groups)]
    assert result.kv_bytes == sum(result.kv_bytes_groups)
    # Group 0 holds every position; the later ones the prompt minus what each stage dropped.
    visual = result.visual_tokens_kept
    assert positions[0] - positions[1] == visual - 32 and positions[0] - positions[2] == visual - 13
    assert result.kv_bytes_uncompressed == (positions[0] + 576 - visual) * llm.kv_bytes_per_token


def test_a_batch_answers_as_each_row_alone(engine):
    prompts = ["What colour is the circle?", "Where is the yellow triangle? Answer in a few words."]
    with Pipeline(engine, threads=1) as pipe:
        alone = [pipe.ask(SHAPES_PNG, p, max_new_tokens=8) for p in prompts]
        batch = pipe.ask_batch([SHAPES_PNG] * 2, prompts, max_new_tokens=8)
        chat = pipe.conversation(SHAPES_PNG)
        chat.ask(prompts[0], max_new_tokens=4)
        follow = chat.ask(prompts[1], max_new_tokens=4)  # a text turn: llm.onnx over every group's cache
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.kv_bytes_groups for r in batch] == [r.kv_bytes_groups for r in alone]
    assert follow.turn == 1 and len(follow.token_ids) >= 1


def test_a_prompt_without_text_after_the_image_is_one_line(engine):
    from sparsezip_deploy.runtime.errors import EngineError
    with Pipeline(engine, threads=1) as pipe:
        with pytest.raises(EngineError, match="needs text after the image"):
            pipe.ask(SHAPES_PNG, "<image>", raw=True, max_new_tokens=2)


def test_build_refuses_bad_pruning_options_before_loading(tmp_path, capsys):
    cases = [
        (["--method", "fastv", "--llm-prune", "sparsevlm"], "stacks on a vision-side --method"),
        (["--method", "fastv", "--prune-keep", "3,4"], "fastv takes one --prune-keep value"),
        (["--method", "sparsezip", "--prune-keep", "30"], "no in-LLM method"),
        (["--method", "fastv", "--recycle", "0.5"], "sparsevlm's"),
        (["--method", "sparsevlm", "--prune-keep", "4", "--prune-budget", "9"], "not both"),
        (["--method", "fastv", "--llm-quant", "int4"], "not supported yet"),
    ]
    for argv, message in cases:
        assert build.main(["--model", "tiny", "--out", str(tmp_path / "e"), *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_sparsevlm_schedules_hit_their_budget_and_say_when_they_cannot():
    from sparsezip_deploy.llm_prune.config import FastVConfig, average_visual
    assert SparseVLMConfig(budget=64).stages(32, 576)[0].keep == 66  # the paper's own list
    for budget in (128, 192):
        stages = SparseVLMConfig(budget=budget).stages(24, 576)
        assert abs(average_visual(stages, 24, 576) - budget) < 1.5
    with pytest.raises(ValueError, match="out of reach"):
        SparseVLMConfig(budget=64).stages(24, 576)
    stages = FastVConfig(budget=64).stages(24, 576)
    assert stages == (Stage(1, 17),) and abs(average_visual(stages, 24, 576) - 64) < 1
    with pytest.raises(ValueError, match="outside"):
        FastVConfig(budget=64).stages(3, 576)


def test_the_fastv_prefill_graph_under_ort_equals_the_oracle(model_dir, tmp_path):
    from sparsezip_deploy.export.llm import DecoderGraph
    from sparsezip_deploy.export.llm_prune import PrefillGraph, export_prefill, pruned_layout
    from sparsezip_deploy.llm_prune.config import FastVConfig

    llava, visual = load_model(model_dir).model, 12
    config = FastVConfig(layer=2, keep=5)
    stages = config.stages(LAYERS, visual)
    graph = PrefillGraph(DecoderGraph(llava, cache=pruned_layout(LAYERS, stages)), config, visual).eval()
    io, _ = export_prefill(graph, tmp_path / "llm_prefill.onnx")
    table = llava.model.language_model.embed_tokens.weight.detach().numpy()
    embeds, mask, visual_start = synthetic_prompt(table, visual)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    want = oracle.run(llava, torch.tensor(embeds), torch.tensor(mask), torch.tensor(positions),
                      torch.tensor(visual_start), visual, "fastv", stages, None, steps=0)
    with open_backend("ort", tmp_path / "llm_prefill.onnx", io) as prefill:
        out = prefill.run({"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                           "visual_start": visual_start})
    for b in range(2):
        assert out[GROUP_SLOTS % 1][b].tolist() == want.slots[0][b].tolist()
        assert out[GROUP_MASK % 1][b].tolist() == want.masks[0][b].tolist()
    assert out[GROUP_SLOTS % 1].shape[1] == embeds.shape[1] - visual + 5
    np.testing.assert_allclose(out["logits"][:, -1], want.prefill_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [2, 3, 24])
def test_the_accuracy_benchmarks_in_llm_variants_are_builds_this_model_accepts(layers, monkeypatch):
    import sys
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    sys.modules.pop("accuracy", None)
    import accuracy

    for variant in accuracy.llm_variants(16, layers):
        args = build.parse_args(["--model", "tiny", *variant.options])
        stages = build.prune_config(args).stages(layers, 576)
        assert stages[-1].keep == 16 and stages[-1].after < layers - 1
