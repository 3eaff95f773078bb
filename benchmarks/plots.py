"""PNG plots of the latency, memory and quantisation reports (matplotlib, no display needed).

Each function takes a report as latency.py / memory.py / quant.py store it in their JSON
and a path stem, writes `<stem>-<plot>.png` and returns the paths.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: a benchmark machine often has no display
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20
COLOURS = {"vision": "#4c72b0", "compression": "#dd8452", "prefill": "#55a868", "other": "#c7c7c7",
           "weights": "#4c72b0", "kv": "#dd8452", "rest": "#c7c7c7", "ideal": "#8c8c8c"}


def latency_plots(report: dict[str, dict], base: str, stem: Path) -> list[Path]:
    return [ttft_bars(report, Path(f"{stem}-ttft.png")), kv_bars(report, Path(f"{stem}-kv.png")),
            speedup_vs_kept(report, base, Path(f"{stem}-prefill-speedup.png"))]


def ttft_bars(report: dict[str, dict], path: Path) -> Path:
    """Time to first token per method, stacked: vision (without compression), compression, prefill, other."""
    names = list(report)
    parts = {"vision": [], "compression": [], "prefill": [], "other": []}
    for r in report.values():
        vision, ttft, prefill = r["vision_ms"]["median"], r["ttft_ms"]["median"], r["prefill_ms"]["median"]
        parts["vision"].append(vision - r["compression_ms"])
        parts["compression"].append(r["compression_ms"])
        parts["prefill"].append(prefill)
        # Text embedding, sampling the first token, and the medians not adding up exactly.
        parts["other"].append(max(0.0, ttft - vision - prefill))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 4.5))
    bottom = [0.0] * len(names)
    for part, values in parts.items():
        ax.bar(names, values, bottom=bottom, label=part, color=COLOURS[part])
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(report.values()):
        ax.annotate(f"{r['ttft_ms']['median']:.0f} ms\n{r['visual_tokens_kept']} tok\ncompr. {r['compression_ms']:.1f} ms",
                    (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_title("Time to first token by stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, ax, path)


def kv_bars(report: dict[str, dict], path: Path) -> Path:
    names = list(report)
    mib = [r["kv_bytes"] / MIB for r in report.values()]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 4.5))
    ax.bar(names, mib, color=COLOURS["kv"])
    for i, r in enumerate(report.values()):
        saved = f"-{r['kv_saved_pct']:.0f}%" if r["kv_saved_bytes"] else "baseline"
        ax.annotate(f"{mib[i]:.1f} MiB\n{saved}", (i, mib[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("KV cache after the answer, MiB")
    ax.set_ylim(0, max(mib) * 1.18)
    ax.set_title("KV cache per method (saved vs. all 576 patches)")
    return _save(fig, ax, path)


def speedup_vs_kept(report: dict[str, dict], base: str, path: Path) -> Path:
    """Measured prefill speedup against kept tokens, with the ideal (visual+text)/(kept+text) curve."""
    b = report[base]
    text = b["prompt_tokens"] - b["visual_tokens_kept"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kept = range(min(r["visual_tokens_kept"] for r in report.values()), b["visual_tokens_kept"] + 1)
    ideal = [b["prompt_tokens"] / (k + text) for k in kept]
    ax.plot(kept, ideal, color=COLOURS["ideal"], label="ideal (visual+text)/(kept+text)")
    ax.plot(kept, [0.9 * i for i in ideal], color=COLOURS["ideal"], linestyle="--", label="0.9 x ideal (goal)")
    seen: dict[int, int] = {}
    for name, r in report.items():
        x, y = r["visual_tokens_kept"], r["prefill_speedup"]
        ax.scatter(x, y, zorder=3)
        # Methods that keep the same count land on one spot: stack their labels.
        nth = seen[x] = seen.get(x, -1) + 1
        ax.annotate(f"{name} ({r['fraction_of_ideal']:.2f} of ideal)", (x, y), xytext=(6, 4 - 11 * nth),
                    textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ticks = sorted({r["visual_tokens_kept"] for r in report.values()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens kept (log)")
    ax.set_ylabel("prefill speedup vs. none (median)")
    ax.set_title("Prefill speedup against the ideal token ratio")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, None, path)


def memory_bars(report: dict[str, dict], path: Path) -> Path:
    """Peak RSS per engine, stacked: weights, KV cache allocated, the rest; the 1.15 x goal marked."""
    names = list(report)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 4.5))
    bottom = [0.0] * len(names)
    for part, key in (("weights", "weights_bytes"), ("kv", "kv_bytes_allocated"), ("rest", "rest_bytes")):
        values = [max(0.0, r[key]) / MIB for r in report.values()]
        ax.bar(names, values, bottom=bottom, label=part, color=COLOURS[part])
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(report.values()):
        goal = 1.15 * (r["weights_bytes"] + r["kv_bytes_allocated"]) / MIB
        ax.hlines(goal, i - 0.4, i + 0.4, colors="black", linestyles="--",
                  label="1.15 x (weights + KV)" if i == 0 else None)
        ax.annotate(f"{r['peak_rss_bytes'] / MIB:.0f} MiB\n{r['peak_over_weights_kv']:.3f}x",
                    (i, max(bottom[i], goal)), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("peak RSS of the runtime process, MiB")
    ax.set_ylim(0, max(bottom) * 1.3)
    ax.set_title("Peak memory per engine")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, ax, path)


def quant_bars(report: dict[str, dict], reference: str, path: Path) -> Path:
    """Per engine: vision ms, prefill ms, decode tok/s, weights and peak RSS, labelled against `reference`."""
    names = list(report)
    ref_rss = report[reference]["peak_rss_bytes"]["median"]
    panels = (("vision ms", lambda r: r["vision_ms"]["median"], lambda r: f"{r['vision_speedup']:.2f}x faster"),
              ("decode tokens/s", lambda r: (r["decode_tokens_per_s"] or {}).get("median", 0.0),
               lambda r: f"{r['decode_speedup'] or float('nan'):.2f}x"),
              ("prefill ms", lambda r: r["prefill_ms"]["median"], lambda r: f"{r['prefill_speedup']:.2f}x faster"),
              ("weights MiB", lambda r: r["weights_bytes"] / MIB, lambda r: f"{r['weights_ratio']:.2f} of ref"),
              ("peak RSS MiB", lambda r: r["peak_rss_bytes"]["median"] / MIB,
               lambda r: f"{r['peak_rss_bytes']['median'] / ref_rss:.2f} of ref"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 0.7 * len(names) * len(panels), 4.5))
    for ax, (title, value, label) in zip(axes, panels):
        values = [value(r) for r in report.values()]
        ax.bar(names, values, color=[COLOURS["ideal"] if n == reference else COLOURS["vision"] for n in names])
        for i, r in enumerate(report.values()):
            ax.annotate(f"{values[i]:.4g}\n{label(r)}", (i, values[i]), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(values) * 1.25)
        ax.set_title(title)
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.suptitle(f"quantised engines against {reference} (medians)")
    return _save(fig, None, path)


def _save(fig, bar_axis, path: Path) -> Path:
    if bar_axis is not None:
        plt.setp(bar_axis.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def batch_bars(out: dict, path: Path) -> Path:
    """Decode tokens/s: B answers one after another against B at once, with the speed-up."""
    s = out["summary"]
    batch = out["conditions"]["batch"]
    names = [f"{batch} one after another", f"batch of {batch}"]
    rates = [s["sequential_tokens_per_s"], s["batch_tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.bar(names, rates, color=[COLOURS["ideal"], COLOURS["prefill"]])
    ax.annotate(f"{rates[0]:.1f} tok/s", (0, rates[0]), ha="center", va="bottom", fontsize=9)
    ax.annotate(f"{rates[1]:.1f} tok/s\n{s['speedup']:.2f}x", (1, rates[1]), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("decode tokens/s (median of rounds)")
    ax.set_ylim(0, max(rates) * 1.25)
    ax.set_title(f"Batched decoding ({Path(out['engine']).name})")
    return _save(fig, None, path)
