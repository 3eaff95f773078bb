"""Model loading: llava-hf folders, original LLaVA folders, the bundled `shapes` model
(the embedded default, trained by train/train.py) and the random-init `tiny` test model.

Every loader returns one `LoadedModel`: a float32 `LlavaForConditionalGeneration` in
eval mode plus the tokenizer, preprocessing facts, chat template and special ids the
export needs. Original LLaVA checkpoints (liuhaotian/llava-v1.5-*) are mapped onto
the transformers classes here, without the `llava` package.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from tokenizers import AddedToken, Tokenizer
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from sparsezip_deploy.runtime.manifest import ImageConfig

from .errors import ExportError
from .model_files import (check_weight_files, field, iter_tensors, pickle_refused, read_json, read_json_if_exists,
                          read_text, sha256_files, weight_files)
from .tiny import BUILD_INFO, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PIL_BICUBIC, TINY_FORMAT, build_tiny
from .tokenizer import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, bos_post_processor

DEFAULT_CACHE_DIR = Path("~/.cache/sparsezip-deploy")
# The embedded default: a small LLaVA trained on generated scenes (train/train.py), in
# llava-hf layout, shipped as package data.
SHAPES_MODEL = Path(__file__).resolve().parent / "shapes_model"
TINY_SEED = 0
# llava-hf padded the LLM vocabulary to a multiple of 64 after adding <image>, for
# tensor-core friendly shapes; original checkpoints are padded the same way here.
# (llava-hf filled the new rows with samples near the mean embedding; here they are
# zero, so the added ids get logit exactly 0 and are easy to recognise.)
VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class LoadedModel:
    model: LlavaForConditionalGeneration
    tokenizer: Tokenizer
    image: ImageConfig
    chat_template: str
    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    # kind ("llava-hf" | "llava-original" | "shapes" | "tiny"), path, name, weights_sha256
    # (+ vision_tower for original LLaVA).
    source: dict[str, Any]


def load_model(spec: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """`spec`: "shapes", "tiny", a llava-hf folder or an original LLaVA folder.

    `vision_tower`: a local CLIP folder, for original LLaVA folders only.
    `cache_dir`: where the tiny model is built (`<cache_dir>/tiny-seed0`).
    """
    if str(spec) == "tiny":
        if vision_tower is not None:
            raise ExportError("--vision-tower does not apply to the tiny model")
        return _load_llava_hf(ensure_tiny(cache_dir), kind="tiny")
    if str(spec) == "shapes":
        if vision_tower is not None:
            raise ExportError("--vision-tower does not apply to the shapes model")
        if not (SHAPES_MODEL / "config.json").is_file():
            raise ExportError(f"the bundled shapes model is missing ({SHAPES_MODEL}): reinstall the package")
        return _load_llava_hf(SHAPES_MODEL, kind="shapes")
    folder = Path(spec).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"model folder {folder} is a file, not a folder "
                          "(expected a llava-hf folder, an original LLaVA folder, 'shapes' or 'tiny')")
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist "
                          "(expected a llava-hf folder, an original LLaVA folder, 'shapes' or 'tiny')")
    config = read_json(folder / "config.json", f"{folder} has no config.json: not a model folder")
    kind = detect_kind(config, folder)
    if kind == "llava-original":
        return _load_original(folder, config, vision_tower)
    if vision_tower is not None:
        raise ExportError(f"--vision-tower applies to original LLaVA folders only; "
                          f"{folder} is a llava-hf folder with its own vision tower")
    return _load_llava_hf(folder, kind="llava-hf")


def detect_kind(config: dict[str, Any], folder: Path) -> str:
    architectures = field(config, "architectures", list, folder / "config.json") or []
    if not all(isinstance(name, str) for name in architectures):
        raise ExportError(f"{folder}/config.json: architectures must be a list of class names, "
                          f"got {architectures!r}")
    # Checked first: liuhaotian's llava-v1.5 configs say model_type "llava" too.
    if "LlavaLlamaForCausalLM" in architectures or "mm_vision_tower" in config:
        return "llava-original"
    if field(config, "model_type", str, folder / "config.json") == "llava":
        return "llava-hf"
    raise ExportError(
        f"{folder}/config.json is model_type {config.get('model_type')!r}, architectures "
        f"{architectures}: not a LLaVA-1.5 model (expected model_type 'llava' or LlavaLlamaForCausalLM)")


def ensure_tiny(cache_dir: str | os.PathLike | None = None, seed: int = TINY_SEED) -> Path:
    """The tiny model folder, built on first use; a partial build never looks complete."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    folder = root / f"tiny-seed{seed}"
    if _tiny_complete(folder, seed):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tiny-seed{seed}-", dir=root))
    except OSError as error:
        raise ExportError(f"cannot build the tiny model in {root}: {error.strerror}") from None
    try:
        build_tiny(staging, seed=seed)
        # Another process may have finished first: keep its folder, it has the same bytes.
        if not _tiny_complete(folder, seed):
            shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(staging, folder)
            except OSError:
                if not _tiny_complete(folder, seed):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _tiny_complete(folder: Path, seed: int) -> bool:
    try:
        info = json.loads((folder / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info == {"format": TINY_FORMAT, "seed": seed}


# ---------------------------------------------------------------- llava-hf


def _load_llava_hf(folder: Path, kind: str) -> LoadedModel:
    path = folder / "config.json"
    raw = read_json(path, f"{folder} has no config.json")
    vision = field(raw, "vision_config", dict, path) or {}
    text = field(raw, "text_config", dict, path) or {}
    _check_llava15(vision.get("model_type", "clip_vision_model"), text.get("model_type", "llama"),
                   raw.get("vision_feature_layer", -2), folder)
    try:
        config = LlavaConfig.from_pretrained(folder, local_files_only=True)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ExportError(f"{path}: invalid settings: {error}") from None
    check_weight_files(weight_files(folder))
    model, info = _from_pretrained(folder, config)
    bad = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(
        str(key) for key in info["mismatched_keys"])
    if bad:
        raise ExportError(f"{folder}: weights do not match the config ({len(bad)} keys, "
                          f"e.g. {', '.join(bad[:3])})")
    model.eval()
    config = model.config

    tokenizer = _read_tokenizer_json(folder)
    image_token_id = config.image_token_id
    if tokenizer.id_to_token(image_token_id) != IMAGE_TOKEN:
        raise ExportError(f"{folder}: config image_token_index {image_token_id} is "
                          f"{tokenizer.id_to_token(image_token_id)!r} in tokenizer.json, not {IMAGE_TOKEN}")
    bos, eos, pad = _special_ids(folder, tokenizer, config.text_config)

    processor, processor_path = _image_processor_config(folder)
    image = _image_preprocess(processor, config.vision_config.image_size,
                              pad_to_square=bool(processor.get("do_pad", False)), path=processor_path)
    return LoadedModel(
        model=model, tokenizer=tokenizer, image=image, chat_template=_chat_template(folder),
        image_token_id=image_token_id, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        source={"kind": kind, "path": str(folder.resolve()),
                "name": kind if kind in ("tiny", "shapes") else folder.name,
                "weights_sha256": sha256_files(weight_files(folder))},
    )


def _from_pretrained(folder: Path, config: LlavaConfig) -> tuple[LlavaForConditionalGeneration, dict]:
    # Mismatched shapes are reported by the caller, as one line, instead of transformers'
    # multi-line load report and its RuntimeError.
    chatter = logging.getLogger("transformers")
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        return LlavaForConditionalGeneration.from_pretrained(
            folder, config=config, dtype=torch.float32, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except pickle.UnpicklingError as error:
        raise ExportError(pickle_refused(folder, error)) from None
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise ExportError(f"{folder}: cannot load the weights: {error}") from None
    finally:
        chatter.setLevel(level)


def _image_processor_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The image processor settings and the file they come from."""
    if (folder / "preprocessor_config.json").is_file():
        return read_json(folder / "preprocessor_config.json", ""), folder / "preprocessor_config.json"
    # transformers v5 save_pretrained nests the image processor in processor_config.json.
    path = folder / "processor_config.json"
    nested = field(read_json_if_exists(path), "image_processor", dict, path)
    if nested is None:
        raise ExportError(f"{folder} has no preprocessor_config.json")
    return nested, path


def _chat_template(folder: Path) -> str:
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = read_json_if_exists(folder / name).get("chat_template")
        if isinstance(template, str):
            return template
    # llava-hf uploads older than processor chat templates: they all use this format.
    return LLAVA_CHAT_TEMPLATE


# ---------------------------------------------------------------- original LLaVA

_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "attention_bias",
                 "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# original name prefix -> LlavaForConditionalGeneration (transformers v5) prefix
_LLAVA_KEYS = (
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("lm_head.", "lm_head."),
)
_PADDED_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def _load_original(folder: Path, config: dict[str, Any],
                   vision_tower: str | os.PathLike | None) -> LoadedModel:
    feature = _check_original_config(folder, config)
    vision_dir = _vision_tower_folder(folder, config, vision_tower)
    vision_config = _clip_vision_config(vision_dir)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ExportError(f"{folder}: mm_hidden_size {config['mm_hidden_size']} does not match the "
                          f"vision tower {vision_dir} (hidden_size {vision_config.hidden_size})")
    select_layer = config.get("mm_vision_select_layer", -2)
    _check_llava15(vision_config.model_type, "llama", select_layer, folder)

    vocab_size = config["vocab_size"]
    tokenizer = _original_tokenizer(folder, vocab_size)
    image_token_id = vocab_size
    padded_vocab = -(-(vocab_size + 1) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    llama = {key: config[key] for key in _LLAMA_FIELDS if key in config}
    llama.update(vocab_size=padded_vocab, tie_word_embeddings=False)
    try:
        text_config = LlamaConfig(**llama)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ExportError(f"{folder}: invalid Llama settings in config.json: {error}") from None
    bos, eos, pad = _special_ids(folder, tokenizer, text_config)
    text_config.pad_token_id = pad
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=patches + (feature == "cls_patch"), projector_hidden_act="gelu",
        vision_feature_layer=select_layer, vision_feature_select_strategy=_SELECT_FEATURE[feature],
        tie_word_embeddings=False, pad_token_id=pad,
    )
    # Every parameter is overwritten below (and missing ones are an error), so skip
    # the random init: it would cost minutes on a 7B model.
    with no_init_weights():
        model = LlavaForConditionalGeneration(llava_config)
    llava_files, clip_files = weight_files(folder), weight_files(vision_dir)
    _load_original_weights(model, llava_files, clip_files, folder)
    model.eval()

    processor = read_json_if_exists(vision_dir / "preprocessor_config.json")
    image = _image_preprocess(processor, vision_config.image_size,
                              pad_to_square=config.get("image_aspect_ratio") == "pad",
                              path=vision_dir / "preprocessor_config.json")
    return LoadedModel(
        model=model, tokenizer=tokenizer, image=image, chat_template=LLAVA_CHAT_TEMPLATE,
        image_token_id=image_token_id, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        source={"kind": "llava-original", "path": str(folder.resolve()), "name": folder.name,
                "vision_tower": str(vision_dir.resolve()),
                # LLaVA weight files, then the vision tower's, each in sorted name order.
                "weights_sha256": sha256_files(llava_files + clip_files)},
    )


def _check_original_config(folder: Path, config: dict[str, Any]) -> str:
    """Reject what is not LLaVA-1.5 (Llama LLM, MLP projector, one image tile); returns
    mm_vision_select_feature."""
    architectures = config.get("architectures") or ["LlavaLlamaForCausalLM"]
    if "LlavaLlamaForCausalLM" not in architectures:
        raise ExportError(f"{folder}: architectures {architectures} are not supported "
                          "(LlavaLlamaForCausalLM only: a Llama / Vicuna LLM)")
    if not isinstance(config.get("vocab_size"), int):
        raise ExportError(f"{folder}/config.json has no vocab_size")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ExportError(f"{folder}: mm_projector_type {projector!r} is not supported "
                          "(LLaVA-1.5 uses mlp2x_gelu)")
    if config.get("image_aspect_ratio") == "anyres" or config.get("mm_patch_merge_type", "flat") != "flat":
        raise ExportError(f"{folder}: anyres / patch-merge models (LLaVA-1.6) are not supported")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ExportError(f"{folder}: mm_use_im_start_end / mm_use_im_patch_token are not supported")
    if config.get("rope_scaling"):
        raise ExportError(f"{folder}: rope_scaling {config['rope_scaling']} is not supported")
    feature = config.get("mm_vision_select_feature", "patch")
    if not isinstance(feature, str) or feature not in _SELECT_FEATURE:
        raise ExportError(f"{folder}: mm_vision_select_feature {feature!r} is not supported "
                          f"({' or '.join(_SELECT_FEATURE)})")
    return feature


def _vision_tower_folder(folder: Path, config: dict[str, Any],
                         vision_tower: str | os.PathLike | None) -> Path:
    if vision_tower is not None:
        vision_dir = Path(vision_tower).expanduser()
        if not vision_dir.is_dir():
            raise ExportError(f"vision tower folder {vision_dir} does not exist")
        return vision_dir
    named = field(config, "mm_vision_tower", str, folder / "config.json")
    if named and Path(named).expanduser().is_dir():
        return Path(named).expanduser()
    raise ExportError(f"{folder} names vision tower {named!r}, which is not a local folder: "
                      "pass --vision-tower DIR with a local copy of that CLIP model")


def _clip_vision_config(vision_dir: Path) -> CLIPVisionConfig:
    raw = read_json(vision_dir / "config.json", f"vision tower {vision_dir} has no config.json")
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise ExportError(f"vision tower {vision_dir} is model_type {raw.get('model_type')!r}; "
                          "only CLIP is supported")
    # Reads the vision half of a full CLIPConfig as well.
    try:
        return CLIPVisionConfig.from_pretrained(vision_dir, local_files_only=True)
    except (StrictDataclassError, TypeError, ValueError) as error:
        raise ExportError(f"vision tower {vision_dir}/config.json: invalid settings: {error}") from None


def _original_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        tokenizer = _read_tokenizer_json(folder)
    elif (folder / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise ExportError(f"{folder} has tokenizer.model but no tokenizer.json: install sentencepiece "
                              "to convert it, or copy in the tokenizer.json of its base LLM "
                              "(e.g. vicuna-7b-v1.5)")
        from transformers import LlamaTokenizer

        tokenizer = LlamaTokenizer.from_pretrained(folder).backend_tokenizer
    else:
        raise ExportError(f"{folder} has neither tokenizer.json nor tokenizer.model")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise ExportError(f"{folder}: the tokenizer has {size} tokens but config vocab_size is {vocab_size}")
    # Original LLaVA marks the image position with id -200 in code; the exported prompt
    # needs a real token, so <image> takes the first free id as in llava-hf (32000).
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    bos = _token_name(_tokenizer_settings(folder).get("bos_token"), "bos_token", folder) or "<s>"
    if tokenizer.token_to_id(bos) is None:
        raise ExportError(f"{folder}: bos token {bos!r} is not in the tokenizer")
    # LLaVA-1.5 prompts start with <s> (add_bos_token), whatever tokenizer.json says.
    tokenizer.post_processor = bos_post_processor(bos, tokenizer.token_to_id(bos))
    return tokenizer


def _load_original_weights(model: LlavaForConditionalGeneration, llava_files: list[Path],
                           clip_files: list[Path], folder: Path) -> None:
    """Copy tensor by tensor (one shard in memory at a time); strict on names and shapes."""
    params = model.state_dict()
    loaded: set[str] = set()
    unexpected: list[str] = []

    def put(name: str, target: str, tensor: torch.Tensor) -> None:
        if target not in params:
            unexpected.append(name)
            return
        dest = params[target]
        if target in _PADDED_ROWS and tensor.shape[1:] == dest.shape[1:] and tensor.shape[0] < dest.shape[0]:
            # Rows for <image> and the padding: zero (see VOCAB_PAD_MULTIPLE). The
            # <image> embedding row is never read: image features replace it.
            dest[tensor.shape[0]:].zero_()
            dest = dest[:tensor.shape[0]]
        if tensor.shape != dest.shape:
            raise ExportError(f"{folder}: {name} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.add(target)

    with torch.no_grad():
        for name, tensor in iter_tensors(llava_files):
            # The llava package reloads the (frozen) vision tower from mm_vision_tower
            # after loading, so copies inside the checkpoint are never used; rotary
            # inv_freq is a recomputed buffer that old Llama checkpoints still carry.
            if name.startswith("model.vision_tower.") or name.endswith("rotary_emb.inv_freq"):
                continue
            put(name, _rename(name, _LLAVA_KEYS), tensor)
        for name, tensor in iter_tensors(clip_files):
            target = _clip_key(name)
            if target is not None:
                put(name, "model.vision_tower." + target, tensor)

    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
        ) if part)
        raise ExportError(f"{folder}: weights do not match an LLaVA-1.5 model: {detail}")


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _clip_key(name: str) -> str | None:
    """A CLIP checkpoint key -> CLIPVisionModel (v5) key; None for what LLaVA does not use."""
    if name.endswith("position_ids"):
        return None  # a buffer older transformers saved
    if name.startswith("vision_model."):
        return name[len("vision_model."):]
    if name.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale")):
        return None  # the text half of a full CLIPModel checkpoint
    return name


# ---------------------------------------------------------------- shared helpers


def _check_llava15(vision_type: str, text_type: str, feature_layer: Any, folder: Path) -> None:
    if vision_type not in ("clip_vision_model", "clip"):
        raise ExportError(f"{folder}: vision tower {vision_type!r} is not supported (CLIP only)")
    if text_type != "llama":
        raise ExportError(f"{folder}: LLM {text_type!r} is not supported (Llama / Vicuna only)")
    if not isinstance(feature_layer, int):
        raise ExportError(f"{folder}: vision feature layer {feature_layer!r} must be a single layer")


def _image_preprocess(processor: dict[str, Any], vision_image_size: int, *,
                      pad_to_square: bool, path: Path) -> ImageConfig:
    """From a CLIPImageProcessor config (read from `path`); an empty dict gives the OpenAI CLIP defaults."""
    try:
        return _image_config(processor, vision_image_size, pad_to_square, path)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a field of the wrong type
        raise ExportError(f"{path}: invalid image processor settings (size {processor.get('size')!r}, "
                          f"crop_size {processor.get('crop_size')!r}, image_mean "
                          f"{processor.get('image_mean')!r}, image_std {processor.get('image_std')!r}): "
                          f"{type(error).__name__}: {error}") from None


def _image_config(processor: dict[str, Any], vision_image_size: int, pad_to_square: bool,
                  path: Path) -> ImageConfig:
    size = processor.get("size", {"shortest_edge": vision_image_size})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    square = size.get("height") if size.get("height") == size.get("width") else None
    shortest = size.get("shortest_edge") or square
    crop = processor.get("crop_size", vision_image_size)
    if isinstance(crop, dict):
        crop = crop["height"] if crop.get("height") == crop.get("width") else None
    do_center_crop = bool(processor.get("do_center_crop", True))
    image_size = crop if do_center_crop else shortest
    if shortest is None or image_size is None:
        raise ExportError(f"{path}: only square crops / resizes are supported "
                          f"(size {processor.get('size')}, crop_size {processor.get('crop_size')})")
    if image_size != vision_image_size:
        raise ExportError(f"{path}: preprocessing gives {image_size}px images but the vision tower "
                          f"expects {vision_image_size}px")
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    mean, std = (0.0,) * 3, (1.0,) * 3
    if processor.get("do_normalize", True):
        mean = tuple(float(v) for v in processor.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(v) for v in processor.get("image_std", OPENAI_CLIP_STD))
    return ImageConfig(
        crop_height=int(image_size), crop_width=int(image_size), shortest_edge=int(shortest),
        resample=int(processor.get("resample", PIL_BICUBIC)), rescale_factor=rescale,
        mean=mean, std=std, do_center_crop=do_center_crop, pad_to_square=pad_to_square,
    )


def _special_ids(folder: Path, tokenizer: Tokenizer, text_config: LlamaConfig) -> tuple[int, int, int]:
    """(bos, eos, pad) from the tokenizer files, else from the LLM config."""
    settings = _tokenizer_settings(folder)

    def lookup(key: str, fallback: int | None) -> int | None:
        name = _token_name(settings.get(key), key, folder)
        found = tokenizer.token_to_id(name) if name else None
        return found if found is not None else fallback

    bos = lookup("bos_token", text_config.bos_token_id)
    eos = lookup("eos_token", text_config.eos_token_id)
    # LLaVA-1.5 trains with pad = unk when the tokenizer has no pad token.
    pad = lookup("pad_token", text_config.pad_token_id)
    pad = pad if pad is not None else lookup("unk_token", tokenizer.token_to_id("<unk>"))
    if not all(isinstance(value, int) for value in (bos, eos, pad)):
        raise ExportError(f"{folder}: cannot tell the bos / eos / pad token ids (got {bos}, {eos}, {pad})")
    return bos, eos, pad


def _tokenizer_settings(folder: Path) -> dict[str, Any]:
    settings = read_json_if_exists(folder / "special_tokens_map.json")
    settings.update(read_json_if_exists(folder / "tokenizer_config.json"))
    return settings


def _token_name(value: Any, key: str, folder: Path) -> str | None:
    name = value.get("content") if isinstance(value, dict) else value
    if name is not None and not isinstance(name, str):
        raise ExportError(f"{folder}: {key} in tokenizer_config.json / special_tokens_map.json must be a "
                          f"token string, got {value!r}")
    return name


def _read_tokenizer_json(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises bare Exceptions
        raise ExportError(f"{path} is not a valid tokenizer: {error}") from None
