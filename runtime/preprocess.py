"""Image preprocessing for the runtime: numpy + Pillow, no torch, no transformers.

Reproduces transformers' PIL-backend CLIP processor (`CLIPImageProcessorPil`,
which is what LLaVA-1.5 was trained and evaluated with) bit for bit:
convert to RGB (alpha composited onto white) -> resize the shortest edge with
Pillow -> center crop (zero padded where the crop leaves the image) ->
rescale -> normalize -> CHW float32. Optionally preceded by original LLaVA's
`image_aspect_ratio: pad` (paste onto a square of the mean colour).

The torchvision backend that transformers v5 picks by default when torchvision
is installed differs from this one (torch bicubic, floor instead of ceil crop
padding), so the export side must read the processor with backend="pil".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from os import PathLike

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PreprocessError
from .manifest import ImageConfig

# Largest image (in pixels) decoded or produced by a resize: 8192^2 RGB is 200 MB,
# already a lot on a Jetson; anything bigger is treated as hostile.
MAX_PIXELS = 8192 * 8192


@contextlib.contextmanager
def _pillow_errors(path: str | PathLike) -> Iterator[None]:
    """Turn whatever Pillow raises for a bad file into one-line PreprocessErrors."""
    try:
        yield
    except FileNotFoundError:
        raise PreprocessError(f"{path}: no such file") from None
    # Pillow raises this itself beyond 2x its MAX_IMAGE_PIXELS (and for a GIF frame or TIFF tile).
    except Image.DecompressionBombError as e:
        raise PreprocessError(f"{path}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise PreprocessError(f"{path}: not an image file Pillow can read") from None
    # Corrupt data surfaces from Pillow's decoders as any of these.
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise PreprocessError(f"{path}: corrupt or unreadable image ({e})") from None


def pixel_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The most pixels `load_image` decodes: `max_pixels`, and never more than Pillow's own limit.

    Checked from the header, so no warning filter is needed to turn Pillow's
    DecompressionBombWarning into an error: `warnings.catch_warnings` changes
    process-wide state, is not thread-safe and can leave a filter behind in the
    host application. Pillow's `Image.MAX_IMAGE_PIXELS` is read, never set (None: no limit of its own).
    """
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow is None else min(max_pixels, pillow)


def load_image(path: str | PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, in its own mode (preprocess converts it)."""
    with _pillow_errors(path):
        image = Image.open(path)  # reads the header only
    with image:
        w, h = image.size
        limit = pixel_limit(max_pixels)
        # Checked before decoding: a tiny file can declare billions of pixels.
        if w * h > limit:
            raise PreprocessError(f"{path}: {w}x{h} is over the {limit}-pixel limit (decompression bomb?)")
        with _pillow_errors(path):
            image.load()  # decode now so truncation is reported here, not mid-pipeline
            # Like transformers.image_utils.load_image: camera photos are seen upright.
            return ImageOps.exif_transpose(image)


def preprocess(image: Image.Image, config: ImageConfig, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One PIL image -> pixel_values [1, 3, H, W] float32 (H, W = crop size when cropping)."""
    rgb = _to_rgb(image)
    if config.pad_to_square:
        rgb = _expand_to_square(rgb, config.mean)
    pixels = _resize_shortest_edge(rgb, config, max_pixels)  # [h, w, 3] uint8
    if config.do_center_crop:
        pixels = _center_crop(pixels, config.crop_height, config.crop_width)
    return _rescale_normalize(pixels, config)[None]


def preprocess_batch(
    images: Sequence[Image.Image], config: ImageConfig, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """PIL images -> pixel_values [B, 3, H, W] float32."""
    if not images:
        raise PreprocessError("no images to preprocess")
    arrays = [preprocess(image, config, max_pixels) for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise PreprocessError("images of different sizes cannot be batched without do_center_crop")
    return np.concatenate(arrays)


def _to_rgb(image: Image.Image) -> Image.Image:
    # transformers' convert_to_rgb: transparency (alpha band or a tRNS colour key)
    # is composited onto white; a plain convert("RGB") would expose the hidden colours.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _expand_to_square(rgb: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    # LLaVA's expand2square: the fill is the mean colour truncated to integers, and
    # the floor offsets put the extra pixel of an odd margin at the bottom/right.
    w, h = rgb.size
    if w == h:
        return rgb
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resized_size(w: int, h: int, shortest_edge: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): the long
    # side is truncated, not rounded (500x337 -> 498x336), same expression order.
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if w <= h else (new_long, shortest_edge)


def _resize_shortest_edge(rgb: Image.Image, config: ImageConfig, max_pixels: int) -> np.ndarray:
    w, h = rgb.size
    if min(w, h) == 0:
        raise PreprocessError(f"empty image {w}x{h}")
    new_w, new_h = _resized_size(w, h, config.shortest_edge)
    # The whole image is resized before cropping, as transformers does: resizing only
    # the crop window (Pillow's box=) runs the passes in another order and rounds
    # differently, so an extreme aspect ratio is refused instead of approximated.
    if new_w * new_h > max_pixels:
        raise PreprocessError(
            f"{w}x{h} image is too elongated: its resize to shortest edge {config.shortest_edge} "
            f"would be {new_w}x{new_h}, over the {max_pixels}-pixel limit"
        )
    # reducing_gap=None: Pillow's reduce-first shortcut changes pixels; transformers
    # does not use it.
    return np.asarray(rgb.resize((new_w, new_h), resample=config.resample, reducing_gap=None))


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    # pixels: [h, w, 3] uint8. transformers' center_crop: offset (size - crop) // 2,
    # floored even when negative, so a too-small image lands ceil(margin / 2) from
    # the top/left of a black (zero, before normalization) canvas.
    h, w = pixels.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    y0, y1 = max(top, 0), min(top + crop_h, h)
    x0, x1 = max(left, 0), min(left + crop_w, w)
    out = np.zeros((crop_h, crop_w, 3), np.uint8)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
    return out


def _rescale_normalize(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
    # [h, w, 3] uint8 -> [3, h, w] float32 through a 256-entry table per channel,
    # built with transformers' exact arithmetic (rescale in float64 then cast,
    # normalize in float32), so the values are bit-identical and cheap.
    levels = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.mean, np.float32)[:, None]
    std = np.asarray(config.std, np.float32)[:, None]
    table = (levels[None, :] - mean) / std  # [3, 256]
    return table[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]
