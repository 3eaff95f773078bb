"""The project's own Llama-style tokenizer, built deterministically for tiny test models.

Same layout as the Llama / Vicuna `tokenizer.json` that llava-hf ships: BPE with
byte fallback (`<0x00>`..`<0xFF>` at ids 3..258), `▁` as the word-boundary marker
added by a Prepend + Replace normalizer (the "legacy" Llama normalizer, so that
decode(encode(s)) == s, leading spaces included), `<unk>`=0, `<s>`=1, `</s>`=2,
a post-processor that prepends `<s>`, and two added special tokens, `<image>` and
`<pad>`, at the end of the vocabulary like llava-hf's 32000 / 32001.

The merges come from a small pure-Python BPE over a built-in English + scene
corpus; nothing is downloaded and the same call always yields the same bytes.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
SPACE = "▁"
# Base vocabulary (specials + bytes + characters + merges); `<image>` and `<pad>`
# follow it, so the whole tokenizer has 1024 ids: a multiple of 64 like llava-hf's 32064.
BASE_VOCAB_SIZE = 1022

# The LLaVA-1.5 conversation format as llava-hf renders it (its `{% generation %}`
# tag dropped so that plain jinja2 in the runtime can render it too): a user turn
# with an image becomes "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_COMMON_WORDS = """
the a an is are was were be been being am of and or but not no yes to in on at by for
with from into onto over under about as it its this that these those there here they them
their he she his her we our you your i me my what which where when why how who whom whose
many much more most some any all each every both few several other another same different
can could will would should may might must do does did done have has had having get got make
made see seen look looks show shows shown picture image photo scene drawing view background
foreground describe tell answer question please thank thanks one two three four five six
seven eight nine ten eleven twelve zero first second third last next only just very also
than then so if because while after before again still near far inside outside between
among around behind front beside across along through up down out off side sides edge
corner corners part whole half number count counted total pair group row column line lines
thing things object objects item items shape shapes colour colours color colors size sizes
position positions place placed located location appear appears visible hidden contains
contain containing filled empty solid outline outlined bright dark light pale deep plain
simple single double each other kind type sort like similar unlike larger smaller bigger
biggest largest smallest longest shortest taller wider narrower above below
USER ASSISTANT SYSTEM Yes No The A An There It This What Which Where How Is Are Can Do
"""

_COLOURS = ("red green blue yellow orange purple pink brown black white gray grey cyan "
            "magenta violet gold silver navy teal").split()
_SHAPES = ("circle square triangle star rectangle ellipse oval diamond hexagon pentagon "
           "cross heart ring dot arrow").split()
_SIZES = "small large big tiny medium huge little".split()
_POSITIONS = ("left right top bottom center centre middle upper lower corner "
              "above below").split()
_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve "
            "0 1 2 3 4 5 6 7 8 9").split()

# (template, number of times it is repeated per filling): the question forms weigh
# more so that their words become single tokens early, as in a real chat corpus.
_TEMPLATES = (
    ("What colour is the {shape}?", 3),
    ("What color is the {shape}?", 2),
    ("Is there a {colour} {shape}?", 3),
    ("How many {shape}s are there?", 3),
    ("Where is the {colour} {shape}?", 3),
    ("Which shape is {size}?", 2),
    ("The {shape} is {colour}.", 2),
    ("The {size} {colour} {shape} is at the {position}.", 1),
    ("There are {number} {shape}s in the image.", 1),
    ("Yes, there is a {colour} {shape} on the {position}.", 1),
    ("No, the {shape} is not {colour}.", 1),
)


def _corpus() -> list[str]:
    """The training text, one sentence per item, in a fixed order."""
    lines = [" ".join(_COMMON_WORDS.split())]
    for template, repeat in _TEMPLATES:
        for i, shape in enumerate(_SHAPES):
            line = template.format(
                shape=shape,
                colour=_COLOURS[i % len(_COLOURS)],
                size=_SIZES[i % len(_SIZES)],
                position=_POSITIONS[i % len(_POSITIONS)],
                number=_NUMBERS[i % len(_NUMBERS)],
            )
            lines.extend([line] * repeat)
    for words in (_COLOURS, _SIZES, _POSITIONS, _NUMBERS):
        lines.append(" ".join(words))
    return lines


# The training-time split into words: a letter run, a single digit (Llama splits
# digits) or a punctuation run, each optionally led by the boundary marker.
_WORD = re.compile(f"{SPACE}?[A-Za-z]+|{SPACE}?[0-9]|{SPACE}?[^{SPACE}A-Za-z0-9]+|{SPACE}")


def _word_counts(lines: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(_WORD.findall(SPACE + line.replace(" ", SPACE)))
    return counts


def _alphabet() -> list[str]:
    # Every printable ASCII character is a piece of its own, like in Llama's vocabulary;
    # only control characters (newline, tab) and non-ASCII text go through byte fallback.
    return [SPACE] + [chr(c) for c in range(0x21, 0x7F)]


@functools.lru_cache(maxsize=1)
def _learn_merges(num_merged_tokens: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Stops once `num_merged_tokens` new tokens exist; a merge whose result is already a
    token (reached by another path) is kept, as HF BPE does, but adds no token.
    """
    counts = _word_counts(_corpus())
    words = [list(word) for word in sorted(counts)]
    freqs = [counts[word] for word in sorted(counts)]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)

    known = set(_alphabet())
    merges: list[tuple[str, str]] = []
    new_tokens = 0
    while new_tokens < num_merged_tokens:
        candidates = [(count, pair) for pair, count in pair_counts.items() if count > 0]
        if not candidates:
            raise RuntimeError(f"tokenizer corpus too small: only {new_tokens} merged tokens")
        best = min(candidates, key=lambda item: (-item[0], item[1]))[1]
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            known.add(merged)
            new_tokens += 1
        for i in sorted(where.pop(best)):
            symbols = words[i]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= freqs[i]
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += freqs[i]
                where.setdefault(pair, set()).add(i)
        del pair_counts[best]
    return tuple(merges)


def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {UNK: 0, BOS: 1, EOS: 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in _alphabet():
        vocab[char] = len(vocab)
    merges = list(_learn_merges(BASE_VOCAB_SIZE - len(vocab)))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    assert len(vocab) == BASE_VOCAB_SIZE, len(vocab)
    return vocab, merges


def bos_post_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    """Llama's `add_bos_token=True`, `add_eos_token=False`."""
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])


def build_tokenizer() -> Tokenizer:
    """The project's tokenizer: 1022 base ids, then `<image>` = 1022 and `<pad>` = 1023."""
    vocab, merges = _vocab()
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK,
                              fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        # The normalizer's own leading marker: drop it, and only it.
        decoders.Strip(" ", 1, 0),
    ])
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False)
         for token in (UNK, BOS, EOS, IMAGE_TOKEN, PAD_TOKEN)])
    tokenizer.post_processor = bos_post_processor(BOS, vocab[BOS])
    return tokenizer


def write_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, *, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by
    `AutoTokenizer` / `PreTrainedTokenizerFast` with bos/eos/unk/pad set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD_TOKEN}
    config = {
        # The generic fast class keeps tokenizer.json as written; transformers v5's
        # LlamaTokenizer would rebuild the pipeline from vocab + merges instead.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
