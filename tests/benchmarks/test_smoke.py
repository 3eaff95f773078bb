"""Each benchmark runs end to end on the tiny model, one repetition, so the scripts cannot rot.

Figures are not checked (timings are never asserted); what is checked is that each
script exits 0 and writes every figure and plot it promises.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METHODS = ["none", "sparsezip-64-text"]  # the baseline and the text-aware path: two builds keep it quick


def run(script: str, *args: str, timeout: int = 300) -> str:
    """`timeout` guards against a hang, not a slow machine: it is several times the script's quiet run."""
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def latency(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "results" / "latency.json"
    run("latency.py", "--build", "--work", str(work), "--size", "tiny", "--methods", *METHODS, "--reps", "1",
        "--warmup", "0", "--new-tokens", "3", "--profile-runs", "1", "--out", str(out))
    return work, json.loads(out.read_text())


def test_latency_reports_every_figure_and_plot(latency):
    work, report = latency
    assert set(report["methods"]) == set(METHODS) and report["baseline"] == "none"
    for key in ("prompt", "image_size", "batch", "dtypes", "provider", "versions", "cpu", "threads", "reps"):
        assert key in report["conditions"], key
    for row in report["methods"].values():
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "peak_rss_bytes"):
            assert row[key]["n"] == 1 and row[key]["median"] > 0, key
        assert 0 <= row["vision_split_ms"]["share_of_vision"] <= 1
        assert row["kv_exact"]
        for key in ("prefill_speedup", "fraction_of_ideal", "ttft_speedup", "kv_saved_bytes", "kv_saved_pct"):
            assert key in row, key
        step = row["decode_step"]
        assert step["bandwidth_gb_s"]["median"] > 0 and step["weight_bytes"] > 0
        assert step["over_ideal"]["median"] == pytest.approx(step["ms"]["median"] / step["ideal_ms"]["median"])
    assert report["methods"]["sparsezip-64-text"]["visual_tokens_kept"] == 64
    for plot in ("ttft", "kv", "prefill-speedup"):
        assert (work / "results" / f"latency-{plot}.png").stat().st_size > 0


def test_memory_splits_the_peak_and_never_imports_torch(latency, tmp_path):
    work, _ = latency
    out = tmp_path / "memory.json"
    engines = [str(work / "engines" / f"tiny-{m}") for m in METHODS]
    run("memory.py", "--engines", *engines, "--new-tokens", "3", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["runtime_import"]["torch_imported"] is False
    for row in report["methods"].values():
        assert row["peak_rss_bytes"] == row["weights_bytes"] + row["kv_bytes_allocated"] + row["rest_bytes"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_vision_overhead(tmp_path):
    out = tmp_path / "vision_overhead.json"
    run("vision_overhead.py", "--tiny", "--reps", "1", "--warmup", "0", "--out", str(out))
    derived = json.loads(out.read_text())["derived"]
    assert "compression_share_of_vision" in derived["sparsezip-64"]
    assert {"split_first_question_vs_fused", "selector_alone_vs_fused"} <= set(derived["sparsezip-64-text"])


def test_quant_compares_quantised_engines_with_float(latency, tmp_path):
    """One variant, int8 vision + int4 LLM: both quantisers and every fidelity figure, one build (~10 s)."""
    work, _ = latency
    out = tmp_path / "quant.json"
    run("quant.py", "--build", "--work", str(work), "--size", "tiny", "--methods", "sparsezip-64-text",
        "--variants", "int8-int4", "--reps", "1", "--warmup", "0", "--new-tokens", "3", "--prompts", "2",
        "--fidelity-tokens", "3", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["reference"] == "fp32" and set(report["variants"]) == {"fp32", "int8-int4"}
    for row in report["variants"].values():
        for key in ("vision_ms", "prefill_ms", "peak_rss_bytes"):
            assert row[key]["n"] == 1 and row[key]["median"] > 0, key
        fidelity = row["fidelity"]
        assert 0 <= fidelity["forced_top1_agreement"] <= 1 and 0 < fidelity["positions"] <= 2 * 3
        assert 0 <= fidelity["kept_jaccard"]["min"] <= 1 and fidelity["visual_cosine"]["min"] <= 1 + 1e-9
    quantised = report["variants"]["int8-int4"]
    assert (quantised["precision"]["vision"], quantised["precision"]["llm"]) == ("int8", "int4")
    assert quantised["weights_bytes"] < report["variants"]["fp32"]["weights_bytes"]
    assert report["variants"]["fp32"]["fidelity"]["greedy_exact_match"]["mean"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0


def test_accuracy_scores_every_method_and_the_pytorch_model(tmp_path):
    out = tmp_path / "accuracy.json"
    # Without the in-LLM rows (two more engine builds; tests/llm_prune checks what they build).
    run("accuracy.py", "--model", "tiny", "--budgets", "16", "--per-type", "1", "--calibration", "4",
        "--pope-per-split", "1", "--resamples", "50", "--work", str(tmp_path / "engines"), "--out", str(out),
        "--no-llm-prune", timeout=1200)  # eight engine builds: ~210 s on 2 quiet cores, 300 s hit under load
    report = json.loads(out.read_text())
    methods = {r["method"] for r in report["results"]}
    assert methods == {"none", "visionzip", "sparsezip", "sparsezip-text", "sparsezip-dynamic",
                       "sparsezip-dynamic-text"}
    assert all("error" not in r and 0 <= r["all"] <= 1 for r in report["results"])
    assert report["conditions"]["heldout"] == "large" and report["conditions"]["questions"] == 6
    for r in report["results"]:
        assert len(r["correct"]) == 6 and r["all"] == sum(r["correct"]) / 6
        for split in ("random", "popular", "adversarial"):
            assert r["pope"][split]["n"] == 2 and 0 <= r["pope"][split]["f1"] <= 1
    compared = {(c["a"], c["b"]) for c in report["comparisons"] if c["budget"] == 16}
    assert {("sparsezip-text", "visionzip"), ("sparsezip-text", "sparsezip")} <= compared
    for c in report["comparisons"]:
        for ci in c["scopes"].values():
            assert ci["n"] == 0 or ci["low"] <= ci["diff"] <= ci["high"]
    assert {r["budget"] for r in report["must_show"]} == {16}  # no 32 / 64 here: only the text-vs-no-text rows
    # The deployed uncompressed engine answers exactly as transformers' generate does.
    assert report["pytorch"]["same_answers_as_deployed_none"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0


def test_image_cache_spares_the_trunk_on_the_second_question(latency, tmp_path):
    """Reuses latency's work folder: its tiny model and sparsezip-64-text; builds only the split engine."""
    work, _ = latency
    out = tmp_path / "image_cache.json"
    run("image_cache.py", "--build", "--work", str(work), "--size", "tiny", "--reps", "1", "--new-tokens", "3",
        "--out", str(out))
    report = json.loads(out.read_text())["configs"]
    assert report["same_answers"] is True
    assert report["split, cache on"]["question_2"]["vision_cached"] == [True]
    for name in ("fused", "split, cache off", "split, cache on"):
        assert report[name]["question_1"]["vision_cached"] == [False] and not report[name]["torch_imported"]
        assert report[name]["question_2"]["vision_ms"] > 0
    assert report["split, cache off"]["question_2"]["vision_cached"] == [False]


def test_batch_answers_together_what_it_answers_alone(latency, tmp_path):
    work, _ = latency
    out = tmp_path / "batch.json"
    run("batch.py", "--engine", str(work / "engines" / "tiny-sparsezip-64-text"), "--batch", "3", "--reps", "1",
        "--new-tokens", "4", "--out", str(out))
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["equal_answers"] is True and summary["torch_imported"] is False
    assert summary["batch_tokens_per_s"] > 0 and summary["sequential_tokens_per_s"] > 0
    assert len(summary["prompt_tokens"]) == 3 and report["conditions"]["bandwidth"]["median_gb_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_gpu_measures_what_runs_and_skips_the_rest_with_the_reason(latency, tmp_path):
    work, _ = latency
    out = tmp_path / "gpu.json"
    engines = [str(work / "engines" / f"tiny-{m}") for m in METHODS]
    stdout = run("gpu.py", "--engines", *engines, "--runners", "cpu", "cuda", "tensorrt", "--reps", "1",
                 "--warmup", "0", "--new-tokens", "3", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {f"tiny-{m} / cpu" for m in METHODS}
    for row in report["rows"].values():
        assert row["ttft_ms"] > 0 and row["ttft_speedup"] > 0 and row["reps"] == 1
    assert report["rows"]["tiny-sparsezip-64-text / cpu"]["visual_tokens_kept"] == 64
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert "onnxruntime-gpu" in report["skipped"]["tiny-none / cuda"]
    assert "| tiny-none | cpu |" in stdout


def test_text_term_measures_every_fusion_and_chooses_a_beta(tmp_path):
    out = tmp_path / "text_term.json"
    run("text_term.py", "--model", "tiny", "--per-type", "1", "--out", str(out))
    report = json.loads(out.read_text())
    sys.path.insert(0, str(REPO / "benchmarks"))
    from text_term import BETAS, BUDGETS
    assert len(report["rows"]) == len(BUDGETS) * (1 + 2 * 3 * len(BETAS))
    assert report["chosen"]["beta"] in BETAS and report["questions"] > 0
    for row in report["rows"]:
        assert 0 <= row["recall"] <= row["hit"] <= 1  # a question with any named patch kept is a hit
