"""This runtime against its peers on one model, image and question: Hugging Face transformers, llama.cpp.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/szbench/peers   # once
    flock /tmp/sparsezip.lock python benchmarks/peers.py --work /tmp/szbench [--size vitl-0.5b]

Peers, each in a fresh process, interleaved round by round (the order rotated):
- the runtime, one process per engine (`--engines`: none, sparsezip-64 float32,
  sparsezip-64 with int8 vision + int4 LLM), via common.measure;
- transformers: LlavaForConditionalGeneration, eager attention, float32, CPU (peers_hf.py);
- llama.cpp `llama-mtmd-cli` at each of `--quants` (peers_llamacpp.py: built from the
  llama-cpp-python sdist, GGUF written from the same llava-hf folder), greedy,
  float32 KV cache, flash attention off, all 576 image tokens.
All get the same threads, prompt text (the engine's first-turn template around
`--prompt`, the image marker in place) and `--new-tokens`. A peer that cannot
run here (no compiler, no transformers, no sdist) is skipped with one line.

Correctness: the first round's greedy answer of each float32 peer against the
runtime's method-none engine (token ids for transformers, text for llama.cpp,
whose CLI prints text only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import IMAGE, PROMPT, SIZES, conditions, ensure_engines, manifest_of, measure  # noqa: E402
import peers_hf  # noqa: E402
import peers_llamacpp as llamacpp  # noqa: E402

ENGINES = ("none", "sparsezip-64", "sparsezip-64-int8-int4")
# The precision llama.cpp runs at that matches each engine's LLM, for the decode ratio.
MATCHED = {"none": "f32", "sparsezip-64": "f32", "sparsezip-64-int8-int4": "q4_0"}


@dataclass(frozen=True)
class PeersConfig:
    size: str = "vitl-0.5b"
    engines: tuple[str, ...] = ENGINES
    quants: tuple[str, ...] = llamacpp.QUANTS
    reps: int = 3
    warmup: int = 1
    new_tokens: int = 16
    threads: int = 2
    sdist_dirs: tuple[Path, ...] = ()  # WORK/peers is always looked in
    out: Path = Path("benchmarks/results/peers.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = PeersConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="model, engines, llama.cpp build and GGUF files")
    p.add_argument("--size", choices=list(SIZES), default=d.size)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(d.engines))
    p.add_argument("--quants", nargs="*", choices=llamacpp.QUANTS, default=list(d.quants))
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="run transformers")
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--sdist-dir", type=Path, nargs="+", default=list(d.sdist_dirs),
                   help=f"where {llamacpp.SDIST} is, besides WORK/peers (get it with: pip download --no-deps "
                        f"--no-binary :all: llama-cpp-python=={llamacpp.LLAMA_CPP_PYTHON} -d WORK/peers)")
    p.add_argument("--out", type=Path, default=d.out, help="JSON; the markdown table goes next to it")
    args = p.parse_args(argv)
    if "none" not in args.engines:
        p.error("--engines: include none, the float32 reference of the correctness check")
    if min(args.reps, args.new_tokens) < 1 or args.warmup < 0:
        p.error("--reps and --new-tokens must be >= 1, --warmup >= 0")
    return args


def build_engines(work: Path, size: str, names: list[str]) -> dict[str, Path]:
    from quant import build_variants

    engines = ensure_engines(work, size, [n for n in names if n != "sparsezip-64-int8-int4"])
    if "sparsezip-64-int8-int4" in names:
        engines["sparsezip-64-int8-int4"] = build_variants(work, size, "sparsezip-64", ["int8-int4"], None)["int8-int4"]
    return {n: engines[n] for n in names}


# -- the peers, one call = one fresh process

def run_hf(model: Path, image: Path, prompt: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, peers_hf.__file__, "--model", str(model), "--image", str(image), "--prompt", prompt,
           "--new-tokens", str(args.new_tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rc, stdout, stderr, peak = llamacpp.run_with_peak(cmd, env)
    if rc != 0:
        raise SystemExit(f"error: the transformers process failed:\n{stderr[-2000:]}")
    return {**json.loads(stdout.decode().strip().splitlines()[-1]), "peak_rss_polled_bytes": peak}


def run_rounds(peers: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    names = list(peers)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            runs[name].append(peers[name]())
            r = runs[name][-1]
            print(f"  round {rep + 1}/{args.reps} {name:<28} TTFT {r['ttft_ms']:8.0f} ms  "
                  f"decode {r['decode_tokens_per_s'] or float('nan'):6.2f} tok/s", flush=True)
    return runs


# -- figures

def summary(runs: list[dict]) -> dict:
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    keys = ("ttft_ms", "decode_tokens_per_s", "peak_rss_bytes", "vision_ms", "prefill_ms", "image_encode_ms",
            "prompt_eval_ms", "prompt_tokens", "prompt_eval_tokens")
    return {k: med(k) for k in keys if any(r.get(k) is not None for r in runs)}


def piece_bytes(tokenizer, ids: list[int]) -> bytes:
    """The bytes llama.cpp prints for `ids` of a byte-fallback SPM-style vocabulary: control tokens
    print nothing, `<0xXX>` is that byte, the word marker a space."""
    out = b""
    for i in ids:
        piece = tokenizer.id_to_token(i)
        if tokenizer.token_to_id(piece) is not None and piece.startswith("<") and piece.endswith(">"):
            if len(piece) == 6 and piece.startswith("<0x"):
                out += bytes([int(piece[3:5], 16)])
            continue
        out += piece.replace("\u2581", " ").encode()
    return out


def correctness(runs: dict[str, list[dict]], tokenizer) -> dict:
    """Each float32 peer's first greedy answer against the runtime's method-none engine."""
    ref = runs["runtime none"][0]
    out = {"reference": "runtime none", "token_ids": ref["token_ids"], "text": ref["text"]}
    if "transformers" in runs:
        hf = runs["transformers"][0]["token_ids"]
        out["transformers"] = {"compared": "token ids", "equal": hf == list(ref["token_ids"]), "token_ids": hf}
    for name, rs in runs.items():
        if name.startswith("llama.cpp"):
            printed = bytes.fromhex(rs[0]["text_hex"]).strip(b"\n")
            ids = list(ref["token_ids"])
            agree = max(k for k in range(len(ids) + 1) if printed.startswith(piece_bytes(tokenizer, ids[:k])))
            out[name] = {"compared": "printed bytes (the CLI prints no ids)",
                         "equal": printed == piece_bytes(tokenizer, ids), "leading_tokens_equal": agree,
                         "printed_hex": printed.hex(), "expected_hex": piece_bytes(tokenizer, ids).hex()}
    if "transformers" in runs and any(v.get("equal") is False for v in out.values() if isinstance(v, dict)):
        out["transformers_top2_margins"] = runs["transformers"][0]["top2_margins"]
    return out


def ratios(table: dict[str, dict]) -> dict:
    """TTFT: llama.cpp's over the engine's (> 1: the engine is faster); decode: the engine's over llama.cpp's."""
    out = {}
    for name, fig in table.items():
        if not name.startswith("runtime "):
            continue
        engine = name.removeprefix("runtime ")
        for q in ("f32", "q4_0"):
            peer = table.get(f"llama.cpp {q}")
            if peer and peer.get("ttft_ms") and fig.get("ttft_ms"):
                out[f"{engine} TTFT speedup vs llama.cpp {q}"] = peer["ttft_ms"] / fig["ttft_ms"]
        peer = table.get(f"llama.cpp {MATCHED[engine]}")
        if peer and peer.get("decode_tokens_per_s") and fig.get("decode_tokens_per_s"):
            out[f"{engine} decode ratio vs llama.cpp {MATCHED[engine]}"] = (
                fig["decode_tokens_per_s"] / peer["decode_tokens_per_s"])
    if table.get("transformers", {}).get("ttft_ms") and table.get("runtime none", {}).get("ttft_ms"):
        out["none TTFT speedup vs transformers"] = table["transformers"]["ttft_ms"] / table["runtime none"]["ttft_ms"]
        out["none decode ratio vs transformers"] = (table["runtime none"]["decode_tokens_per_s"]
                                                    / table["transformers"]["decode_tokens_per_s"])
    return out


def markdown(table: dict[str, dict], rat: dict, check: dict) -> str:
    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| peer | prompt positions | TTFT ms | of which image encode ms | decode tok/s | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, fig in table.items():
        positions = fig.get("prompt_tokens") or fig.get("prompt_eval_tokens")
        encode = fig.get("vision_ms") or fig.get("image_encode_ms")
        rss = fig.get("peak_rss_bytes")
        lines.append(f"| {name} | {f(positions)} | {f(fig.get('ttft_ms'))} | {f(encode)} | "
                     f"{f(fig.get('decode_tokens_per_s'), '{:.2f}')} | {f(rss and rss / 2**20)} |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in rat.items()]
    lines += ["", "| greedy answer vs runtime none | equal |", "| --- | --- |"]
    for k, v in check.items():
        if isinstance(v, dict):
            agree = f" (first {v['leading_tokens_equal']} of {len(check['token_ids'])} tokens equal)" if (
                "leading_tokens_equal" in v and not v["equal"]) else ""
            lines.append(f"| {k} ({v['compared']}) | {v['equal']}{agree} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engines = build_engines(args.work, args.size, args.engines)
    model = args.work / f"model-{args.size}"
    template = manifest_of(engines["none"]).prompt
    prompt = template.first_turn.replace("{prompt}", args.prompt)

    peers, skipped = {}, {}
    for name, engine in engines.items():
        peers[f"runtime {name}"] = (lambda e=engine: measure(e, args.image, args.prompt, args.new_tokens,
                                                             args.warmup, args.threads))
    reason = peers_hf.available() if args.hf else "--no-hf"
    if reason is None:
        peers["transformers"] = lambda: run_hf(model, args.image, prompt, args)
    else:
        skipped["transformers"] = reason
    if args.quants:
        try:
            files = llamacpp.prepare(args.work, model, args.threads, [*args.sdist_dir, args.work / "peers"])
        except llamacpp.Skip as e:
            skipped["llama.cpp"] = str(e)
        else:
            cli_prompt = prompt.replace(template.image_token, llamacpp.MARKER)
            for q in args.quants:
                peers[f"llama.cpp {q}"] = (lambda q=q: llamacpp.run_cli(files, q, args.image, cli_prompt,
                                                                        args.new_tokens, args.threads))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", flush=True)

    runs = run_rounds(peers, args)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(engines["none"] / "tokenizer.json"))
    check = correctness(runs, tokenizer)
    if "llama.cpp" not in skipped and args.quants:
        # the whole first-turn text and a question whose words need the merge order (see merge_order_scores)
        for text in (prompt, "Which shape is to the left of the green rectangle? Answer with one word."):
            ours, theirs = tokenizer.encode(text).ids, llamacpp.tokenize(files, text)
            check.setdefault("llama.cpp tokenizer", {"compared": "prompt ids (llama-tokenize)", "equal": True,
                                                     "texts": []})
            check["llama.cpp tokenizer"]["equal"] &= ours == theirs
            check["llama.cpp tokenizer"]["texts"].append({"text": text, "runtime": ours, "llama.cpp": theirs})
    table = {name: summary(rs) for name, rs in runs.items()}
    rat = ratios(table)
    cond = conditions(argparse.Namespace(**{**vars(args), "image": args.image}), engines)
    cond.update(size=args.size, prompt_text=prompt, llama_cpp=llamacpp.LLAMA_CPP_PYTHON + " (llama-cpp-python sdist)",
                llama_cpp_settings="greedy (--temp 0), KV f32, -fa off, mmproj f32 for f32 else f16")
    result = {"conditions": cond, "skipped": skipped, "summary": table, "ratios": rat, "correctness": check,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    md = markdown(table, rat, check)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
