"""What the benchmarks share: the engines they build, the runtime process they measure, the conditions they record.

Engines: a random-init LLaVA of a chosen size (`SIZES`) and one engine per
method (`METHODS`), built once under a work folder with export/build.py and
reused by later runs.

The runtime process: `measure()` runs one engine in a fresh Python process
that imports the runtime alone (never torch, whose import alone costs hundreds
of MB), so its RSS is what a deployment would see and no engine's peak mixes
with another's. Run as a script, this file is that process and prints one
JSON object; nothing at module level imports torch for that reason.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# TinyConfig fields per size (export/tiny.py); the image side is always CLIP ViT-L/14-336.
VIT_L = dict(vision_hidden=1024, vision_heads=16, vision_layers=24, vision_mlp=4096, qk_scale=1.0)
SIZES: dict[str, dict] = {
    "tiny": {},
    # A 24-layer 1280-wide MHA Llama (0.48B without embeddings): minutes on 2 cores.
    "vitl-0.5b": dict(VIT_L, llm_hidden=1280, llm_heads=20, llm_kv_heads=20, llm_layers=24, llm_mlp=3456),
    # TinyLlama-1.1B widths (grouped-query attention, 4 kv heads).
    "vitl-1.1b": dict(VIT_L, llm_hidden=2048, llm_heads=32, llm_kv_heads=4, llm_layers=22, llm_mlp=5632),
    # Vicuna-7B widths (LLaVA-1.5-7B): ~26 GB of float32 weights, for machines that hold them.
    "vitl-7b": dict(VIT_L, llm_hidden=4096, llm_heads=32, llm_kv_heads=32, llm_layers=32, llm_mlp=11008),
}
DEFAULT_SIZE = "vitl-0.5b"

# export/build.py options per method. VisionZip keeps its paper's dominant:contextual
# split (54:10, 108:20, 162:30); sparsezip-64 is fixed K (1 + 53 + 10 slots), without text;
# sparsezip-64-text is the text-aware default in one fused vision.onnx (the figures below were
# measured so), sparsezip-64-text-split the same in the layout build.py gives it by default.
METHODS: dict[str, tuple[str, ...]] = {
    "none": ("--method", "none"),
    "visionzip-64": ("--method", "visionzip"),
    "visionzip-128": ("--method", "visionzip", "--dominant", "108", "--contextual", "20"),
    "visionzip-192": ("--method", "visionzip", "--dominant", "162", "--contextual", "30"),
    "sparsezip-64": ("--method", "sparsezip", "--beta", "0"),
    "sparsezip-dynamic": ("--method", "sparsezip", "--beta", "0", "--dynamic-k"),
    "sparsezip-64-text": ("--method", "sparsezip", "--no-split-vision"),
}
# In-LLM pruning (FastV, SparseVLM; llm_prune/config.py): every patch reaches the LLM, which drops
# visual tokens after some layers; N is the average of visual tokens its layers carry
# (`average_visual`). Kept apart from METHODS so that the benchmarks' default runs (memory.py,
# batch.py, quant.py, latency.py without --methods) do not build seven more engines; latency.py's
# --methods accepts them by name (engine_parser(in_llm=True)).
PRUNE_METHODS: dict[str, tuple[str, ...]] = {
    # FastV, K = 2: layers 0-1 carry all 576, the other 22 the r = 17 / 87 / 157 best-attended.
    "fastv-64": ("--method", "fastv", "--prune-budget", "64"),
    "fastv-128": ("--method", "fastv", "--prune-budget", "128"),
    "fastv-192": ("--method", "fastv", "--prune-budget", "192"),
    # SparseVLM, stages after the paper's layers 2, 6, 15 of 32 scaled to 24: 2, 4, 11. At 64 those
    # cannot reach the average (layers 0-2 alone carry 3 x 576 / 24 = 72, build.py refuses): the first
    # stage moves one layer earlier, after layer 1.
    "sparsevlm-64": ("--method", "sparsevlm", "--prune-layers", "1,4,11", "--prune-budget", "64"),
    "sparsevlm-128": ("--method", "sparsevlm", "--prune-budget", "128"),
    "sparsevlm-192": ("--method", "sparsevlm", "--prune-budget", "192"),
    # Stacked: SparseZip to 192 slots in vision.onnx (1 CLS + fixed K = 181 + 10 contextual), then
    # SparseVLM inside the LLM on those 192 down to a layer average of 64.
    "sparsezip-192+sparsevlm": ("--method", "sparsezip", "--beta", "0", "--k-max", "181", "--contextual", "10",
                                "--llm-prune", "sparsevlm", "--prune-budget", "64"),
}
# The text-aware sparsezip-64 with its vision stage split into trunk + selector (image_cache.py).
SPLIT_METHODS: dict[str, tuple[str, ...]] = {"sparsezip-64-text-split": ("--method", "sparsezip", "--split-vision")}
ALL_METHODS: dict[str, tuple[str, ...]] = {**METHODS, **PRUNE_METHODS, **SPLIT_METHODS}
PROMPT = "What colour is the small circle in the middle of the picture?"
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
# What the runtime process imports; the figures are only as good as these versions.
PACKAGES = ("sparsezip-deploy", "numpy", "onnxruntime", "tokenizers", "Pillow", "matplotlib")


def engine_parser(doc: str, size: str, new_tokens: int, threads: int, out: Path,
                  in_llm: bool = False) -> argparse.ArgumentParser:
    """The arguments latency.py and memory.py share: which engines, which question, where to write.

    `in_llm`: --methods also accepts PRUNE_METHODS (never in its default)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--engines", type=Path, nargs="+", help="engine folders, one of them method none")
    which.add_argument("--build", action="store_true", help="build (or reuse) the engines of --methods in --work")
    p.add_argument("--work", type=Path, help="with --build: where the model and engines are kept")
    p.add_argument("--size", choices=list(SIZES), default=size)
    choices = ALL_METHODS if in_llm else METHODS
    p.add_argument("--methods", nargs="+", choices=list(choices), default=list(METHODS),
                   help="engines to build" + (f"; the in-LLM ones ({', '.join(PRUNE_METHODS)}) only when named"
                                              if in_llm else ""))
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--out", type=Path, default=out, help="JSON; the plots go next to it")
    return p


def check_engine_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.build and args.work is None:
        p.error("--build needs --work")


def ensure_engines(work: Path, size: str, methods: list[str]) -> dict[str, Path]:
    """The random model `work/model-<size>` and `work/engines/<size>-<method>`, built where missing."""
    from sparsezip_deploy.export import build
    from sparsezip_deploy.export.tiny import BUILD_INFO, TinyConfig, build_tiny

    model = work / f"model-{size}"
    if not (model / BUILD_INFO).exists():
        print(f"building the random {size} model in {model}", flush=True)
        build_tiny(model, tiny=TinyConfig(**SIZES[size]))
    engines = {}
    for name in methods:
        out = work / "engines" / f"{size}-{name}"
        if not is_current(out):
            print(f"building engine {out.name}", flush=True)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                if build.main(["--model", str(model), "--out", str(out), "--force", *ALL_METHODS[name]]) != 0:
                    raise SystemExit(f"building {out.name} failed")
            print(f"  built in {time.perf_counter() - t0:.0f}s", flush=True)
        engines[name] = out
    return engines


def is_current(engine: Path) -> bool:
    """A complete engine folder that this runtime reads (an older format version is rebuilt)."""
    from sparsezip_deploy.runtime.errors import UserError
    from sparsezip_deploy.runtime.manifest import read_manifest

    try:
        read_manifest(engine)
    except UserError:
        return False
    return True


def engines_by_name(dirs: list[Path]) -> dict[str, Path]:
    """Engine folders given on the command line, named by folder; each checked to be one."""
    engines = {d.name: d for d in dirs if _method_of(d)}
    if len(engines) != len(dirs):
        raise SystemExit("error: two engine folders share a name")
    return engines


def baseline_name(engines: dict[str, Path]) -> str:
    """The engine of method `none`, which every speedup and saving is relative to."""
    for name, engine in engines.items():
        if _method_of(engine) == "none":
            return name
    raise SystemExit("error: the speedups are relative to a method `none` engine; pass one")


def manifest_of(engine: Path):
    """The engine's manifest, read and checked by the runtime's schema (torch-free)."""
    from sparsezip_deploy.runtime.errors import UserError
    from sparsezip_deploy.runtime.manifest import read_manifest

    try:
        return read_manifest(engine)
    except UserError as e:
        raise SystemExit(f"error: {engine} is not an engine folder ({e})") from None


def _method_of(engine: Path) -> str:
    return manifest_of(engine).method_name


def measure(engine: Path, image: Path, prompt: str, new_tokens: int, warmup: int, threads: int,
            profile_runs: int = 0, profile_dir: Path | None = None) -> dict:
    """One fresh runtime process on `engine`: `warmup` questions, then one timed; its figures."""
    cmd = [sys.executable, __file__, "--engine", str(engine), "--image", str(image), "--prompt", prompt,
           "--new-tokens", str(new_tokens), "--warmup", str(warmup), "--threads", str(threads)]
    if profile_runs:
        cmd += ["--profile-runs", str(profile_runs), "--profile-dir", str(profile_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the runtime process on {engine} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_bandwidth(threads: int, mib: int = 1024, reps: int = 5) -> dict:
    """This machine's read bandwidth, GB/s: a float32 GEMV over `mib` MiB of weights (numpy's BLAS,
    `threads` threads), the kernel a decode step is made of, in a fresh process; best and median of `reps`."""
    env = {**os.environ, **{k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    done = subprocess.run([sys.executable, __file__, "--bandwidth", str(mib), str(reps)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the bandwidth process failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout), "threads": threads}


def _bandwidth(mib: int, reps: int) -> dict:
    import numpy as np

    cols = 4096
    weights = np.full((mib * 2**20 // (4 * cols), cols), 0.5, np.float32)
    x = np.ones(cols, np.float32)
    weights @ x  # pages touched, BLAS threads started
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        weights @ x
        seconds.append(time.perf_counter() - t0)
    rates = [weights.nbytes / s / 1e9 for s in seconds]
    return {"best_gb_s": max(rates), "median_gb_s": statistics.median(rates), "bytes": weights.nbytes,
            "reps": reps, "kernel": "float32 GEMV, numpy BLAS"}


def llm_weight_bytes(engine: Path) -> int:
    """The bytes a decode step reads besides the KV: llm.onnx and its external data (lm_head included)."""
    manifest = manifest_of(engine)
    graph = manifest.graphs["llm"].file
    return sum(a.bytes for name, a in manifest.artifacts.items() if name.startswith(graph))


def conditions(args: argparse.Namespace, engines: dict[str, Path]) -> dict:
    """The run conditions every benchmark JSON carries."""
    manifest = manifest_of(next(iter(engines.values()))).to_dict()
    from sparsezip_deploy.runtime.manifest import tool_versions  # kept out of the child's imports

    versions = tool_versions(PACKAGES)
    return {
        "image": str(args.image), "image_size": manifest["vision"]["image_size"], "prompt": args.prompt,
        "batch": 1, "new_tokens": args.new_tokens, "warmup": args.warmup,
        "threads": args.threads, "provider": "CPUExecutionProvider", "dtypes": manifest["precision"],
        "llm": manifest["llm"], "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "versions": versions, "engine_tools": manifest["tools"],
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(engine: Path) -> int:
    """The model's weights as the engine stores them: graphs (+ external data) and the embedding table."""
    return sum(a.bytes for name, a in manifest_of(engine).artifacts.items() if name != "tokenizer.json")


# -- the runtime process (this file run as a script)

def _status() -> dict[str, int]:
    """Resident and peak memory now, bytes: VmRSS, VmHWM (peak), RssAnon (heap), RssFile (mapped files)."""
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[keys[key]] = int(value.split()[0]) * 1024
    return out


def _child(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--profile-runs", type=int, default=0)
    p.add_argument("--profile-dir", type=Path)
    args = p.parse_args(argv)

    figures = {"rss_start": _status()["rss"]}
    t0 = time.perf_counter()
    from sparsezip_deploy.runtime.pipeline import Pipeline
    figures.update(import_s=time.perf_counter() - t0, imported=_status(), torch_imported="torch" in sys.modules)

    t0 = time.perf_counter()
    # No image cache: the warm-up asks about the timed image, and the timed run must run the vision graph.
    pipe = Pipeline(args.engine, threads=args.threads, verify_checksums=False, image_cache=0)
    figures.update(load_s=time.perf_counter() - t0, loaded=_status())
    for _ in range(args.warmup):
        pipe.ask(args.image, args.prompt, args.new_tokens)
    chat = pipe.conversation(args.image)
    result = chat.ask(args.prompt, args.new_tokens)
    figures.update(result.to_json(), end=_status(),
                   kv_bytes_fed=sum(v.nbytes for v in chat.cache.bind(0)[0].values()),
                   kv_bytes_per_token=chat.cache.per_token_bytes)
    if args.profile_runs and not pipe.engine.manifest.vision_split:  # the node split reads one fused graph
        figures["profile"] = _profile_vision(pipe, chat, args)
    return figures


def _profile_vision(pipe, chat, args: argparse.Namespace) -> str:
    """ORT's per-node trace of the vision graph on the feeds the timed question used; its path."""
    from sparsezip_deploy.runtime.backends import open_backend
    from sparsezip_deploy.runtime.backends.ort import OrtOptions
    from sparsezip_deploy.runtime.generate import text_features
    from sparsezip_deploy.runtime.prompt import first_turn_ids

    engine = pipe.engine
    feeds = {"pixel_values": chat.pixel_values}
    if engine.vision.text_aware:
        ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, args.prompt, False)
        feeds.update(text_features(pipe.table, [ids.text_ids]))
    pipe.close()
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    options = OrtOptions(threads=args.threads, spin=False, profile_prefix=str(args.profile_dir / args.engine.name))
    spec = engine.graphs["vision"]
    with open_backend("ort", engine.path(spec.file), spec, options) as vision:
        for _ in range(1 + args.profile_runs):  # the first run warms up and is dropped when read
            vision.run(feeds)
        return vision.end_profiling()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bandwidth"]:
        print(json.dumps(_bandwidth(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(_child(sys.argv[1:])))
