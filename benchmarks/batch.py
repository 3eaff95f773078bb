"""Batched decoding: B questions answered together against the same B answered one after another.

    python benchmarks/batch.py --build --work /tmp/szbench [--size vitl-0.5b] [--method sparsezip-64]
    python benchmarks/batch.py --engine engines/some-engine [--batch 4]

B generated scenes, each with its own question (different prompt lengths and,
with a dynamic K, different numbers of visual tokens). In one fresh runtime
process (no torch), after a warm-up: round after round, the B questions one
after another (`Pipeline.ask`), then all at once (`Pipeline.ask_batch`), greedy,
`--new-tokens` each. Decode tokens/s: tokens after each row's first / decode
time (batch: first token to the last row's last). Also reported: prefill and
TTFT of both, and whether every batched answer equals the one given alone (it
must). Goal: batch decode >= 2.5x the sequential one at B = 4 (the weights are
read once per step for the B rows). Reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import (DEFAULT_SIZE, METHODS, SIZES, conditions, ensure_engines, manifest_of, measure_bandwidth)

GOAL = 2.5
QUESTIONS = ("What colour is the small circle in the middle of the picture?", "Is there a blue square?",
             "How many shapes are there?", "Where is the yellow star, on the left or on the right?",
             "Which shape is the smallest one?", "Is the triangle above the circle?",
             "What colour is the large star?", "Are there two circles?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--engine", type=Path, help="an engine folder")
    which.add_argument("--build", action="store_true", help="build (or reuse) the engine of --method in --work")
    p.add_argument("--work", type=Path, help="with --build: where the model and engines are kept")
    p.add_argument("--size", choices=list(SIZES), default=DEFAULT_SIZE)
    p.add_argument("--method", choices=list(METHODS), default="sparsezip-64")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=5, help="scene generator seed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/batch.json"))
    args = p.parse_args(argv)
    if args.build and args.work is None:
        p.error("--build needs --work")
    if not 1 <= args.batch <= len(QUESTIONS) or min(args.reps, args.new_tokens) < 1:
        p.error(f"--batch must be 1..{len(QUESTIONS)}, --reps and --new-tokens >= 1")
    return args


def scenes(folder: Path, count: int, seed: int) -> list[Path]:
    import numpy as np

    from sparsezip_deploy.scenes.scene import render, sample_scene

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, _ = render(sample_scene(rng))
        image.save(folder / f"scene{i}.png")
        paths.append(folder / f"scene{i}.png")
    return paths


def measure(engine: Path, images: list[Path], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(engine), str(args.new_tokens), str(args.reps),
           str(args.threads), *map(str, images)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the runtime process on {engine} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _decode_rate(results) -> float | None:
    """Decoded tokens after each row's first / the time from the first token to the last one."""
    tokens = sum(len(r.token_ids) - 1 for r in results)
    seconds = sum(r.decode_ms for r in results) / 1e3 if results[0].batch == 1 else \
        max(r.decode_ms for r in results) / 1e3
    return tokens / seconds if seconds > 0 and tokens else None


def _child(argv: list[str]) -> dict:
    engine, new_tokens, reps, threads, *images = argv
    new_tokens, reps, threads = int(new_tokens), int(reps), int(threads)
    from sparsezip_deploy.runtime.pipeline import Pipeline

    prompts = list(QUESTIONS[:len(images)])
    rounds = []
    # No image cache: the rounds ask about the same images and must run the vision graph each time.
    with Pipeline(engine, threads=threads, verify_checksums=False, image_cache=0) as pipe:
        pipe.ask_batch(images, prompts, new_tokens)  # warm-up: arenas, threads, page cache
        for _ in range(reps):
            alone = [pipe.ask(image, prompt, new_tokens) for image, prompt in zip(images, prompts)]
            batch = pipe.ask_batch(images, prompts, new_tokens)
            rounds.append({
                "sequential_tokens_per_s": _decode_rate(alone), "batch_tokens_per_s": _decode_rate(batch),
                "sequential_prefill_ms": sum(r.prefill_ms for r in alone), "batch_prefill_ms": batch[0].prefill_ms,
                "sequential_ttft_ms": [r.ttft_ms for r in alone], "batch_ttft_ms": batch[0].ttft_ms,
                "equal_answers": all(a.token_ids == b.token_ids for a, b in zip(alone, batch)),
                "visual_tokens_kept": [r.visual_tokens_kept for r in batch],
                "prompt_tokens": [r.prompt_tokens for r in batch],
                "generated_tokens": [len(r.token_ids) for r in batch],
                "kv_bytes_allocated_batch": batch[0].kv_bytes_allocated,
                "peak_rss_bytes": batch[0].peak_rss_bytes,
            })
    return {"rounds": rounds, "torch_imported": "torch" in sys.modules}


def summarise(child: dict) -> dict:
    rounds = child["rounds"]
    speedups = [r["batch_tokens_per_s"] / r["sequential_tokens_per_s"] for r in rounds]

    def med(key):
        return statistics.median(r[key] for r in rounds)

    return {"sequential_tokens_per_s": med("sequential_tokens_per_s"), "batch_tokens_per_s": med("batch_tokens_per_s"),
            "speedup": statistics.median(speedups), "speedup_range": [min(speedups), max(speedups)],
            "sequential_prefill_ms": med("sequential_prefill_ms"), "batch_prefill_ms": med("batch_prefill_ms"),
            "equal_answers": all(r["equal_answers"] for r in rounds),
            **{k: rounds[-1][k] for k in ("visual_tokens_kept", "prompt_tokens", "generated_tokens",
                                           "kv_bytes_allocated_batch", "peak_rss_bytes")},
            "torch_imported": child["torch_imported"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build:
        engine = ensure_engines(args.work, args.size, [args.method])[args.method]
        work = args.work
    else:
        engine, work = args.engine, args.out.parent
        manifest_of(engine)  # a clear error for a folder that is not an engine
    images = scenes(work / "batch-scenes", args.batch, args.seed)
    child = measure(engine, images, args)
    report = summarise(child)
    args.image, args.prompt, args.warmup = images[0], QUESTIONS[0], 1
    out = {"benchmark": "batch", "engine": str(engine), "size": args.size if args.build else None,
           "conditions": {**conditions(args, {engine.name: engine}), "batch": args.batch, "reps": args.reps,
                          "prompts": list(QUESTIONS[:args.batch]), "images": [str(i) for i in images],
                          "bandwidth": measure_bandwidth(args.threads)},
           "rounds": child["rounds"], "summary": report, "goals": {"speedup": f">= {GOAL}", "equal_answers": True}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"batch {args.batch}: decode {report['batch_tokens_per_s']:.1f} tok/s against "
          f"{report['sequential_tokens_per_s']:.1f} one after another: {report['speedup']:.2f}x "
          f"(rounds {report['speedup_range'][0]:.2f}-{report['speedup_range'][1]:.2f}x; goal >= {GOAL}); "
          f"prefill {report['batch_prefill_ms']:.0f} ms against {report['sequential_prefill_ms']:.0f} ms; "
          f"visual tokens {report['visual_tokens_kept']}; answers equal: {report['equal_answers']}")
    from plots import batch_bars

    print(f"wrote {batch_bars(out, args.out.with_suffix('.png'))}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(sys.argv[2:])))
    else:
        raise SystemExit(main())
