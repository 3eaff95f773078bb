"""Two questions about one image: the vision ms of each, fused graph vs split trunk + selector, cache off vs on.

    flock /tmp/sz-cpu.lock python benchmarks/image_cache.py --build --work /tmp/szbench   # vitl-0.5b
    python benchmarks/image_cache.py --engines FUSED SPLIT                                # text-aware engines

A text-aware sparsezip engine in the split layout (build.py's default) runs CLIP (vision_trunk)
once per image and the selection (vision_selector) once per question; the
Pipeline keeps the trunk's outputs of recent images (runtime/vision.py). Each
configuration runs in a fresh runtime process (no torch): a warm-up question
about another image (the flipped picture), then question 1 and question 2, two
different prompts, about `--image`, as two conversations (`Pipeline.ask`).
Configurations, interleaved round after round: the fused engine (its text-aware
output cannot be cached), the split engine with the cache off (image_cache=0)
and on (the default). Reported per configuration: median vision ms of question
1 and 2, whether each hit the cache, prefill and TTFT, and whether every
configuration gave the same answers (it must).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_SIZE, IMAGE, SIZES, conditions, ensure_engines, manifest_of

QUESTIONS = ("What colour is the small circle in the middle of the picture?",
             "Is there a blue square to the left of the red triangle?")
FUSED, SPLIT = "sparsezip-64-text", "sparsezip-64-text-split"
CONFIGS = (("fused", FUSED, 8), ("split, cache off", SPLIT, 0), ("split, cache on", SPLIT, 8))
FIGURES = ("vision_ms", "prefill_ms", "ttft_ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--engines", type=Path, nargs=2, metavar=("FUSED", "SPLIT"),
                       help="a text-aware engine folder built with --no-split-vision and the same split")
    which.add_argument("--build", action="store_true", help=f"build (or reuse) {FUSED} and {SPLIT} in --work")
    p.add_argument("--work", type=Path, help="with --build: where the model and engines are kept")
    p.add_argument("--size", choices=list(SIZES), default=DEFAULT_SIZE)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also measure (and with --build, build) the fused {FUSED} engine")
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="rounds; each runs every configuration once")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/image_cache.json"))
    args = p.parse_args(argv)
    if args.build and args.work is None:
        p.error("--build needs --work")
    if min(args.reps, args.new_tokens) < 1:
        p.error("--reps and --new-tokens must be >= 1")
    return args


def _child(argv: list[str]) -> dict:
    """One runtime process: a warm-up about another image, then the two questions about `image`."""
    engine, image, cache, new_tokens, threads = argv
    from PIL import Image

    from sparsezip_deploy.runtime.pipeline import Pipeline

    picture = Image.open(image).convert("RGB")
    with Pipeline(engine, threads=int(threads), verify_checksums=False, image_cache=int(cache)) as pipe:
        pipe.ask(picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), QUESTIONS[0], int(new_tokens))
        answers = [pipe.ask(picture, question, int(new_tokens)) for question in QUESTIONS]
    return {"questions": [{**{k: getattr(r, k) for k in FIGURES}, "vision_cached": r.vision_cached,
                           "token_ids": list(r.token_ids), "visual_tokens_kept": r.visual_tokens_kept}
                          for r in answers], "torch_imported": "torch" in sys.modules}


def measure(engine: Path, image: Path, cache: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", str(engine), str(image), str(cache), str(args.new_tokens),
           str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the runtime process on {engine} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    report = {}
    for name, rounds in runs.items():
        row = {}
        for q in range(len(QUESTIONS)):
            figures = [r["questions"][q] for r in rounds]
            row[f"question_{q + 1}"] = {
                **{k: statistics.median(f[k] for f in figures) for k in FIGURES},
                "vision_ms_all": [round(f["vision_ms"], 1) for f in figures],
                "vision_cached": sorted({f["vision_cached"] for f in figures})}
        row["torch_imported"] = any(r["torch_imported"] for r in rounds)
        report[name] = row
    answers = {name: [[q["token_ids"] for q in r["questions"]] for r in rounds] for name, rounds in runs.items()}
    first = next(iter(answers.values()))[0]
    report["same_answers"] = all(a == first for rounds in answers.values() for a in rounds)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build:
        engines = ensure_engines(args.work, args.size, [FUSED, SPLIT] if args.fused else [SPLIT])
    else:
        engines = dict(zip((FUSED, SPLIT), args.engines))
    configs = [c for c in CONFIGS if c[1] in engines]
    for name, engine in engines.items():
        manifest = manifest_of(engine)
        if not manifest.vision.text_aware or manifest.vision_split != (name == SPLIT):
            raise SystemExit(f"error: {engine} must be a text-aware engine{' built with --split-vision' * (name == SPLIT)}"
                             f"{' built with --no-split-vision' * (name == FUSED)}")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for rep in range(args.reps):
        for name, engine, cache in configs:
            runs[name].append(measure(engines[engine], args.image, cache, args))
        print(f"round {rep + 1}/{args.reps} done", flush=True)
    report = summarise(runs)
    out = {"benchmark": "image_cache", "size": args.size if args.build else None,
           "engines": {name: str(path) for name, path in engines.items()}, "questions": list(QUESTIONS),
           "conditions": {**conditions(argparse.Namespace(**vars(args), prompt=" / ".join(QUESTIONS), warmup=1),
                                       engines), "reps": args.reps}, "configs": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'configuration':<18} {'q1 vision':>10} {'q2 vision':>10} {'q2 cached':>9} {'q1 TTFT':>9} {'q2 TTFT':>9}")
    for name, _, _ in configs:
        q1, q2 = report[name]["question_1"], report[name]["question_2"]
        print(f"{name:<18} {q1['vision_ms']:>8.1f}ms {q2['vision_ms']:>8.1f}ms {str(q2['vision_cached']):>9} "
              f"{q1['ttft_ms']:>7.1f}ms {q2['ttft_ms']:>7.1f}ms")
    print(f"same answers in every configuration: {report['same_answers']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(sys.argv[2:])))
    else:
        sys.exit(main())
