"""Latency and KV cache of none / VisionZip / SparseZip / in-LLM pruned engines, side by side.

    python benchmarks/latency.py --build --work /tmp/szbench [--size vitl-0.5b] [--reps 5]
    python benchmarks/latency.py --engines engines/a engines/b ...   # one of them method none

`--build` makes (once, reused later) a random-init LLaVA at realistic widths
(CLIP ViT-L/14-336 + a Llama decoder of `--size`) and an engine per method of
common.METHODS. Each engine then answers the same image and prompt in a fresh
runtime process (common.measure), round after round, engines interleaved so
that load drifts hit all alike; every process warms up before its timed
question. Reported per engine: medians and spread of vision ms, the
compression's share of it (ORT per-node profile of the vision graph), prefill
ms, TTFT, decode tokens/s, peak RSS; visual tokens kept and KV bytes. Derived
against `none`: prefill speedup, that speedup as a fraction of the ideal
token ratio (prompt positions without / with compression), TTFT speedup, KV
saved. And the decode step against this machine's memory bandwidth: after each
engine's process, a fresh one measures the read bandwidth (common.measure_bandwidth,
a float32 GEMV over 1 GiB); the step's ideal is the time that reading the LLM's
weights and the KV cache once takes at that bandwidth. Goals are reported, never
asserted.

In-LLM pruning (common.PRUNE_METHODS: FastV, SparseVLM, SparseZip + SparseVLM;
only when named in --methods): the LLM drops visual tokens after some layers, so
its KV cache has one layer group per stage. Per engine also: each group's
layers, visual tokens carried, positions held (its bytes / (layers x 2 x
kv_heads x head_dim x itemsize)) and bytes, the layer average of visual tokens,
and whether the KV bytes are exactly the sum over groups of positions x layers
x per-layer-token bytes. Their "ideal" token ratio is not defined (the first
layers see every patch): prefill and TTFT speedups are reported with the
layer-token ratio (prompt positions of none / text + layer-average visual)
beside them, fraction_of_ideal is null, and the prefill-speedup plot leaves
them out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import (DEFAULT_SIZE, baseline_name, check_engine_args, conditions, engine_parser, engines_by_name,
                    ensure_engines, llm_weight_bytes, manifest_of, measure, measure_bandwidth)

TIMED = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")
GOALS = {"fraction_of_ideal_at_64": ">= 0.9", "compression_share_of_vision": "<= 0.01",
         "kv_bytes": "== positions x per-token bytes (visual part: kept x per-token); in-LLM pruning: "
                     "== sum over cache groups of positions_g x layers_g x 2 x kv_heads x head_dim x itemsize",
         "none_decode_step_over_bandwidth_ideal": "<= 1.15"}


@dataclass(frozen=True)
class LatencyConfig:
    size: str = DEFAULT_SIZE
    reps: int = 5
    warmup: int = 1
    new_tokens: int = 8
    profile_runs: int = 3  # vision runs profiled per engine, in the last round
    threads: int = os.cpu_count() or 1
    out: Path = Path("benchmarks/results/latency.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = LatencyConfig()
    p = engine_parser(__doc__, d.size, d.new_tokens, d.threads, d.out, in_llm=True)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--profile-runs", type=int, default=d.profile_runs)
    args = p.parse_args(argv)
    check_engine_args(p, args)
    if args.build and "none" not in args.methods:
        p.error("--methods must include none: the speedups are relative to it")
    if min(args.reps, args.profile_runs) < 1:
        p.error("--reps and --profile-runs must be >= 1 (the compression share comes from the profile)")
    return args


def run_rounds(engines: dict[str, Path], args: argparse.Namespace, profile_dir: Path) -> dict[str, list[dict]]:
    names = list(engines)
    runs = defaultdict(list)
    for rep in range(args.reps):
        # Rotating the order keeps any engine from always following the same neighbour.
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            last = rep == args.reps - 1
            fig = measure(engines[name], args.image, args.prompt, args.new_tokens, args.warmup, args.threads,
                          args.profile_runs if last else 0, profile_dir)
            fig["bandwidth"] = measure_bandwidth(args.threads)  # right after: the same machine state
            runs[name].append(fig)
            print(f"round {rep + 1}/{args.reps} {name:<20} vision {fig['vision_ms']:8.1f} ms  "
                  f"prefill {fig['prefill_ms']:8.1f} ms  TTFT {fig['ttft_ms']:8.1f} ms  "
                  f"decode {fig['decode_tokens_per_s'] or 0:5.1f} tok/s  "
                  f"bandwidth {fig['bandwidth']['median_gb_s']:5.1f} GB/s", flush=True)
    return runs


def vision_split(trace: Path, model: Path) -> dict[str, float]:
    """ms per run of the vision graph's nodes: encoder / compression / projector (+ unattributed).

    The exporter records, per node, the line of VisionGraph.forward it came from;
    ORT keeps the original node name before the first '/' when it fuses nodes.
    Layout nodes ORT inserts itself (NCHWc reorders) have no origin: unattributed.
    """
    import onnx

    part = {}
    for node in onnx.load(str(model)).graph.node:
        line = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
        part[node.name] = ("encoder" if "self.encode(" in line else
                           "compression" if "self.compressor(" in line or "project_text_to_vision(" in line
                           else "projector")
    events = json.loads(trace.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    after_warmup = runs[0]["ts"] + runs[0]["dur"]
    us = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after_warmup:
            us[part.get(e["name"].split("/")[0].removesuffix("_kernel_time"), "unattributed")] += e["dur"]
    split = {k: us[k] / 1e3 / (len(runs) - 1) for k in ("encoder", "compression", "projector", "unattributed")}
    split["share_of_vision"] = split["compression"] / sum(split.values())
    return split


def spread(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: dict[str, list[dict]], engines: dict[str, Path]) -> dict[str, dict]:
    report = {}
    for name, figs in runs.items():
        last = figs[-1]
        row = {key: spread([f[key] for f in figs]) for key in TIMED}
        # VmHWM, not the Result's getrusage figure: Linux carries ru_maxrss across execve, so a
        # process started by this (torch-importing) script would report this script's peak.
        row["peak_rss_bytes"] = spread([f["end"]["peak"] for f in figs])
        if "profile" in last:
            vision_file = manifest_of(engines[name]).graphs["vision"].file
            row["vision_split_ms"] = vision_split(Path(last["profile"]), engines[name] / vision_file)
        else:  # a split engine (vision_trunk + vision_selector): no one graph to attribute nodes in
            row["vision_split_ms"] = None
        per_token, positions = last["kv_bytes_per_token"], last["prompt_tokens"] + len(last["token_ids"]) - 1
        row.update({k: last[k] for k in ("visual_tokens_kept", "visual_tokens_total", "prompt_tokens",
                                         "prompt_text_tokens", "kv_bytes", "kv_bytes_fed", "kv_bytes_allocated",
                                         "kv_bytes_uncompressed", "kv_bytes_per_token")})
        row["generated_tokens"] = len(last["token_ids"])
        row.update(kv_groups(last, engines[name]))
        row["kv_exact"] = (last["kv_bytes_fed"] == last["kv_bytes"] == positions * per_token and
                           last["kv_bytes_uncompressed"] - last["kv_bytes"] ==
                           (last["visual_tokens_total"] - last["visual_tokens_kept"]) * per_token) \
            if row["pruning"] is None else row["kv_groups_exact"]
        row["kv_visual_bytes"] = sum(g["visual_tokens"] * g["num_layers"] for g in row["kv_groups"]) \
            * row["kv_bytes_per_layer_token"]
        row["decode_step"] = decode_step(figs, llm_weight_bytes(engines[name]))
        report[name] = row
    return report


def kv_groups(last: dict, engine: Path) -> dict:
    """The KV cache per layer group of the timed answer (one group without in-LLM pruning).

    Per group: its layers, the visual tokens its layers carry (the manifest's stages), the
    positions it holds measured from its bytes (bytes / (layers x per-layer-token bytes)) and
    those expected (the prompt and answer positions of group 0, minus what the stages
    dropped). Exact when every group's bytes are whole positions, are what is expected, sum
    to kv_bytes, and the bytes saved against all patches in every layer are the dropped
    visual tokens' of each group.
    """
    llm = manifest_of(engine).llm
    layer_token = 2 * llm.num_kv_heads * llm.head_dim * llm.np_dtype.itemsize  # K and V, one layer, one position
    positions = last["prompt_tokens"] + len(last["token_ids"]) - 1  # group 0: every position, never pruned
    kept, total = last["visual_tokens_kept"], last["visual_tokens_total"]
    measured = list(last.get("kv_bytes_groups") or [last["kv_bytes"]])
    groups, exact = [], len(measured) == len(llm.cache.groups)
    for index, (spec, nbytes) in enumerate(zip(llm.cache.groups, measured)):
        carried = kept if index == 0 or llm.pruning is None else llm.pruning.carried(index)
        expected = positions - kept + carried
        held, rest = divmod(nbytes, len(spec.layers) * layer_token)
        exact = exact and rest == 0 and held == expected
        groups.append({"layers": [spec.layers[0], spec.layers[-1]], "num_layers": len(spec.layers),
                       "visual_tokens": carried, "positions": held, "positions_expected": expected, "bytes": nbytes})
    exact = (exact and sum(measured) == last["kv_bytes"] == last["kv_bytes_fed"] and
             sum(g["positions_expected"] * g["num_layers"] for g in groups) * layer_token == last["kv_bytes"] and
             last["kv_bytes_uncompressed"] - last["kv_bytes"] ==
             sum((total - g["visual_tokens"]) * g["num_layers"] for g in groups) * layer_token)
    pruning = llm.pruning
    return {
        "pruning": None if pruning is None else {
            "method": pruning.method, "visual_slots": pruning.visual_slots, "config": dict(pruning.config),
            "stages": [{"after": st.after, "keep": st.keep, "merged": st.merged} for st in pruning.stages]},
        "kv_groups": groups, "kv_groups_exact": exact, "kv_bytes_per_layer_token": layer_token,
        # What the LLM's layers carry on average (recycled tokens included); = kept without pruning.
        "visual_tokens_layer_average": sum(g["visual_tokens"] * g["num_layers"] for g in groups) / llm.num_layers,
    }


def decode_step(figs: list[dict], weight_bytes: int) -> dict:
    """The decode step against the bandwidth measured right after it, round by round.

    A step reads the LLM's weights and the KV cache once at best; the KV it reads is
    the mean over the answer's steps (prompt + 0 .. generated - 2 positions): the prompt's
    KV as the cache holds it (in-LLM pruning: fewer positions in later layer groups) and
    each generated position in every layer.
    """
    steps, ideals, rates = [], [], []
    for f in figs:
        if not f["decode_tokens_per_s"]:
            continue
        generated = len(f["token_ids"])
        read = weight_bytes + _prompt_kv_bytes(f) + (generated - 2) / 2 * f["kv_bytes_per_token"]
        rate = f["bandwidth"]["median_gb_s"]
        steps.append(1e3 / f["decode_tokens_per_s"])
        ideals.append(read / (rate * 1e9) * 1e3)
        rates.append(rate)
    last = figs[-1]
    return {"ms": spread(steps), "ideal_ms": spread(ideals), "bandwidth_gb_s": spread(rates),
            "over_ideal": spread([s / i for s, i in zip(steps, ideals)]), "weight_bytes": weight_bytes,
            "kv_bytes_first_step": _prompt_kv_bytes(last),
            "bandwidth_kernel": last["bandwidth"]["kernel"]}


def _prompt_kv_bytes(f: dict) -> int:
    """The KV of the prompt alone: the answer's positions (all but the last token's) hold every layer."""
    return f["kv_bytes"] - (len(f["token_ids"]) - 1) * f["kv_bytes_per_token"]


def derive(report: dict[str, dict], base: str) -> None:
    """Speedups and savings against `base`, in place; each row's figures are medians."""
    b = report[base]
    for row in report.values():
        speedup = b["prefill_ms"]["median"] / row["prefill_ms"]["median"]
        # In-LLM pruning: the first layers see every patch, so no token ratio is "ideal"; the
        # layer-token ratio (cost linear in layers x tokens, ranking and attention's square aside)
        # is reported beside the speedup. Without pruning the two ratios are the same.
        text = row["prompt_tokens"] - row["visual_tokens_kept"]
        layer_tokens = b["prompt_tokens"] / (text + row["visual_tokens_layer_average"])
        ideal = b["prompt_tokens"] / row["prompt_tokens"] if row["pruning"] is None else None
        saved = row["kv_bytes_uncompressed"] - row["kv_bytes"]
        split = row["vision_split_ms"]
        row.update(ideal_ratio=ideal, prefill_speedup=speedup,
                   fraction_of_ideal=None if ideal is None else speedup / ideal,
                   layer_token_ratio=layer_tokens, ttft_speedup=b["ttft_ms"]["median"] / row["ttft_ms"]["median"],
                   kv_saved_bytes=saved, kv_saved_pct=100.0 * saved / row["kv_bytes_uncompressed"],
                   kv_saved_vs_baseline_bytes=b["kv_bytes"] - row["kv_bytes"],
                   compression_ms=None if split is None else split["share_of_vision"] * row["vision_ms"]["median"])


def print_decode_table(report: dict[str, dict]) -> None:
    print(f"{'method':<20} {'step ms':>8} {'ideal ms':>8} {'GB/s':>6} {'over ideal':>10}")
    for name, r in report.items():
        d = r["decode_step"]
        if d["ms"] is None:
            continue
        print(f"{name:<20} {d['ms']['median']:>8.1f} {d['ideal_ms']['median']:>8.1f} "
              f"{d['bandwidth_gb_s']['median']:>6.1f} {d['over_ideal']['median']:>9.2f}x")


def print_table(report: dict[str, dict]) -> None:
    print(f"{'method':<20} {'kept':>4} {'vision':>8} {'compr':>6} {'prefill':>8} {'TTFT':>8} {'tok/s':>6} "
          f"{'KV MiB':>7} {'saved':>6} {'speedup':>7} {'ideal':>6} {'frac':>5} {'peak RSS':>9} exact")
    for name, r in report.items():
        tps = r["decode_tokens_per_s"]
        ideal, frac = (f"{r['ideal_ratio']:>5.2f}x", f"{r['fraction_of_ideal']:>5.2f}") \
            if r["ideal_ratio"] is not None else (f"{'-':>6}", f"{'-':>5}")
        print(f"{name:<20} {r['visual_tokens_kept']:>4} {r['vision_ms']['median']:>8.1f} "
              f"{_share(r['vision_split_ms'])} {r['prefill_ms']['median']:>8.1f} "
              f"{r['ttft_ms']['median']:>8.1f} {tps['median'] if tps else float('nan'):>6.2f} "
              f"{r['kv_bytes'] / 2**20:>7.2f} {r['kv_saved_pct']:>5.1f}% {r['prefill_speedup']:>6.2f}x "
              f"{ideal} {frac} {r['peak_rss_bytes']['median'] / 2**30:>5.2f} GiB {r['kv_exact']}")


def _share(split: dict | None) -> str:
    return f"{'-':>6}" if split is None else f"{100 * split['share_of_vision']:>5.2f}%"


def print_group_table(report: dict[str, dict]) -> None:
    """Per engine: visual tokens and KV MiB per cache layer group (layers a-b), the layer average."""
    print(f"{'method':<24} {'avg':>6} {'L-tok':>6} {'prefill':>7} {'TTFT':>7} {'KV saved':>8} groups "
          "(layers: visual tokens, positions, KV MiB)")
    for name, r in report.items():
        groups = "  ".join(f"{g['layers'][0]}-{g['layers'][1]}: {g['visual_tokens']}, {g['positions']}, "
                           f"{g['bytes'] / 2**20:.2f}" for g in r["kv_groups"])
        print(f"{name:<24} {r['visual_tokens_layer_average']:>6.1f} {r['layer_token_ratio']:>5.2f}x "
              f"{r['prefill_speedup']:>6.2f}x {r['ttft_speedup']:>6.2f}x {r['kv_saved_pct']:>7.1f}% {groups}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build:
        engines = ensure_engines(args.work, args.size, args.methods)
    else:
        engines = engines_by_name(args.engines)
    base = baseline_name(engines)
    with tempfile.TemporaryDirectory() as profile_dir:
        runs = run_rounds(engines, args, Path(profile_dir))
        report = summarise(runs, engines)
    derive(report, base)
    out = {"benchmark": "latency", "size": args.size if args.build else None, "baseline": base,
           "engines": {name: str(path) for name, path in engines.items()},
           "conditions": {**conditions(args, engines), "reps": args.reps}, "methods": report, "goals": GOALS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_table(report)
    print_group_table(report)
    print_decode_table(report)
    from plots import kv_bars, speedup_vs_kept, ttft_bars

    stem = args.out.with_suffix("")
    # The speedup plot draws the ideal token-ratio curve, which an in-LLM method has not.
    vision_side = {name: r for name, r in report.items() if r["pruning"] is None}
    for path in (ttft_bars(report, Path(f"{stem}-ttft.png")), kv_bars(report, Path(f"{stem}-kv.png")),
                 speedup_vs_kept(vision_side, base, Path(f"{stem}-prefill-speedup.png"))):
        print(f"wrote {path}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
