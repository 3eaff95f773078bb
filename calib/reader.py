"""Calibration images and the vision graph's feeds for them.

    calibration_images(folder | None, count, seed) -> PIL images
    folder_digest(folder | None, count, seed)      -> where they came from, for the manifest
    prompt_text(tokenizer, table) / empty_text(width) -> a text-aware graph's text feeds
    VisionCalibrationReader(images, image_config, text) -> ORT CalibrationDataReader
    selector_feeds(trunk, feeds)                     -> a split engine's selector feeds for them

Pixels go through the runtime's own preprocessing (resize, crop, normalise from
the engine's ImageConfig), so the ranges calibration measures are those the
deployed graph sees. Without a folder the set is generated scenes (scenes/),
which need no data on disk and are the same on every machine for a seed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

from sparsezip_deploy.runtime.backends.ort import open_graph
from sparsezip_deploy.runtime.generate import text_features
from sparsezip_deploy.runtime.errors import PreprocessError
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import load_image, preprocess
from sparsezip_deploy.scenes.scene import render, sample_scene

from .errors import CalibError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
DEFAULT_COUNT = 32
# A question that names no object: the fidelity check on a text-aware graph then sees a text term
# that is the same for every image.
CALIBRATION_PROMPT = "Describe the image in detail."


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden ones skipped), sorted by relative path."""
    if not folder.exists():
        raise CalibError(f"calibration folder {folder} does not exist")
    if not folder.is_dir():
        raise CalibError(f"calibration folder {folder} is not a folder")
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise CalibError(f"calibration folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    return files


def calibration_images(folder: Path | None, count: int, seed: int = 0) -> list[Image.Image]:
    """`count` images: a seeded sample of `folder`'s (all of them if it has fewer), or generated scenes.

    Images are decoded now and held in memory; a folder of large photos wants a modest count.
    """
    if count < 1:
        raise CalibError(f"calibration image count must be >= 1, got {count}")
    if folder is None:
        rng = np.random.default_rng(seed)
        return [render(sample_scene(rng))[0] for _ in range(count)]
    files = image_files(Path(folder))
    if len(files) > count:
        # A sample, not the first N: folders are often sorted by class or by camera.
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), count, replace=False))]
    return [_load(path) for path in files]


def _load(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except PreprocessError as e:
        raise CalibError(f"calibration image {e}") from None


def folder_digest(folder: Path | None, count: int = DEFAULT_COUNT, seed: int = 0) -> str:
    """Provenance of a calibration set: sha256 over the folder's image files (relative names and
    bytes, in sorted order), or the generator and its seed for generated scenes."""
    if folder is None:
        return f"generated-scenes:seed={seed},count={count}"
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in image_files(folder):
        name = path.relative_to(folder).as_posix().encode()
        # Length-prefixed, so that no two different folders hash the same stream.
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def prompt_text(tokenizer, table: np.ndarray, prompt: str = CALIBRATION_PROMPT) -> dict[str, np.ndarray]:
    """A text-aware graph's feeds for `prompt`, built as the runtime builds them (its words, no
    template or special tokens; rows of the engine's embedding table). tokenizer: a tokenizers.Tokenizer."""
    return text_features(table, [tokenizer.encode(prompt, add_special_tokens=False).ids])


def empty_text(width: int) -> dict[str, np.ndarray]:
    """The runtime's feeds for an empty prompt (one masked-out row): what a text-aware graph is
    calibrated with. Text enters the graph only after the encoder's linear layers, the only
    quantised nodes, so any prompt would give them the same ranges."""
    return text_features(np.zeros((0, width), np.float32), [()])


class VisionCalibrationReader(CalibrationDataReader):
    """The vision graph's feeds, one image per batch as the runtime runs it; `rewind` starts over.

    text: the fixed text feeds of a text-aware graph (text_embeds [1,T,D], text_mask [1,T]), or None.
    """

    def __init__(self, images: Sequence[Image.Image], image_config: ImageConfig,
                 text: dict[str, np.ndarray] | None = None):
        self.images, self.image_config, self.text = list(images), image_config, dict(text or {})
        self._feeds = self.feeds()

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        # Preprocessed lazily: a [1,3,336,336] float32 input is 1.35 MB, times the image count.
        for image in self.images:
            yield {"pixel_values": preprocess(image, self.image_config), **self.text}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def get_first(self) -> dict[str, np.ndarray]:
        """The first feeds, without advancing: ModelOpt's trial run asks for them."""
        return next(self.feeds())

    def rewind(self) -> None:
        self._feeds = self.feeds()


def selector_feeds(trunk: Path, feeds: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """A split engine's selector feeds for the vision feeds `feeds`: the trunk graph at `trunk`
    (ORT CPU) run on each one's pixels, its text feeds kept. What the dynamic-K fit of a split
    engine runs the selector on (the law is in the selector; the trunk need not rerun per probe)."""
    with open_graph(trunk) as graph:
        return [{**graph.run({"pixel_values": f["pixel_values"]}),
                 **{k: v for k, v in f.items() if k != "pixel_values"}} for f in feeds]
