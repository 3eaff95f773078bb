"""Text <-> ids: the prompt around `<image>`, follow-up turns, streamed decoding.

The whole prompt string is tokenized at once, `<image>` being one special token,
exactly as llava-hf's processor does (tokenizing the pieces on either side of
it separately would change the ids at the seams); the visual tokens then take
the place of that single id:

    ids:       [<s> USER : <image> \n What ... ASSISTANT :]
    positions: [before........][visual tokens][after........]   0..n-1, contiguous
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from .engine import EngineFolder
from .errors import EngineError
from .manifest import TOKENIZER, PromptTemplate, TokenIds


@dataclass(frozen=True)
class PromptIds:
    before: tuple[int, ...]  # text ids before <image>, BOS included
    after: tuple[int, ...]  # text ids after <image>
    text_ids: tuple[int, ...]  # the user's own words, for text-aware compression

    @property
    def text_tokens(self) -> int:
        return len(self.before) + len(self.after)


def load_tokenizer(engine: EngineFolder) -> Tokenizer:
    path = engine.path(TOKENIZER)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise EngineError(f"cannot load {path}: {e}") from None


def first_turn_ids(tokenizer: Tokenizer, template: PromptTemplate, tokens: TokenIds,
                   prompt: str, raw: bool = False) -> PromptIds:
    """Template mode: the user's text goes into `first_turn`; raw: `prompt` is the whole prompt."""
    check_text(prompt)
    image = template.image_token
    if raw:
        if prompt.count(image) != 1:
            found = "no" if image not in prompt else f"{prompt.count(image)}"
            raise EngineError(f"--raw prompt has {found} {image}: it needs exactly one, where the image goes")
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        text_ids = [i for i in ids if i not in tokens.special]
    else:
        if image in prompt:
            raise EngineError(f"the prompt contains {image}; the chat template places the image itself "
                              "(use --raw to write the whole prompt)")
        ids = tokenizer.encode(template.first_turn.replace("{prompt}", prompt), add_special_tokens=True).ids
        text_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    before, after = split_at_image(ids, tokens.image_token_id)
    return PromptIds(tuple(before), tuple(after), tuple(text_ids))


def check_text(prompt: str) -> None:
    """A prompt must be a str that is valid Unicode text, i.e. encodable as UTF-8.

    On Linux, bytes of argv or stdin that are not UTF-8 arrive as lone surrogates
    U+DC80..U+DCFF (Python's surrogateescape), which tokenizers rejects with a TypeError.
    """
    if not isinstance(prompt, str):
        raise EngineError(f"a prompt must be text (str), got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(prompt[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise EngineError(f"the prompt is not valid UTF-8: {what} at character {e.start} "
                          "(re-encode it as UTF-8)") from None


def split_at_image(ids: list[int], image_token_id: int) -> tuple[list[int], list[int]]:
    count = ids.count(image_token_id)
    if count != 1:
        # The string had one <image> but the tokenizer disagrees: the engine's tokenizer
        # does not treat it as a single special token.
        raise EngineError(f"the prompt tokenizes to {count} image tokens (id {image_token_id}), expected 1")
    at = ids.index(image_token_id)
    return ids[:at], ids[at + 1:]


def next_turn_ids(tokenizer: Tokenizer, template: PromptTemplate, prompt: str) -> list[int]:
    """A chat follow-up: the text after the previous answer, no BOS."""
    check_text(prompt)
    if template.image_token in prompt:
        raise EngineError(f"a follow-up turn cannot contain {template.image_token}: "
                          "the image is already in the chat")
    return tokenizer.encode(template.next_turn.replace("{prompt}", prompt), add_special_tokens=False).ids


def check_length(past: int, new_text: int, visual: int, max_new_tokens: int, max_positions: int) -> None:
    """Positions used by the cache so far + this turn's prompt + its answer must fit the engine's limit."""
    total = past + new_text + visual + max_new_tokens
    if total > max_positions:
        parts = [f"{new_text} text", f"{visual} visual"] + ([f"{past} earlier"] if past else [])
        raise EngineError(f"prompt of {past + new_text + visual} tokens ({' + '.join(parts)}) + "
                          f"{max_new_tokens} new tokens = {total} exceeds the engine's max_positions {max_positions}")


class TextStream:
    """Incremental detokenization: `push(id)` returns the text that is now final.

    Decodes a short window instead of the whole answer each time (text-generation-
    inference's prefix/read offsets). A trailing U+FFFD means the window ends inside
    a multi-byte character split over byte-fallback tokens: hold it back until the
    next token completes it. The pieces add up to the whole answer's decode whenever
    the byte tokens form valid UTF-8 (what a trained model emits); for invalid byte
    runs the replacement characters may fall differently, since byte fallback judges
    a run of byte tokens as a whole.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]
