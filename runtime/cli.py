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
bad prompt, too long, not UTF-8, unknown provider, missing GPU package, bad
option, unwritable --save-selection, stdout closed or full) is one `error: ...`
line on stderr and exit status 1; with --json, a {"error": "..."} line on stdout
as well. In --chat, a question that fails (too long, not UTF-8, ...) gets its
error line and the chat goes on from where it was; the exit status is then 1.
--save-selection is checked before anything runs and written whole or not at all.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
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
MAX_THREADS = 1024  # ORT starts one OS thread per intra-op thread: more than this is a typo


class UsageError(EngineError):
    """A bad command line."""


class OutputError(EngineError):
    """stdout or stderr cannot be written (a closed pipe, a full disk): the run stops there."""

    def __init__(self, stream: str, reason: str):
        self.stream = stream
        super().__init__(f"cannot write to {stream}: {reason}")


class _Guarded:
    """A text stream whose write errors become OutputError (print() needs write and flush only)."""

    def __init__(self, stream: TextIO | None, name: str):
        self.stream, self.name = stream, name

    def write(self, text: str) -> int:
        return self._do(lambda s: s.write(text))

    def flush(self) -> None:
        self._do(lambda s: s.flush())

    def _do(self, action: Callable[[TextIO], object]):
        if self.stream is None:  # started with the descriptor closed: Python sets sys.stdout = None
            raise OutputError(self.name, "it is closed")
        try:
            return action(self.stream)
        except BrokenPipeError:
            raise OutputError(self.name, "the reading end of the pipe was closed") from None
        except OSError as e:
            raise OutputError(self.name, e.strerror or str(e)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the one-line, exit-1 rule of every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _checked(parse: Callable[[str], object], check: Callable[[object], object]) -> Callable[[str], object]:
    """An argparse type: `parse` the text, then `check` the value (a UserError is the message)."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check(value)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _generation(name: str) -> Callable[[object], object]:
    """Checked by GenerationConfig itself, so that the CLI and the library refuse the same values."""
    return lambda value: getattr(GenerationConfig(**{name: value}), name)


def _seed(value: int) -> int | None:
    if value == -1:
        return None
    if value < 0:
        raise EngineError(f"seed must be >= 0, or -1 for a fresh random one, got {value}")
    return value


def _threads(value: int) -> int:
    if not 1 <= value <= MAX_THREADS:
        raise EngineError(f"threads must be in [1, {MAX_THREADS}], got {value}")
    return value


def _device_id(value: int) -> int:
    if not 0 <= value < 2**31:
        raise EngineError(f"device id must be in [0, 2**31), got {value}")
    return value


def _wants_json(argv: list[str]) -> bool:
    """--json (or a prefix argparse expands to it), known before parsing: usage errors honour it too."""
    return any(a.startswith("--j") and "--json".startswith(a) for a in argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gen, ort_defaults = GenerationConfig(), OrtOptions()
    p = _Parser(prog="sparsezip-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True, help="engine folder (holds manifest.json)")
    p.add_argument("--image", type=Path, default=None, help="image file (required unless --warmup-build)")
    p.add_argument("--prompt", default=None,
                   help="the question (required without --chat; with --chat, the first stdin line if absent)")
    p.add_argument("--max-new-tokens", type=_checked(int, _generation("max_new_tokens")),
                   default=gen.max_new_tokens,
                   help=">= 1; prompt + answer must fit the engine's max_positions (default: %(default)s)")
    p.add_argument("--raw", action="store_true",
                   help="--prompt is the whole prompt, with <image> where the image goes (no chat template)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per answer, no streaming; a failure prints {"error": "..."}')
    p.add_argument("--chat", action="store_true", help="keep asking: read more questions from stdin")
    p.add_argument("--provider", choices=list(PROVIDERS), default=ort_defaults.provider,
                   help="ONNX Runtime execution provider (default: %(default)s)")
    p.add_argument("--backend", choices=list(BACKENDS), default="ort",
                   help="ort: ONNX Runtime (--provider picks its device); tensorrt: native TensorRT plans "
                        "(sparsezip-build-trt) (default: %(default)s)")
    p.add_argument("--device-id", type=_checked(int, _device_id), default=ort_defaults.device_id,
                   help="GPU index (default: %(default)s)")
    p.add_argument("--trt-cache", type=Path, default=None,
                   help="TensorRT EP engine/timing cache folder (default: ENGINE/trt_cache/<gpu>)")
    p.add_argument("--warmup-build", action="store_true",
                   help="run each graph once and exit (--provider tensorrt: build the engine cache)")
    p.add_argument("--threads", type=_checked(int, _threads), default=ort_defaults.threads,
                   help=f"intra-op threads, 1 .. {MAX_THREADS} (default: all cores)")
    p.add_argument("--temperature", type=_checked(float, _generation("temperature")), default=gen.temperature,
                   help="finite, >= 0; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=_checked(float, _generation("top_p")), default=gen.top_p,
                   help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    p.add_argument("--seed", type=_checked(int, _seed), default=gen.seed,
                   help="sampling seed, an integer >= 0; -1 = a fresh random one (the default)")
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
    argv = sys.argv[1:] if argv is None else argv
    _tolerant_decoding()
    stdout, stderr = _Guarded(sys.stdout, "stdout"), _Guarded(sys.stderr, "stderr")
    wants_json = _wants_json(argv)
    try:
        args = parse_args(argv)
    except SystemExit:  # --help was printed (into stdout's buffer): `--help | head -1` must not fail at exit
        try:
            sys.stdout.flush()
        except OSError:
            _silence(sys.stdout)
        raise
    except UsageError as e:
        _report(str(e), stdout, stderr, json_too=wants_json)
        return 1
    try:
        return run(args, sys.stdin, stdout, stderr)
    except OutputError as e:
        # Python's advice for a closed stdout (docs, "Note on SIGPIPE"): point the descriptor at
        # devnull, so that the flush at exit does not fail a second time with a traceback.
        _silence(sys.stdout if e.stream == "stdout" else sys.stderr)
        _report(str(e), stdout, stderr, json_too=wants_json and e.stream != "stdout")
    except UserError as e:
        _report(str(e), stdout, stderr, json_too=wants_json)
    except KeyboardInterrupt:
        _report("interrupted", stdout, stderr, json_too=wants_json)
    return 1


def _tolerant_decoding() -> None:
    """stdin: bytes that are not UTF-8 become lone surrogates (refused per line, see prompt.check_text)
    instead of a UnicodeDecodeError that would end a chat; stdout: a character the terminal's encoding
    lacks is escaped instead of failing the answer."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=errors)


def _silence(stream: TextIO | None) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no descriptor (None, a test's StringIO): nothing to flush
        pass


def _report(message: str, stdout: _Guarded, stderr: _Guarded, json_too: bool) -> None:
    """The one `error:` line on stderr, and with --json a {"error": ...} line on stdout too."""
    if json_too:
        try:
            print(json.dumps({"error": message}), file=stdout, flush=True)
        except OutputError:
            _silence(stdout.stream)
    try:
        print(f"error: {message}", file=stderr, flush=True)
    except OutputError:
        _silence(stderr.stream)


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
    selection = None if args.save_selection is None else writable_target(args.save_selection)
    image = load_image(args.image)
    prompts = _prompts(args, stdin, stderr)
    first = args.prompt if args.prompt is not None else next(prompts, None)
    if first is None:
        raise EngineError("--chat without --prompt needs the first question on stdin")
    status = 0
    with _pipeline(args, options) as pipe:
        chat = pipe.conversation(image, raw=args.raw, config=config)
        for prompt in itertools.chain([first], prompts):
            try:
                _turn(args, pipe, chat, prompt, stdout, stderr)
            except OutputError:
                raise
            except UserError as e:
                if not args.chat:
                    raise
                # The turn changed nothing (Conversation.ask rolls back): the chat goes on.
                _report(str(e), stdout, stderr, json_too=args.json)
                status = 1
                continue
            if selection is not None and chat.turns == 1:
                v = pipe.engine.vision
                save_selection(selection, chat.pixel_values[0], pipe.engine.image, chat.visual.kept_index, v.grid,
                               v.patch_size)
    return status


def writable_target(path: Path) -> Path:
    """The file `path` names (symlinks followed), if it can be (re)written: checked before any work."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise EngineError(f"--save-selection {path} is a folder; name a .png file")
    if target.exists() and not target.is_file():
        raise EngineError(f"--save-selection {path} exists and is not a regular file")
    folder = target.parent
    if not folder.is_dir():
        raise EngineError(f"--save-selection {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngineError(f"--save-selection {path}: folder {folder} is not writable")
    return target


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
        yield line.rstrip("\r\n")


def _turn(args: argparse.Namespace, pipe: Pipeline, chat: Conversation, prompt: str,
          stdout: TextIO, stderr: TextIO) -> Result:
    if args.json:
        result = chat.ask(prompt)
        record = {"engine": str(args.engine), "method": pipe.engine.method_name,
                  "provider": args.provider, **result.to_json()}
        print(json.dumps(record), file=stdout, flush=True)
        return result

    written = False

    def write(piece: str) -> None:
        nonlocal written
        stdout.write(piece)
        stdout.flush()
        written = True

    try:
        result = chat.ask(prompt, on_text=write)
    except Exception as e:
        if written and not isinstance(e, OutputError):
            print(file=stdout, flush=True)  # end the half-streamed line before the error line
        raise
    print(file=stdout, flush=True)
    print(format_figures(result), file=stderr, flush=True)
    return result


def format_figures(r: Result) -> str:
    saved = 1 - r.kv_bytes / r.kv_bytes_uncompressed if r.kv_bytes_uncompressed else 0.0
    speed = f"{r.decode_tokens_per_s:.1f} tokens/s" if r.decode_tokens_per_s is not None else "n/a"
    lines = [
        f"visual tokens  {r.visual_tokens_kept} / {r.visual_tokens_total} kept"
        + (" (from the first turn)" if r.turn else ""),
        f"vision         {r.vision_ms:.1f} ms" + (" (image reused)" if r.turn else
                                                 " (image cached)" if r.vision_cached else ""),
        f"prefill        {r.prefill_ms:.1f} ms ({r.prompt_tokens} tokens)",
        f"first token    {r.ttft_ms:.1f} ms",
        f"decode         {speed} ({len(r.token_ids)} tokens, stop: {r.stop_reason})",
        f"KV cache       {_size(r.kv_bytes)} used; without compression {_size(r.kv_bytes_uncompressed)} "
        f"({saved:.0%} saved)",
    ]
    if len(r.kv_bytes_groups) > 1:  # pruned inside the LLM: later layers hold fewer positions
        lines.append("  per group    " + " | ".join(_size(b) for b in r.kv_bytes_groups)
                     + " (layers between pruning stages)")
    lines.append(f"peak RSS       {_size(r.peak_rss_bytes)}")
    return "\n".join(["--"] + lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def entry() -> int:
    """The `sparsezip-run` command: main() in a process of its own.

    Pillow warns (DecompressionBombWarning) while it opens an image between one and
    two times its pixel limit, before preprocessing refuses it with one error line;
    the command owns its process, so it silences that warning here, where a
    process-wide filter harms no host application (main() itself sets none).
    """
    from PIL import Image
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
