"""Peak memory of the runtime per engine, and what importing the runtime costs.

    python benchmarks/memory.py --build --work /tmp/szbench [--size vitl-0.5b]
    python benchmarks/memory.py --engines engines/a engines/b ...

Each engine runs one question in its own fresh runtime process
(common.measure), one after the other, so that no engine's peak mixes with
another's. The peak RSS (VmHWM) is split into the model's weights (the bytes
of the engine's graphs and embedding table), the KV cache the conversation
allocated, and the rest (activations, ORT arenas, Python, libraries); the goal
is peak <= 1.15 x (weights + KV). Also recorded: how much loading the engine
added and whether it sits on the heap (RssAnon: ORT's own copy) or in the file
mapping (RssFile: shared with the page cache); the runtime's import time and
RSS, and that torch was not imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import (DEFAULT_SIZE, check_engine_args, conditions, engine_parser, engines_by_name, ensure_engines,
                    measure, weight_bytes)

GOAL = 1.15


@dataclass(frozen=True)
class MemoryConfig:
    size: str = DEFAULT_SIZE
    new_tokens: int = 8
    threads: int = os.cpu_count() or 1
    out: Path = Path("benchmarks/results/memory.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = MemoryConfig()
    p = engine_parser(__doc__, d.size, d.new_tokens, d.threads, d.out)
    args = p.parse_args(argv)
    check_engine_args(p, args)
    args.warmup = 0  # a warm-up question would not raise the peak, only the run time
    return args


def split(fig: dict, engine: Path) -> dict:
    weights, kv, peak = weight_bytes(engine), fig["kv_bytes_allocated"], fig["end"]["peak"]
    imported, loaded = fig["imported"], fig["loaded"]
    return {
        "peak_rss_bytes": peak,
        "weights_bytes": weights,
        "kv_bytes_allocated": kv,
        "rest_bytes": peak - weights - kv,
        "peak_over_weights_kv": peak / (weights + kv),
        "load_added_bytes": {k: loaded[k] - imported[k] for k in ("rss", "anon", "file")},
        "after_answer_bytes": {k: fig["end"][k] for k in ("rss", "anon", "file")},
        "visual_tokens_kept": fig["visual_tokens_kept"],
        "prompt_tokens": fig["prompt_tokens"],
        "load_s": fig["load_s"],
        "import": {"s": fig["import_s"], "rss_added_bytes": imported["rss"] - fig["rss_start"],
                   "rss_bytes": imported["rss"], "torch_imported": fig["torch_imported"]},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = ensure_engines(args.work, args.size, args.methods) if args.build else engines_by_name(args.engines)
    report = {}
    for name, engine in engines.items():
        report[name] = split(measure(engine, args.image, args.prompt, args.new_tokens, 0, args.threads), engine)
        r = report[name]
        print(f"{name:<20} peak {r['peak_rss_bytes'] / 2**20:7.0f} MiB = weights {r['weights_bytes'] / 2**20:6.0f}"
              f" + KV {r['kv_bytes_allocated'] / 2**20:6.1f} + rest {r['rest_bytes'] / 2**20:6.0f}"
              f"  ({r['peak_over_weights_kv']:.3f}x; load added {r['load_added_bytes']['anon'] / 2**20:.0f} MiB"
              f" anon, {r['load_added_bytes']['file'] / 2**20:.0f} MiB file)", flush=True)
    imports = [r["import"] for r in report.values()]
    runtime_import = {"s_median": statistics.median(i["s"] for i in imports),
                      "rss_bytes_median": statistics.median(i["rss_bytes"] for i in imports),
                      "rss_added_bytes_median": statistics.median(i["rss_added_bytes"] for i in imports),
                      "torch_imported": any(i["torch_imported"] for i in imports)}
    print(f"runtime import: {runtime_import['s_median'] * 1e3:.0f} ms, RSS {runtime_import['rss_bytes_median'] / 2**20:.0f}"
          f" MiB (+{runtime_import['rss_added_bytes_median'] / 2**20:.0f} MiB), torch imported: "
          f"{runtime_import['torch_imported']}")
    out = {"benchmark": "memory", "size": args.size if args.build else None,
           "engines": {name: str(path) for name, path in engines.items()},
           "conditions": conditions(args, engines), "runtime_import": runtime_import, "methods": report,
           "goals": {"peak_over_weights_kv": f"<= {GOAL}", "torch_imported": False}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    from plots import memory_bars

    print(f"wrote {memory_bars(report, args.out.with_suffix('.png'))}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
