"""export/build.py --vision-dtype float16, built and answered: a float16 tower and projector, a float32
selection and float32 graph I/O, kept patches equal to the float32 engine's.

Here rather than in tests/export: the float32 engines to compare with are the runtime's session fixtures.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.vision import VisionGraph
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.sparsezip.config import NoneConfig

from .conftest import SPARSEZIP_KEPT, SPARSEZIP_OPTIONS, _build

QUESTION = "What colour is the circle?"
FLOAT16 = ["--vision-dtype", "float16"]


@pytest.fixture(scope="module")
def engine_sparsezip16(tiny_dir, tmp_path_factory):
    """Text-aware sparsezip, float16 vision, float32 LLM."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-sparsezip-v16", "sparsezip",
                  *SPARSEZIP_OPTIONS, *FLOAT16)


@pytest.fixture(scope="module")
def engine_none16(tiny_dir, tmp_path_factory):
    """No compression, float16 vision and float16 LLM."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-none-v16-l16", "none", *FLOAT16,
                  "--llm-dtype", "float16")


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph (weights, inputs, outputs, intermediates)."""
    model = onnx.shape_inference.infer_shapes(model)
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _input_types(model: onnx.ModelProto, op: str) -> set[int]:
    types = _types(model)
    nodes = [n for n in model.graph.node if n.op_type == op]
    assert nodes, f"no {op} node"
    return {types[n.input[0]] for n in nodes}


@pytest.mark.parametrize("name", ["engine_sparsezip16", "engine_none16"])
def test_tower_is_float16_and_selection_float32(request, name):
    model = onnx.load(str(request.getfixturevalue(name) / "vision.onnx"))
    weights = {i.name: i for i in model.graph.initializer
               if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and numpy_helper.to_array(i).size >= 1024}
    assert weights["embeddings.patch_embedding.weight"].data_type == TensorProto.FLOAT16
    float32 = [i for i in weights.values() if i.data_type == TensorProto.FLOAT]
    if name == "engine_sparsezip16":
        # The one float32 weight: the text relevance's W2 W1 (LLM width x vision width), folded from the
        # float16 projector and part of the selection.
        assert [tuple(i.dims) for i in float32] == [(64, 64)]
        assert _input_types(model, "TopK") == {TensorProto.FLOAT}
        assert _input_types(model, "ArgMax") == {TensorProto.FLOAT}  # k-means assignments
    else:
        assert not float32
    assert _input_types(model, "Conv") == _input_types(model, "LayerNormalization") == {TensorProto.FLOAT16}


def test_manifest_records_the_precision_and_float32_io(engine_sparsezip16, engine_none16):
    for engine, llm in ((engine_sparsezip16, "float32"), (engine_none16, "float16")):
        manifest = json.loads((engine / "manifest.json").read_text())
        assert manifest["precision"] == {"vision": "float16", "llm": llm, "embed_tokens": llm}
        vision = manifest["graphs"]["vision"]
        floats = {name: t["dtype"] for table in (vision["inputs"], vision["outputs"]) for name, t in table.items()
                  if not name.endswith(("_mask", "num_tokens", "kept_index"))}
        assert set(floats.values()) == {"float32"}, floats
        model = onnx.load(str(engine / "vision.onnx"))
        declared = [t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]
                    if t.name in floats]
        assert set(declared) == {TensorProto.FLOAT}


def _answer(engine, image):
    with Pipeline(engine, threads=2) as pipe:
        chat = pipe.conversation(image)
        result = chat.ask(QUESTION, max_new_tokens=3)
        return result, chat.visual


def _relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def test_text_aware_float16_keeps_what_float32_keeps_and_answers(engine_sparsezip16, engine_sparsezip, shapes_png):
    r16, v16 = _answer(engine_sparsezip16, shapes_png)
    r32, v32 = _answer(engine_sparsezip, shapes_png)
    assert r16.visual_tokens_kept == r32.visual_tokens_kept == SPARSEZIP_KEPT
    assert r16.kept_index == r32.kept_index
    # float16 rounding of the tower and the projector, not a different selection or merge.
    assert _relative_l2(v16.tokens, v32.tokens) < 1e-2
    assert 1 <= len(r16.token_ids) <= 3 and r16.stop_reason in ("eos", "length")


def test_float16_vision_feeds_a_float16_llm(engine_none16, engine_none, shapes_png):
    r16, v16 = _answer(engine_none16, shapes_png)
    _, v32 = _answer(engine_none, shapes_png)
    assert r16.kept_index == tuple(range(576))
    assert v16.tokens.dtype == np.float32  # the graph's output; the prompt embeds are float16
    assert _relative_l2(v16.tokens, v32.tokens) < 1e-2
    assert 1 <= len(r16.token_ids) <= 3 and r16.stop_reason in ("eos", "length")


def test_unknown_dtype_and_int8_of_float16_are_user_errors(tiny, tiny_dir, tmp_path, capsys):
    from sparsezip_deploy.export import build

    with pytest.raises(ExportError, match="--vision-dtype 'bfloat16'"):
        VisionGraph(copy.deepcopy(tiny.model), NoneConfig(), "bfloat16")
    assert build.main(["--model", str(tiny_dir), "--method", "none", *FLOAT16, "--vision-int8", "cpu",
                       "--out", str(tmp_path / "e")]) == 1
    assert "--vision-int8 quantises a float32 vision graph" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
