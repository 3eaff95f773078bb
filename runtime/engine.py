"""Open an engine folder: its manifest, checked (runtime/manifest.py), and its artifacts, verified.

Every check fails with a one-line `EngineError` naming the folder and what is
wrong (missing folder, unreadable or invalid manifest, unknown format version,
missing or altered artifact), so that a bad folder is refused before any graph
is loaded rather than half way through a generation.

The folder holds its files: manifest.json and every artifact must be a regular
file in it, not a symbolic link (not even to a file beside it), FIFO, device or
folder, so that what is verified is what is read and nothing outside the folder
is. The folder itself may be reached through a link: that path is the user's
choice. The runtime reaches an artifact only through `EngineFolder.path`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .files import check_regular, open_regular, sha256_stream
from .manifest import (MANIFEST, Artifact, GraphSpec, ImageConfig, LlmInfo, Manifest, PromptTemplate, TokenIds,
                       VisionInfo, read_manifest)


@dataclass(frozen=True)
class EngineFolder:
    """A validated engine folder: where it is and what its manifest says."""

    folder: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        """The artifact `name`, checked again (still a regular file) for the caller about to open it."""
        if name not in self.manifest.artifacts:
            raise ValueError(f"{name} is not an artifact of {self.folder}")  # a bug: the runtime reads artifacts only
        path = self.folder / name
        try:
            check_regular(path, f"artifact {name}")
        except FileNotFoundError:
            raise EngineError(f"{self.folder}: artifact {name} is missing") from None
        return path

    # The sections the runtime reads everywhere, without `.manifest` each time.
    @property
    def image(self) -> ImageConfig:
        return self.manifest.image

    @property
    def vision(self) -> VisionInfo:
        return self.manifest.vision

    @property
    def llm(self) -> LlmInfo:
        return self.manifest.llm

    @property
    def tokens(self) -> TokenIds:
        return self.manifest.tokens

    @property
    def prompt(self) -> PromptTemplate:
        return self.manifest.prompt

    @property
    def graphs(self) -> Mapping[str, GraphSpec]:
        return self.manifest.graphs

    @property
    def method_name(self) -> str:
        return self.manifest.method_name


def load_engine(folder: str | Path, verify_checksums: bool = True) -> EngineFolder:
    """Read `folder/manifest.json`, check every artifact (size always, sha256 unless told not to)."""
    folder = Path(folder)
    if not folder.exists():
        raise EngineError(f"engine folder {folder} does not exist")
    if not folder.is_dir():
        raise EngineError(f"engine {folder} is not a folder")
    manifest = read_manifest(folder)
    for name, artifact in manifest.artifacts.items():
        _verify_artifact(folder, name, artifact, verify_checksums)
    return EngineFolder(folder, manifest)


def _verify_artifact(folder: Path, name: str, artifact: Artifact, verify_checksum: bool) -> None:
    path = folder / name  # a plain file name: the manifest's schema refuses anything else
    try:
        with open_regular(path, f"artifact {name}") as f:
            size = os.fstat(f.fileno()).st_size
            if size != artifact.bytes:
                raise EngineError(f"{path}: {size} bytes, the manifest says {artifact.bytes} (truncated or replaced?)")
            if verify_checksum and sha256_stream(f) != artifact.sha256:
                raise EngineError(f"{path}: sha256 differs from the {MANIFEST} (corrupted or replaced; "
                                  "--skip-checksums skips this check)")
    except FileNotFoundError:
        raise EngineError(f"{folder}: artifact {name} is missing") from None
    except OSError as e:  # a read error of the disk
        raise EngineError(f"cannot read {path}: {e.strerror or e}") from None
