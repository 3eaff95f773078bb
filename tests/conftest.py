"""Session-wide fixtures: the tiny LLaVA and its uncompressed engine, built once per test run (no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sparsezip_deploy.export.models import LoadedModel, load_model
from sparsezip_deploy.export.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llava-hf folder with the tiny random-init model (seed 0)."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-seed0")


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def engine_none(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's uncompressed engine, built once for the runtime and calib tests."""
    from .runtime.conftest import _build

    return _build(tiny_dir, tmp_path_factory.mktemp("engines") / "tiny-none", "none")
