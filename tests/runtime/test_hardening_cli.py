"""Hardening of sparsezip-run and of a conversation (issue 16): bad flags, a sampler that cannot
produce NaN, text that is not UTF-8, a closed or full stdout, an unwritable --save-selection, and
a failed turn that leaves the chat (and the KV cache) as it was.

Every user error is one `error:` line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparsezip_deploy.runtime import cli
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.generate import GenerationConfig, sample
from sparsezip_deploy.runtime.pipeline import Pipeline

QUESTION = "What colour is the circle?"
FOLLOW_UP = "And the square?"
TOO_LONG = "word " * 2100  # more positions than the tiny engines' max_positions 2048


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- 1. every flag is checked where it is parsed

BAD_FLAGS = {
    "max-new-tokens 0": (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    "max-new-tokens negative": (["--max-new-tokens", "-3"], "max_new_tokens must be >= 1"),
    "max-new-tokens float": (["--max-new-tokens", "1.5"], "expected an integer, got '1.5'"),
    "threads 0": (["--threads", "0"], "threads must be in [1, 1024], got 0"),
    "threads absurd": (["--threads", "100000"], "threads must be in [1, 1024]"),
    "temperature negative": (["--temperature", "-1"], "temperature must be >= 0 and finite"),
    "temperature nan": (["--temperature", "nan"], "temperature must be >= 0 and finite, got nan"),
    "temperature inf": (["--temperature", "inf"], "temperature must be >= 0 and finite, got inf"),
    "temperature text": (["--temperature", "hot"], "expected a number, got 'hot'"),
    "top-p 0": (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    "top-p above 1": (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    "top-p nan": (["--top-p", "nan"], "top_p must be in (0, 1], got nan"),
    "top-p inf": (["--top-p", "inf"], "top_p must be in (0, 1], got inf"),
    "seed -2": (["--seed", "-2"], "seed must be >= 0, or -1 for a fresh random one, got -2"),
    "seed float": (["--seed", "0.5"], "expected an integer"),
    "seed too many digits": (["--seed", "9" * 5000], "expected an integer"),
    "device-id negative": (["--device-id", "-1"], "device id must be in [0, 2**31), got -1"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_refused_at_parse_time(capsys, tmp_path, case):
    flags, message = BAD_FLAGS[case]
    # The engine does not exist: a flag checked only later would report that instead.
    status, out, err = run_cli(capsys, "--engine", tmp_path / "nope", "--image", "x.png", "--prompt", "hi", *flags)
    assert status == 1 and out == ""
    one_error_line(err)
    assert f"argument --{flags[0][2:]}: {message}" in err and "(see sparsezip-run --help)" in err


def test_with_json_a_failure_is_also_a_json_line_on_stdout(capsys, tmp_path):
    status, out, err = run_cli(capsys, "--engine", tmp_path / "nope", "--image", "x.png", "--prompt", "hi",
                               "--json", "--top-p", "2")
    assert status == 1 and json.loads(out) == {"error": err.removeprefix("error: ").rstrip("\n")}
    assert out.count("\n") == 1 and "top_p must be in (0, 1]" in one_error_line(err)
    status, out, err = run_cli(capsys, "--engine", tmp_path / "nope", "--image", "x.png", "--prompt", "hi", "--js")
    assert status == 1 and "no such file" in json.loads(out)["error"] and "no such file" in one_error_line(err)


def test_defaults_come_from_the_configs_and_seeds_map_as_documented():
    args = cli.parse_args(["--engine", "e", "--image", "i", "--prompt", "p"])
    gen = GenerationConfig()
    assert (args.max_new_tokens, args.temperature, args.top_p, args.seed) == \
           (gen.max_new_tokens, gen.temperature, gen.top_p, gen.seed)
    parse = lambda *flags: cli.parse_args(["--engine", "e", "--image", "i", "--prompt", "p", *flags])  # noqa: E731
    assert parse("--seed", "-1").seed is None  # a fresh random seed, like the default
    assert parse("--seed", str(2**200)).seed == 2**200  # numpy's SeedSequence takes any int >= 0
    assert parse("--temperature", "1e30", "--top-p", "1e-9").temperature == 1e30


def test_a_huge_seed_samples_reproducibly():
    logits = np.random.default_rng(0).standard_normal(64)
    config = GenerationConfig(temperature=1.0, seed=2**200)
    draws = [[sample(logits, config, rng) for _ in range(20)] for rng in
             (np.random.default_rng(config.seed), np.random.default_rng(config.seed))]
    assert draws[0] == draws[1]


def test_absurd_max_new_tokens_is_refused_by_the_engine_limit(capsys, engine_none, shapes_png):
    status, out, err = run_cli(capsys, "--engine", engine_none, "--image", shapes_png, "--prompt", QUESTION,
                               "--max-new-tokens", str(10**12), "--threads", "1")
    assert status == 1 and out == ""
    assert "exceeds the engine's max_positions 2048" in one_error_line(err)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=2.0), dict(temperature=float("inf")),
                                    dict(temperature=float("nan")), dict(top_p=float("nan")), dict(seed=-1),
                                    dict(seed=1.5)])
def test_generation_config_refuses_what_the_cli_refuses(kwargs):
    with pytest.raises(EngineError):
        GenerationConfig(**kwargs)


# -- 2. the sampler, for any finite temperature and any logits

LOGITS = {
    "normal": np.random.default_rng(1).standard_normal(50).astype(np.float32) * 5,
    "-inf": np.array([-np.inf, 2.0, -np.inf, 1.0, -np.inf], np.float32),
    "huge": np.array([-3e38, 3e38, 3e38, 0.0], np.float32),
    "+inf": np.array([1.0, np.inf, 3.0, np.inf], np.float32),
    "nan": np.array([np.nan, 0.5, np.nan, 2.0], np.float32),
}
TEMPERATURES = [1e-30, 1e-12, 1e-3, 0.7, 1.0, 10.0, 1e12, 1e30]


@pytest.mark.parametrize("kind", LOGITS)
def test_sample_never_returns_an_invalid_id(kind):
    logits = LOGITS[kind]
    allowed = set(np.flatnonzero(logits == np.inf)) or set(np.flatnonzero(np.isfinite(logits)))
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        for temperature in TEMPERATURES:
            for top_p in (1.0, 0.9, 1e-9):
                config = GenerationConfig(temperature=temperature, top_p=top_p)
                drawn = {sample(logits, config, rng) for _ in range(20)}
                assert drawn <= allowed, (temperature, top_p, drawn)


def test_a_tiny_temperature_is_argmax_and_a_huge_one_uniform_over_the_finite():
    logits = LOGITS["-inf"]
    rng = np.random.default_rng(0)
    assert {sample(logits, GenerationConfig(temperature=1e-30), rng) for _ in range(50)} == {1}
    assert {sample(logits, GenerationConfig(temperature=1e30), rng) for _ in range(200)} == {1, 3}


def test_logits_without_any_finite_value_still_give_an_id():
    logits = np.array([np.nan, -np.inf, np.nan], np.float32)
    assert 0 <= sample(logits, GenerationConfig(temperature=1.0), np.random.default_rng(0)) < 3


# -- 3. text that is not UTF-8

def test_an_argv_prompt_that_is_not_utf8_is_one_line(capsys, engine_none, shapes_png):
    # What Python makes of the argv bytes b"caf\xe9?" on Linux (surrogateescape).
    prompt = b"caf\xe9?".decode("utf-8", "surrogateescape")
    status, out, err = run_cli(capsys, "--engine", engine_none, "--image", shapes_png, "--prompt", prompt,
                               "--threads", "1")
    assert status == 1 and out == ""
    assert "the prompt is not valid UTF-8: byte 0xe9 at character 3" in one_error_line(err)


def test_real_argv_bytes_in_a_subprocess(engine_none, shapes_png):
    result = subprocess.run([sys.executable, "-m", "sparsezip_deploy.runtime.cli", "--engine", str(engine_none),
                             "--image", str(shapes_png), "--prompt", b"caf\xe9?", "--threads", "1"],
                            capture_output=True, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert "not valid UTF-8: byte 0xe9" in one_error_line(err)


def test_the_api_refuses_lone_surrogates_and_non_text(pipe, shapes_png):
    chat = pipe.conversation(shapes_png)
    with pytest.raises(EngineError, match="not valid UTF-8: lone surrogate U\\+D800 at character 2"):
        chat.ask("ab\ud800", 2)
    with pytest.raises(EngineError, match="a prompt must be text"):
        chat.ask(b"bytes", 2)
    assert chat.turns == 0 and chat.cache is None


# -- 4. a closed or full stdout, an unwritable --save-selection

class _Failing(io.StringIO):
    def __init__(self, error: OSError):
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.mark.parametrize("error,message", [(BrokenPipeError(32, "Broken pipe"), "the reading end of the pipe"),
                                           (OSError(28, "No space left on device"), "No space left on device")])
@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_a_stdout_that_cannot_be_written_is_one_line(capsys, monkeypatch, engine_none, shapes_png, error,
                                                     message, mode):
    monkeypatch.setattr(sys, "stdout", _Failing(error))
    status = cli.main(["--engine", str(engine_none), "--image", str(shapes_png), "--prompt", QUESTION,
                       "--max-new-tokens", "2", "--threads", "1", *mode])
    err = capsys.readouterr().err
    assert status == 1 and f"error: cannot write to stdout: {message}" in one_error_line(err)


def shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)


def test_a_closed_pipe_and_a_full_disk_in_a_subprocess(engine_none, shapes_png, tmp_path):
    run = (f"{sys.executable} -m sparsezip_deploy.runtime.cli --engine {engine_none} --image {shapes_png} "
           f"--threads 1 --max-new-tokens 8 --chat")
    questions = "\\n".join([QUESTION, FOLLOW_UP] * 4)
    piped = shell(f"printf '{questions}\\n' | {run} 2>{tmp_path}/err | head -c 3 >/dev/null; "
                  f"echo ${{PIPESTATUS[1]}}; cat {tmp_path}/err")
    status, *err = piped.stdout.splitlines()
    assert status == "1", piped.stdout
    assert "Traceback" not in piped.stdout and "Exception ignored" not in piped.stdout
    assert "error: cannot write to stdout: the reading end of the pipe was closed" in err
    full = shell(f"echo '{QUESTION}' | {run} > /dev/full")
    assert full.returncode == 1 and "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    assert full.stderr.endswith("error: cannot write to stdout: No space left on device\n"), full.stderr


def test_unwritable_save_selection_is_refused_before_the_answer(capsys, engine_none, shapes_png, tmp_path):
    base = ["--engine", engine_none, "--image", shapes_png, "--prompt", QUESTION, "--max-new-tokens", "2",
            "--threads", "1", "--save-selection"]
    cases = {tmp_path / "missing" / "kept.png": "does not exist", tmp_path: "is a folder; name a .png file",
             "/dev/null": "exists and is not a regular file"}
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[locked / "kept.png"] = "is not writable"
    for path, message in cases.items():
        status, out, err = run_cli(capsys, *base, path)
        assert status == 1 and out == "", path  # refused before anything streamed
        assert message in one_error_line(err)
    status, out, err = run_cli(capsys, *base, tmp_path / "missing" / "kept.png", "--json")
    assert status == 1 and "does not exist" in json.loads(out)["error"]


def test_save_selection_is_whole_or_absent(capsys, monkeypatch, engine_none, shapes_png, tmp_path):
    target = tmp_path / "kept.png"
    argv = ["--engine", engine_none, "--image", shapes_png, "--prompt", QUESTION, "--max-new-tokens", "1",
            "--threads", "1", "--json", "--save-selection", target]
    from PIL import Image
    real = Image.Image.save

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    status, _, err = run_cli(capsys, *argv)
    assert status == 1 and "No space left on device" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file
    monkeypatch.setattr(Image.Image, "save", real)
    target.write_bytes(b"old")
    status, _, err = run_cli(capsys, *argv)
    assert status == 0, err
    assert target.read_bytes().startswith(b"\x89PNG\r\n") and list(tmp_path.iterdir()) == [target]


# -- 5. a failed chat turn changes nothing

def stdin_bytes(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_a_bad_chat_line_is_refused_and_the_chat_goes_on(capsys, monkeypatch, pipe, engine_none, shapes_png):
    lines = [b"caf\xe9?", QUESTION.encode(), TOO_LONG.encode(), b"\xff\xfe", FOLLOW_UP.encode()]
    stdin_bytes(monkeypatch, b"\r\n".join(lines) + b"\n")
    status, out, err = run_cli(capsys, "--engine", engine_none, "--image", shapes_png, "--chat", "--json",
                               "--max-new-tokens", "4", "--threads", "1")
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and len(records) == 5
    errors = [r["error"] for r in records if "error" in r]
    assert [r.get("turn") for r in records] == [None, 0, None, None, 1]
    assert "not valid UTF-8: byte 0xe9 at character 3" in errors[0]
    assert "exceeds the engine's max_positions 2048" in errors[1] and "byte 0xff at character 0" in errors[2]
    assert err.splitlines() == [f"error: {e}" for e in errors]
    chat = pipe.conversation(shapes_png)
    assert [tuple(r["token_ids"]) for r in records if "turn" in r] == \
           [chat.ask(q, 4).token_ids for q in (QUESTION, FOLLOW_UP)]


def test_a_bad_chat_line_in_human_mode(capsys, monkeypatch, engine_none, shapes_png):
    stdin_bytes(monkeypatch, f"{TOO_LONG}\n{FOLLOW_UP}\nexit\n".encode())
    status, out, err = run_cli(capsys, "--engine", engine_none, "--image", shapes_png, "--chat",
                               "--prompt", QUESTION, "--max-new-tokens", "3", "--threads", "1")
    assert status == 1 and out.count("\n") == 2  # two answers, one line each
    assert [line for line in err.splitlines() if line.startswith("error: ")] == \
           [line for line in err.splitlines() if "max_positions" in line]
    assert err.count("\n--\n") + err.startswith("--\n") == 2 and "Traceback" not in err


@pytest.fixture(scope="module")
def pipe(engine_none):
    with Pipeline(engine_none, threads=1) as p:
        yield p


def state(chat) -> tuple:
    batch, cache = chat._batch, chat.cache
    if cache is None:
        return None, batch.turns, tuple(batch.pending)
    return (cache.length, cache.input_pos.tolist(), cache.mask[:, :cache.length].tolist(), batch.turns,
            tuple(batch.pending), batch.rngs[0].bit_generator.state["state"]["state"])


class Boom(Exception):
    pass


def failing_llm(pipe, monkeypatch, after: int) -> None:
    """The LLM graph raises on its `after`-th call from now: in the middle of decoding."""
    calls, run = [0], pipe.llm.run

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            raise Boom("the device fell over")
        return run(*args, **kwargs)

    monkeypatch.setattr(pipe.llm, "run", flaky)


def on_text_raising(piece: str) -> None:
    raise Boom("the caller's callback failed")


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=3),
                                    GenerationConfig(max_new_tokens=3, temperature=1.0, seed=5)])
def test_a_failed_turn_rolls_back_and_a_retry_answers_as_if_it_never_happened(pipe, shapes_png, monkeypatch,
                                                                             config):
    expected = pipe.conversation(shapes_png, config=config)
    want = [expected.ask(QUESTION).token_ids, expected.ask(FOLLOW_UP, 12).token_ids,
            expected.ask(QUESTION).token_ids]

    chat = pipe.conversation(shapes_png, config=config)
    before = state(chat)
    with pytest.raises(Boom):
        chat.ask(QUESTION, on_text=on_text_raising)  # the first turn
    assert state(chat) == before
    assert chat.ask(QUESTION).token_ids == want[0]

    before = state(chat)
    with monkeypatch.context() as m:
        failing_llm(pipe, m, after=4)  # prefill (growing the cache: 12 new tokens) and 2 decode steps
        with pytest.raises(Boom):
            chat.ask(FOLLOW_UP, 12)
    assert state(chat) == before
    with pytest.raises(Boom):
        chat.ask(FOLLOW_UP, 12, on_text=on_text_raising)
    assert state(chat) == before
    with pytest.raises(EngineError, match="max_positions"):
        chat.ask(TOO_LONG)
    assert state(chat) == before
    assert chat.ask(FOLLOW_UP, 12).token_ids == want[1]
    assert chat.ask(QUESTION).token_ids == want[2]
