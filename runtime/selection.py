"""`--save-selection`: which patches the compression kept, drawn on the image the model saw.

The picture is the preprocessed image (resized, cropped) recovered from
pixel_values by undoing the normalisation: preprocess maps each uint8 level
through a fixed table, so rounding the inverse gives those exact pixels back.
Kept patches (kept_index >= 0) keep their colours and get an outline; the rest
is dimmed. CLS and merged tokens have no single patch and are not drawn.
"""
from __future__ import annotations

import os

from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import EngineError
from .manifest import ImageConfig

DIM = 0.3  # brightness left to the patches that were dropped or merged
OUTLINE = (255, 200, 0)


def unnormalise(pixel_values: np.ndarray, config: ImageConfig) -> np.ndarray:
    """pixel_values [3,H,W] float32 -> the uint8 image [H,W,3] it was made from."""
    mean = np.asarray(config.mean, np.float64)[:, None, None]
    std = np.asarray(config.std, np.float64)[:, None, None]
    levels = (pixel_values.astype(np.float64) * std + mean) / config.rescale_factor
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def kept_mask(kept_index: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """kept_index [n] (patch ids, -1 for none) -> bool [rows, cols]."""
    rows, cols = grid
    mask = np.zeros(rows * cols, bool)
    kept = np.asarray(kept_index)
    mask[kept[kept >= 0]] = True
    return mask.reshape(rows, cols)


def render_selection(pixel_values: np.ndarray, config: ImageConfig, kept_index: np.ndarray,
                     grid: tuple[int, int], patch_size: int) -> Image.Image:
    rgb = unnormalise(pixel_values, config)
    mask = kept_mask(kept_index, grid)
    # Patch mask -> pixel mask, clipped to the image in case the two sizes disagree.
    pixel_mask = np.zeros(rgb.shape[:2], bool)
    covered = np.kron(mask, np.ones((patch_size, patch_size), bool))[:rgb.shape[0], :rgb.shape[1]]
    pixel_mask[:covered.shape[0], :covered.shape[1]] = covered
    shaded = np.where(pixel_mask[..., None], rgb, (rgb * DIM).astype(np.uint8))
    image = Image.fromarray(shaded)
    draw = ImageDraw.Draw(image)
    for r, c in zip(*np.nonzero(mask)):
        x, y = c * patch_size, r * patch_size
        draw.rectangle([x, y, x + patch_size - 1, y + patch_size - 1], outline=OUTLINE)
    return image


def save_selection(path: str | PathLike, pixel_values: np.ndarray, config: ImageConfig,
                   kept_index: np.ndarray, grid: tuple[int, int], patch_size: int) -> Path:
    """Write the overlay as PNG (whatever the suffix says), whole or not at all: a temporary file
    beside `path`, renamed over it."""
    path = Path(path)
    image = render_selection(pixel_values, config, kept_index, grid, patch_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        raise EngineError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
