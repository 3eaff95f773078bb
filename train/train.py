"""Train a LLaVA on generated scenes: `python train/train.py --seed 0 --out models/shapes`.

A LLaVA-1.5 with the real geometry (336 px, patch 14, 576 patches + CLS, features of
layer -2, 2-layer GELU projector, Llama decoder) and small widths, trained from
scratch on generated scenes, on a CPU, in minutes. Losses:

- next-token cross-entropy on the answers (and the EOS after each) only;
- CLS: multi-label scene attributes from the CLS token of the feature layer, the
  image-level objective CLIP's contrastive pretraining gives a real tower, so that
  CLS attention (what VisionZip and SparseZip rank patches by) points at objects;
- patches: the colour and kind of the shape under each patch. Dense targets teach a
  from-scratch ViT in hundreds of steps what the answer loss alone takes thousands for.

Curriculum: for the first `sparse_steps` steps the LLM sees only the patches on shapes
plus `sparse_background` random background patches (in spatial order, as a compressed
engine feeds them). Among all 576 tokens a from-scratch LLM's attention is spread so
thin that the answer loss barely says which tokens matter, and it settles on answer
priors; with few distractors it learns to look, then the full 576 tokens follow.

The output folder is what export/tiny.py writes (llava-hf layout), with the trained
weights and `training.json` (this run's config and held-out accuracy).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from sparsezip_deploy.export.prompt import prompt_formats
from sparsezip_deploy.export.tiny import BUILD_INFO, TinyConfig, build_tiny
from sparsezip_deploy.export.tokenizer import BOS, EOS, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer
from sparsezip_deploy.scenes.questions import HELDOUT_PER_TYPE, TYPES, Example, ask, heldout
from sparsezip_deploy.scenes.scene import SceneConfig, sample_scene
from sparsezip_deploy.train.data import (CLS_TARGETS, IGNORE, PATCH_CLASSES, Batch, Prompter,
                                         make_batch, shuffled_types)

TRAINING_INFO = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # 0.08 s per image on 2 idle cores (several times that on a busy machine):
    # 1000 x 8 images is about 10 minutes.
    vision_steps: int = 300  # stage 1: the vision tower and its heads
    steps: int = 1000  # stage 2: projector + LLM on the answers
    batch: int = 8  # images per step, each with one question of every type
    lr: float = 1.5e-3
    warmup: int = 50
    sparse_steps: int = 350
    sparse_background: int = 24
    weight_decay: float = 0.01
    clip: float = 1.0
    norm_batches: int = 4  # batches the feature whitening is measured on
    # Trained, the projector collapsed colour and kind into one shared direction (cosine
    # 0.98 between shapes of different colours at the LLM's input); frozen at its random
    # init over whitened features it keeps them apart (0.0-0.3; same colour 0.7-0.8).
    train_projector: bool = False
    look_layer: int = 1  # the LLM layer whose attention the look loss supervises
    look_weight: float = 0.5
    threads: int = 2
    eval_every: int = 250
    eval_per_type: int = 10  # a quick look during training
    heldout_per_type: int = HELDOUT_PER_TYPE  # the score written into training.json
    vision_hidden: int = 128
    vision_heads: int = 4
    # 4 layers: features come from layer 3 (index -2); the 4th exists, as in CLIP, but is
    # never run by the deployed graph nor trained here.
    vision_layers: int = 4
    vision_mlp: int = 384
    llm_hidden: int = 128
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_layers: int = 3
    llm_mlp: int = 384


def model_shape(config: TrainConfig) -> TinyConfig:
    # qk_scale 1: the tiny test model's trick against uniform random attention is not
    # needed once attention is trained.
    return TinyConfig(vision_hidden=config.vision_hidden, vision_heads=config.vision_heads,
                      vision_layers=config.vision_layers, vision_mlp=config.vision_mlp,
                      llm_hidden=config.llm_hidden, llm_heads=config.llm_heads,
                      llm_kv_heads=config.llm_kv_heads, llm_layers=config.llm_layers,
                      llm_mlp=config.llm_mlp, qk_scale=1.0)


def feature_layer_states(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> hidden states of `vision_feature_layer` [B, 1 + P, C], later layers skipped."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    used = len(layers) + 1 + model.config.vision_feature_layer  # hidden_states[k] = output of k layers
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in layers[:used]:
        hidden = layer(hidden, None)
    return hidden


class Heads(torch.nn.Module):
    """Training-only linear probes on the feature layer; not part of the saved model."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, CLS_TARGETS)
        self.patch = torch.nn.Linear(width, sum(PATCH_CLASSES))


def sparse_patches(batch: Batch, background: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] patch indices, ascending: every patch on a shape, then random background ones up to K."""
    foreground = batch.patch_colour > 0
    keep = int(foreground.sum(1).max()) + background
    # Shapes first (key 2+), then background in random order (key in [0, 1)); top-K takes them.
    key = foreground.float() * 2 + torch.rand(foreground.shape, generator=generator)
    return key.topk(keep, dim=1).indices.sort(dim=1).values


class Whitened(torch.nn.Module):
    """(x - mean) @ whiten, in front of the projector during stage 2 only."""

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("whiten", whiten)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.whiten


def answer_logits(model: LlavaForConditionalGeneration, batch: Batch, patches: torch.Tensor | None = None,
                  whitened: Whitened | None = None, look_layer: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the whole model on [before | visual | after]; logits [B, T, V] over the `after`
    part, the feature layer's hidden states [B, 1 + P, C], and with `look_layer` that LLM
    layer's attention from each answer position to the visual tokens [B, Q, H, K].

    `patches` [B, K]: feed the LLM only these visual tokens (all P when None).
    """
    hidden = feature_layer_states(model, batch.pixel_values)
    features = hidden[:, 1:] if whitened is None else whitened(hidden[:, 1:])
    visual = model.model.multi_modal_projector(features)  # [B, P, D]
    if patches is not None:
        visual = visual.gather(1, patches[..., None].expand(-1, -1, visual.shape[-1]))
    embed = model.model.language_model.embed_tokens
    rows = len(batch.after)
    before = embed(batch.before)[None].expand(rows, -1, -1)
    embeds = torch.cat([before, visual, embed(batch.after)], 1)
    prefix = before.shape[1] + visual.shape[1]
    mask = torch.cat([torch.ones(rows, prefix, dtype=batch.mask.dtype), batch.mask], 1)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                     output_attentions=look_layer is not None)
    logits = model.lm_head(out.last_hidden_state[:, prefix:])
    if look_layer is None:
        return logits, hidden, None
    attn = out.attentions[look_layer]  # [B, H, S, S]
    rows = torch.arange(rows)[:, None]
    at = prefix + batch.answer_at.clamp_min(0)  # [B, Q]
    looks = attn[rows, :, at][..., before.shape[1]:prefix]  # [B, Q, H, K]
    return logits, hidden, looks


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def look_loss(looks: torch.Tensor, batch: Batch, patches: torch.Tensor | None) -> torch.Tensor:
    """-log of the attention mass (mean over heads) each answer position puts on the patches
    its answer is read from. A training aid only: it teaches the LLM's attention where to
    look, which the answer loss alone takes thousands of steps to find."""
    look_at = batch.look_at
    if patches is not None:
        look_at = look_at.gather(2, patches[:, None].expand(-1, look_at.shape[1], -1))
    mass = (looks.mean(2) * look_at).sum(-1)  # [B, Q]
    used = (batch.answer_at >= 0) & look_at.any(-1)
    return -(mass[used] + 1e-6).log().mean()


def vision_losses(heads: Heads, batch: Batch, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    cls = F.binary_cross_entropy_with_logits(heads.cls(hidden[:, 0]), batch.cls_targets)
    patch_logits = heads.patch(hidden[:, 1:]).split(PATCH_CLASSES, -1)
    patch = sum(F.cross_entropy(lg.flatten(0, 1), target.flatten())
                for lg, target in zip(patch_logits, (batch.patch_colour, batch.patch_kind)))
    return {"cls": cls, "patch": patch}


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, prompter: Prompter, examples: list[Example],
             patch: int, whitened: Whitened | None = None, batch: int = 16) -> dict[str, float]:
    """Accuracy per question type: the first-turn answer token, argmax (= greedy's first step)."""
    model.eval()
    right = {t: [] for t in TYPES}
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        data = make_batch([e.scene for e in chunk], [[e.question] for e in chunk], prompter, patch)
        logits, _, _ = answer_logits(model, data, whitened=whitened)
        for row, example in enumerate(chunk):
            position = int((data.targets[row] != IGNORE).nonzero()[0])
            right[example.question.type].append(int(logits[row, position].argmax()) == int(data.targets[row, position]))
    model.train()
    scores = {t: float(np.mean(r)) for t, r in right.items() if r}
    scores["all"] = float(np.mean([x for r in right.values() for x in r]))
    return scores


def lr_at(step: int, config: TrainConfig, steps: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def whitening(model: LlavaForConditionalGeneration, config: TrainConfig, rng: np.random.Generator,
              scene_config: SceneConfig, prompter: Prompter, patch: int) -> Whitened:
    """ZCA whitening of the (frozen) feature layer's patch tokens, measured over a few batches.

    Two directions hold about 70% of the trained tower's feature variance (background vs
    shape, mostly); colour and kind live in the rest. Whitened, every direction counts alike
    for the projector, and a frozen random projector keeps them apart for the LLM.
    """
    with torch.no_grad():
        feats = []
        for _ in range(config.norm_batches):
            scenes = [sample_scene(rng, scene_config) for _ in range(config.batch)]
            batch = make_batch(scenes, [ask(s, rng) for s in scenes], prompter, patch)
            feats.append(feature_layer_states(model, batch.pixel_values)[:, 1:].flatten(0, 1))
        feats = torch.cat(feats)
        values, vectors = torch.linalg.eigh(torch.cov(feats.T))
        whiten = vectors @ torch.diag((values.clamp_min(0) + 1e-4 * values.max()) ** -0.5) @ vectors.T
    return Whitened(feats.mean(0), whiten)


def fold_whitening(projector: torch.nn.Module, whitened: Whitened) -> None:
    """W (x - m) A + b == (W A^T) x + (b - W A^T m), A = whiten: the saved projector takes raw features."""
    with torch.no_grad():
        weight = projector.linear_1.weight @ whitened.whiten.T
        projector.linear_1.bias -= weight @ whitened.mean
        projector.linear_1.weight.copy_(weight)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def step_optimizer(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()


def train(config: TrainConfig, out: Path, scene_config: SceneConfig = SceneConfig(),
          log=print) -> dict[str, float]:
    """Stage 1 trains the vision tower on its own targets; stage 2 freezes it and trains
    projector + LLM on the answers, over whitened features (folded into the projector
    when saved): the raw features share one large offset that RMSNorm keeps, and through it
    every visual token looks alike to a from-scratch LLM."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    shape = model_shape(config)
    build_tiny(out, seed=config.seed, tiny=shape)  # config, tokenizer, processor files + the init
    (out / BUILD_INFO).unlink()  # that marker means "a tiny test model"; this one is not
    # Eager attention: sdpa returns no attention probabilities for the look loss.
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                          attn_implementation="eager").train()
    heads = Heads(shape.vision_hidden)
    tokenizer = build_tokenizer()
    formats = prompt_formats(LLAVA_CHAT_TEMPLATE, IMAGE_TOKEN, BOS, EOS)
    prompter = Prompter(tokenizer, formats["first_turn"], formats["next_turn"])
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    quick = heldout(per_type=config.eval_per_type)
    t0 = time.perf_counter()

    def batch_of_scenes() -> Batch:
        scenes = [sample_scene(rng, scene_config) for _ in range(config.batch)]
        return make_batch(scenes, [ask(s, rng, shuffled_types(rng)) for s in scenes], prompter, shape.patch_size)

    tower = model.model.vision_tower
    optimizer = make_optimizer(list(tower.parameters()) + list(heads.parameters()), config)
    for step in range(config.vision_steps):
        batch = batch_of_scenes()
        hidden = feature_layer_states(model, batch.pixel_values)
        parts = vision_losses(heads, batch, hidden)
        step_optimizer(optimizer, parts["cls"] + parts["patch"], lr_at(step, config, config.vision_steps), config.clip)
        if step % 20 == 0 or step == config.vision_steps - 1:
            log(f"vision step {step} {time.perf_counter() - t0:.0f}s " +
                " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
    tower.requires_grad_(False)
    whitened = whitening(model, config, rng, scene_config, prompter, shape.patch_size)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(config.train_projector)
    params = (list(projector.parameters()) if config.train_projector else []) + \
        list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = make_optimizer(params, config)
    for step in range(config.steps):
        batch = batch_of_scenes()
        patches = sparse_patches(batch, config.sparse_background, generator) \
            if step < config.sparse_steps else None
        logits, _, looks = answer_logits(model, batch, patches, whitened, config.look_layer)
        parts = {"answer": answer_loss(logits, batch), "look": look_loss(looks, batch, patches)}
        loss = parts["answer"] + config.look_weight * parts["look"]
        step_optimizer(optimizer, loss, lr_at(step, config, config.steps), config.clip)
        if step % 20 == 0 or step == config.steps - 1:
            log(f"step {step} {time.perf_counter() - t0:.0f}s " +
                " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
        if (step + 1) % config.eval_every == 0:
            log(f"step {step + 1} quick held-out accuracy "
                f"{evaluate(model, prompter, quick, shape.patch_size, whitened)}")
    model.eval()
    fold_whitening(projector, whitened)
    scores = evaluate(model, prompter, heldout(per_type=config.heldout_per_type), shape.patch_size)
    log(f"held-out accuracy {scores}")
    model.save_pretrained(out)
    info = {"config": dataclasses.asdict(config), "scene_config": dataclasses.asdict(scene_config),
            "train_seconds": round(time.perf_counter() - t0, 1), "heldout_accuracy": scores}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return scores


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path]:
    p = argparse.ArgumentParser(prog="train/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write (llava-hf layout)")
    for f in dataclasses.fields(TrainConfig):
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kind)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    return TrainConfig(**args), out


def main(argv: list[str] | None = None) -> int:
    config, out = parse_args(argv)
    train(config, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
