"""calib/vision_int8.py on the tiny model: each recipe's graph, its fidelity, and the runtime on an int8 engine.

What random weights guarantee, and so what is asserted: the int8 graph runs, only
the intended nodes are quantised, the selection and the tokens stay within the
documented floors, and the runtime on the int8 engine is exactly HF's LLM fed
the int8 graph's own visual tokens (the LLM is untouched). Greedy tokens against
the float engine are not asserted: a random LLM's logits are nearly flat, so any
perturbation of its input may flip an argmax; the prefill logits' distance is.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sparsezip_deploy.calib.errors import CalibError
from sparsezip_deploy.calib.reader import VisionCalibrationReader, calibration_images, prompt_text
from sparsezip_deploy.calib.vision_int8 import FLOORS, Floors, compare_outputs, quantize_vision
from sparsezip_deploy.runtime.generate import embed, encode_images, prefill, text_features
from sparsezip_deploy.runtime.kv_cache import KVCache
from sparsezip_deploy.runtime.pipeline import Pipeline
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import load_image, preprocess
from sparsezip_deploy.runtime.prompt import first_turn_ids

from .conftest import CALIB_COUNT

QUESTION = "What colour is the circle?"
NEW_TOKENS = 12
# Prefill logits of the int8 engine against the float one: max |difference| over the logits' spread (std),
# on `none` engines, where only quantisation differs. Measured 0.017 to 0.078 over three prompts on the tiny
# model (on sparsezip engines: 0.14-0.18, as int8 also swaps 2-3 near-tied patches of 53).
LOGITS_TOLERANCE = 0.15
SHARED_KEPT = 0.9  # kept patches the int8 sparsezip engine shares with the float one (51 of 53 measured)


def manifest(engine):
    return json.loads((engine / "manifest.json").read_text())


def float_inputs_only(model: onnx.ModelProto, names) -> bool:
    """The nodes `names` are still float MatMuls, reading no tensor made by a (de)quantising node."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    quantising = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
    nodes = {n.name: n for n in model.graph.node}
    return all(nodes[name].op_type == "MatMul" and producer.get(t) not in quantising
               for name in names for t in nodes[name].input)


def held_out_feeds(engine_dir, shapes_png):
    """The test picture and two scenes the calibration never saw, with a real prompt's text feeds."""
    with Pipeline(engine_dir) as pipe:
        text = prompt_text(pipe.tokenizer, pipe.table, QUESTION)
        images = [load_image(shapes_png)] + calibration_images(None, 2, seed=7)
        return list(VisionCalibrationReader(images, pipe.engine.image, text).feeds())


def test_cpu_recipe_quantises_the_encoder_linears_only(engine_fp32, engine_int8_cpu):
    record = manifest(engine_int8_cpu)["calibration"]["vision_int8"]
    assert manifest(engine_int8_cpu)["precision"]["vision"] == "int8"
    assert record["target"] == "cpu" and record["recipe"].startswith("ort-dynamic")
    assert record["calibration"] == {"images": CALIB_COUNT, "source": f"generated-scenes:seed=0,count={CALIB_COUNT}",
                                     "method": "dynamic (ranges measured per run)"}
    model = onnx.load(str(engine_int8_cpu / "vision.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == record["quantized_linears"] == 6 * 3 - 2
    assert len(record["float_linears"]) == 2 and float_inputs_only(model, record["float_linears"])
    float_matmuls = sum(n.op_type == "MatMul" for n in onnx.load(str(engine_fp32 / "vision.onnx")).graph.node)
    assert ops.count("MatMul") == float_matmuls - record["quantized_linears"]
    fidelity, floors = record["fidelity"], FLOORS["cpu"]
    assert fidelity["kept_jaccard_mean"] >= floors.kept_jaccard_mean
    assert fidelity["token_cosine_min"] >= floors.token_cosine_min


@pytest.mark.parametrize("engine_name", ["engine_int8_cpu", "engine_int8_trt"])
def test_held_out_selection_and_tokens_within_the_floors(request, engine_name, engine_fp32, shapes_png):
    engine = request.getfixturevalue(engine_name)
    floors = FLOORS[manifest(engine)["calibration"]["vision_int8"]["target"]]
    ref = ort.InferenceSession(str(engine_fp32 / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(engine / "vision.onnx"), providers=["CPUExecutionProvider"])
    figures = [compare_outputs(ref.run(None, f), got.run(None, f)) for f in held_out_feeds(engine_fp32, shapes_png)]
    assert np.mean([j for j, _ in figures]) >= floors.kept_jaccard_mean
    assert np.concatenate([c for _, c in figures]).min() >= floors.token_cosine_min


def test_tensorrt_recipe_is_symmetric_int8_qdq(engine_int8_trt):
    record = manifest(engine_int8_trt)["calibration"]["vision_int8"]
    assert record["recipe"].startswith("modelopt") and record["calibration"]["method"] == "max"
    model = onnx.load(str(engine_int8_trt / "vision.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quantisers = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert quantisers and not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    for node in quantisers:  # symmetric int8: zero points 0 (or absent)
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero is None or (zero.dtype == np.int8 and not zero.any())
    assert float_inputs_only(model, record["float_linears"])


def _prefill_logits(engine_dir, image):
    """The runtime's visual tokens for QUESTION on `image`, the prompt around them, and the prefill logits."""
    with Pipeline(engine_dir) as pipe:
        engine = pipe.engine
        ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, QUESTION, False)
        visual = encode_images(pipe.vision, preprocess(load_image(image), engine.image),
                               text_features(pipe.table, [ids.text_ids]))[0]
        embeds = np.concatenate([embed(pipe.table, ids.before), visual.tokens, embed(pipe.table, ids.after)])
        cache = KVCache(pipe.llm, engine.llm, 1, len(embeds) + 1)
        return visual, embeds, prefill(pipe.llm, cache, embeds[None])[0]


def test_int8_engine_answers_like_the_oracle(tiny, engine_fp32, engine_int8_cpu, shapes_png):
    """The runtime on the int8 engine = HF's LLM fed the int8 graph's visual tokens, and int8
    moves few of the patches the float engine keeps."""
    float_visual, _, _ = _prefill_logits(engine_fp32, shapes_png)
    visual, embeds, _ = _prefill_logits(engine_int8_cpu, shapes_png)
    with Pipeline(engine_int8_cpu) as pipe:
        got = pipe.ask(shapes_png, QUESTION, NEW_TOKENS)
    with torch.no_grad():
        out = tiny.model.generate(inputs_embeds=torch.from_numpy(embeds)[None],
                                  attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    assert list(got.token_ids) == out[0].tolist()
    kept, float_kept = (set(v.kept_index[v.kept_index >= 0].tolist()) for v in (visual, float_visual))
    # The random tiny tower ranks many patches within int8 noise of each other: 2 of 53 swap
    # (measured); an int8 graph that selected by something else would share few.
    assert len(kept & float_kept) >= SHARED_KEPT * len(float_kept), (sorted(kept - float_kept),
                                                                     sorted(float_kept - kept))


def test_int8_moves_the_prefill_logits_little(engine_none, engine_none_int8, shapes_png):
    """Quantisation alone (`none`: every patch, no selection that int8 could reorder): the
    prefill logits of the int8 engine stay near the float engine's."""
    _, _, float_logits = _prefill_logits(engine_none, shapes_png)
    _, _, logits = _prefill_logits(engine_none_int8, shapes_png)
    drift = np.abs(logits - float_logits).max() / float_logits.std()
    assert drift <= LOGITS_TOLERANCE, f"int8 moved the prefill logits by {drift:.3f} of their spread"


def test_missing_modelopt_names_the_install(monkeypatch, engine_fp32, calib_images, tmp_path):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # import fails, installed or not
    config = ImageConfig.from_dict(manifest(engine_fp32)["image"])
    with pytest.raises(CalibError, match=r"pip install nvidia-modelopt onnx-graphsurgeon onnxslim lief$"):
        quantize_vision(engine_fp32 / "vision.onnx", tmp_path / "v.onnx", "tensorrt", calib_images, config, "test")
    assert list(tmp_path.iterdir()) == []


def test_bad_target_and_failed_check_write_nothing(monkeypatch, engine_fp32, calib_images, tmp_path):
    config = ImageConfig.from_dict(manifest(engine_fp32)["image"])
    with pytest.raises(CalibError, match="not one of cpu, tensorrt"):
        quantize_vision(engine_fp32 / "vision.onnx", tmp_path / "v.onnx", "gpu", calib_images, config, "test")
    monkeypatch.setitem(FLOORS, "cpu", Floors(kept_jaccard_mean=1.0, token_cosine_min=1.0 + 1e-6))
    with pytest.raises(CalibError, match="too far from float32"):
        quantize_vision(engine_fp32 / "vision.onnx", tmp_path / "v.onnx", "cpu", calib_images, config, "test")
    assert list(tmp_path.iterdir()) == []
