"""Prefill, time to first token and KV bytes of none / VisionZip / SparseZip, side by side.

    python benchmarks/prefill.py --work /tmp/sz-bench [--size vitl-0.5b] [--reps 5]

Builds (once, reused on later runs) a random-init LLaVA at realistic widths
(CLIP ViT-L/14-336 and a ~0.5B Llama decoder), an engine per method with
export/build.py, then times the runtime's Pipeline on the same image and
prompt, interleaved, after warm-up. Reports prefill speedup against the ideal
token ratio (prompt positions without / with compression) and checks that
the KV cache holds exactly (prompt + generated - 1) x per-token bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
from pathlib import Path

from sparsezip_deploy.export.manifest import tool_versions
from sparsezip_deploy.export.tiny import TinyConfig, build_tiny
from sparsezip_deploy.runtime.pipeline import Pipeline

from common import cpu_model

SIZES = {
    "tiny": TinyConfig(),
    # ViT-L/14-336 as in LLaVA-1.5; a 24-layer 1280-wide MHA Llama (0.48B without embeddings).
    "vitl-0.5b": TinyConfig(vision_hidden=1024, vision_heads=16, vision_layers=24, vision_mlp=4096,
                            llm_hidden=1280, llm_heads=20, llm_kv_heads=20, llm_layers=24, llm_mlp=3456,
                            qk_scale=1.0),
}
METHODS = {
    "none": ["--method", "none"],
    "visionzip-64": ["--method", "visionzip"],
    "sparsezip-64": ["--method", "sparsezip", "--beta", "0"],
    "sparsezip-64-text": ["--method", "sparsezip"],
}
PROMPT = "What colour is the small circle in the middle of the picture?"

def ensure_engines(work: Path, size: str) -> dict[str, Path]:
    from sparsezip_deploy.export import build

    model = work / f"model-{size}"
    if not (model / "sparsezip_tiny.json").exists():
        print(f"building the random {size} model in {model}", flush=True)
        build_tiny(model, tiny=SIZES[size])
    engines = {}
    for name, options in METHODS.items():
        out = work / "engines" / f"{size}-{name}"
        if not (out / "manifest.json").exists():
            print(f"building engine {out.name}", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                if build.main(["--model", str(model), "--out", str(out), "--force", *options]) != 0:
                    raise SystemExit(f"building {out.name} failed")
        engines[name] = out
    return engines

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="where the model and engines are built and kept")
    p.add_argument("--size", choices=list(SIZES), default="vitl-0.5b")
    p.add_argument("--image", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "shapes.png")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill.json"))
    args = p.parse_args(argv)

    engines = ensure_engines(args.work, args.size)
    pipes = {name: Pipeline(path, threads=args.threads, verify_checksums=False) for name, path in engines.items()}
    runs = {name: [] for name in pipes}
    for rep in range(args.warmup + args.reps):
        for name, pipe in pipes.items():
            result = pipe.ask(args.image, PROMPT, args.new_tokens)
            if rep >= args.warmup:
                runs[name].append(result)

    report = {}
    for name, results in runs.items():
        r = results[-1]
        per_token = pipes[name].engine.llm.kv_bytes_per_token
        report[name] = {
            "visual_tokens_kept": r.visual_tokens_kept,
            "prompt_tokens": r.prompt_tokens,
            "vision_ms": statistics.median(x.vision_ms for x in results),
            "prefill_ms": statistics.median(x.prefill_ms for x in results),
            "prefill_ms_min": min(x.prefill_ms for x in results),
            "ttft_ms": statistics.median(x.ttft_ms for x in results),
            "kv_bytes": r.kv_bytes,
            "kv_bytes_uncompressed": r.kv_bytes_uncompressed,
            "kv_bytes_per_token": per_token,
            "kv_exact": r.kv_bytes == (r.prompt_tokens + len(r.token_ids) - 1) * per_token,
        }
    base = report["none"]
    for name, row in report.items():
        ideal = base["prompt_tokens"] / row["prompt_tokens"]
        speedup = base["prefill_ms"] / row["prefill_ms"]
        row.update(ideal_ratio=ideal, prefill_speedup=speedup, fraction_of_ideal=speedup / ideal,
                   ttft_speedup=base["ttft_ms"] / row["ttft_ms"],
                   kv_saved_pct=100.0 * (1 - row["kv_bytes"] / row["kv_bytes_uncompressed"]))
    out = {"benchmark": "prefill", "size": args.size, "prompt": PROMPT,
           "conditions": {"image": args.image.name, "batch": 1, "new_tokens": args.new_tokens, "reps": args.reps,
                          "warmup": args.warmup, "threads": args.threads, "provider": "CPUExecutionProvider",
                          "dtype": "float32", "cpu": cpu_model(), "versions": tool_versions()},
           "methods": report,
           "goals": {"fraction_of_ideal": ">= 0.9", "kv_exact": True}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'method':<18} {'kept':>5} {'prompt':>6} {'vision ms':>10} {'prefill ms':>11} {'TTFT ms':>9} "
          f"{'speedup':>8} {'ideal':>6} {'frac':>5} {'KV MiB':>7} {'saved':>6} exact")
    for name, r in report.items():
        print(f"{name:<18} {r['visual_tokens_kept']:>5} {r['prompt_tokens']:>6} {r['vision_ms']:>10.1f} "
              f"{r['prefill_ms']:>11.1f} {r['ttft_ms']:>9.1f} {r['prefill_speedup']:>7.2f}x {r['ideal_ratio']:>5.2f}x "
              f"{r['fraction_of_ideal']:>5.2f} {r['kv_bytes'] / 2**20:>7.2f} {r['kv_saved_pct']:>5.1f}% {r['kv_exact']}")
    print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
