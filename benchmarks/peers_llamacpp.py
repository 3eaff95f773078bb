"""llama.cpp as a peer: build its tools, turn a llava-hf folder into GGUF files, run `llama-mtmd-cli`.

The tree comes from the llama-cpp-python source package (`LLAMA_CPP_PYTHON`),
which vendors the whole of llama.cpp; only the three tools the benchmark needs
are built, once, under the work folder. Its `convert_hf_to_gguf.py` converts the
Llama half of the folder; the CLIP tower and projector (which it refuses:
"Unsupported model type: clip_vision_model") are written here, as the mmproj
file tools/mtmd/clip.cpp reads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # llama-cpp-python source package; its vendor/llama.cpp is what runs
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
TARGETS = ("llama-mtmd-cli", "llama-bench", "llama-quantize", "llama-tokenize")
QUANTS = ("f32", "f16", "q8_0", "q4_0")
# The prompt goes in as written: a template that emits the user's message and nothing else.
VERBATIM_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
MARKER = "<__media__>"  # mtmd's default media marker


class Skip(Exception):
    """This peer cannot run here; the message says why, in one line."""


# -- build

def source_tree(peers: Path, sdist_dirs: list[Path]) -> Path:
    """vendor/llama.cpp of the pinned sdist, unpacked once under `peers`."""
    tree = peers / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    for d in sdist_dirs:
        if (d / SDIST).exists():
            with tarfile.open(d / SDIST) as tar:
                tar.extractall(peers, filter="data")
            return tree
    raise Skip(f"{SDIST} not found in {', '.join(map(str, sdist_dirs))} "
               f"(pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON})")


def build_tools(peers: Path, tree: Path, threads: int) -> Path:
    """The `TARGETS` binaries, built (Release, native CPU, no network pieces) where missing; their folder."""
    build = peers / f"llama.cpp-{LLAMA_CPP_PYTHON}-build"
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        raise Skip(f"no {', '.join(missing)} on PATH to build it")
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
    print(f"building llama.cpp {LLAMA_CPP_PYTHON} ({', '.join(TARGETS)}) in {build}", flush=True)
    t0 = time.perf_counter()
    for cmd in (configure, ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(threads)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd[:3])} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    print(f"  built in {time.perf_counter() - t0:.0f}s", flush=True)
    return bin_dir


# -- GGUF files

def text_folder(llava: Path, out: Path) -> Path:
    """The Llama half of a llava-hf folder as a LlamaForCausalLM folder convert_hf_to_gguf.py accepts."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((llava / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    text = {**config["text_config"], "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(text, indent=1))
    tensors = {}
    for file in sorted(llava.glob("*.safetensors")):
        for name, value in load_file(file).items():
            if name.startswith("language_model.lm_head."):
                tensors[name.removeprefix("language_model.")] = value
            elif name.startswith("language_model.model."):
                tensors[name.removeprefix("language_model.")] = value
    if "lm_head.weight" not in tensors or "model.embed_tokens.weight" not in tensors:
        raise SystemExit(f"error: {llava} has no language_model.* tensors in the layout of transformers >= 4.52")
    save_file(tensors, str(out / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (llava / name).exists():
            shutil.copy(llava / name, out / name)
    return out


def merge_order_scores(gguf_path: Path, tokenizer_json: Path) -> int:
    """Rewrite the GGUF's token scores, in place, so that llama.cpp's merges follow the BPE's merge order.

    convert_hf_to_gguf.py gives every token of a tokenizer.json BPE the same score
    (gguf.LlamaHfVocab), and llama.cpp's SPM tokenizer picks the best-scored pair
    to merge first: with ties it tokenizes differently. A merge result scores
    minus its merge rank; tokens no merge produces keep their score. Returns
    the number of scores changed.
    """
    import gguf

    model = json.loads(tokenizer_json.read_text())["model"]
    vocab = model["vocab"]
    rank = {}
    for i, merge in enumerate(model["merges"]):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(vocab[a + b], i)
    reader = gguf.GGUFReader(gguf_path, "r+")
    scores = reader.fields["tokenizer.ggml.scores"]
    for token_id, i in rank.items():
        scores.parts[scores.data[token_id]][0] = -float(i)
    return len(rank)


def convert_text(tree: Path, folder: Path, out: Path) -> Path:
    if out.exists():
        return out
    try:
        import gguf  # noqa: F401  (convert_hf_to_gguf.py and merge_order_scores need it)
    except ImportError:
        raise Skip("the gguf package is missing (pip install gguf==0.19.0 sentencepiece)") from None
    tmp = out.with_suffix(".tmp")
    done = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                           "--outfile", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: convert_hf_to_gguf.py failed:\n{done.stderr[-2000:]}")
    merge_order_scores(tmp, folder / "tokenizer.json")
    tmp.rename(out)
    return out


def quantize(bin_dir: Path, f32: Path, kind: str, threads: int) -> Path:
    if kind == "f32":
        return f32
    out = f32.with_name(f32.name.replace("-f32", f"-{kind}"))
    if not out.exists():
        done = subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(out), kind.upper(),
                               str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: llama-quantize {kind} failed:\n{done.stderr[-2000:]}")
    return out


def write_mmproj(llava: Path, out: Path, dtype: str) -> Path:
    """CLIP tower + 2-layer MLP projector as clip.cpp's "mlp" projector file (float32 or float16 matrices).

    clip.cpp's LLaVA graph runs block_count - 1 blocks and skips post_ln when it
    is absent: with all 24 blocks stored that is HF's vision_feature_layer -2
    (the output of block 23, before post_layernorm); the CLS row is dropped
    after the blocks, as vision_feature_select_strategy "default" does.
    """
    if out.exists():
        return out
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((llava / "config.json").read_text())
    vision = config["vision_config"]
    if config.get("vision_feature_layer", -2) != -2 or config.get("vision_feature_select_strategy") != "default":
        raise SystemExit("error: the mmproj writer covers LLaVA-1.5's feature layer -2, strategy default only")
    pre = json.loads((llava / "preprocessor_config.json").read_text())
    weights = {}
    for file in sorted(llava.glob("*.safetensors")):
        weights.update(load_file(file))
    src = {k.removeprefix("vision_tower.").removeprefix("vision_model."): v for k, v in weights.items()
           if k.startswith("vision_tower.")}

    w = gguf.GGUFWriter(str(out.with_suffix(".tmp")), arch="clip")
    w.add_name(llava.name)
    w.add_file_type(0 if dtype == "f32" else 1)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", vision.get("hidden_act", "quick_gelu") == "gelu")
    w.add_uint32("clip.vision.image_size", vision["image_size"])
    w.add_uint32("clip.vision.patch_size", vision["patch_size"])
    w.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", config["text_config"]["hidden_size"])
    w.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vision.get("layer_norm_eps", 1e-5))
    w.add_uint32("clip.vision.block_count", vision["num_hidden_layers"])
    w.add_array("clip.vision.image_mean", [float(x) for x in pre["image_mean"]])
    w.add_array("clip.vision.image_std", [float(x) for x in pre["image_std"]])

    def put(name: str, value) -> None:
        value = np.ascontiguousarray(value, np.float32)
        w.add_tensor(name, value.astype(np.float16) if dtype == "f16" and value.ndim >= 2 else value)

    put("v.class_embd", src["embeddings.class_embedding"])
    put("v.patch_embd.weight", src["embeddings.patch_embedding.weight"])
    put("v.position_embd.weight", src["embeddings.position_embedding.weight"])
    put("v.pre_ln.weight", src["pre_layrnorm.weight"])
    put("v.pre_ln.bias", src["pre_layrnorm.bias"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(vision["num_hidden_layers"]):
        for hf, ours in names.items():
            for part in ("weight", "bias"):
                put(f"v.blk.{i}.{ours}.{part}", src[f"encoder.layers.{i}.{hf}.{part}"])
    for hf, ours in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        for part in ("weight", "bias"):
            put(f"{ours}.{part}", weights[f"multi_modal_projector.{hf}.{part}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.with_suffix(".tmp").rename(out)
    return out


def prepare(work: Path, llava: Path, threads: int, sdist_dirs: list[Path]) -> dict:
    """Tools built, GGUF files written (text at every `QUANTS`, mmproj f32 and f16), all cached under work."""
    peers = work / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    tree = source_tree(peers, sdist_dirs)
    bin_dir = build_tools(peers, tree, threads)
    gguf_dir = peers / "gguf" / llava.name
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f32 = convert_text(tree, text_folder(llava, gguf_dir / "text-hf"), gguf_dir / "text-f32.gguf")
    return {"bin": bin_dir, "text": {k: quantize(bin_dir, f32, k, threads) for k in QUANTS},
            "mmproj": {k: write_mmproj(llava, gguf_dir / f"mmproj-{k}.gguf", k) for k in ("f32", "f16")}}


# -- run

def tokenize(files: dict, text: str) -> list[int]:
    """llama.cpp's ids for `text` (BOS added, special tokens parsed) with the f32 text GGUF's vocabulary."""
    done = subprocess.run([str(files["bin"] / "llama-tokenize"), "-m", str(files["text"]["f32"]), "-p", text,
                           "--ids", "--log-disable"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: llama-tokenize failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_PERF = {
    "load_ms": r"load time =\s*([\d.]+) ms",
    "prompt_eval_ms": r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens",
    "eval_ms": r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs",
    "image_encode_ms": r"mtmd batch encoding done in\s*(\d+) ms",  # CLIP + projector
    "image_decode_ms": r"image decoded \(batch 1/1\) in\s*(\d+) ms",  # the LLM over the 576 embeddings
}


def run_cli(files: dict, quant: str, image: Path, prompt: str, new_tokens: int, threads: int) -> dict:
    """One `llama-mtmd-cli` process (greedy, f32 KV cache, flash attention off): its answer, timings, peak RSS.

    `prompt` is the runtime's first-turn text with the image marker in place;
    it goes in verbatim through a template that adds nothing.
    """
    mmproj = files["mmproj"]["f32" if quant == "f32" else "f16"]
    cmd = [str(files["bin"] / "llama-mtmd-cli"), "-m", str(files["text"][quant]), "--mmproj", str(mmproj),
           "--image", str(image), "-p", prompt, "-n", str(new_tokens), "--temp", "0", "--seed", "0",
           "-t", str(threads), "-tb", str(threads), "-fa", "off", "-ctk", "f32", "-ctv", "f32",
           "--jinja", "--chat-template", VERBATIM_TEMPLATE, "-c", "2048", "--no-mmproj-offload",
           "-lv", "4"]  # the perf lines print at this verbosity only
    returncode, stdout, stderr, peak = run_with_peak(cmd)
    if returncode != 0:
        raise SystemExit(f"error: llama-mtmd-cli ({quant}) failed:\n{stderr[-2500:]}")
    figures = {"quant": quant, "mmproj": mmproj.name, "kv_type": "f32", "flash_attn": "off", "command": cmd,
               "text": stdout.decode("utf-8", "replace"), "text_hex": stdout.hex()}
    for key, pattern in _PERF.items():
        m = re.findall(pattern, stderr)
        if key == "prompt_eval_ms" and m:
            figures[key], figures["prompt_eval_tokens"] = float(m[-1][0]), int(m[-1][1])
        elif key == "eval_ms" and m:
            figures[key], figures["eval_runs"] = float(m[-1][0]), int(m[-1][1])
        elif m:
            figures[key] = float(m[-1])
    figures["peak_rss_bytes"] = peak
    # prompt eval counts the LLM over the image's embeddings (its 576 positions); the encode is apart
    figures["ttft_ms"] = figures.get("image_encode_ms", 0.0) + figures.get("prompt_eval_ms", float("nan"))
    runs = figures.get("eval_runs", 0)
    figures["decode_tokens_per_s"] = runs / figures["eval_ms"] * 1e3 if runs and figures.get("eval_ms") else None
    figures["stderr_tail"] = stderr[-1500:]
    return figures


def run_with_peak(cmd: list[str], env: dict | None = None) -> tuple[int, bytes, str, int | None]:
    """Run `cmd`; its exit status, stdout (bytes), stderr and peak RSS in bytes.

    The peak is the child's VmHWM, read while it runs (exec starts a fresh
    high-water mark; ru_maxrss from wait4 would carry this process's over).
    """
    peak = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read().decode("utf-8", "replace"), peak
