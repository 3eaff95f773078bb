"""calib fixtures: one float sparsezip engine from the tiny model, its int8 copies, calibration images."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from sparsezip_deploy.calib.reader import calibration_images, folder_digest
from sparsezip_deploy.calib.vision_int8 import MODELOPT_HINT, quantize_vision
from sparsezip_deploy.runtime.manifest import artifact_entries, read_manifest, write_manifest

from ..runtime.conftest import _build, shapes_png  # noqa: F401 (a fixture, shared)

CALIB_COUNT = 4


@pytest.fixture(scope="session")
def engine_fp32(tiny_dir, tmp_path_factory) -> Path:
    """The product's default method: sparsezip, text-aware, 1 + 53 + 10 slots, in one vision.onnx (the
    split layout's int8 and budget fit: tests/calib/test_budget.py)."""
    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-sz-fp32", "sparsezip", "--no-split-vision")


@pytest.fixture(scope="session")
def calib_images():
    return calibration_images(None, CALIB_COUNT, seed=0)


def int8_engine(fp32: Path, out: Path, target: str, images) -> Path:
    """What build.py does with --vision-int8: vision.onnx replaced in place, the manifest told."""
    shutil.copytree(fp32, out)
    manifest = read_manifest(out)
    record = quantize_vision(out / "vision.onnx", out / "vision.onnx", target, images, manifest.image,
                             folder_digest(None, len(images)))
    write_manifest(out, dataclasses.replace(
        manifest, precision={**manifest.precision, "vision": record["precision"]},
        calibration={"vision_int8": record}, artifacts=artifact_entries(out, list(manifest.artifacts))))
    return out


@pytest.fixture(scope="session")
def engine_int8_cpu(engine_fp32, calib_images, tmp_path_factory) -> Path:
    return int8_engine(engine_fp32, tmp_path_factory.mktemp("engines") / "tiny-sz-int8-cpu", "cpu", calib_images)


@pytest.fixture(scope="session")
def engine_none_int8(engine_none, calib_images, tmp_path_factory) -> Path:
    return int8_engine(engine_none, tmp_path_factory.mktemp("engines") / "tiny-none-int8", "cpu", calib_images)


@pytest.fixture(scope="session")
def engine_int8_trt(engine_fp32, calib_images, tmp_path_factory) -> Path:
    pytest.importorskip("modelopt.onnx.quantization", reason=f"NVIDIA ModelOpt is not installed ({MODELOPT_HINT})")
    return int8_engine(engine_fp32, tmp_path_factory.mktemp("engines") / "tiny-sz-int8-trt", "tensorrt", calib_images)
