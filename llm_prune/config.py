"""Frozen configs of the in-LLM pruning methods, and the stages they resolve to for one model.

A method prunes the visual tokens of the first (image) prefill inside the LLM,
in stages. A stage is `Stage(after, keep, merged)`: layer `after`'s attention
ranks the visual tokens its input carried, the `keep` best stay (in their
order), `merged` tokens recycled from the dropped ones join them, and layers
after `after` run on that shorter sequence. Text tokens are never dropped.

- FastV (Chen et al. 2024): one stage. Layers >= `layer` (K, default 2) see
  the kept tokens, ranked by layer K-1's attention averaged over heads and over
  the (real) query positions; `keep` = R of the visual tokens (default half, the
  paper's R = 50 %).
- SparseVLM (Zhang et al., ICML 2025): stages after `layers` (paper 2, 6, 15 of
  32), ranked by the attention of the text raters; each stage recycles the top
  `recycle` of its dropped tokens into `int(n * clusters) + 1` tokens by
  density-peak clustering (the paper's code: 30 %, a tenth).

`budget` asks for an average number of visual tokens over the layers (what
the LLM carries, recycled tokens included); `stages()` turns a config into the
constant keep counts of one model (its layer count, its visual slots).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union

# The paper's schedules for LLaVA-1.5-7B (32 layers, 576 visual tokens), stages after layers 2, 6, 15
# (SparseVLM's code, score.py): budget -> keep per stage.
PAPER_LAYERS = (2, 6, 15)
PAPER_NUM_LAYERS = 32
PAPER_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
PAPER_VISUAL = 576


@dataclass(frozen=True)
class Stage:
    after: int  # the layer whose attention ranks; layers > after carry keep + merged visual tokens
    keep: int
    merged: int = 0  # recycled tokens (SparseVLM); FastV: 0

    @property
    def carried(self) -> int:
        return self.keep + self.merged


@dataclass(frozen=True)
class FastVConfig:
    method: ClassVar[str] = "fastv"
    layer: int = 2  # K: the first layer that runs on the kept tokens
    keep: int = 0  # r; 0: half the visual tokens (or what `budget` asks)
    budget: int = 0  # > 0: choose r so the layers carry this many visual tokens on average

    def stages(self, num_layers: int, visual: int) -> tuple[Stage, ...]:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"fastv: layer {self.layer} must be in [1, {num_layers - 1}] for a "
                             f"{num_layers}-layer LLM")
        if self.keep and self.budget:
            raise ValueError("fastv: give keep or budget, not both")
        if self.budget:
            pruned = num_layers - self.layer
            keep = round((self.budget * num_layers - self.layer * visual) / pruned)
            if not 1 <= keep < visual:
                raise ValueError(f"fastv: a budget of {self.budget} visual tokens over {num_layers} layers "
                                 f"needs r = {keep}, outside [1, {visual - 1}] with {visual} visual tokens "
                                 f"and K = {self.layer}")
        else:
            keep = self.keep or max(1, visual // 2)
        if not 1 <= keep < visual:
            raise ValueError(f"fastv: keep {keep} must be in [1, {visual - 1}] ({visual} visual tokens)")
        return (Stage(self.layer - 1, keep),)


@dataclass(frozen=True)
class SparseVLMConfig:
    method: ClassVar[str] = "sparsevlm"
    layers: tuple[int, ...] = ()  # prune after these; (): the paper's 2, 6, 15, scaled to the layer count
    keep: tuple[int, ...] = ()  # per stage; (): from `budget`
    budget: int = 192  # the paper's 192 / 128 / 64 schedules, fitted to this model (see `schedule`)
    recycle: float = 0.3  # share of a stage's dropped tokens that are recycled (top by score)
    clusters: float = 0.1  # recycled tokens -> int(n * clusters) + 1 merged tokens

    def after_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers:
            layers = tuple(self.layers)
        elif num_layers == PAPER_NUM_LAYERS:
            layers = PAPER_LAYERS
        else:
            # The paper's depths as fractions of the model, at least one layer after the last stage.
            layers = tuple(sorted({min(num_layers - 2, round(l * num_layers / PAPER_NUM_LAYERS))
                                   for l in PAPER_LAYERS}))
        if list(layers) != sorted(set(layers)) or not layers:
            raise ValueError(f"sparsevlm: layers {list(layers)} must be strictly increasing")
        if layers[0] < 0 or layers[-1] > num_layers - 2:
            raise ValueError(f"sparsevlm: layers {list(layers)} must lie in [0, {num_layers - 2}] for a "
                             f"{num_layers}-layer LLM (at least one layer after the last stage)")
        return layers

    def merged_count(self, dropped: int) -> int:
        """Tokens recycled from `dropped` ones (SparseVLM's code: int(0.3 d) + 1 -> int(n / 10) + 1)."""
        return int(self.recycled_count(dropped) * self.clusters) + 1 if dropped and self.recycle else 0

    def recycled_count(self, dropped: int) -> int:
        return min(dropped, int(dropped * self.recycle) + 1) if dropped and self.recycle else 0

    def stages(self, num_layers: int, visual: int) -> tuple[Stage, ...]:
        layers = self.after_layers(num_layers)
        if not 0 <= self.recycle <= 1 or not 0 <= self.clusters <= 1:
            raise ValueError("sparsevlm: recycle and clusters must be in [0, 1]")
        keeps = tuple(self.keep) if self.keep else self.schedule(num_layers, visual, layers)
        if len(keeps) != len(layers):
            raise ValueError(f"sparsevlm: {len(keeps)} keep counts for {len(layers)} stages ({list(layers)})")
        return self._stages(layers, keeps, visual)

    def _stages(self, layers: tuple[int, ...], keeps: tuple[int, ...], visual: int) -> tuple[Stage, ...]:
        stages, carried = [], visual
        for after, keep in zip(layers, keeps):
            if not 1 <= keep < carried:
                raise ValueError(f"sparsevlm: keep {keep} after layer {after} must be in [1, {carried - 1}] "
                                 f"(the {carried} visual tokens that stage receives)")
            stage = Stage(after, keep, self.merged_count(carried - keep))
            stages.append(stage)
            carried = stage.carried
        return tuple(stages)

    def schedule(self, num_layers: int, visual: int, layers: tuple[int, ...]) -> tuple[int, ...]:
        """Keep counts whose layer-average of carried visual tokens is nearest `budget`.

        The paper's own list when the model is the paper's (32 layers, 576 tokens,
        layers 2, 6, 15, budget 192 / 128 / 64); otherwise the shape of the nearest
        paper schedule, scaled by one factor found by bisection.
        """
        if (num_layers, visual, layers) == (PAPER_NUM_LAYERS, PAPER_VISUAL, PAPER_LAYERS) \
                and self.budget in PAPER_SCHEDULES:
            return PAPER_SCHEDULES[self.budget]
        nearest = min(PAPER_SCHEDULES, key=lambda b: abs(b - self.budget))
        shape = [k / PAPER_VISUAL for k in PAPER_SCHEDULES[nearest]]
        shape = (shape + [shape[-1]] * len(layers))[:len(layers)]
        if not 0 < self.budget < visual:
            raise ValueError(f"sparsevlm: budget {self.budget} must be in [1, {visual - 1}]")

        def keeps_for(scale: float) -> tuple[int, ...]:
            out, carried = [], visual
            for f in shape:
                keep = min(carried - 1, max(1, round(scale * f * visual)))
                out.append(keep)
                carried = keep + self.merged_count(carried - keep)
            return tuple(out)

        lo, hi = 0.0, 1.0 / min(shape)
        least = average_visual(self._stages(layers, keeps_for(lo), visual), num_layers, visual)
        if self.budget < least - 0.5:
            raise ValueError(f"sparsevlm: a budget of {self.budget} is out of reach with stages after layers "
                             f"{list(layers)} of {num_layers}: the layers up to the first stage alone carry "
                             f"{least:.1f} visual tokens on average; prune earlier (--prune-layers) or keep "
                             "counts (--prune-keep)")
        for _ in range(60):
            mid = (lo + hi) / 2
            if average_visual(self._stages(layers, keeps_for(mid), visual), num_layers, visual) < self.budget:
                lo = mid
            else:
                hi = mid
        candidates = {keeps_for(lo), keeps_for(hi)}
        return min(candidates, key=lambda k: abs(average_visual(self._stages(layers, k, visual), num_layers,
                                                                visual) - self.budget))


def average_visual(stages: tuple[Stage, ...], num_layers: int, visual: int) -> float:
    """Visual tokens the LLM's layers carry, averaged over its layers."""
    total, carried, start = 0, visual, 0
    for stage in stages:
        total += (stage.after + 1 - start) * carried
        carried, start = stage.carried, stage.after + 1
    return (total + (num_layers - start) * carried) / num_layers


PruneConfig = Union[FastVConfig, SparseVLMConfig]
PRUNE_CONFIGS: dict[str, type] = {c.method: c for c in (FastVConfig, SparseVLMConfig)}


def prune_to_dict(config: PruneConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {"method": config.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}


def prune_from_dict(data: dict[str, Any]) -> PruneConfig:
    data = dict(data)
    method = data.pop("method", None)
    if method not in PRUNE_CONFIGS:
        raise ValueError(f"unknown in-LLM pruning method {method!r}; known: {', '.join(PRUNE_CONFIGS)}")
    cls = PRUNE_CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(data) - known:
        raise ValueError(f"{method}: unknown option(s) {', '.join(sorted(unknown))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
