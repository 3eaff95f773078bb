"""Build one engine folder: `python export/build.py --model shapes --method sparsezip`.

Stages: load the model, export vision.onnx (CLIP up to l* + compression +
projector; for text-aware sparsezip, unless --no-split-vision,
vision_trunk.onnx + vision_selector.onnx, the same cut in two) and llm.onnx
(decoder with KV cache), check each against PyTorch, optionally quantise them
and calibrate the dynamic-K budget (calib/), write the embedding table,
tokenizer and manifest.json.
Everything is written into a temporary sibling folder that is renamed into
place at the end, so an interrupted build never leaves a folder that looks
complete. `--out` is checked before the model loads (minutes for a 7B model).

The siblings of `out` that a build makes, all `.<name>.<8 random chars>.<kind>`:

    .partial  the engine being written, with builder.json (pid, host) while it is;
              stale once its process is gone (same host) or it is STALE_AFTER old
    .old      the previous engine, set aside by --force for the two renames
              (out -> .old, .partial -> out); complete, since it is never written
    .trash    a .old after the new engine is in place, being deleted

A kill at any point leaves a complete engine at `out`, or none and a `.old`:
the next build of the same name (`sweep`) puts that `.old` back when `out` is
missing and deletes it when `out` exists; it deletes `.trash` and stale
`.partial` folders, and touches nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.tensorrt_lint import TARGETS as LINT_TARGETS
from sparsezip_deploy.runtime.errors import UserError
from sparsezip_deploy.runtime.manifest import (DEFAULT_MAX_BATCH, DEFAULT_MAX_TEXT_LEN, FORMAT_VERSION,
                                               SELECTOR_GRAPH, TOKENIZER, TRUNK_GRAPH, VISION_GRAPH, Limits,
                                               LlmInfo, Manifest, PromptTemplate, TokenIds, VisionInfo,
                                               artifact_entries, tool_versions, write_manifest)
from sparsezip_deploy.llm_prune.config import PRUNE_CONFIGS, PruneConfig
from sparsezip_deploy.sparsezip.config import CONFIGS, MethodConfig, NoneConfig, SparseZipConfig, config_to_dict

DEFAULT_MODEL = "shapes"
DEFAULT_METHOD = "sparsezip"
# A .partial whose builder cannot be asked (another host, no builder.json) is stale after
# this long; no build of the tiny-to-7B models here takes close to it.
STALE_AFTER = 24 * 3600
# The vision parity check's images: a batch of 2 (not a static axis), its own seed
# (calibration uses seed 0, the accuracy benchmark's held-out scenes others).
PARITY_IMAGES, PARITY_SEED = 2, 11
BUILDER = "builder.json"


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
                   help="'shapes' (the embedded default, trained on generated scenes), 'tiny' (random-init, "
                        "for tests), a llava-hf folder or an original LLaVA folder")
    p.add_argument("--vision-tower", default=None, help="CLIP folder for an original LLaVA model")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=[*CONFIGS, *PRUNE_CONFIGS],
                   help="a vision-side method (in vision.onnx), or an in-LLM one (fastv, sparsevlm: in the "
                        "LLM's image prefill, every patch to the LLM)")
    p.add_argument("--llm-prune", default=None, choices=list(PRUNE_CONFIGS),
                   help="stack an in-LLM method on the vision-side --method (e.g. sparsezip to 192, then "
                        "sparsevlm inside the LLM)")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default: engines/<model>-<method>)")
    p.add_argument("--force", action="store_true", help="replace an existing engine folder")
    p.add_argument("--llm-dtype", default="float32", choices=["float32", "float16"],
                   help="precision of llm.onnx and the embedding table")
    p.add_argument("--vision-dtype", default="float32", choices=["float32", "float16"],
                   help="precision of the CLIP tower and projector in vision.onnx (float16 is for GPUs: "
                        "ONNX Runtime CPU runs most of it in float32 between casts); the token selection "
                        "and the graph's inputs and outputs stay float32")
    p.add_argument("--split-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="write the vision stage as vision_trunk.onnx (CLIP to the feature layer) + "
                        "vision_selector.onnx (scores, text term, TopK, merging, projector), so the runtime runs "
                        "CLIP once per image and the selection once per question (default: for text-aware "
                        "sparsezip, the only method whose vision output depends on the prompt; "
                        "--no-split-vision: one vision.onnx)")
    p.add_argument("--target", default=None, choices=list(LINT_TARGETS),
                   help="fail the build if TensorRT's ONNX parser of this version would refuse a node "
                        "(export/tensorrt_lint.py; runs on the CPU)")
    limits = p.add_argument_group(
        "serving limits", "the largest shapes the engine serves: TensorRT's optimisation profiles end there "
                          "and the runtime refuses beyond them")
    limits.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="rows of one batch")
    limits.add_argument("--max-positions", type=int, default=None,
                        help="prompt + answer per row, image tokens included (default: the LLM's "
                             "max_position_embeddings)")
    limits.add_argument("--max-text-len", type=int, default=DEFAULT_MAX_TEXT_LEN,
                        help="prompt words a text-aware vision graph reads (capped at --max-positions)")
    calib = p.add_argument_group("quantisation and calibration (calib/)")
    calib.add_argument("--vision-int8", choices=["cpu", "tensorrt"], default=None,
                       help="int8 encoder linear layers: 'cpu' ONNX Runtime dynamic int8, 'tensorrt' "
                            "ModelOpt symmetric Q/DQ; the selection path stays float")
    calib.add_argument("--llm-quant", choices=["none", "int4", "int8"], default="none",
                       help="weight-only MatMulNBits quantisation of llm.onnx")
    calib.add_argument("--target-mean-k", type=float, default=None,
                       help="fit the dynamic-K offset so the calibration images keep this many dominant "
                            "patches on average (sparsezip; turns --dynamic-k on)")
    calib.add_argument("--calib-images", type=Path, default=None,
                       help="folder of calibration images (default: generated scenes); the vision "
                            "parity check also runs on two of them")
    calib.add_argument("--calib-count", type=int, default=32, help="calibration images to use")
    prune = p.add_argument_group(
        "in-LLM pruning options (fastv, sparsevlm)", "unset options take the paper's defaults")
    prune.add_argument("--prune-layers", type=_ints, default=None,
                       help="fastv: K, the first layer on the kept tokens (default 2); sparsevlm: the layers "
                            "after which it prunes, e.g. 2,6,15 (default: the paper's, scaled to the depth)")
    prune.add_argument("--prune-keep", type=_ints, default=None,
                       help="visual tokens kept: fastv one count (default half), sparsevlm one per stage")
    prune.add_argument("--prune-budget", type=int, default=None,
                       help="instead of --prune-keep: the average visual tokens over the LLM's layers "
                            "(sparsevlm default 192: the paper's schedules)")
    prune.add_argument("--recycle", type=float, default=None,
                       help="sparsevlm: share of each stage's dropped tokens recycled (default 0.3)")
    prune.add_argument("--clusters", type=float, default=None,
                       help="sparsevlm: merged tokens per recycled token (default 0.1)")
    group = p.add_argument_group(
        "method options", "each applies to the methods that have it; unset options take the method's default")
    for name, f in _method_fields().items():
        owners = [m for m, cls in CONFIGS.items() if name in {g.name for g in dataclasses.fields(cls)}]
        defaults = ", ".join(f"{m}: {getattr(CONFIGS[m](), name)}" for m in owners)
        kind = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else \
            dict(type={"int": int, "str": str}.get(getattr(f.type, "__name__", f.type), float))
        group.add_argument(_option(name), default=None, help=f"default {defaults}", **kind)
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def vision_method(args: argparse.Namespace) -> str:
    """The method in vision.onnx: --method, or none under an in-LLM --method."""
    return NoneConfig.method if args.method in PRUNE_CONFIGS else args.method


def prune_config(args: argparse.Namespace) -> PruneConfig | None:
    """The in-LLM method (--method fastv|sparsevlm, or --llm-prune), from the --prune-* options."""
    if args.method in PRUNE_CONFIGS and args.llm_prune is not None:
        raise ExportError(f"--llm-prune stacks on a vision-side --method; {args.method} is in-LLM already")
    name = args.method if args.method in PRUNE_CONFIGS else args.llm_prune
    given = {flag: getattr(args, flag) for flag in ("prune_layers", "prune_keep", "prune_budget", "recycle",
                                                    "clusters") if getattr(args, flag) is not None}
    if name is None:
        if given:
            raise ExportError(f"{', '.join(_option(f) for f in given)}: no in-LLM method (--method fastv|sparsevlm "
                              "or --llm-prune)")
        return None
    if args.prune_keep is not None and args.prune_budget is not None:
        raise ExportError("give --prune-keep or --prune-budget, not both")
    if name == "fastv":
        if args.recycle is not None or args.clusters is not None:
            raise ExportError("--recycle and --clusters are sparsevlm's (fastv recycles nothing)")
        for flag in ("prune_layers", "prune_keep"):
            if len(given.get(flag, (0,))) != 1:
                raise ExportError(f"fastv takes one {_option(flag)} value, got {','.join(map(str, given[flag]))}")
        options = dict(layer=given.get("prune_layers", (None,))[0], keep=given.get("prune_keep", (None,))[0],
                       budget=args.prune_budget)
    else:
        options = dict(layers=args.prune_layers, keep=args.prune_keep, budget=args.prune_budget,
                       recycle=args.recycle, clusters=args.clusters)
    return PRUNE_CONFIGS[name](**{k: v for k, v in options.items() if v is not None})


def method_config(args: argparse.Namespace) -> MethodConfig:
    cls = CONFIGS[vision_method(args)]
    own = {f.name for f in dataclasses.fields(cls)}
    given = {name: getattr(args, name) for name in _method_fields() if getattr(args, name) is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        raise ExportError(f"method {cls.method} has no option(s) {', '.join(_option(n) for n in foreign)}")
    if args.target_mean_k is not None:
        if "dynamic_k" not in own:
            raise ExportError(f"--target-mean-k needs a method with a dynamic K (sparsezip), not {cls.method}")
        if given.get("dynamic_k") is False:
            raise ExportError("--target-mean-k calibrates the dynamic K: drop --no-dynamic-k")
        given["dynamic_k"] = True
    config = cls(**given)
    if args.target_mean_k is not None and not config.k_min <= args.target_mean_k <= config.k_max:
        raise ExportError(f"--target-mean-k {args.target_mean_k:g} is outside [--k-min, --k-max] = "
                          f"[{config.k_min}, {config.k_max}]")
    return config


def check_limit_options(args: argparse.Namespace) -> None:
    """What can be checked before the model loads; --max-positions against the model, after."""
    if not 1 <= args.max_batch <= 1024:
        raise ExportError(f"--max-batch must be in [1, 1024], got {args.max_batch}")
    if args.max_text_len < 1:
        raise ExportError(f"--max-text-len must be >= 1, got {args.max_text_len}")
    if args.max_positions is not None and args.max_positions < 2:
        raise ExportError(f"--max-positions must be >= 2, got {args.max_positions}")


def serving_limits(args: argparse.Namespace, max_position_embeddings: int) -> Limits:
    positions = max_position_embeddings if args.max_positions is None else args.max_positions
    if positions > max_position_embeddings:
        raise ExportError(f"--max-positions {positions} exceeds the LLM's max_position_embeddings "
                          f"{max_position_embeddings}")
    return Limits(args.max_batch, positions, min(args.max_text_len, positions))


def _calibrating(args: argparse.Namespace) -> bool:
    return args.vision_int8 is not None or args.target_mean_k is not None


class Progress:
    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.step += 1
        print(f"[{self.step}/{self.total}] {what} (t={time.perf_counter() - self.t0:.1f}s)", flush=True)


def build(args: argparse.Namespace) -> Path:
    config = method_config(args)
    pruning = prune_config(args)
    if pruning is not None and args.llm_quant != "none":
        raise ExportError("--llm-quant with an in-LLM method is not supported yet: its image prefill graph "
                          "would stay float")
    check_limit_options(args)
    if args.calib_count < 1:
        raise ExportError(f"--calib-count must be >= 1, got {args.calib_count}")
    if args.calib_images is not None:  # refused before the model loads, not at the parity check
        from sparsezip_deploy.calib.reader import image_files
        image_files(args.calib_images)
    text_aware = isinstance(config, SparseZipConfig) and config.text_aware
    if args.split_vision is None:
        args.split_vision = text_aware
    if args.split_vision and not text_aware:
        raise ExportError(f"--split-vision is for text-aware sparsezip (--beta > 0): the vision output of "
                          f"{config.method}{' --beta 0' if isinstance(config, SparseZipConfig) else ''} does "
                          "not depend on the prompt, and the runtime caches it whole")
    if args.vision_int8 is not None and args.vision_dtype != "float32":
        raise ExportError("--vision-int8 quantises a float32 vision graph: drop --vision-dtype")
    optional = (args.vision_int8 is not None) + (args.target_mean_k is not None) + (args.llm_quant != "none") \
        + (args.target is not None)
    label = pruning.method if args.method in PRUNE_CONFIGS else \
        config.method + (f"+{pruning.method}" if pruning is not None else "")
    out = args.out or Path("engines") / f"{_model_name(args.model)}-{label}"
    check_out(out, _model_folders(args), args.force)
    for line in sweep(out):
        print(line)
    if out.exists() and not args.force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    tmp = make_partial(out)
    try:
        progress = Progress(7 + optional + _calibrating(args) + 2 * (pruning is not None))
        progress(f"loading model {args.model}")
        from sparsezip_deploy.export.llm import DecoderGraph
        from sparsezip_deploy.export.models import load_model
        from sparsezip_deploy.export.vision import VisionGraph
        loaded = load_model(args.model, vision_tower=args.vision_tower)
        try:
            graph = VisionGraph(loaded.model, config, args.vision_dtype).eval()
        except ValueError as e:
            raise ExportError(str(e)) from None
        prefill = None
        if pruning is None:
            decoder = DecoderGraph(loaded.model, args.llm_dtype).eval()
        else:
            from sparsezip_deploy.export.llm_prune import PrefillGraph, pruned_layout
            num_layers = loaded.model.config.text_config.num_hidden_layers
            try:
                stages = pruning.stages(num_layers, graph.num_slots)
            except ValueError as e:
                raise ExportError(str(e)) from None
            decoder = DecoderGraph(loaded.model, args.llm_dtype, pruned_layout(num_layers, stages)).eval()
            prefill = PrefillGraph(decoder, pruning, graph.num_slots).eval()
        limits = serving_limits(args, decoder.max_positions)
        manifest = _build_into(tmp, loaded, graph, decoder, prefill, limits, progress, args)
        progress(f"moving into place: {out}")
        (tmp / BUILDER).unlink()
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the engine from other users
        if out.exists() and not args.force:  # another build finished first
            raise ExportError(f"{out} appeared during the build; pass --force to replace it")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"engine: {out}  method {config.method}, {manifest.vision.num_slots} slots "
          f"of {manifest.vision.num_patches} patches")
    if manifest.llm.pruning is not None:
        stages = ", ".join(f"after layer {s.after}: {s.keep}" + (f" + {s.merged} merged" if s.merged else "")
                           for s in manifest.llm.pruning.stages)
        print(f"        in the LLM: {manifest.llm.pruning.method}, visual tokens {stages}")
    return out


def _model_name(spec: str) -> str:
    """What load_model puts in source["name"], known before loading."""
    return spec if spec in ("tiny", "shapes") else Path(spec).expanduser().resolve().name


def _model_folders(args: argparse.Namespace) -> list[Path]:
    if args.model == "shapes":
        from sparsezip_deploy.export.models import SHAPES_MODEL
        folders = [SHAPES_MODEL]
    else:
        folders = [] if args.model == "tiny" else [Path(args.model).expanduser()]
    return folders + ([Path(args.vision_tower).expanduser()] if args.vision_tower else [])


def check_out(out: Path, model_folders: list[Path], force: bool) -> None:
    """Everything about --out that can fail, checked before the model loads."""
    where = out.resolve()  # '..' and symlinks, as the kernel will see them
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    for parent in where.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"--out {out}: {parent} is a file, not a folder")
    for model in model_folders:
        model = model.resolve()
        if where == model:
            raise ExportError(f"--out {out} is the model folder: write the engine elsewhere")
        if model in where.parents:
            raise ExportError(f"--out {out} is inside the model folder {model}: write the engine elsewhere")
        if where in model.parents:
            raise ExportError(f"--out {out} contains the model folder {model}: write the engine elsewhere")
    if out.is_dir() and force and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ExportError(f"--out {out} is a folder but not an engine folder (no manifest.json): --force "
                          "replaces engine folders only; remove it yourself or choose another --out")
    existing = next(parent for parent in where.parents if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: cannot write in {existing} (permission denied)")


def make_partial(out: Path) -> Path:
    """The hidden sibling folder the engine is written into, marked with its builder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise ExportError(f"--out {out}: cannot create a folder in {out.parent}: {error.strerror}") from None
    (tmp / BUILDER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """tmp -> out, replacing an engine folder at out; see the module docstring for the states."""
    old = tmp.with_suffix(".old")
    # SIGINT / SIGTERM wait until both renames are done (SIGKILL cannot: the sweep recovers).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        if old.exists():
            os.rename(old, old.with_suffix(".trash"))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old.with_suffix(".trash"), ignore_errors=True)


def _siblings(out: Path) -> dict[str, list[Path]]:
    """This engine name's .partial / .old / .trash folders (mkdtemp's random part has no dots)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.(partial|old|trash)")
    found: dict[str, list[Path]] = {"partial": [], "old": [], "trash": []}
    if out.parent.is_dir():
        for path in sorted(out.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_dir() and not path.is_symlink():
                found[match.group(1)].append(path)
    return found


def _age(path: Path) -> float:
    return time.time() - path.stat().st_mtime


def _describe_age(seconds: float) -> str:
    for unit, size, from_ in (("days", 86400, 2 * 86400), ("h", 3600, 3600), ("min", 60, 60)):
        if seconds >= from_:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _builder_gone(partial: Path) -> bool | None:
    """True: its builder process (on this host) has exited; None: cannot tell."""
    try:
        builder = json.loads((partial / BUILDER).read_text(encoding="utf-8"))
        pid, host = int(builder["pid"]), builder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep(out: Path) -> list[str]:
    """Clean up after interrupted builds of `out` (see the module docstring); one line per action."""
    found, lines = _siblings(out), []
    for old in sorted(found["old"], key=_age):  # newest first: the one to restore
        age = _describe_age(_age(old))
        if not out.exists():
            os.rename(old, out)
            lines.append(f"restored {out} from {old.name} ({age} old, set aside by an interrupted --force build)")
        else:
            shutil.rmtree(old, ignore_errors=True)
            lines.append(f"removed stale {old.name} ({age} old, the engine an interrupted --force build replaced)")
    for trash in found["trash"]:
        age = _describe_age(_age(trash))
        shutil.rmtree(trash, ignore_errors=True)
        lines.append(f"removed stale {trash.name} ({age} old, left by an interrupted --force build)")
    for partial in found["partial"]:
        age, gone = _age(partial), _builder_gone(partial)
        if gone or (gone is None and age > STALE_AFTER):
            shutil.rmtree(partial, ignore_errors=True)
            lines.append(f"removed stale {partial.name} ({_describe_age(age)} old, left by an interrupted build)")
    return lines


def _build_into(folder: Path, loaded, graph, decoder, prefill, limits: Limits, progress: Progress,
                args: argparse.Namespace) -> Manifest:
    from sparsezip_deploy.export.llm import check_llm, export_llm, save_embeddings
    from sparsezip_deploy.export.prompt import prompt_formats
    from sparsezip_deploy.export.vision import check_split, check_vision, export_split, export_vision

    content = f"{PARITY_IMAGES} {'of the calibration images' if args.calib_images else 'generated scenes'}"
    if args.split_vision:
        progress(f"exporting vision_trunk.onnx ({graph.layers_run} CLIP layers) and vision_selector.onnx "
                 f"({graph.method.method} + projector)")
        vision_graphs = dict(zip((TRUNK_GRAPH, SELECTOR_GRAPH), export_split(graph, folder)))
        progress(f"checking vision_trunk.onnx, then vision_selector.onnx on its features, against PyTorch "
                 f"(ONNX Runtime CPU) on {content}")
        lines = check_split(graph, *(folder / spec.file for spec in vision_graphs.values()),
                            _parity_feeds(loaded, graph, args))
    else:
        progress(f"exporting vision.onnx ({graph.layers_run} CLIP layers + {graph.method.method} + projector)")
        vision_graphs = {VISION_GRAPH: export_vision(graph, folder / "vision.onnx")}
        progress(f"checking vision.onnx against PyTorch (ONNX Runtime CPU) on {content}")
        lines = check_vision(graph, folder / "vision.onnx", _parity_feeds(loaded, graph, args))
    for line in lines:
        print(f"      {line}")
    save_embeddings(loaded.model, folder / "embed_tokens.npy", decoder.dtype_name)
    calibration = _calibrate_vision(folder, loaded, graph, vision_graphs, progress, args) \
        if _calibrating(args) else {}
    progress(f"exporting llm.onnx ({decoder.num_layers} layers, {decoder.dtype_name}, KV cache)")
    llm_io, external = export_llm(decoder, folder / "llm.onnx")
    progress("checking llm.onnx against PyTorch (prefill and decode)")
    for line in check_llm(decoder, folder / "llm.onnx"):
        print(f"      {line}")
    graphs, files = {}, []
    if prefill is not None:
        from sparsezip_deploy.export.llm_prune import check_prefill, export_prefill
        progress(f"exporting llm_prefill.onnx (the image prefill, {prefill.config.method} inside the LLM)")
        graphs["llm_prefill"], prefill_external = export_prefill(prefill, folder / "llm_prefill.onnx")
        files += ["llm_prefill.onnx"] + (["llm_prefill.onnx.data"] if prefill_external else [])
        progress("checking llm_prefill.onnx against PyTorch")
        for line in check_prefill(prefill, folder / "llm_prefill.onnx"):
            print(f"      {line}")
    llm_precision = decoder.dtype_name
    if args.llm_quant != "none":
        from sparsezip_deploy.calib.llm_quant import quantize_llm
        progress(f"quantising llm.onnx weights to {args.llm_quant} (MatMulNBits)")
        record = quantize_llm(folder / "llm.onnx", folder / "llm.onnx", int(args.llm_quant[3:]),
                              embeddings=np.load(folder / "embed_tokens.npy"))
        external = "llm.onnx.data" in record.pop("files")
        if not external:  # int4 weights of a model that needed external data in float may not
            (folder / "llm.onnx.data").unlink(missing_ok=True)
        print(f"      {record['nodes_quantised']} MatMuls, logits cosine vs float "
              f"min {record['fidelity']['logits_cosine_min']:.4f}")
        calibration["llm_quant"] = record
        llm_precision = record["precision"]
    tools = tool_versions()
    if args.target is not None:
        _lint(folder, args.target, progress)
        tools["tensorrt_lint"] = f"{args.target}: no violations"
    progress("writing tokenizer and manifest.json")
    method = graph.method
    if "dynamic_k" in calibration:
        method = dataclasses.replace(method, k_offset=calibration["dynamic_k"]["k_offset"])
    loaded.tokenizer.save(str(folder / TOKENIZER))
    token = loaded.tokenizer.id_to_token
    vc = loaded.model.config.vision_config
    files += [spec.file for spec in vision_graphs.values()] + ["llm.onnx", "embed_tokens.npy", TOKENIZER] \
        + (["llm.onnx.data"] if external else [])
    try:
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            source=loaded.source,
            method=config_to_dict(method),
            image=loaded.image,
            vision=VisionInfo(
                image_size=vc.image_size, patch_size=vc.patch_size, grid=(vc.image_size // vc.patch_size,) * 2,
                num_patches=graph.num_patches, hidden_size=vc.hidden_size,
                feature_layer=loaded.model.config.vision_feature_layer, layers_run=graph.layers_run,
                num_slots=graph.num_slots, projector="fused", out_width=graph.out_width,
                text_aware=graph.text_aware),
            llm=LlmInfo(
                num_layers=decoder.num_layers, num_kv_heads=decoder.num_kv_heads, head_dim=decoder.head_dim,
                hidden_size=decoder.hidden_size, vocab_size=decoder.vocab_size,
                max_position_embeddings=decoder.max_positions, dtype=decoder.dtype_name,
                embed_tokens="embed_tokens.npy", cache=decoder.cache,
                pruning=None if prefill is None else prefill.pruning),
            tokens=TokenIds(image_token_id=loaded.image_token_id, bos_token_id=loaded.bos_token_id,
                            eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id),
            prompt=PromptTemplate(**prompt_formats(loaded.chat_template, token(loaded.image_token_id),
                                                   token(loaded.bos_token_id), token(loaded.eos_token_id))),
            chat_template=loaded.chat_template,
            graphs={**vision_graphs, "llm": llm_io, **graphs},
            precision={"vision": calibration.get("vision_int8", {}).get("precision", graph.dtype_name),
                       "llm": llm_precision, "embed_tokens": decoder.dtype_name,
                       **({"llm_prefill": decoder.dtype_name} if prefill is not None else {})},
            calibration=calibration,
            tools=tools,
            artifacts=artifact_entries(folder, files),
            limits=limits,
        )
    except ValueError as e:  # the model's facts disagree with each other (e.g. a token id outside the vocabulary)
        raise ExportError(f"the engine's manifest would be invalid: {e}") from None
    write_manifest(folder, manifest)
    return manifest


def _parity_feeds(loaded, graph, args: argparse.Namespace) -> dict:
    """Real content for the vision parity check: scenes (or the user's calibration images)
    and object-naming prompts. Random pixels would do for the export, but a trained tower
    maps them to near-tied scores, where any float rounding reorders the top K."""
    from tokenizers import Tokenizer

    from sparsezip_deploy.calib.reader import calibration_images
    from sparsezip_deploy.export.vision import parity_inputs

    images = calibration_images(args.calib_images, PARITY_IMAGES, seed=PARITY_SEED)
    table = loaded.model.get_input_embeddings().weight.detach().float().numpy()
    return parity_inputs(graph, images, loaded.image, Tokenizer.from_str(loaded.tokenizer.to_str()), table)


def _calibrate_vision(folder: Path, loaded, graph, vision_graphs: dict, progress: Progress,
                      args: argparse.Namespace) -> dict:
    """int8 encoder, then the dynamic-K fit on the graph that ships (quantisation moves var(s)).
    Split: the int8 encoder is the trunk; the law is in the selector, fitted on the trunk's features."""
    from tokenizers import Tokenizer

    from sparsezip_deploy.calib.budget import calibrate_budget
    from sparsezip_deploy.calib.reader import (VisionCalibrationReader, calibration_images, folder_digest,
                                               prompt_text, selector_feeds)
    from sparsezip_deploy.calib.vision_int8 import quantize_vision

    source = folder_digest(args.calib_images, args.calib_count)
    progress(f"loading {args.calib_count} calibration images ({args.calib_images or 'generated scenes'})")
    images = calibration_images(args.calib_images, args.calib_count)
    image_config = loaded.image
    # A text-aware graph is calibrated with one fixed, object-neutral prompt.
    text = prompt_text(Tokenizer.from_str(loaded.tokenizer.to_str()), np.load(folder / "embed_tokens.npy")) \
        if graph.text_aware else None
    calibration = {}
    encoder = folder / vision_graphs[TRUNK_GRAPH if args.split_vision else VISION_GRAPH].file
    selector = folder / vision_graphs[SELECTOR_GRAPH].file if args.split_vision else None
    if args.vision_int8 is not None:
        progress(f"quantising {encoder.name} to int8 for {args.vision_int8}")
        record = quantize_vision(encoder, encoder, args.vision_int8, images, image_config, source, text=text,
                                 selector=selector)
        fid = record["fidelity"]
        print(f"      {record['quantized_linears']} linear layers int8; kept-index Jaccard mean "
              f"{fid['kept_jaccard_mean']:.3f}, token cosine min {fid['token_cosine_min']:.5f}")
        calibration["vision_int8"] = record
    if args.target_mean_k is not None:
        progress(f"fitting the dynamic-K offset for a mean K of {args.target_mean_k:g}")
        feeds = VisionCalibrationReader(images, image_config, text).feeds()
        if selector is not None:
            feeds = selector_feeds(encoder, feeds)
        record = calibrate_budget(selector or encoder, feeds, args.target_mean_k, graph.method.contextual)
        record["calibration"] = {"images": len(images), "source": source,
                                 "prompt": "fixed (calib.reader.CALIBRATION_PROMPT)" if text else "none"}
        print(f"      k_offset {record['k_offset']}: mean K {record['achieved_mean_k']} "
              f"(std {record['k_std']}, range {record['k_range']})")
        calibration["dynamic_k"] = record
    return calibration


def _lint(folder: Path, target: str, progress: Progress) -> None:
    from sparsezip_deploy.export.tensorrt_lint import check_folder

    progress(f"checking every node against TensorRT {target.removeprefix('tensorrt-')}'s ONNX parser rules")
    lines = check_folder(folder, target)
    for line in lines:
        print(f"      {line}")
    if lines:
        raise ExportError(f"{len(lines)} node(s) that TensorRT {target.removeprefix('tensorrt-')} would refuse "
                          "(listed above)")


def _quiet_exporter() -> None:
    """The exporter's chatter (optional torchvision ops, deprecations) is not the user's business."""
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Terminated(BaseException):
    """SIGTERM, raised where the build is, so that its cleanup runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_exporter()
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's condition
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        build(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left behind", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM); nothing was left behind", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
