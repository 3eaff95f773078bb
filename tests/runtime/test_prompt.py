"""runtime/prompt.py: the prompt around <image>, its errors, follow-up turns, streamed decoding."""
from __future__ import annotations

import numpy as np
import pytest

from sparsezip_deploy.export.tokenizer import build_tokenizer
from sparsezip_deploy.runtime.engine import PromptTemplate, TokenIds
from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.prompt import (TextStream, check_length, first_turn_ids, next_turn_ids,
                                             split_at_image)

TEMPLATE = PromptTemplate("USER: <image>\n{prompt} ASSISTANT:", " USER: {prompt} ASSISTANT:", "<image>")
TOKENS = TokenIds(image_token_id=1022, bos_token_id=1, eos_token_id=2, pad_token_id=1023)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_template_prompt_is_tokenized_whole_and_split_at_the_image(tokenizer):
    prompt = "What colour is the {shape}? {0}"  # braces: str.replace, not str.format
    ids = first_turn_ids(tokenizer, TEMPLATE, TOKENS, prompt)
    whole = tokenizer.encode(f"USER: <image>\n{prompt} ASSISTANT:").ids
    assert list(ids.before) + [TOKENS.image_token_id] + list(ids.after) == whole
    assert ids.before[0] == TOKENS.bos_token_id
    assert tokenizer.decode(list(ids.after)) == f"\n{prompt} ASSISTANT:"
    assert list(ids.text_ids) == tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids.text_tokens == len(whole) - 1


def test_raw_prompt(tokenizer):
    raw = "Look: <image> Is there a red circle?"
    ids = first_turn_ids(tokenizer, TEMPLATE, TOKENS, raw, raw=True)
    whole = tokenizer.encode(raw).ids
    assert list(ids.before) + [TOKENS.image_token_id] + list(ids.after) == whole
    assert list(ids.text_ids) == [i for i in whole if i not in (1, 2, 1022, 1023)]


@pytest.mark.parametrize("raw,found", [("no image here", "no"), ("<image> and <image>", "2")])
def test_raw_prompt_needs_one_image(tokenizer, raw, found):
    with pytest.raises(EngineError, match=f"--raw prompt has {found} <image>"):
        first_turn_ids(tokenizer, TEMPLATE, TOKENS, raw, raw=True)


def test_template_prompt_must_not_contain_the_image_token(tokenizer):
    with pytest.raises(EngineError, match="use --raw"):
        first_turn_ids(tokenizer, TEMPLATE, TOKENS, "what is <image>?")


def test_split_at_image():
    assert split_at_image([1, 5, 9, 6], 9) == ([1, 5], [6])
    with pytest.raises(EngineError, match="2 image tokens"):
        split_at_image([9, 9], 9)


def test_next_turn_has_no_bos(tokenizer):
    ids = next_turn_ids(tokenizer, TEMPLATE, "And the square?")
    assert ids == tokenizer.encode(" USER: And the square? ASSISTANT:", add_special_tokens=False).ids
    assert TOKENS.bos_token_id not in ids
    with pytest.raises(EngineError, match="follow-up"):
        next_turn_ids(tokenizer, TEMPLATE, "another <image>")


def test_too_long_names_the_numbers():
    check_length(0, 20, 576, 64, 660)
    with pytest.raises(EngineError) as info:
        check_length(0, 20, 576, 65, 660)
    assert str(info.value) == ("prompt of 596 tokens (20 text + 576 visual) + 65 new tokens = 661 "
                               "exceeds the engine's max_positions 660")
    with pytest.raises(EngineError, match=r"\(12 text \+ 0 visual \+ 640 earlier\)"):
        check_length(640, 12, 0, 10, 660)


def stream_all(tokenizer, ids):
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    return pieces + [stream.flush()]


@pytest.mark.parametrize("text", ["The red circle is at the top left.", "café ☕ 日本語\nzwei Zeilen",
                                  "  spaced  out "])
def test_stream_reassembles_multibyte_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream_all(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # a split character is held back, never shown broken


def test_stream_of_random_ids_equals_the_whole_decode(tokenizer):
    # Every id but the byte-fallback ones (3..258): random bytes are rarely valid UTF-8.
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = rng.integers(259, 1024, size=int(rng.integers(1, 40))).tolist()
        ids[:: 5] = [1, 2, 1022, 1023, 0, 1, 2, 1022][: len(ids[:: 5])]  # specials anywhere
        assert "".join(stream_all(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_holds_a_split_character_until_flush(tokenizer):
    ids = tokenizer.encode("é", add_special_tokens=False).ids  # ▁ <0xC3> <0xA9>
    assert len(ids) == 3
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in ids[:2]] == ["", ""]
    assert stream.flush() == "\ufffd"  # the answer stopped inside the character
