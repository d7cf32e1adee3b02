"""Chat templates by name, written as Jinja chat templates that transformers renders.

Being ordinary chat templates, the same strings can be stored as `tokenizer.chat_template` of an
exported checkpoint, so inference tools format prompts exactly as training did. The assistant part
of every turn sits in a `{% generation %}` block (what transformers' assistant-token masks read).

Span finding (prompt.py) relies on one property only, checked at run time for every template
including a tokenizer's own: rendering a conversation prefix is a string prefix of rendering the
whole conversation, and `render(turns[:k], add_generation_prompt=True)` ends where the assistant's
text of turn k begins.
"""
from __future__ import annotations

from dataclasses import dataclass

# LLaVA's conv_llava_llama_2 (the TGA reference's template for Mistral-7B-Instruct).
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
# LLaVA-1.5's conv_vicuna_v1.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_SYSTEM_OVERRIDE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
)
_BAD_ROLE = "{{- raise_exception('roles must be user/assistant, alternating, user first') -}}"

# `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>`
_LLAMA2 = (
    "{%- set system = '" + LLAMA2_SYSTEM + "' -%}" + _SYSTEM_OVERRIDE
    + "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + message['content'] + ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
)

# `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`
_VICUNA_V1 = (
    "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}" + _SYSTEM_OVERRIDE
    + "{{- bos_token + system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT:' -}}"
    "{%- generation -%}{{- ' ' + message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# LLaVA stage 1: `<image>{caption}\n`, no system prompt, no end-of-sequence token.
_PLAIN = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '\\n' -}}{%- endgeneration -%}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str | None  # Jinja; None = the tokenizer's own `chat_template`
    keeps_question: bool = True  # False for plain: LLaVA stage 1 shows the image alone
    needs_eos: bool = True  # the template writes eos_token as its end of turn


TEMPLATES: dict[str, ChatTemplate] = {
    "llama2": ChatTemplate("llama2", _LLAMA2),
    "vicuna_v1": ChatTemplate("vicuna_v1", _VICUNA_V1),
    "plain": ChatTemplate("plain", _PLAIN, keeps_question=False, needs_eos=False),
    "tokenizer": ChatTemplate("tokenizer", None, needs_eos=False),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template '{name}'; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def template_source(template: ChatTemplate, tokenizer) -> str:
    """The Jinja text to render with (and to store as `chat_template` when exporting)."""
    if template.source is not None:
        if template.needs_eos and not tokenizer.eos_token:
            raise ValueError(f"chat template '{template.name}' ends turns with eos_token, "
                             f"but the tokenizer has none")
        return template.source
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat template 'tokenizer' needs a tokenizer with a chat_template; "
                         f"pick one of {', '.join(n for n in TEMPLATES if n != 'tokenizer')}")
    return tokenizer.chat_template


def render(tokenizer, template: ChatTemplate, conversations: list[list[dict]], *,
           add_generation_prompt: bool = False) -> list[str]:
    """Render several conversations (lists of {role, content}) in one call; strings, untokenized."""
    return tokenizer.apply_chat_template(
        conversations, chat_template=template_source(template, tokenizer), tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
