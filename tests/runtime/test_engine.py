"""runtime/engine.py and runtime/manifest.py on hand-written engine folders: every refusal is one clear EngineError."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import FORMAT_VERSION, Manifest

LAYERS = 2
FILES = {"vision.onnx": b"vision graph", "llm.onnx": b"llm graph", "embed_tokens.npy": b"table",
         "tokenizer.json": b"{}"}


def llm_graph(layers: int = LAYERS) -> dict:
    cache = {"dtype": "float16", "shape": ["past", "batch", 2, 16]}
    new = {"dtype": "float16", "shape": ["seq", "batch", 2, 16]}
    inputs = {"inputs_embeds": {"dtype": "float16", "shape": ["batch", "seq", 64]},
              "attention_mask": {"dtype": "int64", "shape": ["batch", "total"]},
              "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]}}
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", 1, 1024]}}
    for i in range(layers):
        inputs |= {f"past_key_values.{i}.key": cache, f"past_key_values.{i}.value": cache}
        outputs |= {f"new_key_values.{i}.key": new, f"new_key_values.{i}.value": new}
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
                "embed_tokens": "embed_tokens.npy",
                "cache": {"groups": [{"layers": list(range(LAYERS)), "past_axis": "past"}]}},
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
        "source": {"kind": "tiny"},
        "chat_template": "{{ messages }}",
        "precision": {"vision": "float32", "llm": "float16"},
        "calibration": {},
        "tools": {"python": "3.11"},
        "built_by": "a later export",  # unknown keys are allowed (additions within a format version)
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
    assert engine.graphs["llm"].inputs["past_key_values.1.value"].shape == ("past", "batch", 2, 16)
    assert engine.llm.cache.past_names(1) == ("past_key_values.1.key", "past_key_values.1.value")
    assert Manifest.from_dict(engine.manifest.to_dict()) == engine.manifest
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


@pytest.mark.parametrize("version", [1, 3, 0, "2", None, True])
def test_format_version(tmp_path, version):
    data = manifest()
    data["format_version"] = version
    message = refused(write_engine(tmp_path / "e", data))
    assert f"format_version {version} is not supported" in message
    assert f"reads format_version {FORMAT_VERSION} (rebuild the engine with export/build.py)" in message


def test_missing_section(tmp_path):
    data = manifest()
    del data["llm"]
    assert "manifest.json: lacks llm" in refused(write_engine(tmp_path / "e", data))


def test_missing_key_in_section(tmp_path):
    data = manifest()
    del data["llm"]["head_dim"]
    assert "llm: lacks head_dim" in refused(write_engine(tmp_path / "e", data))


def test_bad_image_section(tmp_path):
    data = manifest()
    data["image"]["resample"] = 99
    assert "image.resample: 99 is not one of 0, 1, 2, 3, 4, 5" in refused(write_engine(tmp_path / "e", data))


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
    assert "'../secret' is not a plain file name" in refused(write_engine(tmp_path / "e", data))


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


@pytest.mark.parametrize("section,key,value,message", [
    ("llm", "head_dim", 0, "llm.head_dim: 0 is below the minimum 1"),
    ("llm", "num_layers", -2, "llm.num_layers: -2 is below the minimum 1"),
    ("llm", "num_kv_heads", "2", "llm.num_kv_heads: expected an integer, got str '2'"),
    ("llm", "vocab_size", 2.5, "llm.vocab_size: expected an integer, got float 2.5"),
    ("image", "crop_height", 10**7, "image.crop_height: 10000000 is above the maximum 8192"),
    ("image", "std", [0.2, 0.0, 0.3], "image.std[1]: 0.0 is not above the minimum 0"),
    ("image", "do_center_crop", 1, "image.do_center_crop: expected true or false, got int 1"),
    ("vision", "grid", [24], "vision.grid: expected 2 values, got 1"),
    ("vision", "num_patches", 575, "vision: grid [24, 24] does not hold 575 patches"),
    ("tokens", "eos_token_id", 5000, "tokens.eos_token_id: 5000 is outside the vocabulary of 1024"),
    ("prompt", "first_turn", "USER: {prompt}", "prompt: first_turn must contain '<image>' exactly once"),
    ("artifacts", "vision.onnx", {"bytes": -1, "sha256": "0" * 64}, "artifacts.vision.onnx.bytes: -1 is below"),
    ("graphs", "llm", None, "graphs.llm: expected an object, got NoneType None"),
])
def test_every_field_is_type_and_range_checked(tmp_path, section, key, value, message):
    data = manifest()
    data[section][key] = value
    got = refused(write_engine(tmp_path / "e", data))
    assert message in got and got.startswith(str(tmp_path / "e" / "manifest.json"))


def test_llm_graph_must_match_the_llm_section(tmp_path):
    data = manifest()
    data["llm"]["num_kv_heads"] = 4  # the graph's cache tensors have 2
    assert ("graphs.llm.inputs.past_key_values.0.key: float16 ['past', 'batch', 2, 16], expected float16 "
            "['past', 'batch', 4, 16]") in refused(write_engine(tmp_path / "e", data))


def test_cache_groups_must_cover_every_layer_once(tmp_path):
    data = manifest()
    data["llm"]["cache"]["groups"] = [{"layers": [0, 0], "past_axis": "past"}]
    assert "cache groups must hold each of the 2 layers once" in refused(write_engine(tmp_path / "e", data))
