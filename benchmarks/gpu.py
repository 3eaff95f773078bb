"""Latency on a GPU: engines x runners (ORT CUDA EP, ORT TensorRT EP, native TensorRT), side by side.

    python benchmarks/gpu.py --engines E_none E_sparsezip ... [--runners cuda tensorrt-ep tensorrt]

For the fp16 path build the engines with `--llm-dtype float16 --vision-dtype
float16`; for the native runner run `sparsezip-build-trt E` on this device
first. Each (engine, runner) pair loads once, warms up (`--warmup` questions:
the TensorRT EP builds or loads its engine cache in the first), then answers
the same image and question `--reps` times; engines and runners interleave
round by round. Reported per pair: medians of vision ms, prefill ms, TTFT and
decode tokens/s, visual tokens kept, KV bytes, and the GPU memory in use after
the answer above what was in use before loading (cudaMemGetInfo: the process's
allocations plus the CUDA context, not a true peak). Speedups are against the
`none` engine on the same runner, where one was given.

A runner whose packages or GPU are missing is skipped with the reason, which
the JSON records; with none available the script says so and exits 0. `cpu`
(ORT's CPU EP) is a runner too, so that the script itself is tested on
machines without a GPU (tests/benchmarks/test_smoke.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import IMAGE, PROMPT, baseline_name, engines_by_name, manifest_of

RUNNERS = {  # name -> (backend, provider)
    "cpu": ("ort", "cpu"),
    "cuda": ("ort", "cuda"),
    "tensorrt-ep": ("ort", "tensorrt"),
    "tensorrt": ("tensorrt", "cpu"),
}
TIMED = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engines", type=Path, nargs="+", required=True)
    p.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=["cuda", "tensorrt-ep", "tensorrt"])
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    return p.parse_args(argv)


def unavailable(runner: str, engine: Path) -> str | None:
    """Why `runner` cannot run `engine` here, or None."""
    from sparsezip_deploy.runtime.errors import UserError

    backend, provider = RUNNERS[runner]
    try:
        if backend == "tensorrt":
            from sparsezip_deploy.runtime.backends.tensorrt import import_tensorrt
            from sparsezip_deploy.runtime.cuda import gpu_info
            import_tensorrt()
            gpu_info()
            if manifest_of(engine).tensorrt is None:
                return f"no plans in {engine.name}: run sparsezip-build-trt {engine}"
        elif provider != "cpu":
            from sparsezip_deploy.runtime.backends.ort import resolve_providers
            resolve_providers(provider)
    except UserError as e:
        return str(e)
    return None


def gpu_used_bytes() -> int | None:
    """Device memory in use (total - free) on GPU 0, or None without cuda-python or a GPU."""
    from sparsezip_deploy.runtime.errors import UserError
    try:
        from sparsezip_deploy.runtime import cuda
        free, total = cuda._call(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    except (UserError, ImportError):
        return None
    return int(total) - int(free)


def measure(engine: Path, runner: str, args: argparse.Namespace) -> dict:
    from sparsezip_deploy.runtime.pipeline import Pipeline

    backend, provider = RUNNERS[runner]
    before = gpu_used_bytes()
    t0 = time.perf_counter()
    # No image cache: every timed run asks about the same image and must run the vision graphs.
    pipe = Pipeline(engine, provider=provider, backend=backend, device_id=args.device_id, verify_checksums=False,
                    image_cache=0)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        pipe.ask(args.image, args.prompt, args.new_tokens)
    runs = [pipe.ask(args.image, args.prompt, args.new_tokens).to_json() for _ in range(args.reps)]
    after = gpu_used_bytes()
    pipe.close()
    row = {key: statistics.median(r[key] for r in runs if r[key] is not None) if any(r[key] for r in runs)
           else None for key in TIMED}
    row.update(load_s=round(load_s, 2), warmup_s=round(time.perf_counter() - t0, 2),
               visual_tokens_kept=runs[0]["visual_tokens_kept"], kv_bytes=runs[0]["kv_bytes"],
               gpu_bytes_in_use=None if before is None or after is None else after - before,
               answer=runs[0]["text"], reps=len(runs))
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = engines_by_name(args.engines)
    report = {"conditions": {"prompt": args.prompt, "image": str(args.image), "new_tokens": args.new_tokens,
                             "reps": args.reps, "warmup": args.warmup,
                             "precision": {n: dict(manifest_of(e).precision) for n, e in engines.items()}},
              "skipped": {}, "rows": {}}
    pairs = []
    for runner in args.runners:
        for name, engine in engines.items():
            reason = unavailable(runner, engine)
            if reason is None:
                pairs.append((name, runner))
            else:
                report["skipped"][f"{name} / {runner}"] = reason
                print(f"skip {name} on {runner}: {reason}", file=sys.stderr)
    for name, runner in pairs:
        print(f"measuring {name} on {runner}", file=sys.stderr, flush=True)
        report["rows"][f"{name} / {runner}"] = dict(engine=name, runner=runner,
                                                    **measure(engines[name], runner, args))
    derive(report, engines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not pairs:
        print("no runner could run here (reasons above); nothing measured", file=sys.stderr)
    print_table(report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def derive(report: dict, engines: dict[str, Path]) -> None:
    """TTFT and prefill speedups against the `none` engine on the same runner."""
    try:
        base = baseline_name(engines)
    except SystemExit:
        return
    for row in report["rows"].values():
        ref = report["rows"].get(f"{base} / {row['runner']}")
        if ref is not None:
            for key in ("ttft_ms", "prefill_ms"):
                row[f"{key.removesuffix('_ms')}_speedup"] = ref[key] / row[key] if row[key] else None


def print_table(report: dict) -> None:
    print("| engine | runner | vision ms | prefill ms | TTFT ms | decode tok/s | kept | GPU MiB | TTFT speedup |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in report["rows"].values():
        gpu = "n/a" if row["gpu_bytes_in_use"] is None else f"{row['gpu_bytes_in_use'] / 2**20:.0f}"
        speed = "n/a" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.1f}"
        ttft = row.get("ttft_speedup")
        print(f"| {row['engine']} | {row['runner']} | {row['vision_ms']:.1f} | {row['prefill_ms']:.1f} | "
              f"{row['ttft_ms']:.1f} | {speed} | {row['visual_tokens_kept']} | {gpu} | "
              f"{'-' if ttft is None else f'{ttft:.2f}x'} |")


if __name__ == "__main__":
    sys.exit(main())
