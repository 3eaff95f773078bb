"""The Python API: an engine folder loaded once, conversations about one image each.

    with Pipeline("engines/tiny-sparsezip") as pipe:
        result = pipe.ask("cat.png", "What is in the picture?", max_new_tokens=32)
        chat = pipe.conversation("cat.png")
        first = chat.ask("What is in the picture?")
        second = chat.ask("What colour is it?")   # reuses the image tokens and the KV cache

`Result` carries the generated ids and every figure the CLI prints.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends.ort import OrtBackend, OrtOptions
from .engine import Engine, load_engine
from .errors import EngineError
from .generate import (GenerationConfig, VisualTokens, embed, encode_image, generate, prefill,
                       text_features)
from .kv_cache import KVCache
from .preprocess import load_image, preprocess
from .prompt import TextStream, check_length, first_turn_ids, load_tokenizer, next_turn_ids


@dataclass(frozen=True)
class Result:
    """One turn's answer and what it cost. Times in ms; bytes for batch 1."""

    text: str
    token_ids: tuple[int, ...]  # generated ids, EOS included if produced
    stop_reason: str  # "eos" | "length"
    turn: int  # 0 for the first (image) turn of a conversation
    visual_tokens_kept: int  # valid visual tokens the LLM saw
    visual_tokens_total: int  # patches of the image (what the uncompressed model sees)
    prompt_tokens: int  # positions prefilled this turn (text + visual on the first turn)
    prompt_text_tokens: int
    preprocess_ms: float
    vision_ms: float  # 0 on follow-up turns: the image tokens are reused
    prefill_ms: float
    ttft_ms: float  # from the vision graph's start (a follow-up: the turn's start) to the first token
    decode_ms: float  # first token sampled -> last token sampled
    decode_tokens_per_s: float | None  # tokens after the first / decode_ms; None with one token
    kv_bytes: int  # the cache's valid positions after this turn
    kv_bytes_allocated: int
    kv_bytes_uncompressed: int  # the same cache with all visual_tokens_total patches instead
    peak_rss_bytes: int
    kept_index: tuple[int, ...] = field(repr=False)  # source patch per visual token, -1 CLS / merged

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kept_index")
        d["token_ids"] = list(self.token_ids)
        return d


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, because ru_maxrss survives execve and would
    report the peak of whatever process started this one if that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


class Pipeline:
    """An engine folder with its two graphs, tokenizer and embedding table, loaded once."""

    def __init__(self, engine_dir: str | PathLike, provider: str = OrtOptions.provider,
                 threads: int | None = OrtOptions.threads, verify_checksums: bool = True):
        self.engine: Engine = load_engine(engine_dir, verify_checksums=verify_checksums)
        options = OrtOptions(provider, threads)
        self.tokenizer = load_tokenizer(self.engine)
        self.table = self._load_table()
        graphs = self.engine.graphs
        # One vision run per image, then the LLM's: its threads must not spin on after it.
        self.vision = OrtBackend(self.engine.path(graphs["vision"].file), graphs["vision"],
                                 replace(options, spin=False))
        self.llm = OrtBackend(self.engine.path(graphs["llm"].file), graphs["llm"], options)
        self.vision.activate()
        self.llm.activate()

    def _load_table(self) -> np.ndarray:
        llm = self.engine.llm
        path = self.engine.path(llm.embed_tokens)
        try:
            # Memory-mapped: only the rows of the prompt's tokens are ever paged in.
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load {path}: {e}") from None
        want = (llm.vocab_size, llm.hidden_size)
        if table.shape != want or table.dtype != llm.np_dtype:
            raise EngineError(f"{path}: {table.dtype} {list(table.shape)}, the manifest says "
                              f"{llm.dtype} {list(want)}")
        return table

    def conversation(self, image: str | PathLike | Image.Image, raw: bool = False,
                     config: GenerationConfig = GenerationConfig()) -> Conversation:
        return Conversation(self, image, raw, config)

    def ask(self, image: str | PathLike | Image.Image, prompt: str, max_new_tokens: int | None = None,
            raw: bool = False, *, config: GenerationConfig = GenerationConfig(),
            on_text: Callable[[str], None] | None = None) -> Result:
        """One question about one image; `max_new_tokens` overrides `config`'s."""
        return self.conversation(image, raw, config).ask(prompt, max_new_tokens, on_text=on_text)

    def close(self) -> None:
        self.vision.close()
        self.llm.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Conversation:
    """One image and the turns about it: the image tokens and the KV cache live here.

    The first `ask` encodes the image and prefills the first-turn prompt; each later
    one prefills only [the previous answer's last token, unless EOS] + the
    next_turn text, after what the cache already holds.
    """

    def __init__(self, pipeline: Pipeline, image: str | PathLike | Image.Image, raw: bool,
                 config: GenerationConfig):
        self.pipe, self.raw, self.config = pipeline, raw, config
        engine = pipeline.engine
        t0 = time.perf_counter()
        if not isinstance(image, Image.Image):
            image = load_image(Path(image))
        self.pixel_values = preprocess(image, engine.image)  # [1,3,H,W] float32
        self.preprocess_ms = (time.perf_counter() - t0) * 1e3
        self.rng = np.random.default_rng(config.seed)
        self.cache: KVCache | None = None
        self.visual: VisualTokens | None = None
        self.pending: int | None = None  # last answer token, sampled but not yet in the cache
        self.turns = 0

    def ask(self, prompt: str, max_new_tokens: int | None = None,
            on_text: Callable[[str], None] | None = None) -> Result:
        """Answer `prompt`; `on_text` receives the answer's text piece by piece as it is decoded."""
        config = self.config
        if max_new_tokens is not None:
            config = replace(config, max_new_tokens=max_new_tokens)
        if self.turns == 0:
            logits, figures = self._first_turn(prompt, config)
        else:
            logits, figures = self._next_turn(prompt, config)
        return self._answer(logits, config, figures, on_text)

    def _first_turn(self, prompt: str, config: GenerationConfig) -> tuple[np.ndarray, dict]:
        pipe, engine = self.pipe, self.pipe.engine
        ids = first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, prompt, self.raw)
        t0 = time.perf_counter()
        text = text_features(pipe.table, ids.text_ids) if engine.vision.text_aware else None
        self.visual = encode_image(pipe.vision, self.pixel_values, text)
        n_visual = len(self.visual.tokens)
        check_length(0, ids.text_tokens, n_visual, config.max_new_tokens, engine.llm.max_position_embeddings)
        dtype = engine.llm.np_dtype
        # [before | visual | after] -> [1, T, D]
        embeds = np.concatenate([embed(pipe.table, ids.before), self.visual.tokens.astype(dtype),
                                 embed(pipe.table, ids.after)])[None]
        self.cache = KVCache.for_llm(engine.llm, embeds.shape[1] + config.max_new_tokens)
        t1 = time.perf_counter()
        logits = prefill(pipe.llm, self.cache, embeds)
        prefill_ms = (time.perf_counter() - t1) * 1e3
        return logits, dict(t0=t0, prompt_tokens=embeds.shape[1], prompt_text_tokens=ids.text_tokens,
                            preprocess_ms=self.preprocess_ms, vision_ms=self.visual.vision_ms,
                            prefill_ms=prefill_ms)

    def _next_turn(self, prompt: str, config: GenerationConfig) -> tuple[np.ndarray, dict]:
        pipe, engine, cache = self.pipe, self.pipe.engine, self.cache
        t0 = time.perf_counter()
        ids = ([self.pending] if self.pending is not None else []) + \
            next_turn_ids(pipe.tokenizer, engine.prompt, prompt)
        check_length(cache.length, len(ids), 0, config.max_new_tokens, engine.llm.max_position_embeddings)
        # The next user line is unknown when the first turn allocates: grow (once per turn at most).
        cache.ensure_capacity(cache.length + len(ids) + config.max_new_tokens)
        t1 = time.perf_counter()
        logits = prefill(pipe.llm, cache, embed(pipe.table, ids)[None])
        prefill_ms = (time.perf_counter() - t1) * 1e3
        return logits, dict(t0=t0, prompt_tokens=len(ids), prompt_text_tokens=len(ids),
                            preprocess_ms=0.0, vision_ms=0.0, prefill_ms=prefill_ms)

    def _answer(self, logits: np.ndarray, config: GenerationConfig, figures: dict,
                on_text: Callable[[str], None] | None) -> Result:
        pipe, engine, cache = self.pipe, self.pipe.engine, self.cache
        eos = engine.tokens.eos_token_id
        stream = TextStream(pipe.tokenizer)
        tokens: list[int] = []
        t_first = t_last = figures["t0"]
        for token in generate(pipe.llm, cache, pipe.table, logits, config, eos, self.rng):
            t_last = time.perf_counter()
            if not tokens:
                t_first = t_last
            tokens.append(token)
            if token != eos and on_text is not None and (piece := stream.push(token)):
                on_text(piece)
        if on_text is not None and (piece := stream.flush()):
            on_text(piece)
        self.pending = None if tokens[-1] == eos else tokens[-1]
        self.turns += 1
        decode_s = t_last - t_first
        kept, total = len(self.visual.tokens), engine.vision.num_patches
        return Result(
            text=pipe.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True),
            token_ids=tuple(tokens),
            stop_reason="eos" if tokens[-1] == eos else "length",
            turn=self.turns - 1,
            visual_tokens_kept=kept,
            visual_tokens_total=total,
            prompt_tokens=figures["prompt_tokens"],
            prompt_text_tokens=figures["prompt_text_tokens"],
            preprocess_ms=figures["preprocess_ms"],
            vision_ms=figures["vision_ms"],
            prefill_ms=figures["prefill_ms"],
            ttft_ms=(t_first - figures["t0"]) * 1e3,
            decode_ms=decode_s * 1e3,
            decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None,
            kv_bytes=cache.nbytes_used,
            kv_bytes_allocated=cache.nbytes_allocated,
            kv_bytes_uncompressed=cache.nbytes_used + (total - kept) * cache.per_token_bytes,
            peak_rss_bytes=peak_rss_bytes(),
            kept_index=tuple(int(i) for i in self.visual.kept_index),
        )
