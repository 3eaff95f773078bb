"""Train a LLaVA on generated scenes: `python train/train.py --seed 0 --out models/shapes`.

A LLaVA-1.5 with the real geometry (336 px, patch 14, 576 patches + CLS, features of
layer -2, 2-layer GELU projector, Llama decoder) and small widths, trained from
scratch on generated scenes, on a CPU, in under an hour. Three stages, as LLaVA-1.5's
two after a tower's pretraining:

1. The vision tower alone (train/vision.py), on dense targets: for the CLS token of the
   feature layer, multi-label scene attributes (the image-level objective CLIP's
   contrastive pretraining gives a real tower, so that CLS attention, what VisionZip and
   SparseZip rank patches by, points at objects); for each patch, the colour, kind, size,
   side and kind count of the shape under it (PATCH_TARGETS in data.py); two attention
   guides that group a shape's patches and count the shapes of a kind.
1b. Feature alignment (train/align.py): the word embeddings are set to a designed space
   and frozen for good, the tower is frozen, and the projector alone learns to put each
   patch on the sum of the embeddings of the words for what it shows (its colour, kind,
   size, side, count), through its output and through the linear path SparseZip's text
   term reads (W1^T W2^T e).
2. Instruction tuning: the LLM (all but its word embeddings) trained on next-token
   cross-entropy over the answers (and the EOS after each), with two attention guides
   (`guide_losses`): each word that names something looks at what it names, and each
   answer looks at the word it is read through.

Curriculum: for the first `sparse_steps` steps of stage 2 the LLM sees what a compressed
engine feeds it (CLS, the patches on shapes and a few others in spatial order, merged
tokens); the rest of the steps see all 576 patches, as the `none` engine feeds them.

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
from sparsezip_deploy.train.align import CaptionCode, alignment_figures, alignment_losses, design_embeddings
from sparsezip_deploy.train.data import IGNORE, Batch, Prompter, make_batch, shuffled_types
from sparsezip_deploy.train.vision import (Heads, feature_layer_states, probe_accuracy, sincos_positions,
                                           tower_guide_losses, vision_losses)

TRAINING_INFO = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # On 2 idle cores: a stage-1 step about 0.8 s, an alignment step 0.3 s, a stage-2 step
    # 0.35 s compressed and 1 s over all 576 patches; ~50 minutes in all.
    vision_steps: int = 1200  # stage 1: the vision tower, its probes and guides (train/vision.py)
    align_steps: int = 300  # stage 1b: the projector alone (train/align.py)
    steps: int = 2000  # stage 2: the LLM on the answers
    batch: int = 8  # images per step, each with one question of every type
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    # Tower attention guides (train/vision.py): the layers that group a shape's patches and
    # count the shapes of a kind, how many heads of each are guided, the loss weight.
    group_layer: int = 1
    count_layer: int = 2
    vision_guide_heads: int = 2
    vision_guide_weight: float = 1.0
    position_gain: float = 1.0  # sincos_positions: the position embeddings' start, against patch content
    # Alignment (train/align.py): the norm of a patch's caption target in word norms, the
    # weight of its size, side and count words against its colour and kind, the
    # temperature of its cosine cross-entropy among all words, and the held-out questions
    # per type its figures are measured on.
    align_scale: float = 64.0
    align_detail: float = 0.5
    align_temperature: float = 0.1
    align_eval_per_type: int = 20
    # Curriculum: for the first `sparse_steps` steps the LLM sees what a compressed engine
    # feeds it (`compressed_view`: CLS, the patches on shapes plus `sparse_background`
    # random others, `sparse_contextual` merged tokens): a sequence a fifth as long, steps
    # several times faster, and a model that answers from compressed engines too. Trained
    # on all 576 patches only, it answered at chance from sparsezip-64 (32% vs 53%).
    sparse_steps: int = 1400
    sparse_background: int = 24
    sparse_contextual: int = 10
    ground_layer: int = 0  # guide_losses: the LLM layers whose attention is guided
    route_layer: int = 1
    guide_heads: int = 2
    guide_weight: float = 1.0
    threads: int = 2
    eval_every: int = 400
    eval_per_type: int = 10  # a quick look during training
    heldout_per_type: int = HELDOUT_PER_TYPE  # the score written into training.json
    vision_hidden: int = 128
    vision_heads: int = 4
    # 5 layers: features come from layer 4 (index -2); the 5th exists, as in CLIP, but is
    # never run by the deployed graph nor trained here. Of the 4 used, one sees each patch's
    # neighbourhood, one groups it with its shape, one counts, one reads out.
    vision_layers: int = 5
    vision_mlp: int = 384
    llm_hidden: int = 128
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_layers: int = 3
    llm_mlp: int = 384
    # Llama's 10000 turns all but a few dims of a 32-wide head by over a radian across
    # the 600 tokens between a question word and the patches it looks at; at 1e6 most
    # dims can match content regardless of distance (Llama 3 uses 5e5).
    rope_theta: float = 1e6
    # Llama's 0.02 is a unit-gain init at width 4096 (1.3 / sqrt(4096)); at width 128 it
    # is a gain of 0.23 per matrix, and an answer read through two attention hops (four
    # such matrices) starts about a thousand times too weak to learn from. 1 / sqrt(128).
    llm_init_std: float = 0.088


def model_shape(config: TrainConfig) -> TinyConfig:
    # qk_scale 1: the tiny test model's trick against uniform random attention is not
    # needed once attention is trained.
    return TinyConfig(vision_hidden=config.vision_hidden, vision_heads=config.vision_heads,
                      vision_layers=config.vision_layers, vision_mlp=config.vision_mlp,
                      llm_hidden=config.llm_hidden, llm_heads=config.llm_heads,
                      llm_kv_heads=config.llm_kv_heads, llm_layers=config.llm_layers,
                      llm_mlp=config.llm_mlp, qk_scale=1.0, rope_theta=config.rope_theta,
                      llm_init_std=config.llm_init_std)


def sparse_patches(batch: Batch, background: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] patch indices, ascending: every patch on a shape, then random background ones up to K."""
    foreground = batch.patch_colour > 0
    keep = int(foreground.sum(1).max()) + background
    # Shapes first (key 2+), then background in random order (key in [0, 1)); top-K takes them.
    key = foreground.float() * 2 + torch.rand(foreground.shape, generator=generator)
    return key.topk(keep, dim=1).indices.sort(dim=1).values


def compressed_view(hidden: torch.Tensor, batch: Batch, background: int, contextual: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature-layer states [B, 1 + P, C] laid out as a compressed engine feeds them:
    CLS, the kept patches in spatial order (`sparse_patches`), then `contextual` merged
    tokens (means of random groups of the dropped patches, where the engines merge by
    key similarity). Returns the tokens [B, N, C] and each one's patch index, -1 for CLS
    and merged tokens."""
    patches = sparse_patches(batch, background, generator)
    rows, width = hidden.shape[0], hidden.shape[-1]
    kept = hidden[:, 1:].gather(1, patches[..., None].expand(-1, -1, width))
    dropped = torch.ones(rows, hidden.shape[1] - 1).scatter(1, patches, 0.0)
    group = torch.randint(contextual, dropped.shape, generator=generator)
    weights = F.one_hot(group, contextual).float() * dropped[..., None]  # [B, P, m]
    merged = weights.transpose(1, 2) @ hidden[:, 1:] / weights.sum(1)[..., None].clamp_min(1)
    index = torch.cat([torch.full((rows, 1), -1), patches, torch.full((rows, contextual), -1)], 1)
    return torch.cat([hidden[:, :1], kept, merged], 1), index


def answer_logits(model: LlavaForConditionalGeneration, batch: Batch, view=None, attention: bool = False
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
    """Run the whole model on [before | visual | after]: logits [B, T, V] over the `after`
    part, with `attention` every LLM layer's attention probabilities [B, H, S, S], and the
    patch index of each visual token (None: all P patches in order).

    `view(hidden)` -> (tokens, index): what the LLM sees of the feature layer, e.g.
    `compressed_view`; the P patch tokens when None, as LLaVA (and the `none` engine) feed them."""
    hidden = feature_layer_states(model, batch.pixel_values)
    tokens, index = view(hidden) if view is not None else (hidden[:, 1:], None)
    visual = model.model.multi_modal_projector(tokens)  # [B, N, D]
    embed = model.model.language_model.embed_tokens
    rows = len(batch.after)
    before = embed(batch.before)[None].expand(rows, -1, -1)
    embeds = torch.cat([before, visual, embed(batch.after)], 1)
    prefix = before.shape[1] + visual.shape[1]
    mask = torch.cat([torch.ones(rows, prefix, dtype=batch.mask.dtype), batch.mask], 1)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=attention)
    return model.lm_head(out.last_hidden_state[:, prefix:]), out.attentions if attention else None, index


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)


def attention_mass(attn: torch.Tensor, heads: int, at: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass (mean over the first `heads` heads) query positions `at`
    [B, N] put on keys `to` [B, N, S], averaged over the queries that exist (at >= 0) and
    have a target."""
    rows = torch.arange(len(at))[:, None]
    probs = attn[:, :heads].mean(1)[rows, at.clamp_min(0)]  # [B, N, S]
    mass = (probs * to).sum(-1)
    used = (at >= 0) & to.any(-1)
    return -(mass[used] + 1e-6).log().mean()


def guide_losses(attentions: tuple[torch.Tensor, ...], batch: Batch, index: torch.Tensor | None,
                 config: "TrainConfig") -> dict[str, torch.Tensor]:
    """Training aids that lay out the circuit an answer takes, in two attention hops:

    - ground (layer `ground_layer`): each word that names something (a colour, a kind,
      "small") looks at the patches it names, or at BOS when the scene has none;
    - route (layer `route_layer`): the position that predicts an answer looks at the
      word of its question the answer is read through (ROUTES in data.py).

    Only the first `guide_heads` heads are guided; the others are free. The answer loss
    alone takes thousands of steps to find where to look among 576 visual tokens."""
    sequence = attentions[0].shape[-1]
    before, prefix = len(batch.before), sequence - batch.after.shape[1]
    named = batch.ground_to
    if index is not None:  # a compressed view: only its patch tokens name anything
        named = named.gather(2, index.clamp_min(0)[:, None].expand(-1, named.shape[1], -1)) & (index >= 0)[:, None]
    ground_to = torch.zeros(*batch.ground_at.shape, sequence, dtype=torch.bool)
    ground_to[..., 0] = ~named.any(-1)  # nothing it names is in view: BOS
    ground_to[..., before:prefix] = named
    route_to = F.pad(batch.route_to, (prefix, 0))
    ground_at = torch.where(batch.ground_at >= 0, prefix + batch.ground_at, -1)
    answer_at = torch.where(batch.answer_at >= 0, prefix + batch.answer_at, -1)
    return {"ground": attention_mass(attentions[config.ground_layer], config.guide_heads, ground_at, ground_to),
            "route": attention_mass(attentions[config.route_layer], config.guide_heads, answer_at, route_to)}


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, prompter: Prompter, examples: list[Example],
             patch: int, batch: int = 16) -> dict[str, float]:
    """Accuracy per question type: the first-turn answer token, argmax (= greedy's first step)."""
    model.eval()
    right = {t: [] for t in TYPES}
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        data = make_batch([e.scene for e in chunk], [[e.question] for e in chunk], prompter, patch)
        logits, _, _ = answer_logits(model, data)
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
    """Stage 1 trains the vision tower on its own targets and guides; stage 1b the projector
    alone, to the caption targets in the designed word space; stage 2 freezes both and the
    word embeddings and trains the rest of the LLM on the answers."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    shape = model_shape(config)
    used = config.vision_layers - 1  # layers the feature layer (-2) runs
    assert max(config.group_layer, config.count_layer) < used, "the tower guides need layers the features use"
    build_tiny(out, seed=config.seed, tiny=shape)  # config, tokenizer, processor files + the init
    (out / BUILD_INFO).unlink()  # that marker means "a tiny test model"; this one is not
    # Eager attention: sdpa returns no attention probabilities for the guides.
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                          attn_implementation="eager").train()
    heads = Heads(shape.vision_hidden, used)
    tokenizer = build_tokenizer()
    formats = prompt_formats(LLAVA_CHAT_TEMPLATE, IMAGE_TOKEN, BOS, EOS)
    prompter = Prompter(tokenizer, formats["first_turn"], formats["next_turn"])
    code = CaptionCode(tokenizer, config.align_detail)
    embed = model.model.language_model.embed_tokens
    design_embeddings(embed.weight, code, torch.Generator().manual_seed(config.seed))
    embed.requires_grad_(False)  # the space the projector aligns to: fixed from here on
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    quick = heldout(per_type=config.eval_per_type)
    t0 = time.perf_counter()
    seconds = {}

    def batch_of_scenes() -> Batch:
        scenes = [sample_scene(rng, scene_config) for _ in range(config.batch)]
        return make_batch(scenes, [ask(s, rng, shuffled_types(rng)) for s in scenes], prompter, shape.patch_size)

    def report(stage: str, step: int, parts: dict[str, torch.Tensor], extra: str = "") -> None:
        log(f"{stage} step {step} {time.perf_counter() - t0:.0f}s " +
            " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()) + extra)

    tower = model.model.vision_tower
    sincos_positions(tower, shape.image_size // shape.patch_size, config.position_gain)
    optimizer = make_optimizer(list(tower.parameters()) + list(heads.parameters()), config)
    for step in range(config.vision_steps):
        batch = batch_of_scenes()
        hidden, probs, states = feature_layer_states(model, batch.pixel_values, attention=True)
        parts = {**vision_losses(heads, batch, states),
                 **tower_guide_losses(probs, batch, config.group_layer, config.count_layer,
                                      config.vision_guide_heads)}
        loss = (parts["cls"] + parts["patch"] + parts["deep"]
                + config.vision_guide_weight * (parts["group"] + parts["count"]))
        if step % 20 == 0 or step == config.vision_steps - 1:
            accuracy = probe_accuracy(heads, batch, hidden.detach())
            report("vision", step, parts, " probes " + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
        step_optimizer(optimizer, loss, lr_at(step, config, config.vision_steps), config.clip)
    tower.requires_grad_(False)
    probes = vision_probe_accuracy(model, heads, quick, prompter, shape.patch_size)
    log(f"vision probe accuracy on held-out scenes {probes}")
    seconds["vision"] = time.perf_counter() - t0

    projector = model.model.multi_modal_projector
    optimizer = make_optimizer(list(projector.parameters()), config)
    for step in range(config.align_steps):
        batch = batch_of_scenes()
        with torch.no_grad():
            hidden = feature_layer_states(model, batch.pixel_values)
        parts = alignment_losses(projector, hidden, batch, embed.weight, code, config.align_scale,
                                 config.align_temperature)
        step_optimizer(optimizer, sum(parts.values()), lr_at(step, config, config.align_steps), config.clip)
        if step % 20 == 0 or step == config.align_steps - 1:
            report("align", step, parts)
    projector.requires_grad_(False)
    seconds["align"] = time.perf_counter() - t0 - sum(seconds.values())

    llm = [p for p in (*model.model.language_model.parameters(), *model.lm_head.parameters()) if p.requires_grad]
    optimizer = make_optimizer(llm, config)
    for step in range(config.steps):
        batch = batch_of_scenes()
        view = (lambda hidden: compressed_view(hidden, batch, config.sparse_background, config.sparse_contextual,
                                               generator)) if step < config.sparse_steps else None
        logits, attentions, index = answer_logits(model, batch, view, attention=True)
        parts = {"answer": answer_loss(logits, batch), **guide_losses(attentions, batch, index, config)}
        loss = parts["answer"] + config.guide_weight * (parts["ground"] + parts["route"])
        step_optimizer(optimizer, loss, lr_at(step, config, config.steps), config.clip)
        if step % 20 == 0 or step == config.steps - 1:
            report("llm", step, parts)
        if (step + 1) % config.eval_every == 0:
            log(f"step {step + 1} quick held-out accuracy "
                f"{evaluate(model, prompter, quick, shape.patch_size)}")
    seconds["llm"] = time.perf_counter() - t0 - sum(seconds.values())
    model.eval()
    scores = evaluate(model, prompter, heldout(per_type=config.heldout_per_type), shape.patch_size)
    log(f"held-out accuracy {scores}")
    alignment = alignment_figures(model, heldout(per_type=config.align_eval_per_type), prompter, code,
                                  shape.patch_size, feature_layer_states)
    log(f"alignment {alignment}")
    model.save_pretrained(out)
    info = {"config": dataclasses.asdict(config), "scene_config": dataclasses.asdict(scene_config),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "heldout_accuracy": scores, "vision_probe_accuracy": probes, "alignment": alignment}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return scores


@torch.no_grad()
def vision_probe_accuracy(model: LlavaForConditionalGeneration, heads: Heads, examples: list[Example],
                          prompter: Prompter, patch: int, batch: int = 16) -> dict[str, float]:
    """The tower's probes on held-out scenes: per target, accuracy over patches on shapes."""
    totals: dict[str, list[float]] = {}
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        data = make_batch([e.scene for e in chunk], [[e.question] for e in chunk], prompter, patch)
        weight = float((data.patch_owner > 0).sum())
        for name, value in probe_accuracy(heads, data, feature_layer_states(model, data.pixel_values)).items():
            totals.setdefault(name, []).append((value * weight, weight))
    return {name: sum(v for v, _ in parts) / sum(w for _, w in parts) for name, parts in totals.items()}


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
