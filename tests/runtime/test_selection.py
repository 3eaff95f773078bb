"""runtime/selection.py: the overlay shows the image the model saw, kept patches bright."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparsezip_deploy.runtime.errors import EngineError
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import preprocess
from sparsezip_deploy.runtime.selection import DIM, kept_mask, render_selection, save_selection, unnormalise

CONFIG = ImageConfig(crop_height=336, crop_width=336, shortest_edge=336, resample=3, rescale_factor=1 / 255,
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                     do_center_crop=True, pad_to_square=False)


def noise(w=336, h=336, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_unnormalise_recovers_the_exact_pixels():
    image = noise()
    np.testing.assert_array_equal(unnormalise(preprocess(image, CONFIG)[0], CONFIG), np.asarray(image))


def test_kept_mask_ignores_cls_and_merged():
    mask = kept_mask(np.array([-1, 0, 25, 575, -1]), (24, 24))
    assert mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[23, 23]


def test_render_keeps_selected_patches_and_dims_the_rest():
    image = noise(seed=1)
    out = np.asarray(render_selection(preprocess(image, CONFIG)[0], CONFIG, np.array([-1, 25]), (24, 24), 14))
    src = np.asarray(image)
    # Inside patch 25 (row 1, col 1), away from its outline: untouched.
    np.testing.assert_array_equal(out[16:26, 16:26], src[16:26, 16:26])
    # Patch 0 was not kept: dimmed.
    np.testing.assert_array_equal(out[2:12, 2:12], (src[2:12, 2:12] * DIM).astype(np.uint8))


def test_save_writes_a_png_whatever_the_suffix(tmp_path):
    pixels = preprocess(noise(), CONFIG)[0]
    path = save_selection(tmp_path / "sel.out", pixels, CONFIG, np.arange(10), (24, 24), 14)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (336, 336)


def test_unwritable_path_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="cannot write"):
        save_selection(tmp_path / "missing" / "sel.png", preprocess(noise(), CONFIG)[0], CONFIG,
                       np.arange(3), (24, 24), 14)
