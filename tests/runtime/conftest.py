"""Runtime fixtures: engine folders built once per session from the tiny model, a test image."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# K fixed at 30 through the dynamic-K formula (scale 0) while the graph has 1 + 40 + 8
# slots: num_tokens < S, so the runtime's dropping of padding rows is exercised.
SPARSEZIP_LAW = ["--k-max", "40", "--contextual", "8", "--dynamic-k", "--k-offset", "30",
                 "--k-scale", "0", "--k-min", "16"]
# Text-aware (the default beta) in one vision.onnx, the graph most tests open; engine_split is
# the same engine in the layout a text-aware build gets by default (trunk + selector).
SPARSEZIP_OPTIONS = [*SPARSEZIP_LAW, "--no-split-vision"]
SPARSEZIP_KEPT = 1 + 30 + 8


def _build(tiny_dir: Path, out: Path, method: str, *options: str) -> Path:
    from sparsezip_deploy.export import build

    with contextlib.redirect_stdout(io.StringIO()):
        assert build.main(["--model", str(tiny_dir), "--method", method, "--out", str(out), *options]) == 0
    return out


@pytest.fixture(scope="session")
def engine_sparsezip(tiny_dir, tmp_path_factory) -> Path:
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-sparsezip", "sparsezip",
                  *SPARSEZIP_OPTIONS)


@pytest.fixture(scope="session")
def engine_split(tiny_dir, tmp_path_factory) -> Path:
    """engine_sparsezip with its vision stage split into vision_trunk + vision_selector: build.py's
    default for a text-aware engine, no flag given."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-sparsezip-split", "sparsezip",
                  *SPARSEZIP_LAW)


@pytest.fixture(scope="session")
def shapes_png(tmp_path_factory) -> Path:
    """A 480x360 picture of a few coloured shapes (not square: the crop matters)."""
    image = Image.new("RGB", (480, 360), (70, 70, 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse([40, 60, 200, 220], fill=(200, 30, 30))
    draw.rectangle([300, 40, 440, 160], fill=(30, 60, 180))
    draw.polygon([(260, 330), (380, 190), (460, 330)], fill=(40, 170, 60))
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    image.save(path)
    return path
