"""The training script on a tiny scale: it runs, it is reproducible, and it trains what is deployed."""
from __future__ import annotations

import json

import torch

from sparsezip_deploy.export.models import load_model
from sparsezip_deploy.export.prompt import prompt_formats
from sparsezip_deploy.export.tokenizer import BOS, EOS, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer
from sparsezip_deploy.scenes.questions import heldout
from sparsezip_deploy.train.data import IGNORE, Prompter
from sparsezip_deploy.train.train import TRAINING_INFO, TrainConfig, feature_layer_states, main, train

SMOKE = TrainConfig(vision_steps=1, align_steps=1, steps=2, batch=2, ground_layer=0, route_layer=0, warmup=1,
                    sparse_steps=1, eval_every=1, eval_per_type=1, heldout_per_type=1, align_eval_per_type=1,
                    group_layer=0, count_layer=1, vision_guide_heads=1, vision_hidden=32, vision_heads=2,
                    vision_layers=3, vision_mlp=64, llm_hidden=32, llm_heads=2, llm_kv_heads=1, llm_layers=1,
                    llm_mlp=64)


def test_two_steps_write_a_loadable_reproducible_model(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    train(SMOKE, first, log=lambda line: None)
    train(SMOKE, second, log=lambda line: None)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    info = json.loads((first / TRAINING_INFO).read_text())
    assert info["config"]["steps"] == 2 and 0 <= info["heldout_accuracy"]["all"] <= 1
    loaded = load_model(first)  # the llava-hf loader the export uses, unchanged
    assert loaded.model.config.vision_config.image_size == 336 and loaded.model.config.vision_feature_layer == -2

    # The features training feeds the LLM are the ones LLaVA (and so the export) computes.
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ours = loaded.model.model.multi_modal_projector(feature_layer_states(loaded.model, pixels)[:, 1:])
        theirs = loaded.model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, torch.stack(list(theirs)).reshape(ours.shape))


def test_cli_defaults_come_from_the_config(tmp_path, capsys):
    def option(name: str, value) -> str:
        flag = name.replace("_", "-")
        return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag}={value}"

    options = [option(name, value) for name, value in vars(SMOKE).items()]
    assert main(["--out", str(tmp_path / "m"), *options]) == 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_first_turn_is_the_deployed_prompt_and_only_answers_are_targets():
    tokenizer = build_tokenizer()
    formats = prompt_formats(LLAVA_CHAT_TEMPLATE, IMAGE_TOKEN, BOS, EOS)
    prompter = Prompter(tokenizer, formats["first_turn"], formats["next_turn"])
    questions = [e.question for e in heldout(per_type=1)][:3]
    tokens, targets = prompter.conversation(questions)
    deployed = tokenizer.encode(formats["first_turn"].replace("{prompt}", questions[0].text)).ids
    image = deployed.index(prompter.image_id)
    assert prompter.before == deployed[:image] and tokens[: len(deployed) - image - 1] == deployed[image + 1:]
    answers = [t for t in targets if t != IGNORE]
    expected = []
    for q in questions:
        expected += prompter.answer_ids(q.answer) + [prompter.eos_id]
    assert answers == expected and prompter.eos_id not in tokens
    # The first answer is predicted from the last prompt token, as greedy decoding does.
    assert targets[len(deployed) - image - 2] == prompter.answer_ids(questions[0].answer)[0]
