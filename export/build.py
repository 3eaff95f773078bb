"""Build one engine folder: `python export/build.py --model tiny --method sparsezip`.

Stages: load the model, export vision.onnx (CLIP up to l* + compression +
projector) and llm.onnx (decoder with KV cache), check each against PyTorch,
write the embedding table, tokenizer and manifest.json.
Everything is written into a temporary sibling folder that is renamed into
place at the end, so an interrupted build never leaves a folder that looks
complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.manifest import FORMAT_VERSION, artifact_entries, tool_versions, write_manifest
from sparsezip_deploy.sparsezip.config import CONFIGS, MethodConfig, config_to_dict

DEFAULT_MODEL = "tiny"
DEFAULT_METHOD = "sparsezip"


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _method_fields() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for cls in CONFIGS.values():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, f)
    return fields


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="export/build.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'tiny' (the embedded default), a llava-hf folder or an original LLaVA folder")
    p.add_argument("--vision-tower", default=None, help="CLIP folder for an original LLaVA model")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(CONFIGS))
    p.add_argument("--out", type=Path, default=None, help="engine folder (default: engines/<model>-<method>)")
    p.add_argument("--force", action="store_true", help="replace an existing engine folder")
    p.add_argument("--llm-dtype", default="float32", choices=["float32", "float16"],
                   help="precision of llm.onnx and the embedding table")
    group = p.add_argument_group(
        "method options", "each applies to the methods that have it; unset options take the method's default")
    for name, f in _method_fields().items():
        owners = [m for m, cls in CONFIGS.items() if name in {g.name for g in dataclasses.fields(cls)}]
        defaults = ", ".join(f"{m}: {getattr(CONFIGS[m](), name)}" for m in owners)
        kind = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else \
            dict(type=int if f.type in (int, "int") else float)
        group.add_argument(_option(name), default=None, help=f"default {defaults}", **kind)
    return p.parse_args(argv)


def method_config(args: argparse.Namespace) -> MethodConfig:
    cls = CONFIGS[args.method]
    own = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in _method_fields() if getattr(args, name) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        raise ExportError(f"method {args.method} has no option(s) {', '.join(_option(n) for n in foreign)}")
    return cls(**given)


class Progress:
    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {what} (t={time.perf_counter() - self.t0:.1f}s)", flush=True)


def build(args: argparse.Namespace) -> Path:
    config = method_config(args)
    progress = Progress(7)
    progress(f"loading model {args.model}")
    from sparsezip_deploy.export.llm import DecoderGraph
    from sparsezip_deploy.export.models import load_model
    from sparsezip_deploy.export.vision import VisionGraph
    loaded = load_model(args.model, vision_tower=args.vision_tower)
    try:
        graph = VisionGraph(loaded.model, config).eval()
    except ValueError as e:
        raise ExportError(str(e)) from None
    decoder = DecoderGraph(loaded.model, args.llm_dtype).eval()

    out = args.out or Path("engines") / f"{loaded.source['name']}-{config.method}"
    if out.exists() and not args.force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = _build_into(tmp, loaded, graph, decoder, progress)
        progress(f"moving into place: {out}")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the engine from other users
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"engine: {out}  method {config.method}, {manifest['vision']['num_slots']} slots "
          f"of {manifest['vision']['num_patches']} patches")
    return out


def _build_into(folder: Path, loaded, graph, decoder, progress: Progress) -> dict:
    from sparsezip_deploy.export.llm import check_llm, export_llm, save_embeddings
    from sparsezip_deploy.export.prompt import prompt_formats
    from sparsezip_deploy.export.vision import check_vision, export_vision

    progress(f"exporting vision.onnx ({graph.layers_run} CLIP layers + {graph.method.method} + projector)")
    vision_io = export_vision(graph, folder / "vision.onnx")
    progress("checking vision.onnx against PyTorch (ONNX Runtime CPU)")
    for line in check_vision(graph, folder / "vision.onnx"):
        print(f"      {line}")
    progress(f"exporting llm.onnx ({decoder.num_layers} layers, {decoder.dtype_name}, KV cache)")
    llm_io, external = export_llm(decoder, folder / "llm.onnx")
    progress("checking llm.onnx against PyTorch (prefill and decode)")
    for line in check_llm(decoder, folder / "llm.onnx"):
        print(f"      {line}")
    progress("writing embeddings, tokenizer and manifest.json")
    save_embeddings(loaded.model, folder / "embed_tokens.npy", decoder.dtype_name)
    loaded.tokenizer.save(str(folder / "tokenizer.json"))
    token = loaded.tokenizer.id_to_token
    vc = loaded.model.config.vision_config
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": loaded.source,
        "method": config_to_dict(graph.method),
        "image": dataclasses.asdict(loaded.image),
        "vision": {
            "image_size": vc.image_size,
            "patch_size": vc.patch_size,
            "grid": [vc.image_size // vc.patch_size] * 2,
            "num_patches": graph.num_patches,
            "hidden_size": vc.hidden_size,
            "feature_layer": loaded.model.config.vision_feature_layer,
            "layers_run": graph.layers_run,
            "num_slots": graph.num_slots,
            "projector": "fused",
            "out_width": graph.out_width,
            "text_aware": graph.text_aware,
        },
        "llm": {
            "num_layers": decoder.num_layers,
            "num_kv_heads": decoder.num_kv_heads,
            "head_dim": decoder.head_dim,
            "hidden_size": decoder.hidden_size,
            "vocab_size": decoder.vocab_size,
            "max_position_embeddings": decoder.max_positions,
            "dtype": decoder.dtype_name,
            "embed_tokens": "embed_tokens.npy",
        },
        "tokens": {
            "image_token_id": loaded.image_token_id,
            "bos_token_id": loaded.bos_token_id,
            "eos_token_id": loaded.eos_token_id,
            "pad_token_id": loaded.pad_token_id,
        },
        "prompt": prompt_formats(loaded.chat_template, token(loaded.image_token_id),
                                 token(loaded.bos_token_id), token(loaded.eos_token_id)),
        "chat_template": loaded.chat_template,
        "graphs": {"vision": {"file": "vision.onnx", **vision_io.to_dict()},
                   "llm": {"file": "llm.onnx", **llm_io.to_dict()}},
        "precision": {"vision": "float32", "llm": decoder.dtype_name, "embed_tokens": decoder.dtype_name},
        "tools": tool_versions(),
    }
    files = ["vision.onnx", "llm.onnx", "embed_tokens.npy", "tokenizer.json"]
    if external:
        files.append("llm.onnx.data")
    manifest["artifacts"] = artifact_entries(folder, files)
    write_manifest(folder, manifest)
    return manifest


def _quiet_exporter() -> None:
    """The exporter's chatter (optional torchvision ops, deprecations) is not the user's business."""
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_exporter()
    try:
        build(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left behind", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
