"""runtime/preprocess.py against transformers' PIL-backend CLIP processor.

The oracle is `CLIPImageProcessorPil`: in transformers v5 `CLIPImageProcessor` is the
torchvision backend (it only falls back to the PIL class when torchvision is missing),
while LLaVA-1.5 was trained with the PIL path, which is what the runtime reproduces.

Tolerance: none. Both sides produce the same uint8 pixels with the same Pillow calls
and then do the same float64-rescale / float32-normalize arithmetic, so outputs are
compared bit for bit; any difference is a bug, not rounding noise.
"""

import dataclasses
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sparsezip_deploy.runtime.errors import EngineError, PreprocessError
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import load_image, preprocess, preprocess_batch

LLAVA15 = ImageConfig(
    crop_height=336, crop_width=336, shortest_edge=336, resample=int(Image.Resampling.BICUBIC),
    rescale_factor=1 / 255, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD),
    do_center_crop=True, pad_to_square=False,
)


def hf_processor(config: ImageConfig) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": config.shortest_edge},
        crop_size={"height": config.crop_height, "width": config.crop_width},
        resample=config.resample, do_center_crop=config.do_center_crop,
        rescale_factor=config.rescale_factor,
        image_mean=list(config.mean), image_std=list(config.std),
    )


def hf_pixels(image: Image.Image, config: ImageConfig) -> np.ndarray:
    return hf_processor(config)(images=image, return_tensors="np")["pixel_values"]


def noise_image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    """Random pixels: the worst case for bicubic overshoot and clipping."""
    rng = np.random.default_rng(seed)
    n_bands = len(Image.new(mode, (1, 1)).getbands())
    bands = [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)) for _ in range(n_bands)]
    if mode == "P":
        image = bands[0].convert("P")
        image.info["transparency"] = 7  # a tRNS colour key: transformers composites it
        return image
    return Image.merge(mode, bands)


def llava_expand2square(pil_img: Image.Image, background_color: tuple) -> Image.Image:
    """Original LLaVA's llava/mm_utils.py expand2square, as written there."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def png_bomb(path, w: int, h: int) -> None:
    """A valid 1-bit PNG of w x h black pixels: a few KB that decode to w*h bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    row = bytes(1 + (w + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# --- parity with transformers ---------------------------------------------------

IMAGES = [
    ("RGB", 337, 500),  # long side 498.5 -> truncated to 498
    ("RGB", 500, 337),
    ("RGB", 337, 501),  # 499 rows: odd margin, crop offset floors
    ("RGB", 100, 80),  # upscaled
    ("RGB", 1, 199),  # extreme aspect ratio: 336 x 66864 intermediate
    ("RGB", 199, 1),
    ("RGB", 336, 336),  # no resize at all
    ("L", 120, 90),
    ("RGBA", 90, 120),  # random alpha: composited onto white
    ("LA", 77, 55),
    ("P", 97, 61),
    ("CMYK", 64, 48),
]


@pytest.mark.parametrize("mode,w,h", IMAGES)
def test_matches_hf_llava15(mode, w, h):
    image = noise_image(mode, w, h)
    ours = preprocess(image, LLAVA15)
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, hf_pixels(image, LLAVA15))


OTHER_CONFIGS = {
    # shortest edge below the crop: the crop pads, 35 rows -> 18 on top (ceil)
    "pad-in-crop": dataclasses.replace(LLAVA15, shortest_edge=301),
    "odd-crop": dataclasses.replace(LLAVA15, crop_height=337, crop_width=335),
    "bilinear-224": dataclasses.replace(LLAVA15, shortest_edge=224, crop_height=224, crop_width=224, resample=2),
    "no-crop": dataclasses.replace(LLAVA15, do_center_crop=False),
}


@pytest.mark.parametrize("name", OTHER_CONFIGS)
@pytest.mark.parametrize("mode,w,h", [("RGB", 337, 501), ("RGB", 100, 80), ("RGBA", 90, 121)])
def test_matches_hf_other_configs(name, mode, w, h):
    config = OTHER_CONFIGS[name]
    image = noise_image(mode, w, h, seed=1)
    np.testing.assert_array_equal(preprocess(image, config), hf_pixels(image, config))


@pytest.mark.parametrize("mode,suffix", [("P", ".png"), ("L", ".png"), ("RGBA", ".png"), ("RGB", ".jpg")])
def test_matches_hf_from_file(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    noise_image(mode, 211, 157, seed=2).save(path)
    with Image.open(path) as reference:
        expected = hf_pixels(reference, LLAVA15)
    np.testing.assert_array_equal(preprocess(load_image(path), LLAVA15), expected)


@pytest.mark.parametrize(
    "mode,w,h", [("RGB", 337, 500), ("RGB", 501, 336), ("RGB", 100, 80), ("RGB", 1, 199), ("L", 64, 64)]
)
def test_pad_to_square_matches_llava(mode, w, h):
    image = noise_image(mode, w, h, seed=3)
    fill = tuple(int(x * 255) for x in LLAVA15.mean)  # (122, 116, 104)
    expected = hf_pixels(llava_expand2square(image.convert("RGB"), fill), LLAVA15)
    ours = preprocess(image, dataclasses.replace(LLAVA15, pad_to_square=True))
    np.testing.assert_array_equal(ours, expected)


def test_batch_stacks_singles():
    images = [noise_image("RGB", 337, 500), noise_image("L", 90, 120)]
    batch = preprocess_batch(images, LLAVA15)
    assert batch.shape == (2, 3, 336, 336)
    np.testing.assert_array_equal(batch, np.concatenate([preprocess(i, LLAVA15) for i in images]))


def test_batch_errors():
    no_crop = dataclasses.replace(LLAVA15, do_center_crop=False)
    with pytest.raises(PreprocessError, match="different sizes"):
        preprocess_batch([noise_image("RGB", 40, 30), noise_image("RGB", 30, 40)], no_crop)
    with pytest.raises(PreprocessError, match="no images"):
        preprocess_batch([], LLAVA15)


def test_elongated_image_refused_before_resizing():
    # 1x999 would resize to 336x335664 (113M pixels, 338 MB): refused, not approximated.
    with pytest.raises(PreprocessError, match="too elongated"):
        preprocess(noise_image("RGB", 1, 999), LLAVA15)


# --- config ---------------------------------------------------------------------

def test_config_round_trips_through_json():
    d = json.loads(json.dumps(dataclasses.asdict(LLAVA15)))
    assert ImageConfig.from_dict(d) == LLAVA15


@pytest.mark.parametrize("change,match", [
    ({"crop_height": None}, "lacks crop_height"),
    ({"resample": 99}, "resample: 99 is not one of"),
    ({"std": [0.2, 0.0, 0.3]}, r"std\[1\]: 0.0 is not above the minimum 0"),
    ({"shortest_edge": 0}, "shortest_edge: 0 is below the minimum 1"),
    ({"rescale_factor": "1/255"}, "rescale_factor: expected a number"),
])
def test_config_rejects(change, match):
    d = dataclasses.asdict(LLAVA15)
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(EngineError, match=match):
        ImageConfig.from_dict(d)


# --- load_image errors ------------------------------------------------------------

def load_error(path, **kwargs) -> str:
    with pytest.raises(PreprocessError) as info:
        load_image(path, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "no such file" in load_error(tmp_path / "nope.png")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    assert "not an image" in load_error(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "full.png"
    noise_image("RGB", 64, 64).save(path)
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt" in load_error(cut)


def test_bomb_refused_from_header(tmp_path):
    # 81M pixels: under Pillow's own limit, over ours; the file is ~10 KB.
    path = tmp_path / "bomb.png"
    png_bomb(path, 9000, 9000)
    assert "over the 67108864-pixel limit" in load_error(path)


def test_pillow_bomb_error_and_warning_become_ours(tmp_path):
    huge, large = tmp_path / "huge.png", tmp_path / "large.png"
    png_bomb(huge, 20000, 20000)  # > 2x Pillow's limit: Pillow raises
    png_bomb(large, 10000, 10000)  # between 1x and 2x: Pillow only warns
    assert "decompression bomb" in load_error(huge, max_pixels=10**10)
    assert "decompression bomb" in load_error(large, max_pixels=10**10)


def test_max_pixels_is_honoured(tmp_path):
    path = tmp_path / "small.png"
    noise_image("RGB", 100, 100).save(path)
    assert "100x100 is over the 5000-pixel limit" in load_error(path, max_pixels=5000)
    assert load_image(path, max_pixels=10000).size == (100, 100)


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    noise_image("RGB", 40, 20).save(path, exif=exif)
    with Image.open(path) as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw))
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), expected)


# --- the runtime stays torch-free -------------------------------------------------

def test_import_pulls_in_neither_torch_nor_transformers():
    code = (
        "import sys, sparsezip_deploy.runtime.preprocess\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
