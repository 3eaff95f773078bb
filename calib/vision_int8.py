"""The INT8 vision graph: the encoder's linear layers in int8, the selection path in float.

    quantize_vision(vision.onnx, vision.onnx, "cpu" | "tensorrt", images, image_config, source)
        -> the manifest's record of what was done (recipe, calibration, measured fidelity)

Only the linear layers of CLIP up to layer l* are quantised (graph.py finds them):
they are the bulk of the encoder's time. Left in float: layer l*'s q and k (the
CLS attention row and the head-averaged keys the scores are made of), the
attention MatMuls, Softmax and QuickGELU, the text projection, scores, TopK,
merging and the projector, so that quantisation flips no more of the selection
than the perturbed features force it to.

Targets:

- cpu: ORT dynamic quantisation (MatMulInteger: int8 weights per output
  channel, activations quantised per run), no calibration. Measured side by side
  on one exported ViT-L/14-336 graph (23 layers, random init, sparsezip-64,
  text-aware), ORT 1.31.1, 2 threads of an AVX512-VNNI EPYC shared with other
  jobs; speed: medians of 6 interleaved rounds, two runs (float32 1053 and 1122
  ms); fidelity against float32 on 8 images the calibration never saw (7
  generated scenes and examples/shapes.png), compare_outputs' measures:

      recipe                          speed-up      file     kept Jaccard     token cos
                                                             mean    min      min
      float32                         1.00x         1122 MB    -       -        -
      dynamic, per-tensor weights     2.50x 2.34x    300 MB  0.916   0.797   0.99984
      dynamic, per-channel (this)     2.58x 2.41x    301 MB  0.913   0.797   0.99990
      static Q/DQ, MinMax on 8 scenes 2.64x 2.30x    301 MB  0.852   0.631   0.99989
      ModelOpt Q/DQ (the tensorrt one) 1.66x 1.47x   311 MB  0.853   0.710   0.99984
      dynamic, l*'s q and k too         -            295 MB  0.848   0.582   0.99990

  (static: per-channel int8 weights, uint8 activations, MatMul outputs left
  float.) Static is no faster within the noise and flips far more of the
  selection: its ranges come from a few images, and a patch outside them clips,
  where dynamic measures every image's own. So dynamic it is, and the
  calibration images serve the fidelity check. Per-channel costs nothing and is
  the safer choice for trained weights, whose outlier channels random init lacks
  (random weights flatter quantisation). The last row is why l*'s q and k stay
  float: 2 of 138 linear layers, and the kept Jaccard drops from 0.913 to 0.848
  without them (the tiny model: 0.968 to 0.938).
- tensorrt: NVIDIA ModelOpt ONNX PTQ (symmetric int8 Q/DQ, weights stored
  int8 behind DequantizeLinear, max calibration on ORT's CPU provider,
  everything else kept float32 rather than ModelOpt's default fp16, which would
  reach the TopK). Explicit Q/DQ is the only int8 form TensorRT 11 accepts, and
  TensorRT 10.3 (JetPack 6) accepts it too; ORT runs the same graph on a CPU,
  slower than the cpu recipe.

Every recipe ends with the same check: the int8 graph against the float one on
the calibration images (the first `check_images`), failing below FLOORS.

A split engine's trunk (vision_trunk.onnx, `selector=` its vision_selector.onnx)
is quantised the same way: its linear layers are the encoder's, and l*'s q and k
are found as those feeding the cls_attn and kmet outputs sideways. The selector
stays float; the check runs trunk then selector, int8 against float.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from sparsezip_deploy.runtime.backends.ort import open_graph
from sparsezip_deploy.runtime.manifest import ImageConfig

from .errors import CalibError
from .graph import Linears, find_linears
from .reader import VisionCalibrationReader, empty_text

TARGETS = ("cpu", "tensorrt")
# Not nvidia-modelopt[onnx]: that extra pins an older onnx and onnxruntime-gpu, which replace a CPU
# install's; its int8 path needs only these (the `test` extra in pyproject.toml installs them).
MODELOPT_HINT = "pip install nvidia-modelopt onnx-graphsurgeon onnxslim lief"


@dataclass(frozen=True)
class Floors:
    """What the fidelity check demands of int8 against float, per image set."""

    kept_jaccard_mean: float  # |kept_int8 & kept_fp32| / |kept_int8 | kept_fp32|, patch indices, mean over images
    token_cosine_min: float  # CLS and every patch kept by both: cosine of its token, worst one


# Random-init graphs (tests, benchmarks) must pass, a broken recipe must not: measured token
# cosines are >= 0.9998 on the tiny model and on ViT-L; kept Jaccard means 0.91 (cpu) and
# 0.85 (tensorrt) on random ViT-L, whose near-uniform attention makes the selection fragile,
# and 0.97 / 0.95 on the tiny model. Trained weights, with peaked CLS attention, do better.
# The vision graph's outputs, in the order compare_outputs takes them.
OUTPUTS = ("visual_tokens", "num_tokens", "kept_index")
FLOORS = {"cpu": Floors(kept_jaccard_mean=0.8, token_cosine_min=0.995),
          "tensorrt": Floors(kept_jaccard_mean=0.7, token_cosine_min=0.995)}


def quantize_vision(source: Path, output: Path, target: str, images: Sequence[Image.Image],
                    image_config: ImageConfig, calibration_source: str, *,
                    text: dict[str, np.ndarray] | None = None, check_images: int = 8,
                    selector: Path | None = None) -> dict:
    """Write the int8 graph of `source` to `output` (which may be `source`); the manifest's record of it.

    images: the calibration set (calibration_images()); calibration_source: its folder_digest().
    text: text feeds for a text-aware graph (prompt_text()); None: the runtime's empty prompt.
    selector: `source` is a split engine's trunk, and this the selector that reads it (left float).
    Nothing is written to `output` unless the fidelity check passes.
    """
    if target not in TARGETS:
        raise CalibError(f"int8 target {target!r} is not one of {', '.join(TARGETS)}")
    if not images:
        raise CalibError("no calibration images")
    source, output = Path(source), Path(output)
    model = onnx.load(str(source))
    linears = find_linears(model)
    if text is None and (width := _text_width(onnx.load(str(selector)) if selector else model)) is not None:
        text = empty_text(width)
    reader = VisionCalibrationReader(images, image_config, text)
    # The trunk reads pixels only: ModelOpt's calibration runs it alone.
    graph_reader = VisionCalibrationReader(images, image_config) if selector is not None else reader
    # The float graph is the reference of the check: the int8 one takes its place only afterwards.
    staged = output.with_name(f".{output.name}.int8.partial")
    try:
        recipe, method = RECIPES[target](source, staged, graph_reader, linears)
        fidelity = check_fidelity(source, staged, reader, check_images, FLOORS[target], selector)
        staged.replace(output)
    finally:
        staged.unlink(missing_ok=True)
    return {
        "precision": "int8",
        "target": target,
        "recipe": recipe,
        "quantized_linears": len(linears.quantize),
        "float_linears": list(linears.selection),
        "calibration": {"images": len(images), "source": calibration_source, "method": method},
        "fidelity": fidelity,
        "tools": _versions(target),
    }


def _text_width(model: onnx.ModelProto) -> int | None:
    for tensor in model.graph.input:
        if tensor.name == "text_embeds":
            return tensor.type.tensor_type.shape.dim[-1].dim_value
    return None


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantiser warns on the root logger that pre-processing is advised: it is not, here
    (dynamic quantisation needs no shapes, and symbolic shape inference fails on the selection ops)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_dynamic(source: Path, output: Path, reader: VisionCalibrationReader, linears: Linears) -> tuple[str, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(source, output, op_types_to_quantize=["MatMul"], nodes_to_quantize=list(linears.quantize),
                         per_channel=True, weight_type=QuantType.QInt8)
    return "ort-dynamic-matmul-s8-per-channel", "dynamic (ranges measured per run)"


def modelopt_qdq(source: Path, output: Path, reader: VisionCalibrationReader, linears: Linears) -> tuple[str, str]:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise CalibError(f"--vision-int8 tensorrt needs NVIDIA ModelOpt ({e}): {MODELOPT_HINT}") from None
    # ModelOpt rewrites the file it is given (0.47 saved its own edits over it): give it a copy.
    with tempfile.TemporaryDirectory(prefix="calib-", dir=output.parent) as work:
        copy = Path(work) / "vision.onnx"
        shutil.copyfile(source, copy)
        quantize(str(copy), quantize_mode="int8", calibration_data_reader=reader, calibration_method="max",
                 calibration_eps=["cpu"], nodes_to_quantize=[f"^{re.escape(n)}$" for n in linears.quantize],
                 dq_only=True, high_precision_dtype="fp32", output_path=str(output), log_level="ERROR")
    model = onnx.load(str(output))
    read_float(model, linears.selection)
    onnx.save(model, str(output))
    return "modelopt-int8-qdq-symmetric", "max"


def read_float(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Point the nodes `names` at the float tensor behind any QuantizeLinear -> DequantizeLinear
    they read. ModelOpt quantises a tensor once for all its readers: l*'s q and k share their
    input with v, which is quantised."""
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]


RECIPES = {"cpu": ort_dynamic, "tensorrt": modelopt_qdq}


def compare_outputs(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """One image's (visual_tokens, num_tokens, kept_index) from two graphs -> kept-patch Jaccard and
    the cosines of the tokens both kept: CLS and each patch kept by both, matched by patch index
    (a slot can move when one patch changes), merged tokens left out (their members may differ)."""
    (tokens_r, num_r, kept_r), (tokens_g, num_g, kept_g) = ref, got
    kept_r, kept_g = kept_r[0, :int(num_r[0])], kept_g[0, :int(num_g[0])]
    patches_r, patches_g = set(kept_r[kept_r >= 0].tolist()), set(kept_g[kept_g >= 0].tolist())
    union = patches_r | patches_g
    jaccard = len(patches_r & patches_g) / len(union) if union else 1.0
    common = sorted(patches_r & patches_g)
    cls = [0] if kept_r[0] == kept_g[0] == -1 else []  # method none has no CLS slot
    slot_r = cls + [int(np.flatnonzero(kept_r == p)[0]) for p in common]
    slot_g = cls + [int(np.flatnonzero(kept_g == p)[0]) for p in common]
    x, y = tokens_r[0, slot_r], tokens_g[0, slot_g]
    cosine = (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)
    return jaccard, cosine


def check_fidelity(source: Path, output: Path, reader: VisionCalibrationReader, count: int,
                   floors: Floors, selector: Path | None = None) -> dict:
    """int8 against float on the first `count` images (`selector`: the two are trunks, each run
    through it); CalibError below `floors`."""
    jaccards, cosines = [], []
    with contextlib.ExitStack() as stack:
        ref, got = (stack.enter_context(open_graph(path)) for path in (source, output))
        after = stack.enter_context(open_graph(selector)) if selector is not None else None

        def outputs(graph, feeds):
            if after is None:
                return graph.run(feeds)
            features = graph.run({"pixel_values": feeds["pixel_values"]})
            return after.run({**features, **{k: v for k, v in feeds.items() if k != "pixel_values"}})

        for _, feeds in zip(range(count), reader.feeds()):
            jaccard, cosine = compare_outputs(*([outputs(g, feeds)[k] for k in OUTPUTS] for g in (ref, got)))
            jaccards.append(jaccard)
            cosines.append(cosine)
    figures = {"images": len(jaccards), "kept_jaccard_mean": round(float(np.mean(jaccards)), 4),
               "kept_jaccard_min": round(float(np.min(jaccards)), 4),
               "token_cosine_min": round(float(np.concatenate(cosines).min()), 5), "floors": asdict(floors)}
    if figures["kept_jaccard_mean"] < floors.kept_jaccard_mean or figures["token_cosine_min"] < floors.token_cosine_min:
        raise CalibError(f"the int8 vision graph is too far from float32 on the calibration images: kept-patch "
                         f"Jaccard mean {figures['kept_jaccard_mean']} (floor {floors.kept_jaccard_mean}), "
                         f"token cosine min {figures['token_cosine_min']} (floor {floors.token_cosine_min})")
    return figures


def _versions(target: str) -> dict[str, str]:
    names = ("onnxruntime", "onnx") + (("nvidia-modelopt",) if target == "tensorrt" else ())
    return {name: metadata.version(name) for name in names}
