"""runtime/engine.py on hand-written engine folders: every refusal is one clear EngineError."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sparsezip_deploy.runtime.engine import FORMAT_VERSION, load_engine
from sparsezip_deploy.runtime.errors import EngineError

LAYERS = 2
FILES = {"vision.onnx": b"vision graph", "llm.onnx": b"llm graph", "embed_tokens.npy": b"table",
         "tokenizer.json": b"{}"}


def llm_graph(layers: int = LAYERS) -> dict:
    cache = {"dtype": "float32", "shape": ["batch", 2, "past", 16]}
    present = {"dtype": "float32", "shape": ["batch", 2, "total", 16]}
    inputs = {"inputs_embeds": {"dtype": "float32", "shape": ["batch", "seq", 64]},
              "attention_mask": {"dtype": "int64", "shape": ["batch", "total"]},
              "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]}}
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", 1, 1024]}}
    for i in range(layers):
        inputs |= {f"past_key_values.{i}.key": cache, f"past_key_values.{i}.value": cache}
        outputs |= {f"present.{i}.key": present, f"present.{i}.value": present}
    return {"file": "llm.onnx", "inputs": inputs, "outputs": outputs}


def manifest() -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "method": {"method": "none"},
        "image": {"crop_height": 336, "crop_width": 336, "shortest_edge": 336, "resample": 3,
                  "rescale_factor": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "do_center_crop": True, "pad_to_square": False},
        "vision": {"image_size": 336, "patch_size": 14, "grid": [24, 24], "num_patches": 576,
                   "hidden_size": 64, "feature_layer": -2, "layers_run": 3, "num_slots": 576,
                   "projector": "fused", "out_width": 64, "text_aware": False},
        "llm": {"num_layers": LAYERS, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64,
                "vocab_size": 1024, "max_position_embeddings": 2048, "dtype": "float16",
                "embed_tokens": "embed_tokens.npy"},
        "tokens": {"image_token_id": 1022, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 1023},
        "prompt": {"first_turn": "USER: <image>\n{prompt} ASSISTANT:", "next_turn": " USER: {prompt} ASSISTANT:",
                   "image_token": "<image>"},
        "graphs": {
            "vision": {"file": "vision.onnx",
                       "inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, 336, 336]}},
                       "outputs": {"visual_tokens": {"dtype": "float32", "shape": ["batch", 576, 64]},
                                   "num_tokens": {"dtype": "int64", "shape": ["batch"]},
                                   "kept_index": {"dtype": "int64", "shape": ["batch", 576]}}},
            "llm": llm_graph(),
        },
        "artifacts": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in FILES.items()},
        "source": {"kind": "tiny"},  # extra keys are allowed
    }


def write_engine(folder: Path, data: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in FILES.items():
        (folder / name).write_bytes(content)
    (folder / "manifest.json").write_text(json.dumps(manifest() if data is None else data))
    return folder


def refused(folder: Path, **kwargs) -> str:
    with pytest.raises(EngineError) as info:
        load_engine(folder, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_folder_parses(tmp_path):
    engine = load_engine(write_engine(tmp_path / "e"))
    assert engine.vision.grid == (24, 24) and engine.vision.num_patches == 576
    assert engine.llm.kv_bytes_per_token == 2 * LAYERS * 2 * 16 * 2  # float16
    assert engine.tokens.special == {1, 2, 1022, 1023}
    assert engine.graphs["llm"].inputs["past_key_values.1.value"].shape == ("batch", 2, "past", 16)
    assert engine.image.crop_height == 336 and engine.method_name == "none"


def test_missing_folder(tmp_path):
    assert "does not exist" in refused(tmp_path / "nope")


def test_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "not a folder" in refused(tmp_path / "f")


def test_missing_manifest(tmp_path):
    (tmp_path / "e").mkdir()
    assert "has no manifest.json" in refused(tmp_path / "e")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_corrupt_manifest(tmp_path, text):
    folder = write_engine(tmp_path / "e")
    (folder / "manifest.json").write_text(text)
    assert "manifest.json" in refused(folder)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_format_version(tmp_path, version):
    data = manifest()
    data["format_version"] = version
    message = refused(write_engine(tmp_path / "e", data))
    assert f"format_version {version} is not supported" in message
    assert f"reads format_version {FORMAT_VERSION}" in message


def test_missing_section(tmp_path):
    data = manifest()
    del data["llm"]
    assert "no 'llm' section" in refused(write_engine(tmp_path / "e", data))


def test_missing_key_in_section(tmp_path):
    data = manifest()
    del data["llm"]["head_dim"]
    assert "llm lacks head_dim" in refused(write_engine(tmp_path / "e", data))


def test_bad_image_section(tmp_path):
    data = manifest()
    data["image"]["resample"] = 99
    assert "image:" in refused(write_engine(tmp_path / "e", data))


def test_missing_artifact(tmp_path):
    folder = write_engine(tmp_path / "e")
    (folder / "llm.onnx").unlink()
    assert "artifact llm.onnx is missing" in refused(folder)


def test_unlisted_artifact(tmp_path):
    data = manifest()
    del data["artifacts"]["embed_tokens.npy"]
    assert "does not list embed_tokens.npy" in refused(write_engine(tmp_path / "e", data))


def test_size_mismatch(tmp_path):
    folder = write_engine(tmp_path / "e")
    (folder / "vision.onnx").write_bytes(b"vision graph, longer")
    message = refused(folder, verify_checksums=False)  # sizes are checked even then
    assert "20 bytes, the manifest says 12" in message


def test_checksum_mismatch_and_skip(tmp_path):
    folder = write_engine(tmp_path / "e")
    (folder / "vision.onnx").write_bytes(b"vision GRAPH")  # same size
    assert "sha256 differs" in refused(folder)
    assert load_engine(folder, verify_checksums=False).vision.num_slots == 576


def test_artifact_outside_folder(tmp_path):
    data = manifest()
    data["artifacts"]["../secret"] = {"bytes": 1, "sha256": "0" * 64}
    assert "not a plain file name" in refused(write_engine(tmp_path / "e", data))


def test_llm_graph_lacks_cache_inputs(tmp_path):
    data = manifest()
    data["graphs"]["llm"] = llm_graph(layers=1)  # the llm section says 2 layers
    assert "past_key_values.1.key" in refused(write_engine(tmp_path / "e", data))


def test_text_aware_vision_needs_text_inputs(tmp_path):
    data = manifest()
    data["vision"]["text_aware"] = True
    assert "text_aware=True" in refused(write_engine(tmp_path / "e", data))


def test_unknown_llm_dtype(tmp_path):
    data = manifest()
    data["llm"]["dtype"] = "bfloat16"
    assert "bfloat16" in refused(write_engine(tmp_path / "e", data))
