"""The vision stage: one fused graph, or a trunk and a selector, with a bounded cache of recent images.

    stage = VisionStage(manifest, {name: backend for name in manifest.vision_graphs}, ImageCache(8))
    out, cached = stage.encode(pixel_values, text)   # visual_tokens [B,S,D], num_tokens [B], kept_index [B,S]

A text-aware selection depends on the prompt, CLIP up to layer l* does not. A
split engine (manifest graphs vision_trunk + vision_selector) runs the trunk
only for images it has not seen recently and the selector for every question,
so N questions about one image run CLIP once. For an engine whose vision output
does not depend on the prompt (none, visionzip, sparsezip with beta 0) the
fused graph's whole output is what is cached. A fused text-aware graph (an
unsplit build, or a folder an older export wrote) caches nothing: its output is
the prompt's.

The key is a sha256 of a row's preprocessed pixels (dtype, shape and bytes), so
the same picture from two files, or twice in one batch, is one entry; the cache
holds at most `capacity` images, least recently used out first (0: off).
Entries are copies, never views of a run's outputs.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from .backends.base import Backend
from .errors import EngineError
from .manifest import SELECTOR_GRAPH, TRUNK_GRAPH, VISION_GRAPH, Manifest

DEFAULT_CACHE_SIZE = 8  # images; a ViT-L/14-336 trunk entry is ~2.5 MB (hidden states, keys, CLS row)
MAX_CACHE_SIZE = 4096
Row = dict[str, np.ndarray]  # one image's outputs, batch axis dropped


def pixel_key(pixels: np.ndarray) -> str:
    """A row's preprocessed pixels [3,H,W] -> its cache key."""
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


class ImageCache:
    """Least-recently-used map of pixel keys to one image's outputs, at most `capacity` of them."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 <= capacity <= MAX_CACHE_SIZE:
            raise EngineError(f"image cache size must be an integer in [0, {MAX_CACHE_SIZE}], got {capacity!r}")
        self.capacity = capacity
        self._rows: OrderedDict[str, Row] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> Row | None:
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, key: str, row: Row) -> None:
        if self.capacity == 0:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        self._rows.clear()


class VisionStage:
    """The vision graphs of an engine (`backends`: graph name -> backend, those of manifest.vision_graphs)."""

    def __init__(self, manifest: Manifest, backends: Mapping[str, Backend], cache: ImageCache):
        self.split = manifest.vision_split
        self.text_aware = manifest.vision.text_aware
        self.backends = dict(backends)
        self.cache = cache

    def encode(self, pixel_values: np.ndarray, text: dict[str, np.ndarray] | None = None
               ) -> tuple[dict[str, np.ndarray], list[bool]]:
        """pixel_values [B,3,H,W] (+ text_embeds [B,T,D], text_mask [B,T]) -> the vision outputs and,
        per row, whether its image came from the cache (split: the selector still ran for it)."""
        text = text or {}
        if self.split:
            trunk = self.backends[TRUNK_GRAPH]
            features, cached = self._rows(lambda pixels: trunk.run({"pixel_values": pixels}), pixel_values)
            return self.backends[SELECTOR_GRAPH].run({**features, **text}), cached
        vision = self.backends[VISION_GRAPH]
        if self.text_aware:  # fused: the whole output is the prompt's, nothing to reuse
            return vision.run({"pixel_values": pixel_values, **text}), [False] * len(pixel_values)
        return self._rows(lambda pixels: vision.run({"pixel_values": pixels}), pixel_values)

    def _rows(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], pixel_values: np.ndarray
              ) -> tuple[dict[str, np.ndarray], list[bool]]:
        """`run`'s outputs for every row, running it once on the rows whose image is neither cached
        nor an earlier row of this batch; per row, whether it was spared."""
        if self.cache.capacity == 0:
            return run(pixel_values), [False] * len(pixel_values)
        keys = [pixel_key(pixels) for pixels in pixel_values]
        rows: dict[str, Row] = {}
        for key in dict.fromkeys(keys):
            if (row := self.cache.get(key)) is not None:
                rows[key] = row
        cached = [key in rows for key in keys]
        missing = list(dict.fromkeys(key for key in keys if key not in rows))
        if missing:
            first = [keys.index(key) for key in missing]
            out = run(pixel_values[first])
            for i, key in enumerate(missing):
                rows[key] = {name: value[i].copy() for name, value in out.items()}
                self.cache.put(key, rows[key])
        # A repeat of an image earlier in this batch is spared the run too.
        cached = [c or keys.index(key) < b for b, (key, c) in enumerate(zip(keys, cached))]
        names = list(rows[keys[0]])
        return {name: np.stack([rows[key][name] for key in keys]) for name in names}, cached
