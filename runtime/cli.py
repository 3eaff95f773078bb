"""sparsezip-run: answer a question about an image with an engine folder.

    sparsezip-run --engine engines/tiny-sparsezip --image cat.png --prompt "What is this?"

Output: the answer streams to stdout as it is generated; the figures (visual
tokens kept, vision / prefill / first-token times, decode speed, KV-cache bytes,
peak RSS) follow on stderr, so stdout holds the answer alone and can be piped.
--json prints one JSON object per answer on stdout instead (no streaming).
--chat keeps asking: further questions are read from stdin, one per line, until
EOF, an empty line or "exit"; the image tokens and the KV cache carry over.

On a GPU: --provider cuda | tensorrt runs ONNX Runtime's execution providers
(onnxruntime-gpu); --backend tensorrt runs native TensorRT plans built on this
device by sparsezip-build-trt. --warmup-build runs each graph once and exits:
with --provider tensorrt that builds the EP's engine cache (minutes, once per
GPU), so that later starts load in seconds.

Every user error (bad engine folder, checksum, format version, unreadable image,
bad prompt, too long, unknown provider, missing GPU package, bad option) is one
`error: ...` line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn, TextIO

from .backends import BACKENDS, backend_options
from .backends.ort import PROVIDERS, OrtOptions
from .errors import EngineError, UserError
from .generate import GenerationConfig
from .pipeline import Conversation, Pipeline, Result
from .preprocess import load_image
from .selection import save_selection

END_OF_CHAT = ("", "exit")


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the one-line, exit-1 rule of every other user error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gen, ort_defaults = GenerationConfig(), OrtOptions()
    p = _Parser(prog="sparsezip-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True, help="engine folder (holds manifest.json)")
    p.add_argument("--image", type=Path, default=None, help="image file (required unless --warmup-build)")
    p.add_argument("--prompt", default=None,
                   help="the question (required without --chat; with --chat, the first stdin line if absent)")
    p.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens, help="default: %(default)s")
    p.add_argument("--raw", action="store_true",
                   help="--prompt is the whole prompt, with <image> where the image goes (no chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer, no streaming")
    p.add_argument("--chat", action="store_true", help="keep asking: read more questions from stdin")
    p.add_argument("--provider", choices=list(PROVIDERS), default=ort_defaults.provider,
                   help="ONNX Runtime execution provider (default: %(default)s)")
    p.add_argument("--backend", choices=list(BACKENDS), default="ort",
                   help="ort: ONNX Runtime (--provider picks its device); tensorrt: native TensorRT plans "
                        "(sparsezip-build-trt) (default: %(default)s)")
    p.add_argument("--device-id", type=int, default=ort_defaults.device_id, help="GPU index (default: 0)")
    p.add_argument("--trt-cache", type=Path, default=None,
                   help="TensorRT EP engine/timing cache folder (default: ENGINE/trt_cache/<gpu>)")
    p.add_argument("--warmup-build", action="store_true",
                   help="run each graph once and exit (--provider tensorrt: build the engine cache)")
    p.add_argument("--threads", type=int, default=ort_defaults.threads,
                   help="intra-op threads (default: all cores)")
    p.add_argument("--temperature", type=float, default=gen.temperature,
                   help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=gen.top_p, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=gen.seed, help="sampling seed (default: a random one)")
    p.add_argument("--save-selection", type=Path, default=None, metavar="PNG",
                   help="write the preprocessed image with the kept patches highlighted")
    p.add_argument("--skip-checksums", action="store_true",
                   help="skip the sha256 check of the artifacts (sizes are still checked)")
    args = p.parse_args(argv)
    if args.warmup_build:
        return args
    if args.image is None:
        p.error("--image is required")
    if args.prompt is None and not args.chat:
        p.error("--prompt is required (with --chat it may come from stdin instead)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, sys.stdin, sys.stdout, sys.stderr)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
    return 1


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    config = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    # Bad options, a missing provider or GPU package: errors before anything loads.
    options = backend_options("ort", provider=args.provider, threads=args.threads, device_id=args.device_id)
    if args.backend == "tensorrt":
        from .backends.tensorrt import import_tensorrt
        import_tensorrt()
    elif args.provider != "cpu":
        from .backends.ort import resolve_providers
        resolve_providers(args.provider)
    if args.warmup_build:
        return warmup(args, options, stderr)
    image = load_image(args.image)
    prompts = _prompts(args, stdin, stderr)
    first = args.prompt if args.prompt is not None else next(prompts, None)
    if first is None:
        raise EngineError("--chat without --prompt needs the first question on stdin")
    with _pipeline(args, options) as pipe:
        chat = pipe.conversation(image, raw=args.raw, config=config)
        _turn(args, pipe, chat, first, stdout, stderr)
        if args.save_selection is not None:
            v = pipe.engine.vision
            save_selection(args.save_selection, chat.pixel_values[0], pipe.engine.image,
                           chat.visual.kept_index, v.grid, v.patch_size)
        if args.chat:
            for prompt in prompts:
                _turn(args, pipe, chat, prompt, stdout, stderr)
    return 0


def _pipeline(args: argparse.Namespace, options: OrtOptions) -> Pipeline:
    return Pipeline(args.engine, options.provider, options.threads, verify_checksums=not args.skip_checksums,
                    backend=args.backend, device_id=args.device_id, trt_cache=args.trt_cache)


def warmup(args: argparse.Namespace, options: OrtOptions, stderr: TextIO) -> int:
    """Load and run each graph once: what a first start on a new GPU spends building engines."""
    where = "native plans" if args.backend == "tensorrt" else f"provider {options.provider}"
    note = "; a first start on this GPU builds TensorRT engines: minutes" if options.provider == "tensorrt" else ""
    print(f"warming up {args.engine} ({where}){note}", file=stderr, flush=True)
    t0 = time.perf_counter()
    with _pipeline(args, options) as pipe:
        pipe.warmup(lambda line: print(f"  {line}", file=stderr, flush=True))
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=stderr, flush=True)
    return 0


def _prompts(args: argparse.Namespace, stdin: TextIO, stderr: TextIO) -> Iterator[str]:
    """Questions from stdin, one per line, until EOF, an empty line or "exit"."""
    if not args.chat:
        return
    while True:
        if stdin.isatty():
            print("USER> ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() in END_OF_CHAT:
            return
        yield line.rstrip("\n")


def _turn(args: argparse.Namespace, pipe: Pipeline, chat: Conversation, prompt: str,
          stdout: TextIO, stderr: TextIO) -> Result:
    if args.json:
        result = chat.ask(prompt)
        record = {"engine": str(args.engine), "method": pipe.engine.method_name,
                  "provider": args.provider, **result.to_json()}
        print(json.dumps(record), file=stdout, flush=True)
        return result

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    result = chat.ask(prompt, on_text=write)
    print(file=stdout, flush=True)
    print(format_figures(result), file=stderr, flush=True)
    return result


def format_figures(r: Result) -> str:
    saved = 1 - r.kv_bytes / r.kv_bytes_uncompressed if r.kv_bytes_uncompressed else 0.0
    speed = f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s is not None else "n/a"
    lines = [
        f"visual tokens  {r.visual_tokens_kept} / {r.visual_tokens_total} kept"
        + (" (from the first turn)" if r.turn else ""),
        f"vision         {r.vision_ms:.1f} ms" + (" (image reused)" if r.turn else ""),
        f"prefill        {r.prefill_ms:.1f} ms ({r.prompt_tokens} tokens)",
        f"first token    {r.ttft_ms:.1f} ms",
        f"decode         {speed} ({len(r.token_ids)} tokens, stop: {r.stop_reason})",
        f"KV cache       {_size(r.kv_bytes)} used; without compression {_size(r.kv_bytes_uncompressed)} "
        f"({saved:.0%} saved)",
        f"peak RSS       {_size(r.peak_rss_bytes)}",
    ]
    return "\n".join(["--"] + lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


if __name__ == "__main__":
    sys.exit(main())
