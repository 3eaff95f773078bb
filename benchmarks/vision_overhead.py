"""What compression costs inside the vision graph, at real ViT-L/14-336 widths.

    python benchmarks/vision_overhead.py [--reps 7] [--out benchmarks/results/vision_overhead.json]

Random-init LLaVA-1.5 geometry (CLIP ViT-L/14-336, 1024 wide, 24 layers,
features of layer -2; projector 1024 -> 4096 -> 4096). For each method the
vision graph is exported and timed in ONNX Runtime (CPU), interleaved with the
others, after warm-up. Also timed: the compression module alone as its own
ONNX graph (its share of the vision time is the figure the goal is about),
PyTorch eager HF `get_image_features` (all 24 layers, what LLaVA runs), and the
text-aware graph in its default split layout: trunk then selector (a first
question about an image), the selector alone (a second one, trunk cached).
Goals reported, not asserted: compression <= 1% of vision time; ORT >= 1.3x
faster than torch eager.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sparsezip_deploy.export.graph_io import SELECTOR_FILE, TRUNK_FILE
from sparsezip_deploy.export.vision import OPSET, VisionGraph, example_inputs, export_split, export_vision
from sparsezip_deploy.runtime.backends.ort import OrtOptions, open_graph
from sparsezip_deploy.runtime.manifest import tool_versions
from sparsezip_deploy.sparsezip.config import NoneConfig, SparseZipConfig, VisionZipConfig
from sparsezip_deploy.sparsezip.modules import project_text_to_vision

from common import cpu_model

REAL = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            llm_hidden=4096)
TINY = dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
            llm_hidden=64)
METHODS = {
    "none": NoneConfig(),
    "visionzip-64": VisionZipConfig(),
    "sparsezip-64": SparseZipConfig(beta=0.0),
    "sparsezip-64-text": SparseZipConfig(),
}
TEXT_LEN = 16


def random_llava(widths: dict, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, **widths["vision"])
    # The LLM is not part of the vision graph: one small layer keeps memory down.
    text = LlamaConfig(hidden_size=widths["llm_hidden"], intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=32 if widths["llm_hidden"] >= 1024 else 4, vocab_size=512)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=511, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


class CompressionOnly(torch.nn.Module):
    """The compressor of a VisionGraph on its own, fed the features of layer l*."""

    def __init__(self, graph: VisionGraph):
        super().__init__()
        self.compressor = graph.compressor
        self.text_aware = graph.text_aware
        self.register_buffer("w1", graph.projector.linear_1.weight.detach().clone())
        self.register_buffer("w2", graph.projector.linear_2.weight.detach().clone())

    def forward(self, h, cls_attn, kmet, text_embeds=None, text_mask=None):
        text_vis = project_text_to_vision(text_embeds, self.w1, self.w2) if self.text_aware else None
        return self.compressor(h, cls_attn, kmet, text_vis, text_mask)


def ort_graph(path: Path, threads: int):
    """The graph on the runtime's own ORT backend (CPU), as the runtime runs it."""
    return open_graph(path, OrtOptions(threads=threads))


def split_runners(graph: VisionGraph, folder: Path, feeds: dict, threads: int, name: str) -> dict:
    """A first question on the split engine (trunk, then selector on its outputs), and a second one about
    the same image (the selector alone, on the trunk outputs the runtime cached)."""
    folder.mkdir()
    export_split(graph, folder)
    trunk, selector = (ort_graph(folder / f, threads) for f in (TRUNK_FILE, SELECTOR_FILE))
    pixels, text = {"pixel_values": feeds["pixel_values"]}, {k: feeds[k] for k in ("text_embeds", "text_mask")}
    cached = {**trunk.run(pixels), **text}

    def first():
        return selector.run({**trunk.run(pixels), **text})
    return {f"ort/{name}-split": first, f"ort/{name}-selector": lambda: selector.run(cached)}


def time_interleaved(runners: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every runner once per round, round after round, so load drifts hit all alike."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tiny", action="store_true", help="tiny widths (a smoke run, not a measurement)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vision_overhead.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    widths = TINY if args.tiny else REAL

    model = random_llava(widths)
    runners, exported = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in METHODS.items():
            graph = VisionGraph(model, config).eval()
            path = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            export_vision(graph, path)
            print(f"exported {name}: {time.perf_counter() - t0:.1f}s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
            feeds = {k: v.numpy() for k, v in example_inputs(graph, batch=1, text_len=TEXT_LEN).items()}
            backend = ort_graph(path, args.threads)
            runners[f"ort/{name}"] = lambda b=backend, f=feeds: b.run(f)
            exported[name] = graph

            if graph.text_aware:  # the same graph in build.py's default layout for it: trunk + selector
                runners.update(split_runners(graph, Path(tmp) / f"{name}-split", feeds, args.threads, name))
            if config.method != "none":
                only = CompressionOnly(graph).eval()
                with torch.no_grad():
                    h, cls_attn, kmet = graph.encode(torch.from_numpy(feeds["pixel_values"]))
                cfeeds = {"h": h, "cls_attn": cls_attn, "kmet": kmet}
                if graph.text_aware:
                    cfeeds.update(text_embeds=torch.from_numpy(feeds["text_embeds"]),
                                  text_mask=torch.from_numpy(feeds["text_mask"]))
                cpath = Path(tmp) / f"{name}-compression.onnx"
                with torch.no_grad():
                    torch.onnx.export(only, (), str(cpath), kwargs=cfeeds, dynamo=True, opset_version=OPSET,
                                      verbose=False)
                cbackend = ort_graph(cpath, args.threads)
                cnp = {k: v.numpy() for k, v in cfeeds.items()}
                runners[f"compression/{name}"] = lambda b=cbackend, f=cnp: b.run(f)

        pixel_values = torch.from_numpy(feeds["pixel_values"])
        with torch.no_grad():
            runners["torch-eager/hf-get_image_features"] = \
                lambda: model.model.get_image_features(pixel_values=pixel_values)
            times = time_interleaved(runners, args.reps, args.warmup)

    results = {name: summary(ms) for name, ms in times.items()}
    med = {name: r["median_ms"] for name, r in results.items()}
    derived = {}
    for name in METHODS:
        if name == "none":
            continue
        derived[name] = {
            "compression_share_of_vision": med[f"compression/{name}"] / med[f"ort/{name}"],
            "graph_ms_vs_none": med[f"ort/{name}"] / med["ort/none"],
        }
    for name in (n for n in METHODS if f"ort/{n}-split" in med):
        derived[name].update({"split_first_question_vs_fused": med[f"ort/{name}-split"] / med[f"ort/{name}"],
                              "selector_alone_vs_fused": med[f"ort/{name}-selector"] / med[f"ort/{name}"]})
    derived["ort_none_speedup_vs_torch_eager"] = med["torch-eager/hf-get_image_features"] / med["ort/none"]
    report = {
        "benchmark": "vision_overhead",
        "widths": "tiny" if args.tiny else "ViT-L/14-336 (random init), projector 1024->4096->4096",
        "conditions": {"batch": 1, "image_size": 336, "text_len": TEXT_LEN, "dtype": "float32",
                       "provider": "CPUExecutionProvider", "threads": args.threads, "reps": args.reps,
                       "warmup": args.warmup, "opset": OPSET, "cpu": cpu_model(),
                       "cpu_count": os.cpu_count(), "versions": tool_versions()},
        "slots": {name: g.num_slots for name, g in exported.items()},
        "timings": results,
        "derived": derived,
        "goals": {"compression_share_of_vision": "<= 0.01", "ort_none_speedup_vs_torch_eager": ">= 1.3"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  median {r['median_ms']:9.2f} ms  (min {r['min_ms']:.2f}, max {r['max_ms']:.2f})")
    for name, d in derived.items():
        print(f"{name}: {json.dumps(d) if isinstance(d, dict) else f'{d:.2f}x'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
