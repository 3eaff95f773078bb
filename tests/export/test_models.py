"""Loaders, the project tokenizer and the tiny model: all against transformers itself."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from sparsezip_deploy.export.errors import ExportError
from sparsezip_deploy.export.models import LoadedModel, load_model
from sparsezip_deploy.export.tiny import BUILD_INFO, build_tiny, image_processor_config
from sparsezip_deploy.export.tokenizer import build_tokenizer

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
IMAGE_ID, PAD_ID, VOCAB = 1022, 1023, 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def special_ids(loaded: LoadedModel) -> tuple[int, int, int, int]:
    return loaded.image_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", [
    "What colour is the circle?",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttabbed",
    "Is there a small red star at the top left? Yes, 3 of them!",
    "",
    "x",
])
def test_tokenizer_round_trip(text):
    tokenizer = build_tokenizer()
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == 1  # <s>, Llama's add_bos_token
    assert tokenizer.decode(encoding.ids) == text


def test_tokenizer_special_tokens():
    tokenizer = build_tokenizer()
    assert tokenizer.get_vocab_size() == VOCAB
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")] == [
        0, 1, 2, IMAGE_ID, PAD_ID]
    assert tokenizer.token_to_id("<0x0A>") == 3 + 0x0A
    ids = tokenizer.encode(PROMPT).ids
    assert ids.count(IMAGE_ID) == 1
    # Runs of image tokens stay runs: nothing is inserted between them.
    ids = tokenizer.encode("USER: <image><image><image>\nHi").ids
    start = ids.index(IMAGE_ID)
    assert ids[start:start + 3] == [IMAGE_ID] * 3 and ids.count(IMAGE_ID) == 3
    # The scene vocabulary is in whole words.
    assert len(tokenizer.encode("What colour is the circle?", add_special_tokens=False).ids) == 6


def test_tokenizer_is_deterministic(tiny_dir):
    text = build_tokenizer().to_str(pretty=True)
    assert text == build_tokenizer().to_str(pretty=True)
    assert (tiny_dir / "tokenizer.json").read_text(encoding="utf-8") == text


def test_tokenizer_files_load_in_transformers(tiny_dir, tiny):
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, PAD_ID)
    assert hf(PROMPT).input_ids == tiny.tokenizer.encode(PROMPT).ids


# ---------------------------------------------------------------- tiny model


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert sha256(again / "model.safetensors") == sha256(tiny_dir / "model.safetensors")
    other = build_tiny(tmp_path / "other", seed=1)
    assert sha256(other / "model.safetensors") != sha256(tiny_dir / "model.safetensors")


def test_tiny_geometry(tiny):
    config = tiny.model.config
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_attention_heads,
            vision.num_hidden_layers, vision.intermediate_size) == (336, 14, 64, 4, 4, 128)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.num_hidden_layers, text.intermediate_size, text.vocab_size) == (64, 4, 2, 2, 128, VOCAB)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_token_id == IMAGE_ID and config.image_seq_length == 576
    assert config.projector_hidden_act == "gelu"
    assert not config.tie_word_embeddings
    assert tiny.model.lm_head.weight.data_ptr() != tiny.model.get_input_embeddings().weight.data_ptr()
    assert tiny.model.dtype == torch.float32 and not tiny.model.training


def test_llava_hf_loader(tiny_dir, tiny):
    assert tiny.source == {"kind": "llava-hf", "path": str(tiny_dir.resolve()), "name": tiny_dir.name,
                           "weights_sha256": sha256(tiny_dir / "model.safetensors")}
    assert special_ids(tiny) == (IMAGE_ID, 1, 2, PAD_ID)
    image = tiny.image
    assert (image.crop_height, image.crop_width, image.shortest_edge, image.resample) == (336, 336, 336, 3)
    assert image.do_center_crop and not image.pad_to_square
    assert image.rescale_factor == pytest.approx(1 / 255)
    assert image.mean == (0.48145466, 0.4578275, 0.40821073)
    assert image.std == (0.26862954, 0.26130258, 0.27577711)
    # Plain jinja2, as the torch-free runtime will render it.
    rendered = jinja2.Template(tiny.chat_template).render(
        messages=[{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "What colour is the circle?"}]}],
        add_generation_prompt=True)
    assert rendered == PROMPT


def test_auto_processor_and_generate(tiny_dir, tiny):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT
    inputs = processor(images=Image.new("RGB", (400, 300), (200, 40, 40)), text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 576
    with torch.no_grad():
        out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_load_model_tiny_is_cached(tmp_path, tiny_dir):
    loaded = load_model("tiny", cache_dir=tmp_path)
    folder = tmp_path / "tiny-seed0"
    assert loaded.source["kind"] == "tiny" and loaded.source["path"] == str(folder.resolve())
    assert sha256(folder / "model.safetensors") == sha256(tiny_dir / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-seed0"]  # no staging folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_model("tiny", cache_dir=tmp_path)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # Without its completion marker, the folder is an interrupted build: rebuilt.
    (folder / BUILD_INFO).unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    load_model("tiny", cache_dir=tmp_path)
    assert sha256(folder / "model.safetensors") == sha256(tiny_dir / "model.safetensors")


# ---------------------------------------------------------------- original LLaVA


def write_original_llava(tiny: LoadedModel, folder: Path, vision_tower: str, sharded: bool) -> None:
    """The tiny model in liuhaotian/llava-v1.5-7b layout: original key names, no <image> in the vocabulary."""
    folder.mkdir(parents=True)
    text = tiny.model.config.text_config
    weights = {}
    for name, tensor in tiny.model.state_dict().items():
        for new, old in (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.",
                         "model.mm_projector.0."), ("model.multi_modal_projector.linear_2.",
                         "model.mm_projector.2."), ("lm_head.", "lm_head.")):
            if name.startswith(new):
                weights[old + name[len(new):]] = tensor.clone()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:IMAGE_ID].clone()
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "vocab_size": IMAGE_ID, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "image_aspect_ratio": "pad", "mm_hidden_size": tiny.model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": vision_tower,
    }
    (folder / "config.json").write_text(json.dumps(config))
    if sharded:
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({key: weights[key] for key in keys}, str(folder / file), metadata={"format": "pt"})
        index = {"weight_map": {key: file for file, keys in shards.items() for key in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        # What old checkpoints also carry: a rotary buffer and a copy of the vision tower.
        weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        weights["model.vision_tower.vision_tower.vision_model.post_layernorm.bias"] = torch.ones(4)
        torch.save(weights, folder / "pytorch_model.bin")
    # The Vicuna tokenizer: the project tokenizer minus <image> and <pad>.
    tokenizer = json.loads(tiny.tokenizer.to_str())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < IMAGE_ID]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
         "add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}))


def write_clip_vision_v4(tiny: LoadedModel, folder: Path) -> None:
    """A CLIPVisionModel folder as older transformers saved it: `vision_model.` keys, .bin."""
    folder.mkdir(parents=True)
    state = {"vision_model." + k: v.clone() for k, v in tiny.model.model.vision_tower.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(tiny.model.config.vision_config.to_json_string())
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor_config(336)))


def write_clip_full(tiny: LoadedModel, folder: Path) -> None:
    """A full CLIPModel folder (vision + text), like openai/clip-vit-large-patch14-336."""
    vision = tiny.model.config.vision_config
    clip = CLIPModel(CLIPConfig(
        vision_config=vision.to_dict(), projection_dim=32,
        text_config={"hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2}))
    clip.vision_model.load_state_dict(tiny.model.model.vision_tower.state_dict())
    clip.save_pretrained(folder)


@pytest.fixture(scope="session")
def original(tmp_path_factory, tiny):
    """variant -> (llava folder, vision_tower argument)."""
    root = tmp_path_factory.mktemp("original")
    write_clip_vision_v4(tiny, root / "clip-vision-v4")
    write_clip_full(tiny, root / "clip-full")
    write_original_llava(tiny, root / "llava-bin", "openai/clip-vit-large-patch14-336", sharded=False)
    write_original_llava(tiny, root / "llava-sharded", str(root / "clip-full"), sharded=True)
    return {"bin": (root / "llava-bin", root / "clip-vision-v4"),
            "sharded": (root / "llava-sharded", None)}


@pytest.mark.parametrize("variant", ["bin", "sharded"])
def test_original_loader_matches_source(original, tiny, variant):
    folder, vision_tower = original[variant]
    loaded = load_model(folder, vision_tower=vision_tower)
    assert loaded.source["kind"] == "llava-original" and loaded.source["name"] == folder.name
    assert special_ids(loaded) == (IMAGE_ID, 1, 2, 0)
    assert loaded.image.pad_to_square and loaded.image.crop_height == 336
    config = loaded.model.config
    assert config.text_config.vocab_size == VOCAB and config.image_seq_length == 576
    assert loaded.model.dtype == torch.float32 and not loaded.model.training

    ids = loaded.tokenizer.encode(PROMPT).ids
    assert ids == tiny.tokenizer.encode(PROMPT).ids
    at = ids.index(IMAGE_ID)
    input_ids = torch.tensor([ids[:at] + [IMAGE_ID] * 576 + ids[at + 1:]])
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.stack(tiny.model.model.get_image_features(pixel_values=pixels).pooler_output)
        got = torch.stack(loaded.model.model.get_image_features(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        want = tiny.model(input_ids=input_ids, pixel_values=pixels[:1]).logits
        got = loaded.model(input_ids=input_ids, pixel_values=pixels[:1]).logits
    torch.testing.assert_close(got[..., :IMAGE_ID], want[..., :IMAGE_ID], rtol=0, atol=0)
    assert not got[..., IMAGE_ID:].any()  # zero-padded lm_head rows


def clone_original(original, tmp_path) -> tuple[Path, Path]:
    folder, vision = original["bin"]
    shutil.copytree(folder, tmp_path / "llava")
    return tmp_path / "llava", vision


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_folders(tmp_path, tiny_dir):
    with pytest.raises(ExportError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ExportError, match="model_type 'bert'.*BertModel"):
        load_model(tmp_path / "bert")
    with pytest.raises(ExportError, match="--vision-tower applies to original LLaVA"):
        load_model(tiny_dir, vision_tower=tmp_path)


def test_bad_original_folders(original, tmp_path):
    folder, vision = clone_original(original, tmp_path)
    with pytest.raises(ExportError, match="not a local folder: pass --vision-tower DIR"):
        load_model(folder)
    edit_config(folder, mm_projector_type="linear")
    with pytest.raises(ExportError, match="mm_projector_type 'linear' is not supported"):
        load_model(folder, vision_tower=vision)
    edit_config(folder, mm_projector_type="mlp2x_gelu")

    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    weights["model.extra.weight"] = torch.zeros(1)
    del weights["model.norm.weight"]
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match=r"missing 1 \(e.g. model.language_model.norm.weight\); "
                                          r"unexpected 1 \(e.g. model.extra.weight\)"):
        load_model(folder, vision_tower=vision)


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None,
                    reason="sentencepiece is installed, so tokenizer.model would be converted")
def test_original_tokenizer_model_needs_sentencepiece(original, tmp_path):
    folder, vision = clone_original(original, tmp_path)
    (folder / "tokenizer.json").rename(folder / "tokenizer.model")
    with pytest.raises(ExportError, match="install sentencepiece"):
        load_model(folder, vision_tower=vision)
