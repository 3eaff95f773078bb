"""Dynamic-K budget calibration: the fit, the graph edit, and `build.py --target-mean-k` end to end."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest

from sparsezip_deploy.calib.budget import Law, calibrate_budget, fit_offset, mean_k, read_law, write_law
from sparsezip_deploy.calib.errors import CalibError
from sparsezip_deploy.calib.reader import VisionCalibrationReader, calibration_images
from sparsezip_deploy.export import build
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.pipeline import Pipeline

from ..runtime.conftest import _build

LAW = Law(offset=53.0, scale=8.0, k_min=16.0, k_max=53.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [16, 20, 31.3, 45, 53])
def test_fit_lands_within_a_quarter_token_far_from_rounding_edges(seed, target):
    log_var = np.random.default_rng(seed).normal(-3.0, 0.4, 40)
    offset = fit_offset(log_var, target, LAW)
    assert abs(mean_k(offset, log_var, LAW) - target) <= 0.25
    # In the middle of its step: a probe error of 1e-3 in log var cannot move the mean.
    for shift in (-1e-3, 1e-3):
        assert mean_k(offset, log_var + shift, LAW) == mean_k(offset, log_var, LAW)


def test_target_outside_the_clamp_is_refused():
    with pytest.raises(CalibError, match="outside"):
        fit_offset(np.zeros(4), 60, LAW)


@pytest.fixture(scope="module")
def dynamic_engine(tiny_dir, tmp_path_factory):
    """Image-only scores (beta 0): the graph takes pixel_values alone."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-dyn", "sparsezip", "--dynamic-k", "--beta", "0")


def test_the_law_is_found_and_rewritten_without_touching_shared_constants(dynamic_engine):
    model = onnx.load(dynamic_engine / "vision.onnx")
    assert read_law(model) == LAW
    before = {i.name: onnx.numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    write_law(model, Law(40.5, 6.0, 10.0, 50.0))
    assert read_law(model) == Law(40.5, 6.0, 10.0, 50.0)
    after = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # The exporter shares equal-valued constants (the offset 53 was also k_max; 8 is also an
    # attention scale): the old initializers keep their values for their other readers.
    assert all(np.array_equal(after[name], value) for name, value in before.items())


def test_a_graph_without_the_law_is_refused(engine_fp32):
    with pytest.raises(CalibError, match="--dynamic-k"):
        read_law(onnx.load(engine_fp32 / "vision.onnx"))


@pytest.mark.parametrize("target", [24, 40])
def test_calibration_hits_its_target_on_generated_images(dynamic_engine, tmp_path, target):
    vision = tmp_path / "vision.onnx"
    vision.write_bytes((dynamic_engine / "vision.onnx").read_bytes())
    engine = load_engine(dynamic_engine)
    reader = VisionCalibrationReader(calibration_images(None, 12, seed=3), engine.image)
    record = calibrate_budget(vision, reader.feeds(), target, contextual=10)
    assert abs(record["achieved_mean_k"] - target) <= 1 and record["images"] == 12
    assert read_law(onnx.load(vision)).offset == pytest.approx(record["k_offset"])
    assert record["k_range"][0] < record["k_range"][1]  # K does vary between images


def _main(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build.main(list(argv))


def test_build_refuses_budgets_it_cannot_calibrate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert build.main(["--model", str(tiny_dir), "--method", "visionzip", "--target-mean-k", "30",
                       "--out", str(out)]) == 1
    assert "sparsezip" in capsys.readouterr().err
    assert build.main(["--model", str(tiny_dir), "--target-mean-k", "60", "--out", str(out)]) == 1
    assert "outside" in capsys.readouterr().err
    assert build.main(["--model", str(tiny_dir), "--calib-images", str(tmp_path), "--out", str(out)]) == 1
    assert "holds no images" in capsys.readouterr().err  # the parity check reads them too: not "unused"
    assert build.main(["--model", str(tiny_dir), "--vision-int8", "cpu", "--calib-images", str(tmp_path / "nope"),
                       "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".e.*"))


def test_one_build_quantises_calibrates_and_records_it(tiny_dir, tmp_path, shapes_png):
    out = tmp_path / "q"
    assert _main("--model", str(tiny_dir), "--vision-int8", "cpu", "--llm-quant", "int4", "--target-mean-k", "30",
                 "--calib-count", "8", "--no-split-vision", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"vision": "int8", "llm": "int4", "embed_tokens": "float32"}
    calibration = manifest["calibration"]
    assert set(calibration) == {"vision_int8", "dynamic_k", "llm_quant"}
    assert calibration["vision_int8"]["calibration"] == {
        "images": 8, "source": "generated-scenes:seed=0,count=8", "method": "dynamic (ranges measured per run)"}
    budget = calibration["dynamic_k"]
    assert abs(budget["achieved_mean_k"] - 30) <= 1 and budget["calibration"]["images"] == 8
    assert manifest["method"]["dynamic_k"] and manifest["method"]["k_offset"] == budget["k_offset"]
    # The fit is in the graph that shipped, which the runtime loads and runs unchanged.
    assert read_law(onnx.load(out / "vision.onnx")).offset == pytest.approx(budget["k_offset"])
    with Pipeline(out) as pipe:
        result = pipe.ask(shapes_png, "What colour is the circle?", max_new_tokens=4)
    assert 1 + 16 + 10 <= result.visual_tokens_kept <= 1 + 53 + 10 and len(result.token_ids) >= 1



def test_split_engine_quantises_its_trunk_and_fits_its_selector(tiny_dir, tmp_path, shapes_png):
    """The default (split) layout: int8 on the trunk (l*'s q and k left float), the dynamic-K law fitted in
    the selector."""
    out = tmp_path / "split"
    assert _main("--model", str(tiny_dir), "--vision-int8", "cpu", "--target-mean-k", "30",
                 "--calib-count", "8", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"]["vision"] == "int8"
    record, budget = manifest["calibration"]["vision_int8"], manifest["calibration"]["dynamic_k"]
    assert record["quantized_linears"] > 0 and len(record["float_linears"]) == 2  # l*'s q and k
    trunk, selector = (onnx.load(out / name) for name in ("vision_trunk.onnx", "vision_selector.onnx"))
    assert any(n.op_type == "MatMulInteger" for n in trunk.graph.node)
    assert not any(n.op_type == "MatMulInteger" for n in selector.graph.node)
    assert abs(budget["achieved_mean_k"] - 30) <= 1
    assert read_law(selector).offset == pytest.approx(budget["k_offset"]) == manifest["method"]["k_offset"]
    with Pipeline(out) as pipe:
        first = pipe.ask(shapes_png, "What colour is the circle?", max_new_tokens=4)
        second = pipe.ask(shapes_png, "Is there a square?", max_new_tokens=4)
    assert second.vision_cached and 1 + 16 + 10 <= first.visual_tokens_kept <= 1 + 53 + 10
