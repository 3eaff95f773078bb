"""Issue 16, the engine folder and image part: links, special files, hostile JSON, bombs loaded from threads."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

from sparsezip_deploy.runtime import cli
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.errors import EngineError, PreprocessError
from sparsezip_deploy.runtime.manifest import MAX_DEPTH, MAX_MANIFEST_BYTES
from sparsezip_deploy.runtime.preprocess import load_image, pixel_limit

from .test_engine import manifest, refused, write_engine
from .test_preprocess import noise_image, png_bomb


def run_cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main([*map(str, args)])
    return rc, err.getvalue()


# --- 1. the folder holds its files ------------------------------------------------

@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinked_artifact_refused(tmp_path, target):
    folder = write_engine(tmp_path / "e")
    # Same bytes, same size, same sha256: only the link itself is wrong.
    real = (tmp_path / "elsewhere.onnx") if target == "outside" else (folder / "copy.onnx")
    real.write_bytes((folder / "vision.onnx").read_bytes())
    (folder / "vision.onnx").unlink()
    (folder / "vision.onnx").symlink_to(real)
    message = refused(folder)
    assert "artifact vision.onnx is a symbolic link" in message
    assert "artifact vision.onnx is a symbolic link" in refused(folder, verify_checksums=False)


def test_symlinked_manifest_refused(tmp_path):
    folder = write_engine(tmp_path / "e")
    (folder / "manifest.json").rename(tmp_path / "manifest.json")
    (folder / "manifest.json").symlink_to(tmp_path / "manifest.json")
    assert "manifest.json is a symbolic link" in refused(folder)


def test_dangling_symlink_artifact_is_a_link_not_missing(tmp_path):
    folder = write_engine(tmp_path / "e")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(tmp_path / "nowhere")
    assert "artifact tokenizer.json is a symbolic link" in refused(folder)


def test_symlinked_folder_and_hardlinked_artifact_accepted(tmp_path):
    folder = write_engine(tmp_path / "e")
    # The folder's own path is the user's choice; a hard link is a regular file.
    (tmp_path / "shared.onnx").write_bytes((folder / "llm.onnx").read_bytes())
    (folder / "llm.onnx").unlink()
    os.link(tmp_path / "shared.onnx", folder / "llm.onnx")
    (tmp_path / "link").symlink_to(folder)
    engine = load_engine(tmp_path / "link")
    assert engine.path("llm.onnx") == tmp_path / "link" / "llm.onnx"


@pytest.mark.parametrize("name", ["vision.onnx", "manifest.json"])
@pytest.mark.parametrize("kind,message", [("fifo", "is a FIFO"), ("folder", "is a folder")])
def test_special_files_refused_without_blocking(tmp_path, name, kind, message):
    folder = write_engine(tmp_path / "e")
    (folder / name).unlink()
    os.mkfifo(folder / name) if kind == "fifo" else (folder / name).mkdir()
    result = []
    # A FIFO opened for reading blocks until a writer comes: the check must not open it.
    worker = threading.Thread(target=lambda: result.append(refused(folder)), daemon=True)
    worker.start()
    worker.join(10)
    assert result, f"load_engine blocked on a {kind} {name}"
    assert f"{name} {message}, not a regular file" in result[0]


def test_engine_path_rechecks_and_refuses_unlisted_names(tmp_path):
    folder = write_engine(tmp_path / "e")
    engine = load_engine(folder)
    with pytest.raises(ValueError, match="not an artifact"):
        engine.path("../manifest.json")
    # Swapped for a link after loading: the backend about to open it is told.
    (folder / "embed_tokens.npy").rename(tmp_path / "table.npy")
    (folder / "embed_tokens.npy").symlink_to(tmp_path / "table.npy")
    with pytest.raises(EngineError, match="artifact embed_tokens.npy is a symbolic link"):
        engine.path("embed_tokens.npy")
    (folder / "embed_tokens.npy").unlink()
    with pytest.raises(EngineError, match="artifact embed_tokens.npy is missing"):
        engine.path("embed_tokens.npy")


@pytest.mark.parametrize("name", ["tokenizer.json", "embed_tokens.npy"])
def test_cli_refuses_symlinked_tokenizer_and_table(tmp_path, engine_none, shapes_png, name):
    folder = shutil.copytree(engine_none, tmp_path / "e")
    (folder / name).rename(tmp_path / name)
    (folder / name).symlink_to(tmp_path / name)
    rc, err = run_cli("--engine", folder, "--image", shapes_png, "--prompt", "hi", "--max-new-tokens", "2",
                      "--threads", "1")
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"artifact {name} is a symbolic link" in err


# --- 3. hostile manifests ------------------------------------------------------------

def write_text(tmp_path: Path, text: str | bytes) -> Path:
    folder = write_engine(tmp_path / "e")
    path = folder / "manifest.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return folder


def with_raw(tmp_path: Path, section: str, key: str, literal: str) -> Path:
    """The manifest with `section.key` set to a raw JSON literal (json.dumps would not write it)."""
    data = manifest()
    data[section][key] = "@@RAW@@"
    return write_text(tmp_path, json.dumps(data).replace('"@@RAW@@"', literal))


@pytest.mark.parametrize("section,key,literal,message", [
    ("image", "rescale_factor", "NaN", "is not valid JSON (NaN is not JSON"),
    ("image", "rescale_factor", "Infinity", "is not valid JSON (Infinity is not JSON"),
    ("method", "score", "-Infinity", "is not valid JSON (-Infinity is not JSON"),  # free-form sections too
    ("image", "rescale_factor", "1e999", "is not valid JSON ('1e999' overflows to infinity"),
    ("llm", "vocab_size", "1" * 5000, "is not valid JSON (Exceeds the limit (4300 digits)"),
    ("image", "rescale_factor", "1" * 400, "image.rescale_factor: expected a finite number, got 1111"),
    ("prompt", "first_turn", '"USER: <image>\\ud800{prompt}"', "prompt.first_turn: 'USER: <image>\\ud800{prompt}' "
                                                            "is not valid Unicode text (a lone surrogate)"),
    ("artifacts", "\udcff.bin", '{"bytes": 1, "sha256": "' + "0" * 64 + '"}',
     "artifacts: key '\\udcff.bin' is not valid Unicode text (a lone surrogate)"),
])
def test_hostile_json_values(tmp_path, section, key, literal, message):
    assert message in refused(with_raw(tmp_path, section, key, literal))


def test_duplicate_keys_refused(tmp_path):
    text = json.dumps(manifest())
    text = text.replace('"llm": {', '"llm": {"dtype": "float32", ', 1)  # a second llm.dtype, read first
    assert "is not valid JSON (duplicate key 'dtype')" in refused(write_text(tmp_path, text))


def test_nesting(tmp_path):
    data = manifest()
    deep = inner = {}
    for _ in range(MAX_DEPTH + 5):
        inner["x"] = inner = {}
    data["method"]["options"] = deep
    assert f"method.options.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x: nested deeper than {MAX_DEPTH}" \
        in refused(write_engine(tmp_path / "a", data))
    # Deeper than Python's recursion limit: json itself refuses.
    text = json.dumps(manifest()).replace('"calibration": {}', '"calibration": ' + "[" * 100_000 + "]" * 100_000)
    assert "is not valid JSON (maximum recursion depth" in refused(write_text(tmp_path / "b", text))


def test_giant_manifest_refused_unread(tmp_path):
    text = json.dumps(manifest() | {"padding": "x" * MAX_MANIFEST_BYTES})
    assert f"over {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest" in refused(write_text(tmp_path, text))


def test_not_utf8(tmp_path):
    assert "not UTF-8" in refused(write_text(tmp_path, b'{"format_version": "\xff"}'))


def test_huge_string_message_stays_short(tmp_path):
    data = manifest()
    data["llm"]["dtype"] = "float" * 200_000
    message = refused(write_engine(tmp_path / "e", data))
    assert "llm.dtype: 'floatfloat" in message and "is not one of float32, float16" in message
    assert len(message) < 400


@pytest.mark.parametrize("change,message", [
    # Static axes multiplying to 2^48 elements: refused before anything sizes a buffer from them.
    (lambda d: d["graphs"]["vision"]["outputs"]["visual_tokens"].update(shape=["batch", 1 << 24, 1 << 24]),
     "graphs.vision.outputs.visual_tokens: shape: ['batch', 16777216, 16777216]: its static axes hold over "
     "4294967296 elements"),
    (lambda d: d["graphs"]["vision"]["inputs"]["pixel_values"].update(shape=[1] * 9),
     "graphs.vision.inputs.pixel_values: shape: 9 axes"),
    # 2 x 64 x 4096 x 4096 x 2 bytes = 4 GiB of cache per token.
    (lambda d: d["llm"].update(num_layers=64, num_kv_heads=4096, head_dim=4096),
     "llm: num_layers 64 x num_kv_heads 4096 x head_dim 4096 needs 4096 MiB of KV cache per token"),
    (lambda d: d["artifacts"].update({"a" * 256: {"bytes": 1, "sha256": "0" * 64}}),
     "is not a plain file name"),
    (lambda d: d["llm"].update(embed_tokens="embed\ttokens.npy"), "llm.embed_tokens: 'embed\\ttokens.npy' is not"),
    (lambda d: d["vision"].update(grid=[24, 25]), "vision: grid [24, 25] does not hold 576 patches"),
    (lambda d: d["vision"].update(grid=[48, 12]), "vision: grid [48, 12] of 14 px patches exceeds 336 px images"),
    (lambda d: d["vision"].update(image_size=224), "vision: grid [24, 24] of 14 px patches exceeds 224 px images"),
])
def test_absurd_shapes_and_names(tmp_path, change, message):
    data = manifest()
    change(data)
    assert message in refused(write_engine(tmp_path / "e", data))


def test_vocab_size_against_the_embed_table(tmp_path, engine_none, shapes_png):
    folder = shutil.copytree(engine_none, tmp_path / "e")
    data = json.loads((folder / "manifest.json").read_text())
    vocab = data["llm"]["vocab_size"]
    data["llm"]["vocab_size"] = vocab * 2  # the logits' declared width with it: the manifest is consistent
    data["graphs"]["llm"]["outputs"]["logits"]["shape"][-1] = vocab * 2
    (folder / "manifest.json").write_text(json.dumps(data))
    rc, err = run_cli("--engine", folder, "--image", shapes_png, "--prompt", "hi", "--threads", "1")
    assert rc == 1 and err.count("\n") == 1
    assert f"embed_tokens.npy: float32 [{vocab}, " in err and f"the manifest says float32 [{vocab * 2}, " in err


# --- 2. images: no warning filters, from any thread ------------------------------------

def test_threaded_loads_leave_warning_filters_alone(tmp_path):
    good, bomb, band = tmp_path / "good.png", tmp_path / "bomb.png", tmp_path / "band.png"
    noise_image("RGB", 64, 48).save(good)
    png_bomb(bomb, 9000, 9000)  # over our limit, under Pillow's
    png_bomb(band, 10000, 10000)  # between 1x and 2x Pillow's: it only warns, we refuse
    before = list(warnings.filters)
    errors, sizes = [], []

    def work():
        for _ in range(3):
            sizes.append(load_image(good).size)
            for path, limit in ((bomb, None), (band, 10**10)):
                try:
                    load_image(path) if limit is None else load_image(path, max_pixels=limit)
                except PreprocessError as e:
                    errors.append(str(e))

    with warnings.catch_warnings():  # the test's own: Pillow's band warning is expected, not ours to show
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        inside = list(warnings.filters)
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(warnings.filters) == inside
    assert list(warnings.filters) == before
    assert sizes == [(64, 48)] * 24 and len(errors) == 48
    assert all("pixel limit (decompression bomb?)" in e for e in errors)
    assert sum("9000x9000 is over the 67108864-pixel limit" in e for e in errors) == 24
    assert sum(f"10000x10000 is over the {Image.MAX_IMAGE_PIXELS}-pixel limit" in e for e in errors) == 24


def test_load_image_never_touches_warning_filters(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    png_bomb(path, 9000, 9000)
    calls = []
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: calls.append(a) or contextlib.nullcontext())
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: calls.append(a))
    with pytest.raises(PreprocessError, match="over the 67108864-pixel limit"):
        load_image(path)
    assert calls == []


def test_pixel_limit_follows_pillow_without_setting_it(monkeypatch):
    assert pixel_limit(10**10) == Image.MAX_IMAGE_PIXELS
    assert pixel_limit(5000) == 5000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a host that switched Pillow's check off
    assert pixel_limit(10**10) == 10**10
