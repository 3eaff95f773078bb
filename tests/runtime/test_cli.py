"""sparsezip-run in subprocesses, with torch, transformers and onnx made unimportable.

Every run here puts a directory first on PYTHONPATH whose `torch`, `transformers`
and `onnx` packages raise ImportError, so each test also proves the runtime
answers without them (DESIGN.md: the runtime never imports torch).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sparsezip_deploy.runtime.pipeline import Pipeline

from .conftest import SPARSEZIP_KEPT

QUESTION = "What colour is the circle?"
BLOCKED = ("torch", "transformers", "onnx")


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: the runtime must not import it')\n")
    return root


def cli(blocker: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    return subprocess.run([sys.executable, "-m", "sparsezip_deploy.runtime.cli", *map(str, args)],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_blocker_blocks(blocker):
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode == 1 and "torch is blocked" in probe.stderr


def test_json_answer_without_torch(blocker, engine_none, shapes_png):
    result = cli(blocker, "--engine", engine_none, "--image", shapes_png, "--prompt", QUESTION,
                 "--max-new-tokens", "6", "--json", "--threads", "1")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert result.stdout.count("\n") == 1 and result.stderr == ""
    assert record["visual_tokens_kept"] == record["visual_tokens_total"] == 576
    with Pipeline(engine_none, threads=1) as pipe:
        assert record["token_ids"] == list(pipe.ask(shapes_png, QUESTION, 6).token_ids)
    for key in ("vision_ms", "prefill_ms", "ttft_ms", "kv_bytes", "kv_bytes_uncompressed", "peak_rss_bytes"):
        assert record[key] > 0


def test_streamed_answer_equals_the_json_text(blocker, engine_sparsezip, shapes_png):
    common = ["--engine", engine_sparsezip, "--image", shapes_png, "--prompt", QUESTION, "--max-new-tokens", "12"]
    human = cli(blocker, *common)
    record = json.loads(cli(blocker, *common, "--json").stdout)
    assert human.returncode == 0, human.stderr
    assert human.stdout == record["text"] + "\n"
    assert f"visual tokens  {SPARSEZIP_KEPT} / 576 kept" in human.stderr
    for label in ("vision", "prefill", "first token", "decode", "KV cache", "peak RSS"):
        assert f"\n{label} " in human.stderr


def test_save_selection_writes_a_png(blocker, engine_sparsezip, shapes_png, tmp_path):
    out = tmp_path / "selection.png"
    result = cli(blocker, "--engine", engine_sparsezip, "--image", shapes_png, "--prompt", QUESTION,
                 "--max-new-tokens", "2", "--json", "--save-selection", out)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (336, 336)


def test_chat_two_turns_from_stdin(blocker, engine_sparsezip, shapes_png):
    result = cli(blocker, "--engine", engine_sparsezip, "--image", shapes_png, "--chat", "--json",
                 "--max-new-tokens", "4", stdin=f"{QUESTION}\nAnd the square?\n\nnot read\n")
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [0, 1]
    assert turns[1]["vision_ms"] == 0 and turns[1]["kv_bytes"] > turns[0]["kv_bytes"]
    with Pipeline(engine_sparsezip) as pipe:
        chat = pipe.conversation(shapes_png)
        expected = [chat.ask(q, 4).token_ids for q in (QUESTION, "And the square?")]
    assert [tuple(t["token_ids"]) for t in turns] == expected


def test_chat_human_output_ends_at_exit(blocker, engine_none, shapes_png):
    result = cli(blocker, "--engine", engine_none, "--image", shapes_png, "--prompt", QUESTION, "--chat",
                 "--max-new-tokens", "3", stdin="And the square?\nexit\nnot read\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n--\n") + result.stderr.startswith("--\n") == 2  # one figure block per turn
    assert "(image reused)" in result.stderr


def png_bomb_header(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels; the runtime must refuse it before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def broken(engine_none, tmp_path_factory) -> dict[str, Path]:
    """Files and engine folders that are wrong in exactly one way each."""
    root = tmp_path_factory.mktemp("broken")
    checksum = shutil.copytree(engine_none, root / "checksum")
    data = bytearray((checksum / "tokenizer.json").read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")  # same size, other bytes
    (checksum / "tokenizer.json").write_bytes(bytes(data))
    version = shutil.copytree(engine_none, root / "version")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["format_version"] = 1  # a folder an older export wrote
    (version / "manifest.json").write_text(json.dumps(manifest))
    (root / "notes.png").write_text("not an image at all\n")
    png_bomb_header(root / "bomb.png", 100_000, 100_000)
    return {"checksum": checksum, "version": version, "text": root / "notes.png", "bomb": root / "bomb.png",
            "missing": root / "nope"}


# case: (option overrides, a value naming a `broken` entry or None to drop the option; flags; message)
ERRORS = {
    "missing engine": ({"--engine": "missing"}, [], "does not exist"),
    "checksum": ({"--engine": "checksum"}, [], "sha256 differs from the manifest"),
    "format version": ({"--engine": "version"}, [],
                       "format_version 1 is not supported; this runtime reads format_version 2 "
                       "(rebuild the engine with export/build.py)"),
    "image missing": ({"--image": "missing"}, [], "no such file"),
    "not an image": ({"--image": "text"}, [], "not an image file"),
    "bomb": ({"--image": "bomb"}, [], "decompression bomb"),
    "raw without image": ({"--prompt": "no picture"}, ["--raw"], "--raw prompt has no <image>"),
    "raw with two images": ({"--prompt": "<image> <image>"}, ["--raw"], "--raw prompt has 2 <image>"),
    "too long": ({"--max-new-tokens": "1900"}, [], "exceeds the engine's max_positions 2048"),
    "unavailable provider": ({"--provider": "cuda"}, [], "available: "),
    "unknown provider": ({"--provider": "rocm"}, [], "invalid choice: 'rocm'"),
    "bad temperature": ({"--temperature": "-1"}, [], "temperature must be >= 0"),
    "no prompt": ({"--prompt": None}, [], "--prompt is required"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_are_one_line_and_exit_1(blocker, engine_none, shapes_png, broken, case):
    overrides, flags, message = ERRORS[case]
    options = {"--engine": engine_none, "--image": shapes_png, "--prompt": QUESTION, "--max-new-tokens": "2"}
    options.update({k: broken.get(v, v) for k, v in overrides.items()})
    argv = [x for k, v in options.items() if v is not None for x in (k, v)]
    result = cli(blocker, *argv, *flags)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_skip_checksums_accepts_an_altered_artifact(blocker, broken, shapes_png):
    result = cli(blocker, "--engine", broken["checksum"], "--image", shapes_png, "--prompt", QUESTION,
                 "--max-new-tokens", "1", "--json", "--skip-checksums")
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed():
    script = shutil.which("sparsezip-run")
    assert script, "pip install -e . installs the sparsezip-run console script"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--save-selection" in result.stdout
