"""Open an engine folder: its manifest, checked (runtime/manifest.py), and its artifacts, verified.

Every check fails with a one-line `EngineError` naming the folder and what is
wrong (missing folder, unreadable or invalid manifest, unknown format version,
missing or altered artifact), so that a bad folder is refused before any graph
is loaded rather than half way through a generation.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .manifest import (MANIFEST, Artifact, GraphSpec, ImageConfig, LlmInfo, Manifest, PromptTemplate, TokenIds,
                       VisionInfo, read_manifest, sha256_file)


@dataclass(frozen=True)
class EngineFolder:
    """A validated engine folder: where it is and what its manifest says."""

    folder: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.folder / name

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
    if not path.is_file():
        raise EngineError(f"{folder}: artifact {name} is missing")
    size = path.stat().st_size
    if size != artifact.bytes:
        raise EngineError(f"{path}: {size} bytes, the manifest says {artifact.bytes} (truncated or replaced?)")
    if verify_checksum and sha256_file(path) != artifact.sha256:
        raise EngineError(f"{path}: sha256 differs from the {MANIFEST} (corrupted or replaced; "
                          "--skip-checksums skips this check)")
