"""The Python API: an engine folder loaded once, conversations about one image each, or a batch of them.

    with Pipeline("engines/tiny-sparsezip") as pipe:
        result = pipe.ask("cat.png", "What is in the picture?", max_new_tokens=32)
        chat = pipe.conversation("cat.png")
        first = chat.ask("What is in the picture?")
        second = chat.ask("What colour is it?")   # reuses the image tokens and the KV cache
        answers = pipe.ask_batch(["a.png", "b.png"], ["What is it?", "How many?"])   # B rows at once

A batch runs B conversations together: one vision call for the B images, one
LLM call per step for all rows (the weights are read once for B tokens). Rows
carry their own numbers of visual tokens; prompts are left-padded to a common
length under the attention mask, every row has its own positions, sampler and
stop. A row's greedy answer is the one it gets alone. `Result` carries the
generated ids and every figure the CLI prints.
"""
from __future__ import annotations

import resource
import sys
import time
from tokenize import TokenError
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .backends import backend_options, open_backend
from .backends.base import Backend
from .engine import EngineFolder, load_engine
from .errors import EngineError
from .generate import (GenerationConfig, VisualTokens, embed, encode_images, generate, pad_left, prefill,
                       prefill_pruned, text_features)
from .kv_cache import KVCache
from .manifest import PREFILL_GRAPH
from .preprocess import load_image, preprocess
from .profiles import gpu_cache_dir, tensorrt_ep_options, typical_feeds
from .prompt import TextStream, check_length, first_turn_ids, load_tokenizer, next_turn_ids
from .vision import DEFAULT_CACHE_SIZE, ImageCache, VisionStage

ImageInput = str | PathLike | Image.Image


@dataclass(frozen=True)
class Result:
    """One turn's answer (of one row) and what it cost. Times in ms; bytes for this row."""

    text: str
    token_ids: tuple[int, ...]  # generated ids, EOS included if produced
    stop_reason: str  # "eos" | "length"
    turn: int  # 0 for the first (image) turn of a conversation
    visual_tokens_kept: int  # valid visual tokens the LLM saw
    visual_tokens_total: int  # patches of the image (what the uncompressed model sees)
    prompt_tokens: int  # positions prefilled this turn (text + visual on the first turn)
    prompt_text_tokens: int
    preprocess_ms: float
    # 0 on follow-up turns: the image tokens are reused (a batch: its one vision call); a cached image:
    # the selector's run (split engine) or the cache lookup alone.
    vision_ms: float
    prefill_ms: float  # a batch: its one prefill call
    ttft_ms: float  # from the vision graph's start (a follow-up: the turn's start) to the first token
    decode_ms: float  # first token sampled -> this row's last token sampled
    decode_tokens_per_s: float | None  # tokens after the first / decode_ms; None with one token
    kv_bytes: int  # the cache positions this row holds after this turn (batch padding not counted)
    kv_bytes_allocated: int  # the whole cache (all rows of a batch)
    kv_bytes_uncompressed: int  # this row's positions with all visual_tokens_total patches instead, every layer
    peak_rss_bytes: int
    batch: int = 1  # rows answered together
    kept_index: tuple[int, ...] = field(default=(), repr=False)  # source patch per visual token, -1 CLS / merged
    kv_bytes_groups: tuple[int, ...] = ()  # kv_bytes per cache layer group (FastV / SparseVLM: > 1 group)
    # This row's image came from the Pipeline's image cache (first turn only): a split engine ran
    # only its selector (vision_ms is the selector's), a prompt-independent one no graph at all.
    vision_cached: bool = False

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
    """An engine folder with its two graphs, tokenizer and embedding table, loaded once.

    `backend` names the runner (runtime/backends): "ort" with `provider` cpu |
    cuda | tensorrt (ONNX Runtime's execution providers), or "tensorrt" (native
    plans built by sparsezip-build-trt). The KV cache lives on that device.
    `trt_cache`: where the TensorRT EP keeps its engines (default: a per-GPU
    folder under the engine's trt_cache/). `image_cache`: how many recent images'
    vision outputs are kept (runtime/vision.py: a split engine's trunk features,
    or a prompt-independent graph's whole output), keyed by their pixels; 0 turns it off.
    """

    def __init__(self, engine_dir: str | PathLike, provider: str = "cpu", threads: int | None = None,
                 verify_checksums: bool = True, backend: str = "ort", device_id: int = 0,
                 trt_cache: str | PathLike | None = None, image_cache: int = DEFAULT_CACHE_SIZE):
        cache = ImageCache(image_cache)  # a bad size is refused before any graph loads
        self.engine: EngineFolder = load_engine(engine_dir, verify_checksums=verify_checksums)
        self.limits = self.engine.manifest.serving_limits
        self.tokenizer = load_tokenizer(self.engine)
        self.table = self._load_table()
        if backend == "ort" and provider == "tensorrt" and trt_cache is None:
            trt_cache = gpu_cache_dir(self.engine, device_id)  # once: it asks the driver (or nvidia-smi)
        self.vision = VisionStage(self.engine.manifest, {
            graph: self._open(backend, graph, provider, threads, device_id, trt_cache)
            for graph in self.engine.manifest.vision_graphs}, cache)
        self.llm = self._open(backend, "llm", provider, threads, device_id, trt_cache)
        # FastV / SparseVLM: the image prefill, which drops visual tokens inside the LLM, is a graph of its own.
        self.llm_prefill = self._open(backend, PREFILL_GRAPH, provider, threads, device_id, trt_cache) \
            if PREFILL_GRAPH in self.engine.graphs else None
        for graph in self._graphs():
            graph[1].activate()

    def _graphs(self) -> list[tuple[str, Backend]]:
        graphs = [*self.vision.backends.items(), ("llm", self.llm)]
        return graphs + ([(PREFILL_GRAPH, self.llm_prefill)] if self.llm_prefill is not None else [])

    def _open(self, backend: str, graph: str, provider: str, threads: int | None, device_id: int,
              trt_cache: str | PathLike | None) -> Backend:
        engine, spec = self.engine, self.engine.graphs[graph]
        if backend == "tensorrt":
            built = engine.manifest.tensorrt
            if built is None or graph not in built.plans:
                raise EngineError(f"{engine.folder} has no TensorRT plan for {graph}: run sparsezip-build-trt "
                                  f"{engine.folder} on this device first")
            options = backend_options(backend, built=built, device_id=device_id)
            return open_backend(backend, engine.path(built.plans[graph].file), spec, options)
        extra = {}
        if graph in engine.manifest.vision_graphs:
            # One vision run per image (or question), then the LLM's: its threads must not spin on
            # after it, nor its activations stay resident under the LLM's.
            extra = dict(spin=False, shrink_arena=True)
        if provider == "tensorrt":
            extra["provider_options"] = tuple(tensorrt_ep_options(engine, graph, trt_cache).items())
        options = backend_options(backend, provider=provider, threads=threads, device_id=device_id, **extra)
        return open_backend(backend, engine.path(spec.file), spec, options)

    def warmup(self, progress: Callable[[str], None] = lambda line: None) -> dict[str, float]:
        """Run each graph once at its typical shapes (the TensorRT EP builds or loads its engines here).

        Returns seconds per graph. The feeds are zeros under all-ones masks: only their shapes matter.
        """
        seconds = {}
        for name, backend in self._graphs():
            progress(f"{name}: first run ({backend.path.name})")
            t0 = time.perf_counter()
            backend.run(typical_feeds(self.engine, name))
            seconds[name] = time.perf_counter() - t0
            progress(f"{name}: ready in {seconds[name]:.1f} s")
        return seconds

    def _load_table(self) -> np.ndarray:
        llm = self.engine.llm
        path = self.engine.path(llm.embed_tokens)
        try:
            # Memory-mapped: only the rows of the prompt's tokens are ever paged in.
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        # A corrupt .npy header reaches numpy's header parser (ast), which raises SyntaxError or
        # tokenize.TokenError besides the OSError / ValueError of a bad file.
        except (OSError, ValueError, SyntaxError, TokenError) as e:
            raise EngineError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        want = (llm.vocab_size, llm.hidden_size)
        if table.shape != want or table.dtype != llm.np_dtype:
            raise EngineError(f"{path}: {table.dtype} {list(table.shape)}, the manifest says "
                              f"{llm.dtype} {list(want)}")
        return table

    def conversation(self, image: ImageInput, raw: bool = False,
                     config: GenerationConfig = GenerationConfig()) -> Conversation:
        return Conversation(self, image, raw, config)

    def ask(self, image: ImageInput, prompt: str, max_new_tokens: int | None = None,
            raw: bool = False, *, config: GenerationConfig = GenerationConfig(),
            on_text: Callable[[str], None] | None = None) -> Result:
        """One question about one image; `max_new_tokens` overrides `config`'s."""
        return self.conversation(image, raw, config).ask(prompt, max_new_tokens, on_text=on_text)

    def ask_batch(self, images: Sequence[ImageInput], prompts: Sequence[str], max_new_tokens: int | None = None,
                  raw: bool = False, *, config: GenerationConfig = GenerationConfig(),
                  on_text: Callable[[int, str], None] | None = None) -> list[Result]:
        """Question b about image b, for every b at once; `on_text(b, piece)` streams row b."""
        if len(images) != len(prompts) or not images:
            raise EngineError(f"a batch needs one prompt per image, got {len(images)} images and "
                              f"{len(prompts)} prompts")
        if len(images) > self.limits.max_batch:
            raise EngineError(f"a batch of {len(images)} exceeds the engine's max_batch {self.limits.max_batch} "
                              "(export/build.py --max-batch)")
        return Batch(self, images, raw, config).ask(prompts, max_new_tokens, on_text)

    def close(self) -> None:
        for _, backend in self._graphs():
            backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Batch:
    """B conversations advanced together: their images' visual tokens, one KV cache, one sampler per row.

    The first `ask` encodes the images and prefills each row's first-turn prompt;
    each later one prefills only [the previous answer's last token, unless EOS] +
    the next_turn text, after what the cache already holds. An `ask` that raises
    changes nothing: the cache's positions, the pending tokens, the turn count and
    the samplers' states are put back.
    """

    def __init__(self, pipeline: Pipeline, images: Sequence[ImageInput], raw: bool, config: GenerationConfig):
        self.pipe, self.raw, self.config = pipeline, raw, config
        t0 = time.perf_counter()
        loaded = [image if isinstance(image, Image.Image) else load_image(Path(image)) for image in images]
        # [B,3,H,W] float32
        self.pixel_values = np.concatenate([preprocess(image, pipeline.engine.image) for image in loaded])
        self.preprocess_ms = (time.perf_counter() - t0) * 1e3
        # One generator per row, each seeded alike: a row samples what it would alone.
        self.rngs = [np.random.default_rng(config.seed) for _ in loaded]
        self.cache: KVCache | None = None
        self.visual: list[VisualTokens] = []
        self.pending: list[int | None] = [None] * len(loaded)  # last answer token, not yet in the cache
        self.turns = 0

    @property
    def size(self) -> int:
        return len(self.rngs)

    def ask(self, prompts: Sequence[str], max_new_tokens: int | None = None,
            on_text: Callable[[int, str], None] | None = None) -> list[Result]:
        config = self.config if max_new_tokens is None else replace(self.config, max_new_tokens=max_new_tokens)
        if len(prompts) != self.size:
            raise EngineError(f"{self.size} conversations need {self.size} prompts, got {len(prompts)}")
        saved = self._save()
        try:
            if self.turns == 0:
                logits, figures = self._first_turn(prompts, config)
            else:
                logits, figures = self._next_turn(prompts, config)
            return self._answer(logits, config, figures, on_text)
        except BaseException:
            # A failed turn (a bad prompt, an error in `on_text` or in the middle of decoding, Ctrl-C)
            # leaves the conversation as it was: a retry answers as if it never happened.
            self._restore(saved)
            raise

    def _save(self) -> tuple:
        return (self.cache, None if self.cache is None else self.cache.snapshot(), list(self.visual),
                list(self.pending), self.turns, [rng.bit_generator.state for rng in self.rngs])

    def _restore(self, saved: tuple) -> None:
        self.cache, cache_state, self.visual, self.pending, self.turns, rng_states = saved
        if self.cache is not None:
            self.cache.restore(cache_state)
        for rng, state in zip(self.rngs, rng_states):
            rng.bit_generator.state = state

    def _first_turn(self, prompts: Sequence[str], config: GenerationConfig) -> tuple[np.ndarray, dict]:
        pipe, engine = self.pipe, self.pipe.engine
        ids = [first_turn_ids(pipe.tokenizer, engine.prompt, engine.tokens, p, self.raw) for p in prompts]
        if engine.llm.pruning is not None and not all(i.after for i in ids):
            raise EngineError(f"this engine cuts visual tokens inside the LLM ({engine.llm.pruning.method}): the "
                              "prompt needs text after the image, where the answer starts")
        t0 = time.perf_counter()
        if engine.vision.text_aware and (longest := max(len(i.text_ids) for i in ids)) > pipe.limits.max_text_len:
            raise EngineError(f"a prompt of {longest} words exceeds the engine's max_text_len "
                              f"{pipe.limits.max_text_len} (export/build.py --max-text-len)")
        text = text_features(pipe.table, [i.text_ids for i in ids]) if engine.vision.text_aware else None
        self.visual = encode_images(pipe.vision, self.pixel_values, text)
        for row, visual in zip(ids, self.visual):
            check_length(0, row.text_tokens, len(visual.tokens), config.max_new_tokens, pipe.limits.max_positions)
        dtype, pruning = engine.llm.np_dtype, engine.llm.pruning
        if pruning is None:
            # Each row [before | its visual tokens | after] -> embeds [B, T, D], left-padded
            rows = [np.concatenate([embed(pipe.table, i.before), v.tokens.astype(dtype),
                                    embed(pipe.table, i.after)]) for i, v in zip(ids, self.visual)]
            embeds, mask = pad_left(rows)
        else:
            # Every visual slot, padding masked: the graph cuts a constant number of them per row.
            rows = [np.concatenate([embed(pipe.table, i.before), v.slots.astype(dtype), embed(pipe.table, i.after)])
                    for i, v in zip(ids, self.visual)]
            masks = [np.concatenate([np.ones(len(i.before), np.int64), np.arange(v.num_slots) < len(v.tokens),
                                     np.ones(len(i.after), np.int64)]) for i, v in zip(ids, self.visual)]
            embeds, mask = pad_left(rows, masks)
            visual_start = np.array([embeds.shape[1] - len(r) + len(i.before) for r, i in zip(rows, ids)], np.int64)
        self.cache = KVCache(pipe.llm, engine.llm, self.size, embeds.shape[1] + config.max_new_tokens)
        t1 = time.perf_counter()
        if pruning is None:
            logits = prefill(pipe.llm, self.cache, embeds, mask)
        else:
            logits = prefill_pruned(pipe.llm_prefill, self.cache, pruning, embeds, mask, visual_start)
        prefill_ms = (time.perf_counter() - t1) * 1e3
        return logits, dict(t0=t0, prompt_tokens=[int(m.sum()) for m in mask],
                            prompt_text_tokens=[i.text_tokens for i in ids], preprocess_ms=self.preprocess_ms,
                            vision_ms=self.visual[0].vision_ms, prefill_ms=prefill_ms)

    def _next_turn(self, prompts: Sequence[str], config: GenerationConfig) -> tuple[np.ndarray, dict]:
        pipe, engine, cache = self.pipe, self.pipe.engine, self.cache
        t0 = time.perf_counter()
        ids = [([pending] if pending is not None else []) + next_turn_ids(pipe.tokenizer, engine.prompt, p)
               for pending, p in zip(self.pending, prompts)]
        for row, row_ids in enumerate(ids):
            check_length(int(cache.input_pos[row]), len(row_ids), 0, config.max_new_tokens,
                         pipe.limits.max_positions)
        embeds, mask = pad_left([embed(pipe.table, row_ids) for row_ids in ids])
        cache.reserve(cache.length + embeds.shape[1] + config.max_new_tokens)
        t1 = time.perf_counter()
        logits = prefill(pipe.llm, cache, embeds, mask)
        prefill_ms = (time.perf_counter() - t1) * 1e3
        return logits, dict(t0=t0, prompt_tokens=[len(i) for i in ids], prompt_text_tokens=[len(i) for i in ids],
                            preprocess_ms=0.0, vision_ms=0.0, prefill_ms=prefill_ms)

    def _answer(self, logits: np.ndarray, config: GenerationConfig, figures: dict,
                on_text: Callable[[int, str], None] | None) -> list[Result]:
        pipe, engine, cache = self.pipe, self.pipe.engine, self.cache
        eos = engine.tokens.eos_token_id
        streams = [TextStream(pipe.tokenizer) for _ in range(self.size)]
        tokens: list[list[int]] = [[] for _ in range(self.size)]
        t_first, t_last = figures["t0"], [figures["t0"]] * self.size
        for step, sampled in enumerate(generate(pipe.llm, cache, pipe.table, logits, config, eos, self.rngs)):
            now = time.perf_counter()
            if step == 0:
                t_first = now
            for row, token in enumerate(sampled.tolist()):
                if token < 0:
                    continue
                tokens[row].append(token)
                t_last[row] = now
                if token != eos and on_text is not None and (piece := streams[row].push(token)):
                    on_text(row, piece)
        if on_text is not None:
            for row, stream in enumerate(streams):
                if piece := stream.flush():
                    on_text(row, piece)
        self.pending = [None if t[-1] == eos else t[-1] for t in tokens]
        self.turns += 1
        rss = peak_rss_bytes()
        return [self._result(row, tokens[row], figures, t_first, t_last[row], rss) for row in range(self.size)]

    def _result(self, row: int, tokens: list[int], figures: dict, t_first: float, t_last: float,
                rss: int) -> Result:
        pipe, engine, cache = self.pipe, self.pipe.engine, self.cache
        eos = engine.tokens.eos_token_id
        decode_s = t_last - t_first
        kept, total = len(self.visual[row].tokens), engine.vision.num_patches
        kv_bytes = cache.row_bytes(row)
        positions = int(cache.mask[row, :cache.length].sum())  # every layer's, were nothing pruned
        return Result(
            text=pipe.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True),
            token_ids=tuple(tokens),
            stop_reason="eos" if tokens[-1] == eos else "length",
            turn=self.turns - 1,
            visual_tokens_kept=kept,
            visual_tokens_total=total,
            prompt_tokens=figures["prompt_tokens"][row],
            prompt_text_tokens=figures["prompt_text_tokens"][row],
            preprocess_ms=figures["preprocess_ms"],
            vision_ms=figures["vision_ms"],
            prefill_ms=figures["prefill_ms"],
            ttft_ms=(t_first - figures["t0"]) * 1e3,
            decode_ms=decode_s * 1e3,
            decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None,
            kv_bytes=kv_bytes,
            kv_bytes_allocated=cache.nbytes_allocated,
            kv_bytes_uncompressed=(positions + total - kept) * cache.per_token_bytes,
            kv_bytes_groups=tuple(cache.group_bytes(row)),
            peak_rss_bytes=rss,
            batch=self.size,
            kept_index=tuple(int(i) for i in self.visual[row].kept_index),
            vision_cached=self.visual[row].cached and self.turns == 1,
        )


class Conversation:
    """One image and the turns about it: a batch of one, with the image tokens and the KV cache kept."""

    def __init__(self, pipeline: Pipeline, image: ImageInput, raw: bool, config: GenerationConfig):
        self._batch = Batch(pipeline, [image], raw, config)

    def ask(self, prompt: str, max_new_tokens: int | None = None,
            on_text: Callable[[str], None] | None = None) -> Result:
        """Answer `prompt`; `on_text` receives the answer's text piece by piece as it is decoded.

        If it raises (from `on_text` too), the conversation is left as it was before the call.
        """
        stream = None if on_text is None else (lambda _row, piece: on_text(piece))
        return self._batch.ask([prompt], max_new_tokens, stream)[0]

    @property
    def pixel_values(self) -> np.ndarray:
        return self._batch.pixel_values  # [1,3,H,W]

    @property
    def visual(self) -> VisualTokens | None:
        return self._batch.visual[0] if self._batch.visual else None

    @property
    def cache(self) -> KVCache | None:
        return self._batch.cache

    @property
    def turns(self) -> int:
        return self._batch.turns
