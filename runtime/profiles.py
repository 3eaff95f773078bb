"""TensorRT optimisation profiles, derived from the manifest: each graph's declared axes and the serving limits.

    profile = graph_profiles(manifest, "llm", native=True)[1]   # {input: ShapeRange(min, opt, max)}
    ort_tensorrt_options(profile, ...)                           # ORT TensorRT EP provider options

Nothing here is hand-written per model: every input with a symbolic axis gets a
range from that axis's name (the same names export/graph_io.py declares and the
runtime's feed checks read), so a new input or a second cache group is covered
by construction. Axis ranges:

    batch     1 .. limits.max_batch                 (opt 1: one conversation)
    text_len  1 .. limits.max_text_len              (opt TYPICAL_TEXT)
    seq       prefill 1 .. max_positions, decode 1  (opt a typical first prompt / 1)
    past_*    0 .. max_positions - 1                (0: the first prefill; TensorRT takes empty tensors)
    total     past + seq                            (1 .. max_positions)

The native TensorRT backend gets two LLM profiles, prefill and decode, one
execution context each: kernels tuned for 600-token prompts are the wrong ones
for one-token steps and the other way round. ONNX Runtime's TensorRT EP keeps
its execution context on profile 0 (microsoft/onnxruntime#31624, open), so it
gets one profile spanning both, tuned for decoding, where the time goes.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np

from .engine import EngineFolder
from .manifest import (BATCH, PREFILL_GRAPH, SEQ, TEXT_LEN, TOTAL, GraphSpec, Limits, Manifest, Profile,
                       ShapeRange)

PREFILL, DECODE = "prefill", "decode"
TYPICAL_TEXT = 32  # prompt tokens a profile is tuned for (a question, the template's words)
CACHE_DIR = "trt_cache"  # ORT TensorRT EP engine and timing caches, one subfolder per GPU


def axis_ranges(manifest: Manifest, phase: str | None) -> dict[str, tuple[int, int, int]]:
    """Symbolic axis -> (min, opt, max). `phase` PREFILL / DECODE, or None for one range covering both."""
    limits: Limits = manifest.serving_limits
    top = limits.max_positions
    # A first prompt: its text, the image's visual tokens.
    prompt = min(manifest.vision.num_slots + TYPICAL_TEXT, top - 1)
    ranges = {BATCH: (1, 1, limits.max_batch),
              TEXT_LEN: (1, min(TYPICAL_TEXT, limits.max_text_len), limits.max_text_len)}
    if phase == PREFILL:
        seq, past, total = (1, prompt, top), (0, 0, top - 1), (1, prompt, top)
    elif phase == DECODE:
        seq, past, total = (1, 1, 1), (1, prompt, top - 1), (2, prompt + 1, top)
    elif phase is None:
        seq, past, total = (1, 1, top), (0, prompt, top - 1), (1, prompt + 1, top)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    ranges[SEQ], ranges[TOTAL] = seq, total
    for group in manifest.llm.cache.groups:
        ranges[group.past_axis], ranges[group.total_axis] = past, total
    return ranges


def input_profile(spec: GraphSpec, ranges: Mapping[str, tuple[int, int, int]]) -> Profile:
    """Every input with a symbolic axis -> its ShapeRange (static inputs need none), in declaration order."""
    profile = {}
    for name, tensor in spec.inputs.items():
        if all(isinstance(d, int) for d in tensor.shape):
            continue
        unknown = [d for d in tensor.shape if isinstance(d, str) and d not in ranges]
        if unknown:
            raise ValueError(f"{spec.file}: input {name} has axis {unknown[0]!r}, which no profile range covers")
        dims = [(d, d, d) if isinstance(d, int) else ranges[d] for d in tensor.shape]
        profile[name] = ShapeRange(*(tuple(dim[i] for dim in dims) for i in range(3)))
    return profile


def graph_profiles(manifest: Manifest, graph: str, native: bool) -> tuple[Profile, ...]:
    """The optimisation profiles of `graph`: the LLM's prefill and decode natively, one range for the EP."""
    spec = manifest.graphs[graph]
    if graph == PREFILL_GRAPH:  # an image prompt: the visual slots and at least one text token after them
        ranges = axis_ranges(manifest, PREFILL)
        low, opt, top = ranges[SEQ]
        ranges[SEQ] = (min(manifest.llm.pruning.visual_slots + 1, top), opt, top)
        return (input_profile(spec, ranges),)
    phases = (PREFILL, DECODE) if native and graph == "llm" else (None,)
    return tuple(input_profile(spec, axis_ranges(manifest, phase)) for phase in phases)


def shapes_string(profile: Profile, which: str) -> str:
    """trtexec / ORT TensorRT EP syntax: `name:1x3x336x336,name2:1x32`."""
    return ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in profile.items())


def ort_tensorrt_options(profile: Profile, cache_dir: Path) -> dict[str, str]:
    """Provider options of ORT's TensorRT EP for one graph: its profile, and engine + timing caches.

    The EP needs all three shape options for every dynamic input, or none. No
    `trt_fp16_enable`: with it the EP builds a weakly typed network in which
    TensorRT may run any float32 layer in float16, the vision graph's selection
    scores included; without it (and without int8) ORT >= 1.22 builds a strongly
    typed network (microsoft/onnxruntime#24298), so an fp16 ONNX runs in fp16 where
    it says so and in float32 where it says so.
    """
    options = {f"trt_profile_{which}_shapes": shapes_string(profile, which) for which in ("min", "opt", "max")}
    options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(cache_dir),
                   trt_timing_cache_enable="True", trt_timing_cache_path=str(cache_dir))
    return options


def gpu_slug(name: str, compute_capability: str) -> str:
    """'NVIDIA GeForce RTX 4090', '8.9' -> 'nvidia-geforce-rtx-4090-sm89' (a folder name)."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{base}-sm{compute_capability.replace('.', '')}"


def tensorrt_cache_dir(engine_dir: Path, gpu: str, compute_capability: str) -> Path:
    """Engine and timing caches of one GPU model, inside the engine folder: a plan is only valid there."""
    return Path(engine_dir) / CACHE_DIR / gpu_slug(gpu, compute_capability)


def gpu_cache_dir(engine: EngineFolder, device_id: int = 0) -> Path:
    """The TensorRT EP's cache folder for this GPU, inside `engine` (asks the driver which GPU this is)."""
    from .cuda import gpu_info  # only on the TensorRT path
    gpu = gpu_info(device_id)
    return tensorrt_cache_dir(engine.folder, gpu.name, gpu.compute_capability)


def tensorrt_ep_options(engine: EngineFolder, graph: str, cache: str | PathLike) -> dict[str, str]:
    """The TensorRT EP's options for one graph of `engine`, its engine and timing caches in `cache` (made here)."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    (profile,) = graph_profiles(engine.manifest, graph, native=False)
    return ort_tensorrt_options(profile, cache)


def typical_feeds(engine: EngineFolder, graph: str) -> dict[str, np.ndarray]:
    """Feeds of `graph` at its profile's opt shapes, zeros under all-ones masks (a warm-up: shapes are what counts)."""
    spec = engine.graphs[graph]
    (profile,) = graph_profiles(engine.manifest, graph, native=False)
    make = {True: np.ones, False: np.zeros}
    return {name: make["_mask" in name](profile[name].opt if name in profile else t.shape, t.np_dtype)
            for name, t in spec.inputs.items()}
