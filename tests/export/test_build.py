"""export/build.py end to end on the tiny model: the folder, the manifest, the errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sparsezip_deploy.export import build
from sparsezip_deploy.runtime.manifest import FORMAT_VERSION, ImageConfig, sha256_file
from sparsezip_deploy.sparsezip.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-sz"
    assert build.main(["--model", str(tiny_dir), "--method", "sparsezip", "--k-max", "40",
                       "--contextual", "8", "--no-split-vision", "--target", "tensorrt-10.3", "--out", str(out)]) == 0
    return out


def test_tensorrt_lint_ran_and_passed(engine):
    assert json.loads((engine / "manifest.json").read_text())["tools"]["tensorrt_lint"] == \
        "tensorrt-10.3: no violations"


def test_tensorrt_lint_fails_the_build_naming_the_nodes(tiny_dir, tmp_path, capsys):
    assert build.main(["--model", str(tiny_dir), "--method", "none", "--llm-quant", "int4",
                       "--target", "tensorrt-11", "--out", str(tmp_path / "e")]) == 1
    out, err = capsys.readouterr()
    assert "llm.onnx: node" in out and "(MatMulNBits): ORT-only contrib op: build without --llm-quant" in out
    assert err.splitlines()[-1].startswith("error: ") and err.splitlines()[-1].endswith(
        "node(s) that TensorRT 11 would refuse (listed above)")
    assert not (tmp_path / "e").exists() and not list(tmp_path.iterdir())


def test_engine_folder_is_complete_and_self_describing(engine):
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    method = config_from_dict(manifest["method"])
    assert (method.method, method.k_max, method.contextual) == ("sparsezip", 40, 8)
    assert manifest["vision"]["num_slots"] == 1 + 40 + 8
    assert manifest["vision"]["layers_run"] == 3  # 4-layer tower, feature layer -2
    for name, entry in manifest["artifacts"].items():
        assert sha256_file(engine / name) == entry["sha256"]
        assert (engine / name).stat().st_size == entry["bytes"]
    assert ImageConfig.from_dict(manifest["image"]).crop_height == 336
    session = ort.InferenceSession(str(engine / "vision.onnx"), providers=["CPUExecutionProvider"])
    declared = manifest["graphs"]["vision"]
    assert [i.name for i in session.get_inputs()] == list(declared["inputs"])
    assert [o.name for o in session.get_outputs()] == list(declared["outputs"])
    assert [i.shape for i in session.get_inputs()] == [v["shape"] for v in declared["inputs"].values()]
    assert manifest["tokens"]["image_token_id"] >= 0 and "<image>" in manifest["chat_template"]
    assert manifest["prompt"]["first_turn"] == "USER: <image>\n{prompt} ASSISTANT:"
    assert set(manifest["artifacts"]) == {"vision.onnx", "llm.onnx", "embed_tokens.npy", "tokenizer.json"}
    llm_session = ort.InferenceSession(str(engine / "llm.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in llm_session.get_inputs()] == list(manifest["graphs"]["llm"]["inputs"])
    table = np.load(engine / "embed_tokens.npy")
    assert table.shape == (manifest["llm"]["vocab_size"], manifest["llm"]["hidden_size"])
    assert not [p for p in engine.parent.iterdir() if p.name.endswith(".partial")]


def test_text_aware_build_splits_and_checks_trunk_and_selector(tiny_dir, tmp_path, capsys):
    """A text-aware sparsezip engine gets vision_trunk + vision_selector without asking (the `engine`
    fixture above is the same build with --no-split-vision)."""
    out = tmp_path / "split"
    assert build.main(["--model", str(tiny_dir), "--method", "sparsezip", "--k-max", "40", "--contextual", "8",
                       "--target", "tensorrt-10.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checking vision_trunk.onnx, then vision_selector.onnx on its features" in printed
    for name in ("hidden_states", "cls_attn", "kmet", "kept_index (selected patches)", "visual_tokens"):
        assert f"      {name}" in printed  # the trunk's outputs, then the selector's on them
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"vision_trunk.onnx", "vision_selector.onnx", "llm.onnx",
                                          "embed_tokens.npy", "tokenizer.json"}
    assert manifest["tools"]["tensorrt_lint"] == "tensorrt-10.3: no violations"
    for graph in ("vision_trunk", "vision_selector"):
        declared = manifest["graphs"][graph]
        session = ort.InferenceSession(str(out / declared["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(declared["inputs"])
        assert [o.name for o in session.get_outputs()] == list(declared["outputs"])
        assert [i.shape for i in session.get_inputs()] == [v["shape"] for v in declared["inputs"].values()]


@pytest.mark.parametrize("method", [["--method", "none"], ["--method", "sparsezip", "--beta", "0"]])
def test_split_vision_is_for_text_aware_graphs(tiny_dir, tmp_path, capsys, method):
    assert build.main(["--model", str(tiny_dir), *method, "--split-vision", "--out", str(tmp_path / "e")]) == 1
    assert "--split-vision is for text-aware sparsezip" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_existing_folder_needs_force(engine, tiny_dir, capsys):
    assert build.main(["--model", str(tiny_dir), "--method", "none", "--out", str(engine)]) == 1
    assert "--force" in capsys.readouterr().err
    assert json.loads((engine / "manifest.json").read_text())["method"]["method"] == "sparsezip"


def test_option_of_another_method_is_an_error(tiny_dir, tmp_path, capsys):
    assert build.main(["--model", str(tiny_dir), "--method", "visionzip", "--k-max", "3",
                       "--out", str(tmp_path / "e")]) == 1
    assert "visionzip has no option(s) --k-max" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_invalid_config_is_an_error(tiny_dir, tmp_path, capsys):
    assert build.main(["--model", str(tiny_dir), "--method", "visionzip", "--dominant", "600",
                       "--out", str(tmp_path / "e")]) == 1
    assert "exceeds the 576 patches" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--max-positions", "5000", "--max-positions 5000 exceeds the LLM's max_position_embeddings 2048"),
    ("--max-positions", "1", "--max-positions must be >= 2, got 1"),
    ("--max-batch", "0", "--max-batch must be in [1, 1024], got 0"),
    ("--max-text-len", "0", "--max-text-len must be >= 1, got 0"),
])
def test_serving_limits_are_checked(tiny_dir, tmp_path, capsys, option, value, message):
    assert build.main(["--model", str(tiny_dir), "--method", "none", option, value, "--out", str(tmp_path / "e")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "e").exists()


def test_serving_limits_reach_the_manifest(engine):
    limits = json.loads((engine / "manifest.json").read_text())["limits"]
    assert limits == {"max_batch": 8, "max_positions": 2048, "max_text_len": 512}


def test_failed_build_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch):
    from sparsezip_deploy.export import vision

    def broken(graph, path):
        path.write_bytes(b"half an onnx file")
        raise vision.ExportError("simulated failure mid-export")

    monkeypatch.setattr(vision, "export_vision", broken)
    assert build.main(["--model", str(tiny_dir), "--method", "none", "--out", str(tmp_path / "e")]) == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_model_is_one_line_exit_1(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "export" / "build.py"), "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
