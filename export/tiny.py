"""A tiny random-init LLaVA-1.5 with the real geometry, saved as a llava-hf folder.

Image 336, patch 14 (576 patches + CLS), `vision_feature_layer=-2`, "default"
feature selection, GELU projector: everything the exported graphs depend on is
the real model's; only the widths and depths are small, so the whole pipeline runs
in seconds on a CPU. The LLM uses grouped-query attention (4 heads, 2 kv heads) on
purpose, so that nothing downstream can confuse `num_heads` with `num_kv_heads`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .tokenizer import (BOS, EOS, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, PAD_TOKEN, build_tokenizer,
                        write_tokenizer_files)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3

# Bumped whenever the tiny model changes, so a cached folder from an older build is rebuilt.
TINY_FORMAT = 1
BUILD_INFO = "sparsezip_tiny.json"


@dataclass(frozen=True)
class TinyConfig:
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_layers: int = 4
    vision_mlp: int = 128
    llm_hidden: int = 64
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_layers: int = 2
    llm_mlp: int = 128
    max_positions: int = 2048
    rope_theta: float = 10000.0
    llm_init_std: float = 0.02  # the LLM's initializer_range (Llama's default)
    # Random-init CLIP attention is close to uniform, so CLS-attention top-K would be
    # decided by float noise. Scaling q and k scales the attention logits by its square
    # and spreads the scores apart: index-equality tests become meaningful.
    qk_scale: float = 4.0
    # The same for the LLM's attention (1: none), for tests of methods that rank by it (FastV, SparseVLM).
    llm_qk_scale: float = 1.0


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int,
                      tiny: TinyConfig = TinyConfig()) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden, intermediate_size=tiny.vision_mlp,
        num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size, patch_size=tiny.patch_size, projection_dim=tiny.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=tiny.llm_hidden, intermediate_size=tiny.llm_mlp,
        num_hidden_layers=tiny.llm_layers, num_attention_heads=tiny.llm_heads,
        num_key_value_heads=tiny.llm_kv_heads, max_position_embeddings=tiny.max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": tiny.rope_theta},
        initializer_range=tiny.llm_init_std,
    )
    num_patches = (tiny.image_size // tiny.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=num_patches, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, pad_token_id=pad_token_id,
    )


def image_processor_config(image_size: int) -> dict:
    """CLIPImageProcessor settings of llava-hf/llava-1.5-7b-hf (OpenAI CLIP-336)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": PIL_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }


def build_tiny(out_dir: str | Path, seed: int = 0, tiny: TinyConfig = TinyConfig()) -> Path:
    """Write the tiny model into `out_dir` (created if needed); same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    image_id, pad_id = tokenizer.token_to_id(IMAGE_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    assert tokenizer.token_to_id(BOS) == 1 and tokenizer.token_to_id(EOS) == 2
    config = tiny_llava_config(tokenizer.get_vocab_size(), image_id, pad_id, tiny)

    # A private generator state: building the model must not depend on, or disturb,
    # whatever the caller did with torch's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(tiny.qk_scale)
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(tiny.llm_qk_scale)
    model.save_pretrained(out)

    write_tokenizer_files(tokenizer, out, model_max_length=tiny.max_positions)
    _write_json(out / "preprocessor_config.json", image_processor_config(tiny.image_size))
    _write_json(out / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": tiny.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    })
    (out / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE, encoding="utf-8")
    # Written last: its presence (with the current format) marks a complete build.
    _write_json(out / BUILD_INFO, {"format": TINY_FORMAT, "seed": seed})
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
