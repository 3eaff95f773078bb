"""calib/reader.py: calibration image sets, their provenance, the vision graph's feeds."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparsezip_deploy.calib.errors import CalibError
from sparsezip_deploy.calib.reader import (VisionCalibrationReader, calibration_images, empty_text,
                                           folder_digest, prompt_text)
from sparsezip_deploy.runtime.manifest import ImageConfig
from sparsezip_deploy.runtime.preprocess import preprocess
from sparsezip_deploy.runtime.engine import load_engine
from sparsezip_deploy.runtime.prompt import load_tokenizer


@pytest.fixture
def folder(tmp_path):
    """Five small images (one in a subfolder), a text file and a hidden image that must be ignored."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200)).save(root / f"img{i}.png")
    Image.new("RGB", (20, 50), (10, 10, 10)).save(root / "sub" / "deep.JPG", format="JPEG")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    return root


def one_line_error(call) -> str:
    with pytest.raises(CalibError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_user_errors_are_one_line(tmp_path, folder):
    assert "does not exist" in one_line_error(lambda: calibration_images(tmp_path / "nope", 4))
    assert "is not a folder" in one_line_error(lambda: calibration_images(folder / "img0.png", 4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    assert "holds no images" in one_line_error(lambda: calibration_images(tmp_path / "empty", 4))
    assert ">= 1" in one_line_error(lambda: calibration_images(folder, 0))
    assert ">= 1" in one_line_error(lambda: calibration_images(None, -3))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert "broken.png" in one_line_error(lambda: calibration_images(folder, 10))


def test_folder_sample_is_seeded_and_the_digest_follows_the_files(folder):
    everything = calibration_images(folder, 10)
    assert [im.size for im in everything] == [(40, 30), (41, 30), (42, 30), (43, 30), (20, 50)]  # sorted names
    sample = calibration_images(folder, 3, seed=5)
    assert len(sample) == 3
    assert [im.size for im in sample] == [im.size for im in calibration_images(folder, 3, seed=5)]
    digest = folder_digest(folder)
    assert digest.startswith("sha256:") and digest == folder_digest(folder)
    (folder / "img0.png").rename(folder / "img9.png")
    renamed = folder_digest(folder)
    assert renamed != digest
    Image.new("RGB", (40, 30), (1, 90, 200)).save(folder / "img9.png")  # same name, other pixels
    assert folder_digest(folder) != renamed


def test_generated_scenes_are_the_default_set():
    first, again = calibration_images(None, 3, seed=2), calibration_images(None, 3, seed=2)
    assert len(first) == 3 and all(im.size == (336, 336) for im in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(calibration_images(None, 1, seed=3)[0]))
    assert folder_digest(None, 3, seed=2) == "generated-scenes:seed=2,count=3"


def test_feeds_are_the_runtimes(engine_fp32, calib_images):
    engine = load_engine(engine_fp32)
    assert engine.vision.text_aware
    text = prompt_text(load_tokenizer(engine), np.load(engine.path(engine.llm.embed_tokens)))
    reader = VisionCalibrationReader(calib_images, engine.image, text)
    feeds = [reader.get_next() for _ in calib_images]
    assert reader.get_next() is None
    for image, feed in zip(calib_images, feeds):
        np.testing.assert_array_equal(feed["pixel_values"], preprocess(image, engine.image))
        assert feed["text_embeds"].shape[2] == engine.vision.out_width and feed["text_mask"].all()
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["pixel_values"], feeds[0]["pixel_values"])
    np.testing.assert_array_equal(reader.get_first()["pixel_values"], feeds[0]["pixel_values"])
    empty = empty_text(engine.vision.out_width)
    assert empty["text_embeds"].shape == (1, 1, engine.vision.out_width) and not empty["text_mask"].any()


def test_reader_follows_the_config_it_is_given():
    image = Image.new("RGB", (500, 337), (200, 10, 10))
    config = ImageConfig(crop_height=28, crop_width=28, shortest_edge=28, resample=3, rescale_factor=1 / 255,
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), do_center_crop=True, pad_to_square=False)
    (feed,) = VisionCalibrationReader([image], config).feeds()
    assert set(feed) == {"pixel_values"} and feed["pixel_values"].shape == (1, 3, 28, 28)
