"""export/build.py hardening: --out checked before loading, bad model files as one line, the stale
.partial / .old sweep, SIGTERM, and an atomic --force (a kill at each step of the swap)."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsezip_deploy.export import build, models
from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.models import load_model


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "load_model", refuse)


# ---------------------------------------------------------------- --out, before the model loads


def out_cases(tmp_path: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "file").write_text("x")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "manifest.json").write_text("{}")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    return {
        "a file": ([str(tmp_path / "file")], "is a file, not a folder"),
        "under a file": ([str(tmp_path / "file" / "sub" / "e")], f"{tmp_path / 'file'} is a file, not a folder"),
        "exists": ([str(tmp_path / "engine")], "exists; pass --force to replace it"),
        "the model": ([str(model), "--force"], "is the model folder"),
        "inside the model": ([str(model / "e")], "is inside the model folder"),
        "inside via ..": ([str(model / ".." / model.name / "e")], "is inside the model folder"),
        "holds the model": ([str(model.parent), "--force"], "contains the model folder"),
        "not an engine": ([str(tmp_path / "stuff"), "--force"], "not an engine folder (no manifest.json)"),
    }


@pytest.mark.parametrize("case", ["a file", "under a file", "exists", "the model", "inside the model",
                                  "inside via ..", "holds the model", "not an engine"])
def test_out_is_checked_before_loading(case, tmp_path, no_loading, capsys):
    model = tmp_path / "models" / "llava"
    model.mkdir(parents=True)
    out_args, message = out_cases(tmp_path, model)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    assert build.main(["--model", str(model), "--method", "none", "--out", *out_args]) == 1
    assert time.perf_counter() - t0 < 2
    assert message in one_error_line(capsys)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_unwritable_parent_is_checked_before_loading(tmp_path, no_loading, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    # root ignores the mode bits, so the permission is simulated as well as set.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real(path, mode))
    locked.chmod(0o555)
    try:
        assert build.main(["--model", "tiny", "--out", str(locked / "sub" / "e")]) == 1
    finally:
        locked.chmod(0o755)
    assert one_error_line(capsys) == f"error: --out {locked / 'sub' / 'e'}: cannot write in {locked} " \
                                     "(permission denied)"
    assert list(locked.iterdir()) == []


def test_failing_partial_folder_is_one_line(tmp_path, no_loading, monkeypatch, capsys):
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(build.tempfile, "mkdtemp", refuse)
    assert build.main(["--model", "tiny", "--out", str(tmp_path / "e")]) == 1
    assert one_error_line(capsys) == f"error: --out {tmp_path / 'e'}: cannot create a folder in {tmp_path}: " \
                                     "Permission denied"


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, monkeypatch, capsys):
    def killed(*args, **kwargs):
        assert [p.name for p in tmp_path.iterdir()][0].endswith(".partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(models, "load_model", killed)
    assert build.main(["--model", "tiny", "--out", str(tmp_path / "e")]) == 1
    assert one_error_line(capsys) == "error: terminated (SIGTERM); nothing was left behind"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not build._terminate


# ---------------------------------------------------------------- bad model folders


@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "llava"))


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def corrupt(folder: Path, case: str) -> None:
    weights = folder / "model.safetensors"
    if case.startswith("config "):
        (folder / "config.json").write_text(case.removeprefix("config "))
    elif case == "text_config string":
        edit_json(folder / "config.json", lambda c: c.update(text_config="llama"))
    elif case == "hidden_size string":
        edit_json(folder / "config.json", lambda c: c["text_config"].update(hidden_size="big"))
    elif case == "architectures number":
        edit_json(folder / "config.json", lambda c: c.update(architectures=5))
    elif case == "safetensors truncated":
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    elif case == "safetensors garbage":
        weights.write_bytes(b"garbage!" * 100)
    elif case == "safetensors header too long":
        weights.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    elif case == "safetensors 3 bytes":
        weights.write_bytes(b"abc")
    elif case == "pickle code":
        weights.unlink()
        torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    elif case == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif case == "preprocessor list":
        (folder / "preprocessor_config.json").write_text("[336]")
    elif case == "preprocessor size string":
        edit_json(folder / "preprocessor_config.json", lambda c: c.update(size="big"))
    elif case == "tokenizer_config string":
        (folder / "tokenizer_config.json").write_text('"llama"')
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case, file, message", [
    ("config [1, 2]", "config.json", "is not a JSON object (it holds a list)"),
    ('config "llava"', "config.json", "is not a JSON object (it holds a string)"),
    ("config null", "config.json", "is not a JSON object (it holds a null)"),
    ("text_config string", "config.json", 'text_config must be a JSON object, got string "llama"'),
    ("hidden_size string", "config.json", "invalid settings: Validation error for field 'hidden_size'"),
    ("architectures number", "config.json", "architectures must be a JSON list, got number 5"),
    ("safetensors truncated", "model.safetensors", "is not a valid safetensors file"),
    ("safetensors garbage", "model.safetensors", "is not a valid safetensors file: its header claims"),
    ("safetensors header too long", "model.safetensors", "header claims 1000000000 bytes but the file has 10"),
    ("safetensors 3 bytes", "model.safetensors", "shorter than the 8-byte header length"),
    ("pickle code", "", "pickle checkpoint (.bin) that holds more than plain tensors is refused"),
    ("no tokenizer", "", "has no tokenizer.json"),
    ("preprocessor list", "preprocessor_config.json", "is not a JSON object (it holds a list)"),
    ("preprocessor size string", "preprocessor_config.json", "invalid image processor settings (size 'big'"),
    ("tokenizer_config string", "tokenizer_config.json", "is not a JSON object (it holds a string)"),
])
def test_bad_model_file_is_one_line_naming_it(model_copy, case, file, message, capsys):
    corrupt(model_copy, case)
    with pytest.raises(ExportError) as error:
        load_model(model_copy)
    text = str(error.value)
    assert text.startswith(str(model_copy / file)) and message in text and "\n" not in text, text
    assert "weights_only=False" not in text and "this must never run" not in capsys.readouterr().out
    if case == "pickle code":
        assert "save_pretrained(folder, safe_serialization=True)" in text


def test_plain_tensor_pickle_still_loads(model_copy):
    """weights_only=True reads plain tensors without running code: .bin of tensors is accepted."""
    torch.save(load_file(model_copy / "model.safetensors"), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    assert load_model(model_copy).source["kind"] == "llava-hf"


def test_model_folder_that_is_a_file(tmp_path):
    (tmp_path / "m").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        load_model(tmp_path / "m")


def test_bad_model_file_through_the_cli(model_copy, tmp_path, capsys):
    corrupt(model_copy, "config [1, 2]")
    assert build.main(["--model", str(model_copy), "--out", str(tmp_path / "engines" / "e")]) == 1
    assert one_error_line(capsys) == f"error: {model_copy / 'config.json'} is not a JSON object (it holds a list)"
    assert list((tmp_path / "engines").iterdir()) == []


# ---------------------------------------------------------------- the sweep


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def partial(parent: Path, name: str, pid: int | None, age_s: float = 0) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "vision.onnx").write_bytes(b"half")
    if pid is not None:
        (folder / build.BUILDER).write_text(json.dumps({"pid": pid, "host": build.socket.gethostname()}))
    stamp = time.time() - age_s
    os.utime(folder, (stamp, stamp))
    return folder


def test_sweep_removes_only_stale_partials_of_this_name(tmp_path):
    out = tmp_path / "e.v1"
    gone = partial(tmp_path, ".e.v1.abc_1234.partial", dead_pid(), age_s=3 * 3600)
    old_unknown = partial(tmp_path, ".e.v1.zzzzzzzz.partial", None, age_s=build.STALE_AFTER + 60)
    kept = [partial(tmp_path, ".e.v1.live1234.partial", os.getpid(), age_s=build.STALE_AFTER * 2),
            partial(tmp_path, ".e.v1.fresh123.partial", None, age_s=60),
            partial(tmp_path, ".e.v1.b.abcd1234.partial", dead_pid()),  # engine "e.v1.b"
            partial(tmp_path, ".e.abcd1234.partial", dead_pid()),  # engine "e"
            partial(tmp_path, ".e.v1.abc.partial", dead_pid()),  # not mkdtemp's name
            partial(tmp_path, "e.v1.abcd1234.partial", dead_pid())]  # not hidden
    (tmp_path / ".e.v1.file1234.partial").write_text("a file, not ours")
    lines = build.sweep(out)
    assert lines == [f"removed stale {gone.name} (3 h old, left by an interrupted build)",
                     f"removed stale {old_unknown.name} (24 h old, left by an interrupted build)"]
    assert not gone.exists() and not old_unknown.exists()
    assert all(k.is_dir() for k in kept) and (tmp_path / ".e.v1.file1234.partial").is_file()


def engine(folder: Path, tag: str) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"tag": tag}))
    (folder / "llm.onnx").write_text(tag)
    return folder


def tag(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["tag"]


# ---------------------------------------------------------------- --force: a kill at each step


def move_killed_after(steps: int, tmp: Path, out: Path) -> None:
    """move_into_place in a forked child that dies (os._exit, like SIGKILL) after `steps` of its
    renames / rmtree calls."""
    pid = os.fork()
    if pid == 0:
        done = [0]

        def step(real):
            def call(*args, **kwargs):
                if done[0] == steps:
                    os._exit(9)
                real(*args, **kwargs)
                done[0] += 1
            return call

        os.rename, shutil.rmtree = step(os.rename), step(shutil.rmtree)
        try:
            build.move_into_place(tmp, out)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("steps, at_out, siblings", [
    (0, "old", {"partial"}),  # before the swap
    (1, None, {"partial", "old"}),  # between the two renames: no engine at out
    (2, "new", {"old"}),  # the new engine in, the old not yet set for deletion
    (3, "new", {"trash"}),  # killed before (or while) deleting the old one
])
def test_force_swap_killed_at_each_step_recovers(tmp_path, steps, at_out, siblings):
    out = engine(tmp_path / "e", "old")
    tmp = engine(tmp_path / ".e.abcd1234.partial", "new")
    (tmp / build.BUILDER).write_text(json.dumps({"pid": dead_pid(), "host": build.socket.gethostname()}))
    move_killed_after(steps, tmp, out)
    assert (tag(out) if out.exists() else None) == at_out
    assert {p.name.rsplit(".", 1)[1] for p in tmp_path.iterdir() if p.name != "e"} == siblings
    for folder in tmp_path.iterdir():  # whatever survived is complete
        if folder.name.endswith((".old", ".partial")) or folder == out:
            assert (folder / "llm.onnx").read_text() == tag(folder)
    build.sweep(out)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    assert tag(out) == (at_out or "old")  # between the renames the sweep restores the old engine


def test_force_swap_completes_and_leaves_nothing(tmp_path):
    out = engine(tmp_path / "e", "old")
    build.move_into_place(engine(tmp_path / ".e.abcd1234.partial", "new"), out)
    assert tag(out) == "new" and [p.name for p in tmp_path.iterdir()] == ["e"]


def test_failed_rename_in_puts_the_old_engine_back(tmp_path, monkeypatch):
    out = engine(tmp_path / "e", "old")
    tmp = engine(tmp_path / ".e.abcd1234.partial", "new")
    real = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        build.move_into_place(tmp, out)
    assert tag(out) == "old" and sorted(p.name for p in tmp_path.iterdir()) == [".e.abcd1234.partial", "e"]


def test_full_build_sweeps_and_replaces(tiny_dir, tmp_path, capsys):
    """The one full build: stale siblings swept, --force replaces the engine, nothing else left."""
    out = engine(tmp_path / "e", "old")
    stale = partial(tmp_path, ".e.abcd1234.partial", dead_pid(), age_s=7200)
    trash = engine(tmp_path / ".e.zzzz1234.trash", "older")
    assert build.main(["--model", str(tiny_dir), "--method", "none", "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert f"removed stale {stale.name} (2 h old, left by an interrupted build)" in printed
    assert f"removed stale {trash.name}" in printed
    assert json.loads((out / "manifest.json").read_text())["method"]["method"] == "none"
    assert not (out / build.BUILDER).exists() and oct(out.stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
