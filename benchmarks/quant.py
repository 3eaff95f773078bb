"""Quantised engines against their float engine: speed, size, memory and fidelity, side by side.

    python benchmarks/quant.py --build --work /tmp/szbench [--size vitl-0.5b] [--variants fp32 llm-int4 ...]
    python benchmarks/quant.py --build --work W --model MODEL_DIR   # a trained model: held-out accuracy too
    python benchmarks/quant.py --engines engines/a engines/b ...   # one of them all float: the reference

`--build` makes (once, reused later) with export/build.py the float engine of
one method (`--methods`), the one latency.py uses, and its variants (VARIANTS):
llm-int4 / llm-int8 (`--llm-quant`: MatMulNBits weights, calib/llm_quant.py),
vision-int8 (`--vision-int8 cpu`: calib/vision_int8.py) and int8-int4 (both).

Speed: each engine answers the same image and prompt in a fresh runtime process
(common.measure), engines interleaved round after round; medians of vision ms,
prefill ms, decode tokens/s and peak RSS. Size: the bytes of every artifact.
Fidelity against the reference, over generated scenes with one question each
(`--prompts`), greedy: per image the Jaccard index of the kept patch sets and
the cosine of the visual tokens; per answer position the cosine of the logits
and whether the top-1 token agrees, the quantised engine fed the reference's
tokens (teacher forcing: one early flip does not hide the rest); free-running
answers: the fraction of the reference's tokens reproduced before the first
divergence, and the exact-match rate. When the reference's model was trained by
train/train.py, also accuracy on its held-out questions (accuracy.py's).
Goals are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accuracy import build as build_engine
from accuracy import run_engine, score
from common import (DEFAULT_SIZE, METHODS, check_engine_args, conditions, engine_parser, engines_by_name,
                    ensure_engines, measure, weight_bytes)
from latency import spread

TIMED = ("vision_ms", "prefill_ms", "decode_tokens_per_s")
# name -> export/build.py options, after the method's
VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "llm-int4": ("--llm-quant", "int4"),
    "llm-int8": ("--llm-quant", "int8"),
    "vision-int8": ("--vision-int8", "cpu"),
    "int8-int4": ("--vision-int8", "cpu", "--llm-quant", "int4"),
}
FLOAT = {"float32", "float16"}
FIDELITY_SEED = 11  # generated scenes for the prompt set: not the held-out seed, not a training seed
GOALS = {"llm-int4 decode_speedup": ">= 2", "llm-int8 decode_speedup": "reported",
         "vision-int8 vision_speedup": "reported",
         "greedy agreement, kept Jaccard, visual cosine": "reported (1.0 = identical)"}


@dataclass(frozen=True)
class QuantBenchConfig:
    size: str = DEFAULT_SIZE
    method: str = "sparsezip-64"
    variants: tuple[str, ...] = tuple(VARIANTS)
    reps: int = 3
    warmup: int = 1
    new_tokens: int = 32  # decode tok/s over this many steps
    prompts: int = 12  # generated scenes for the fidelity figures
    fidelity_tokens: int = 16
    threads: int = os.cpu_count() or 1
    out: Path = Path("benchmarks/results/quant.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = QuantBenchConfig()
    p = engine_parser(__doc__, d.size, d.new_tokens, d.threads, d.out)
    p.set_defaults(methods=[d.method])
    p.add_argument("--model", type=Path, help="with --build: this model folder (one train/train.py wrote, say) "
                   "instead of a random model of --size")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(d.variants),
                   help="with --build: fp32 is always included, as the reference")
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--fidelity-tokens", type=int, default=d.fidelity_tokens)
    p.add_argument("--heldout-per-type", type=int, default=None,
                   help="held-out questions per type for the accuracy figure (default: accuracy.py's); 0 skips it")
    args = p.parse_args(argv)
    check_engine_args(p, args)
    if args.model and not args.build:
        p.error("--model needs --build")
    if args.build and len(args.methods) != 1:
        p.error("--methods: one method; its variants are compared with each other")
    if min(args.reps, args.prompts, args.fidelity_tokens) < 1:
        p.error("--reps, --prompts and --fidelity-tokens must be >= 1")
    return args


# -- engines

def build_variants(work: Path, size: str, method: str, variants: list[str], model: Path | None) -> dict[str, Path]:
    """The float engine of `method` and its variants, built by export/build.py where missing.

    Of `model`, or of the random model of `size`, whose float engine is latency.py's.
    """
    if model is None:
        ensure_engines(work, size, [])
        model, prefix = work / f"model-{size}", size
    else:
        prefix = model.name
    engines = {}
    for name in dict.fromkeys(["fp32", *variants]):
        label = f"{prefix}-{method}" + ("" if name == "fp32" else f"-{name}")
        engines[name] = build_engine(work / "engines", str(model), label, METHODS[method] + VARIANTS[name])
    return engines


def reference_name(engines: dict[str, Path]) -> str:
    """The engine whose every graph is float: what each quantised one is compared with."""
    floats = [name for name, path in engines.items()
              if {_manifest(path)["precision"][g] for g in ("vision", "llm")} <= FLOAT]
    if len(floats) != 1:
        raise SystemExit(f"error: pass exactly one unquantised engine as the reference (got {floats or 'none'})")
    methods = {json.dumps(_manifest(p)["method"], sort_keys=True) for p in engines.values()}
    if len(methods) != 1:
        raise SystemExit("error: the engines differ in method or its options: fidelity would compare apples "
                         "with pears")
    return floats[0]


def _manifest(engine: Path) -> dict:
    from sparsezip_deploy.runtime.manifest import read_manifest

    return read_manifest(engine).to_dict()


# -- speed and memory

def run_rounds(engines: dict[str, Path], args: argparse.Namespace) -> dict[str, list[dict]]:
    names = list(engines)
    runs = defaultdict(list)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            fig = measure(engines[name], args.image, args.prompt, args.new_tokens, args.warmup, args.threads)
            runs[name].append(fig)
            print(f"round {rep + 1}/{args.reps} {name:<12} vision {fig['vision_ms']:8.1f} ms  prefill "
                  f"{fig['prefill_ms']:8.1f} ms  decode {fig['decode_tokens_per_s'] or float('nan'):6.2f} tok/s",
                  flush=True)
    return runs


def speed_row(figs: list[dict], engine: Path) -> dict:
    manifest = _manifest(engine)
    row = {key: spread([f[key] for f in figs]) for key in TIMED}
    row["peak_rss_bytes"] = spread([f["end"]["peak"] for f in figs])
    row.update(precision=manifest["precision"], calibration=manifest.get("calibration", {}),
               artifact_bytes={name: a["bytes"] for name, a in manifest["artifacts"].items()},
               weights_bytes=weight_bytes(engine), visual_tokens_kept=figs[-1]["visual_tokens_kept"],
               prompt_tokens=figs[-1]["prompt_tokens"])
    return row


# -- fidelity

def prompt_set(count: int, seed: int = FIDELITY_SEED) -> list[tuple]:
    """(image, question) pairs on generated scenes, question types taken in turn."""
    from sparsezip_deploy.scenes.questions import ask
    from sparsezip_deploy.scenes.scene import render, sample_scene

    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        scene = sample_scene(rng)
        questions = ask(scene, rng)
        pairs.append((render(scene)[0], questions[len(pairs) % len(questions)].text))
    return pairs


def forced(pipe, image, question: str, tokens: list[int]) -> tuple:
    """Visual tokens and the logits [len(tokens), V] of each position, fed `tokens` whatever it predicts."""
    from sparsezip_deploy.runtime.generate import decode_one_token, embed, encode_images, prefill, text_features
    from sparsezip_deploy.runtime.kv_cache import KVCache
    from sparsezip_deploy.runtime.preprocess import preprocess
    from sparsezip_deploy.runtime.prompt import first_turn_ids

    engine = pipe.engine
    ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, question, False)
    text = text_features(pipe.table, [ids.text_ids]) if engine.vision.text_aware else None
    visual = encode_images(pipe.vision, preprocess(image, engine.image), text)[0]
    embeds = np.concatenate([embed(pipe.table, ids.before), visual.tokens.astype(engine.llm.np_dtype),
                             embed(pipe.table, ids.after)])[None]
    cache = KVCache(pipe.llm, engine.llm, 1, embeds.shape[1] + len(tokens))
    logits = [prefill(pipe.llm, cache, embeds)[0]]
    for token in tokens[:-1]:
        logits.append(decode_one_token(pipe.llm, cache, pipe.table, np.array([token]))[0])
    return visual, np.stack(logits)


def answers(engine: Path, pairs: list[tuple], new_tokens: int, threads: int,
            reference: list[dict] | None = None) -> list[dict]:
    """Per pair: free-running greedy tokens, and the visual tokens and logits fed the reference's tokens."""
    from sparsezip_deploy.runtime.pipeline import Pipeline

    out = []
    with Pipeline(engine, threads=threads, verify_checksums=False) as pipe:
        for i, (image, question) in enumerate(pairs):
            tokens = list(pipe.ask(image, question, new_tokens).token_ids)
            feed = reference[i]["tokens"] if reference else tokens
            visual, logits = forced(pipe, image, question, feed)
            out.append({"tokens": tokens, "visual": visual, "logits": logits})
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [..., D] arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def visual_cosine(ref, got) -> float:
    """Mean cosine of the visual tokens: slot by slot when the kept indices match, else the patches both kept."""
    if np.array_equal(ref.kept_index, got.kept_index):
        return float(cosine(ref.tokens, got.tokens).mean())
    common = np.intersect1d(ref.kept_index[ref.kept_index >= 0], got.kept_index[got.kept_index >= 0])
    row = {int(p): i for i, p in enumerate(got.kept_index)}
    ref_rows = [i for i, p in enumerate(ref.kept_index) if p in common]
    return float(cosine(ref.tokens[ref_rows], got.tokens[[row[int(ref.kept_index[i])] for i in ref_rows]]).mean())


def jaccard(ref, got) -> float:
    a, b = set(ref.kept_index[ref.kept_index >= 0].tolist()), set(got.kept_index[got.kept_index >= 0].tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def prefix_agreement(ref: list[int], got: list[int]) -> float:
    """Fraction of the reference's tokens reproduced before the first divergence."""
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return same / len(ref)


def fidelity(ref: list[dict], got: list[dict]) -> dict:
    per_image = {"kept_jaccard": [jaccard(r["visual"], g["visual"]) for r, g in zip(ref, got)],
                 "visual_cosine": [visual_cosine(r["visual"], g["visual"]) for r, g in zip(ref, got)],
                 "greedy_prefix_agreement": [prefix_agreement(r["tokens"], g["tokens"]) for r, g in zip(ref, got)],
                 "greedy_exact_match": [float(r["tokens"] == g["tokens"]) for r, g in zip(ref, got)]}
    logits_cos = np.concatenate([cosine(r["logits"], g["logits"]) for r, g in zip(ref, got)])
    top1 = np.concatenate([r["logits"].argmax(-1) == g["logits"].argmax(-1) for r, g in zip(ref, got)])
    report = {key: {"mean": float(np.mean(v)), "min": float(np.min(v))} for key, v in per_image.items()}
    report["logits_cosine"] = {"mean": float(logits_cos.mean()), "min": float(logits_cos.min())}
    report["forced_top1_agreement"] = float(top1.mean())
    report["positions"] = int(top1.size)
    return report


def heldout_accuracy(engines: dict[str, Path], reference: str, per_type: int | None, threads: int) -> dict | None:
    """accuracy.py's score on the held-out questions, when the reference's model was trained by train/."""
    from sparsezip_deploy.scenes.questions import HELDOUT_PER_TYPE, heldout
    from sparsezip_deploy.train.train import TRAINING_INFO

    model = Path(_manifest(engines[reference])["source"].get("path", ""))
    if per_type == 0 or not (model / TRAINING_INFO).is_file():
        return None
    examples = heldout(HELDOUT_PER_TYPE if per_type is None else per_type)
    return {name: score(run_engine(engine, examples, threads)[0], examples) for name, engine in engines.items()}


# -- report

def derive(report: dict[str, dict], reference: str) -> None:
    ref = report[reference]
    # No decode speed where an answer was one token (EOS first): then no decode speed-up either.
    ref_tps = (ref["decode_tokens_per_s"] or {}).get("median")
    for row in report.values():
        tps = (row["decode_tokens_per_s"] or {}).get("median")
        row.update(decode_speedup=tps / ref_tps if tps and ref_tps else None,
                   prefill_speedup=ref["prefill_ms"]["median"] / row["prefill_ms"]["median"],
                   vision_speedup=ref["vision_ms"]["median"] / row["vision_ms"]["median"],
                   weights_ratio=row["weights_bytes"] / ref["weights_bytes"])


def print_table(report: dict[str, dict]) -> None:
    print(f"{'engine':<12} {'vision':>8} {'prefill':>8} {'tok/s':>7} {'x':>5} {'weights':>9} {'peak RSS':>9} "
          f"{'jaccard':>7} {'vis cos':>7} {'logit cos':>9} {'top1':>5} {'prefix':>6} {'exact':>5}")
    for name, r in report.items():
        f, tps = r["fidelity"], (r["decode_tokens_per_s"] or {}).get("median", float("nan"))
        print(f"{name:<12} {r['vision_ms']['median']:>8.1f} {r['prefill_ms']['median']:>8.1f} "
              f"{tps:>7.2f} {r['decode_speedup'] or float('nan'):>4.2f}x "
              f"{r['weights_bytes'] / 2**20:>5.0f} MiB {r['peak_rss_bytes']['median'] / 2**30:>5.2f} GiB "
              f"{f['kept_jaccard']['mean']:>7.3f} {f['visual_cosine']['mean']:>7.4f} "
              f"{f['logits_cosine']['mean']:>9.5f} {f['forced_top1_agreement']:>5.2f} "
              f"{f['greedy_prefix_agreement']['mean']:>6.2f} {f['greedy_exact_match']['mean']:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build:
        engines = build_variants(args.work, args.size, args.methods[0], args.variants, args.model)
    else:
        engines = engines_by_name(args.engines)
    reference = reference_name(engines)
    runs = run_rounds(engines, args)
    report = {name: speed_row(runs[name], engines[name]) for name in engines}
    derive(report, reference)
    pairs = prompt_set(args.prompts)
    ref = answers(engines[reference], pairs, args.fidelity_tokens, args.threads)
    for name, engine in engines.items():
        report[name]["fidelity"] = fidelity(ref, ref if name == reference else
                                            answers(engine, pairs, args.fidelity_tokens, args.threads, ref))
    accuracy = heldout_accuracy(engines, reference, args.heldout_per_type, args.threads)
    for name, acc in (accuracy or {}).items():
        report[name]["heldout_accuracy"] = acc
        print(f"{name:<12} held-out accuracy {100 * acc['all']:5.1f}%")
    out = {"benchmark": "quant", "size": None if args.engines or args.model else args.size, "reference": reference,
           "engines": {name: str(path) for name, path in engines.items()},
           "conditions": {**conditions(args, engines), "reps": args.reps, "prompts": args.prompts,
                          "fidelity_tokens": args.fidelity_tokens, "fidelity_seed": FIDELITY_SEED},
           "variants": report, "goals": GOALS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_table(report)
    from plots import quant_bars

    print(f"wrote {quant_bars(report, reference, args.out.with_suffix('.png'))}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
