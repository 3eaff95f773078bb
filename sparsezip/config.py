"""Frozen configs of the compression methods, serialisable to the manifest.

Each config knows its method name and its slot count `S` for a given number of
patches `P`; `validate(P)` rejects configs that cannot be built for that grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union


@dataclass(frozen=True)
class NoneConfig:
    """LLaVA baseline: every patch token, CLS dropped."""

    method: ClassVar[str] = "none"

    def num_slots(self, num_patches: int) -> int:
        return num_patches

    def validate(self, num_patches: int) -> None:
        pass


@dataclass(frozen=True)
class VisionZipConfig:
    """VisionZip: `dominant` tokens (CLS included) + `contextual` merged tokens."""

    method: ClassVar[str] = "visionzip"
    dominant: int = 54
    contextual: int = 10

    def num_slots(self, num_patches: int) -> int:
        return self.dominant + self.contextual

    def validate(self, num_patches: int) -> None:
        if self.dominant < 1 or self.contextual < 1:
            raise ValueError("visionzip: dominant and contextual must both be >= 1")
        if (self.dominant - 1) + self.contextual > num_patches:
            raise ValueError(
                f"visionzip: dominant-1 + contextual = {self.dominant - 1 + self.contextual} "
                f"exceeds the {num_patches} patches")


FUSIONS = ("gated", "minmax", "zscore")
TEXT_FORMS = ("transposed", "forward")


@dataclass(frozen=True)
class SparseZipConfig:
    """SparseZip: text-aware scores, dynamic K, score-weighted k-means merging.

    `k_offset` / `k_scale` are `c` / `g` of DESIGN.md:
    K = clamp(round(c + g * log(var(s) + eps)), k_min, k_max) when `dynamic_k`.

    The text term (DESIGN.md step 2): `text_form` says how a patch meets the prompt
    ("transposed": text embeddings mapped back through the projector transposed, as the
    paper; "forward": the `candidates` best patches by visual score projected into the
    LLM space, against the text embeddings there), `fusion` how the relevance joins the
    visual score ("gated": min-max like the visual terms, times the relevance's own
    contrast, so that a flat or noisy relevance leaves the visual ranking as it was;
    "minmax"; "zscore", the first form, which lets noise outrank the visual score).
    """

    method: ClassVar[str] = "sparsezip"
    alpha_attn: float = 1.0
    alpha_ent: float = 0.3
    alpha_mut: float = 0.3
    tau_feat: float = 1.0
    tau_sim: float = 0.1
    beta: float = 8.0  # chosen on calibration scenes for the default model: benchmarks/text_term.py
    raters: bool = True
    fusion: str = "gated"
    text_form: str = "transposed"
    candidates: int = 128
    dynamic_k: bool = False
    k_offset: float = 53.0
    k_scale: float = 8.0
    k_min: int = 16
    k_max: int = 53
    contextual: int = 10
    kmeans_iters: int = 3

    @property
    def text_aware(self) -> bool:
        return self.beta > 0

    def num_slots(self, num_patches: int) -> int:
        return 1 + self.k_max + self.contextual

    def validate(self, num_patches: int) -> None:
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"sparsezip: need 1 <= k_min ({self.k_min}) <= k_max ({self.k_max})")
        if self.contextual < 1:
            raise ValueError("sparsezip: contextual must be >= 1")
        if self.k_max + self.contextual > num_patches:
            raise ValueError(
                f"sparsezip: k_max + contextual = {self.k_max + self.contextual} "
                f"exceeds the {num_patches} patches")
        if self.tau_feat <= 0 or self.tau_sim <= 0:
            raise ValueError("sparsezip: tau_feat and tau_sim must be > 0")
        if min(self.alpha_attn, self.alpha_ent, self.alpha_mut, self.beta) < 0:
            raise ValueError("sparsezip: alphas and beta must be >= 0")
        if self.kmeans_iters < 0:
            raise ValueError("sparsezip: kmeans_iters must be >= 0")
        if self.fusion not in FUSIONS:
            raise ValueError(f"sparsezip: fusion {self.fusion!r}: choose one of {', '.join(FUSIONS)}")
        if self.text_form not in TEXT_FORMS:
            raise ValueError(f"sparsezip: text_form {self.text_form!r}: choose one of {', '.join(TEXT_FORMS)}")
        if self.text_form == "forward" and not self.k_max <= self.candidates <= num_patches:
            raise ValueError(f"sparsezip: candidates ({self.candidates}) must lie between k_max ({self.k_max}) "
                             f"and the {num_patches} patches")


MethodConfig = Union[NoneConfig, VisionZipConfig, SparseZipConfig]
CONFIGS: dict[str, type] = {c.method: c for c in (NoneConfig, VisionZipConfig, SparseZipConfig)}


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    return {"method": config.method, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIGS:
        raise ValueError(f"unknown compression method {method!r}; known: {', '.join(CONFIGS)}")
    cls = CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {', '.join(sorted(unknown))}")
    return cls(**data)
