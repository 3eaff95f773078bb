"""Turn the model's Jinja chat template into the two plain strings the runtime fills in.

The runtime has no Jinja: it substitutes the user's text for `{prompt}` in
`first_turn` (the image turn, generation prompt included) and, in a chat, in
`next_turn` (what the template puts after an assistant answer). Both are found
by rendering the template here around sentinel texts.
"""
from __future__ import annotations

from transformers.utils.chat_template_utils import render_jinja_template

from .errors import ExportError

PLACEHOLDER = "{prompt}"
_USER1, _ANSWER, _USER2 = "\u2460user-one\u2460", "\u2461answer\u2461", "\u2462user-two\u2462"


def _render(template: str, messages: list[dict], **tokens) -> str:
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **tokens)
    return rendered[0]


def prompt_formats(template: str, image_token: str, bos_token: str, eos_token: str) -> dict[str, str]:
    tokens = dict(bos_token=bos_token, eos_token=eos_token)
    user1 = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _USER1}]}
    first = _render(template, [user1], **tokens)
    both = _render(template, [user1, {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]},
                              {"role": "user", "content": [{"type": "text", "text": _USER2}]}], **tokens)
    if first.count(image_token) != 1 or _USER1 not in first or _ANSWER not in both or _USER2 not in both:
        raise ExportError("the chat template does not render one image and the user's text; "
                          "it cannot drive the runtime")
    if first.startswith(bos_token):
        first = first[len(bos_token):]  # the tokenizer adds BOS itself
    return {
        "first_turn": first.replace(_USER1, PLACEHOLDER),
        "next_turn": both[both.index(_ANSWER) + len(_ANSWER):].replace(_USER2, PLACEHOLDER),
        "image_token": image_token,
    }
