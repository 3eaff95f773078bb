"""Accuracy vs kept visual tokens: a model trained on generated scenes, on the held-out questions.

    python benchmarks/accuracy.py     # the bundled shapes model; budgets 16 32 64 128, 1200 held-out questions
                                      # (--heldout large, 200 per type) + 3 x 300 POPE questions

Every method is an engine built with export/build.py and asked through the runtime's
`Pipeline` (ONNX Runtime CPU, greedy), exactly as a deployment would; the uncompressed
PyTorch model (transformers `generate`) is scored too, to show the export loses nothing.
At each budget B (visual tokens the LLM sees):

- visionzip: B - m dominant (CLS included) + m contextual tokens;
- sparsezip fixed K: CLS + K = B - 1 - m patches + m contextual, with (`-text`) and
  without the text term;
- sparsezip dynamic K: K from the score variance, its offset fitted here on scenes
  outside the held-out set so that the mean K is B - 1 - m (as calib/ would fit it);
  the plot puts it at the mean kept count it actually reached.

m = round(10 B / 64), VisionZip's 54:10 split. In the LLM (every patch reaches it):

- fastv: K = 2 (the paper's), the last layer sees the B best-attended tokens;
- sparsevlm: stages after layers 0 and 1 (the paper's 2, 6, 15 of 32, scaled to
  this model's 3 layers), keeping 2B then B (+ recycled tokens).
  (A shallower LLM: the nearest these can be, see `llm_variants`.)

Their B is what the pruned layers carry at the end; the layer average they
reach (the first layers see all 576) is reported and is where the plot puts
them: on a 3-layer LLM no in-LLM method can average 64. Writes JSON (per
method, budget and question type, small-object questions apart, chance per
type, every question's 0/1; paired bootstrap CIs of the differences between
methods (`PAIRS`) overall, per type and on small shapes; the issue's
must-show rows; POPE accuracy / precision / recall / F1 / yes-ratio per
negative split, `scenes.questions.pope`) and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from sparsezip_deploy.scenes.questions import (CHANCE, HELDOUTS, POPE_PER_SPLIT, POPE_SEED, POPE_SPLITS, TYPES,
                                               Example, ask, heldout, pope)
from sparsezip_deploy.scenes.scene import render, sample_scene

from common import is_current
from stats import RESAMPLES, paired_diff_ci, pope_metrics

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_SEED = 7  # scenes for fitting the dynamic-K offset; not the held-out seed
# Probe engines write K = round(PROBE_C + PROBE_G * log var(s)): log var(s) read back to 1/PROBE_G.
PROBE_C, PROBE_G = 450.0, 50.0
DYNAMIC_SCALE = 8.0  # g of the deployed dynamic engines: the default SparseZipConfig.k_scale


@dataclass(frozen=True)
class Variant:
    name: str  # method label in the report and the plot
    budget: int | None  # requested visual tokens; None for the uncompressed model
    options: tuple[str, ...]  # export/build.py options


def contextual(budget: int) -> int:
    return max(1, round(10 * budget / 64))


def fixed_variants(budget: int) -> list[Variant]:
    m = contextual(budget)
    k = budget - 1 - m
    fixed = ("--method", "sparsezip", "--k-max", str(k), "--k-min", str(k), "--contextual", str(m))
    return [Variant("visionzip", budget, ("--method", "visionzip", "--dominant", str(budget - m),
                                          "--contextual", str(m))),
            Variant("sparsezip", budget, (*fixed, "--beta", "0")),
            Variant("sparsezip-text", budget, fixed)]


def llm_variants(budget: int, num_layers: int) -> list[Variant]:
    """FastV at K = 2 (or the last layer of a shallower LLM); SparseVLM at its default (scaled) layers,
    each stage halving what the next keeps, ending at `budget`."""
    from sparsezip_deploy.llm_prune.config import SparseVLMConfig

    layer = min(2, num_layers - 1)
    stages = len(SparseVLMConfig().after_layers(num_layers))
    keeps = ",".join(str(budget << (stages - 1 - s)) for s in range(stages))
    return [Variant("fastv", budget, ("--method", "fastv", "--prune-layers", str(layer), "--prune-keep",
                                      str(budget))),
            Variant("sparsevlm", budget, ("--method", "sparsevlm", "--prune-keep", keeps))]


def layer_average(engine: Path) -> float | None:
    """Visual tokens an in-LLM method's layers carry on average (None: no in-LLM pruning)."""
    from sparsezip_deploy.llm_prune.config import Stage, average_visual
    from sparsezip_deploy.runtime.manifest import read_manifest

    llm = read_manifest(engine).llm
    if llm.pruning is None:
        return None
    stages = tuple(Stage(s.after, s.keep, s.merged) for s in llm.pruning.stages)
    return average_visual(stages, llm.num_layers, llm.pruning.visual_slots)


def build(work: Path, model: str, label: str, options: tuple[str, ...]) -> Path:
    """The engine folder for `label`, built if missing; SystemExit with build.py's error if it fails."""
    from sparsezip_deploy.export import build as build_script

    out = work / label
    if not is_current(out):
        t0 = time.perf_counter()
        errors = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            if build_script.main(["--model", model, "--out", str(out), "--force", *options]) != 0:
                raise SystemExit(f"building {label} failed: {errors.getvalue().strip().splitlines()[-1]}")
        print(f"built {label} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def kept_tokens(engine: Path, examples: list[Example], threads: int) -> np.ndarray:
    from sparsezip_deploy.runtime.pipeline import Pipeline

    with Pipeline(engine, threads=threads) as pipe:
        return np.array([pipe.ask(render(e.scene)[0], e.question.text, max_new_tokens=1).visual_tokens_kept
                         for e in examples])


def fit_offset(log_var: np.ndarray, target_k: int, k_min: int, k_max: int) -> float:
    """The c that makes mean(clamp(round(c + g log var), k_min, k_max)) closest to target_k."""
    def mean_k(c: float) -> float:
        return float(np.clip(np.round(c + DYNAMIC_SCALE * log_var), k_min, k_max).mean())

    low, high = k_min - DYNAMIC_SCALE * log_var.max() - 1, k_max - DYNAMIC_SCALE * log_var.min() + 1
    for _ in range(50):  # mean_k is non-decreasing in c: bisect
        mid = (low + high) / 2
        low, high = (mid, high) if mean_k(mid) < target_k else (low, mid)
    return round(high, 3)


def dynamic_variants(work: Path, model: str, budgets: list[int], calibration: list[Example],
                     threads: int) -> list[Variant]:
    variants = []
    for text in (False, True):
        beta = () if text else ("--beta", "0")
        # One probe per text setting: the scores (and their variance) do not depend on K or m.
        probe = build(work, model, f"probe{'-text' if text else ''}",
                      ("--method", "sparsezip", "--dynamic-k", "--k-offset", str(PROBE_C), "--k-scale",
                       str(PROBE_G), "--k-min", "1", "--k-max", "560", "--contextual", "10", *beta))
        k = kept_tokens(probe, calibration, threads) - 1 - 10
        assert (k > 1).all() and (k < 560).all(), "probe K clamped: widen PROBE_C / PROBE_G"
        log_var = (k - PROBE_C) / PROBE_G
        for budget in budgets:
            m = contextual(budget)
            target = budget - 1 - m
            k_min, k_max = max(1, target // 3), min(2 * target, 575 - m)
            offset = fit_offset(log_var, target, k_min, k_max)
            variants.append(Variant(f"sparsezip-dynamic{'-text' if text else ''}", budget, (
                "--method", "sparsezip", "--dynamic-k", "--k-offset", str(offset), "--k-scale",
                str(DYNAMIC_SCALE), "--k-min", str(k_min), "--k-max", str(k_max), "--contextual", str(m),
                *beta)))
    return variants


def score(answers: list[str], examples: list[Example]) -> dict:
    """Accuracy overall, per type and on small-shape questions, and every question's 0/1 (for the CIs)."""
    right = [int(a.strip() == e.question.answer) for a, e in zip(answers, examples)]
    by_type = {t: float(np.mean([r for r, e in zip(right, examples) if e.question.type == t])) for t in TYPES}
    small = [r for r, e in zip(right, examples) if e.question.small]
    return {"all": float(np.mean(right)), "by_type": by_type, "small_objects": float(np.mean(small)),
            "correct": right}


def score_pope(answers: list[str], splits: dict[str, list[Example]]) -> dict:
    """POPE's metrics per negative split; an answer counts as yes when it starts with "yes" (LLaVA's parsing)."""
    out, at = {}, 0
    for split, examples in splits.items():
        said = [a.strip().lower().startswith("yes") for a in answers[at:at + len(examples)]]
        out[split] = pope_metrics(said, [e.question.answer == "Yes" for e in examples])
        at += len(examples)
    return out


# (a, b): is a better than b? The issue's must-show pairs first, then each method against visionzip.
PAIRS = (("sparsezip-text", "visionzip"), ("sparsezip-text", "sparsezip"),
         ("sparsezip-dynamic-text", "sparsezip-dynamic"), ("sparsezip", "visionzip"),
         ("sparsezip-dynamic-text", "visionzip"), ("fastv", "visionzip"), ("sparsevlm", "visionzip"))


def scopes(examples: list[Example]) -> dict[str, np.ndarray]:
    masks = {"all": np.ones(len(examples), bool), "small_objects": np.array([e.question.small for e in examples])}
    masks.update({t: np.array([e.question.type == t for e in examples]) for t in TYPES})
    return masks


def comparisons(results: list[dict], examples: list[Example], resamples: int) -> list[dict]:
    """Paired bootstrap CIs of the accuracy difference a - b at each budget, per scope."""
    rows = {(r["method"], r["budget"]): r for r in results if "correct" in r}
    masks = scopes(examples)
    out = []
    for budget in sorted({b for _, b in rows if b is not None}):
        for a, b in PAIRS:
            if (a, budget) not in rows or (b, budget) not in rows:
                continue
            ra, rb = np.array(rows[a, budget]["correct"]), np.array(rows[b, budget]["correct"])
            out.append({"a": a, "b": b, "budget": budget, "scopes": {
                name: paired_diff_ci(ra[m], rb[m], resamples=resamples) for name, m in masks.items()}})
    return out


def must_show(compared: list[dict]) -> list[dict]:
    """The issue's table: text-aware >= visionzip + 3 points on small shapes (CI excluding zero) at 32 / 64;
    text-aware never below sparsezip without text by more than the CI (its upper end >= 0)."""
    rows = []
    for c in compared:
        if (c["a"], c["b"]) == ("sparsezip-text", "visionzip") and c["budget"] in (32, 64):
            ci = c["scopes"]["small_objects"]
            rows.append({"claim": "sparsezip-text >= visionzip + 3 points, small shapes", "budget": c["budget"],
                         **ci, "met": ci["diff"] is not None and ci["diff"] >= 0.03 and ci["low"] > 0})
        if (c["a"], c["b"]) == ("sparsezip-text", "sparsezip"):
            for scope in ("all", "small_objects"):
                ci = c["scopes"][scope]
                rows.append({"claim": f"sparsezip-text not below sparsezip beyond the CI, {scope}",
                             "budget": c["budget"], **ci, "met": ci["high"] is not None and ci["high"] >= 0})
    return rows


def print_tables(report: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}"

    print("\npaired differences a - b, points [95% bootstrap CI]")
    print(f"{'a - b':44s} {'B':>4s} {'all':>22s} {'small shapes':>22s}")
    for c in report["comparisons"]:
        cells = [f"{pct(c['scopes'][k]['diff'])} [{pct(c['scopes'][k]['low'])}, {pct(c['scopes'][k]['high'])}]"
                 for k in ("all", "small_objects")]
        print(f"{c['a'] + ' - ' + c['b']:44s} {c['budget']:4d} {cells[0]:>22s} {cells[1]:>22s}")
    print("\nmust-show")
    for r in report["must_show"]:
        print(f"{r['claim']:60s} B={r['budget']:<4d} {pct(r['diff'])} [{pct(r['low'])}, {pct(r['high'])}]  "
              f"{'met' if r['met'] else 'NOT met'}")
    if any("pope" in r for r in report["results"]):
        print("\nPOPE (accuracy / precision / recall / F1 / yes-ratio, %)")
        for r in report["results"]:
            if "pope" not in r:
                continue
            label = r["method"] if r["budget"] is None else f"{r['method']}-{r['budget']}"
            cells = ["/".join(f"{100 * r['pope'][s][k]:.0f}" for k in ("accuracy", "precision", "recall", "f1",
                                                                          "yes_ratio")) for s in POPE_SPLITS]
            print(f"{label:28s} " + "  ".join(f"{s} {c}" for s, c in zip(POPE_SPLITS, cells)))


def run_engine(engine: Path, examples: list[Example], threads: int) -> tuple[list[str], float]:
    from sparsezip_deploy.runtime.pipeline import Pipeline

    answers, kept = [], []
    with Pipeline(engine, threads=threads) as pipe:
        for e in examples:
            result = pipe.ask(render(e.scene)[0], e.question.text, max_new_tokens=4)
            answers.append(result.text)
            kept.append(result.visual_tokens_kept)
    return answers, float(np.mean(kept))


def run_pytorch(model: str, examples: list[Example]) -> list[str]:
    """transformers' own pipeline: its PIL image processor, its prompt expansion, `generate`."""
    import torch
    from transformers import AutoProcessor

    from sparsezip_deploy.export.models import load_model
    from sparsezip_deploy.export.prompt import prompt_formats

    loaded = load_model(model)
    processor = AutoProcessor.from_pretrained(loaded.source["path"], backend="pil")
    token = loaded.tokenizer.id_to_token
    first = prompt_formats(loaded.chat_template, token(loaded.image_token_id), token(loaded.bos_token_id),
                           token(loaded.eos_token_id))["first_turn"]
    answers = []
    for e in examples:
        inputs = processor(images=render(e.scene)[0], text=first.replace("{prompt}", e.question.text),
                           return_tensors="pt")
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers.append(loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist(),
                                               skip_special_tokens=True))
    return answers


def chance(examples: list[Example]) -> dict:
    """Uniform guessing over a type's answers, and always giving its most frequent held-out answer."""
    majority = {t: Counter(e.question.answer for e in examples if e.question.type == t).most_common(1)[0][1]
                / sum(e.question.type == t for e in examples) for t in TYPES}
    return {"uniform": CHANCE, "majority": majority}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: a benchmark machine often has no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "all", "all held-out questions"),
                           (axes[1], "small_objects", "questions about the small shape")):
        scored = [r for r in report["results"] if "error" not in r]
        methods = sorted({r["method"] for r in scored if r["budget"] is not None})
        for method in methods:
            rows = sorted((r for r in scored if r["method"] == method), key=lambda r: r["kept_mean"])
            ax.plot([r["kept_mean"] for r in rows], [100 * r[key] for r in rows], marker="o", label=method)
        base = next(r for r in report["results"] if r["method"] == "none")
        ax.axhline(100 * base[key], color="black", linestyle="--", label="none (576 tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens kept (mean)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{report['conditions']['model']} model, {report['conditions']['questions']} held-out questions, "
                 "ONNX Runtime CPU, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes",
                   help="export/build.py --model: the bundled model, a folder trained by train/train.py, "
                        "or 'tiny' for a smoke run")
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--heldout", choices=tuple(HELDOUTS), default="large",
                   help="large: 1200 questions (200 per type, its own seed); small: the 300 train.py scores on")
    p.add_argument("--per-type", type=int, default=None, help="held-out questions per type (default: the set's)")
    p.add_argument("--pope-per-split", type=int, default=POPE_PER_SPLIT,
                   help="POPE scenes per negative split (a Yes and a No each); 0: no POPE split")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples for the paired CIs")
    p.add_argument("--calibration", type=int, default=48, help="scenes to fit the dynamic-K offset on")
    p.add_argument("--work", type=Path, default=RESULTS / "accuracy-engines", help="engine folders (reused)")
    p.add_argument("--out", type=Path, default=RESULTS / "accuracy.json", help="JSON report; the PNG goes beside it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-pytorch", action="store_true", help="do not score the PyTorch model")
    p.add_argument("--llm-prune", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the in-LLM methods (fastv, sparsevlm)")
    args = p.parse_args(argv)

    seed, per_type = HELDOUTS[args.heldout]
    per_type = per_type if args.per_type is None else args.per_type
    examples = heldout(per_type=per_type, seed=seed)
    pope_splits = pope(per_split=args.pope_per_split) if args.pope_per_split > 0 else {}
    pope_examples = [e for split in pope_splits.values() for e in split]
    rng = np.random.default_rng(CALIBRATION_SEED)
    calibration = []
    for _ in range(args.calibration):
        scene = sample_scene(rng)
        questions = ask(scene, rng)
        calibration.append(Example(scene, questions[int(rng.integers(len(questions)))]))
    variants = [Variant("none", None, ("--method", "none"))]
    variants += [v for b in args.budgets for v in fixed_variants(b)]
    try:
        variants += dynamic_variants(args.work, args.model, args.budgets, calibration, args.threads)
    except SystemExit as failed:  # its probe engine did not build: the dynamic rows say why
        print(failed, flush=True)
        variants += [Variant(f"sparsezip-dynamic{t}", b, ()) for t in ("", "-text") for b in args.budgets]
        dynamic_error = str(failed)
    else:
        dynamic_error = None
    if args.llm_prune:
        from sparsezip_deploy.runtime.manifest import read_manifest
        layers = read_manifest(build(args.work, args.model, "none", variants[0].options)).llm.num_layers
        variants += [v for b in args.budgets for v in llm_variants(b, layers)]

    results = []
    for v in variants:
        label = v.name if v.budget is None else f"{v.name}-{v.budget}"
        if not v.options:  # a dynamic variant without its probe
            results.append({"method": v.name, "budget": v.budget, "build_options": [], "error": dynamic_error})
            continue
        try:
            engine = build(args.work, args.model, label, v.options)
        except SystemExit as failed:  # reported, not hidden: the row says why it has no accuracy
            print(failed, flush=True)
            results.append({"method": v.name, "budget": v.budget, "build_options": list(v.options),
                            "error": str(failed)})
            continue
        t0 = time.perf_counter()
        answers, kept = run_engine(engine, examples + pope_examples, args.threads)
        answers, pope_answers = answers[:len(examples)], answers[len(examples):]
        extra = {"pope": score_pope(pope_answers, pope_splits)} if pope_splits else {}
        if (average := layer_average(engine)) is not None:  # the LLM receives every patch, then prunes
            extra.update({"kept_mean": average, "fed_to_llm": kept, "carried_last": v.budget})
        results.append({"method": v.name, "budget": v.budget, "kept_mean": kept, "build_options": list(v.options),
                        **score(answers, examples), **extra})
        kept = results[-1]["kept_mean"]
        print(f"{label:28s} kept {kept:6.1f}  accuracy {100 * results[-1]['all']:5.1f}%  "
              f"small {100 * results[-1]['small_objects']:5.1f}%  ({time.perf_counter() - t0:.0f}s)", flush=True)
        if v.name == "none":
            deployed_answers = answers

    report = {"conditions": {
        "model": args.model, "heldout": args.heldout, "heldout_seed": seed, "questions": len(examples),
        "per_type": per_type, "pope_seed": POPE_SEED, "pope_per_split": args.pope_per_split,
        "bootstrap": {"resamples": args.resamples, "level": 0.95, "kind": "paired, percentile, over questions"}, "small_object_questions": sum(e.question.small for e in examples),
        "calibration_scenes": args.calibration, "provider": "ORT CPU", "threads": args.threads,
        "decoding": "greedy", "machine": platform.machine(), "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in ("onnxruntime", "numpy", "torch", "transformers")},
    }, "chance": chance(examples), "results": results}
    report["comparisons"] = comparisons(results, examples, args.resamples)
    report["must_show"] = must_show(report["comparisons"])
    print_tables(report)
    if not args.skip_pytorch:
        torch_answers = run_pytorch(args.model, examples)
        report["pytorch"] = {**score(torch_answers, examples),
                             "same_answers_as_deployed_none": float(np.mean(
                                 [a.strip() == b.strip() for a, b in zip(torch_answers, deployed_answers)]))}
        print(f"{'pytorch (HF generate)':28s} accuracy {100 * report['pytorch']['all']:5.1f}%  "
              f"same answers as deployed none: {100 * report['pytorch']['same_answers_as_deployed_none']:.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
