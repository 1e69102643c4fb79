"""Prompts through a tokenizer's chat template, for training data and for sampling alike.

A chat template may refuse messages (jinja's `raise_exception`: Gemma's "System role not supported", roles
that do not alternate user / assistant): `TemplateRefused` carries its message, so that the data pipeline
names the row (a bad row) and `copg generate` the prompt, instead of a traceback from inside jinja.
"""

from __future__ import annotations

import jinja2


class TemplateRefused(ValueError):
    """The tokenizer's chat template raised on these messages."""


def prompt_text(tokenizer, prompt: str | list[dict], chat_template: bool) -> tuple[str, bool]:
    """(the text to tokenise, whether it went through the chat template) of a prompt: a message list (or,
    with `chat_template`, a string as one user message) is rendered with the generation prompt; a string is
    itself.

    Raises:
      TemplateRefused: the chat template refuses the messages (its own message quoted).
    """
    if not (isinstance(prompt, list) or chat_template):
        return prompt, False
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    except jinja2.TemplateError as e:
        raise TemplateRefused(f"the tokenizer's chat template refuses the prompt: {e}") from None
