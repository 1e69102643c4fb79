"""Prompts through a tokenizer's chat template, for training data and for sampling alike.

A chat template may refuse messages (jinja's `raise_exception`: Gemma's "System role not supported", roles
that do not alternate user / assistant): `TemplateRefused` carries its message, so that the data pipeline
names the row (a bad row) and `copg generate` the prompt, instead of a traceback from inside jinja.

Templates take variables of their own (`data.chat_template_kwargs`): Qwen3's and SmolLM3's `enable_thinking`
(false renders an empty reasoning block after the generation prompt), Granite's `thinking`, `tools`. A
variable the template never reads would be ignored by jinja without a word, so `check_template_kwargs`
refuses it (a typo such as `enable_thinkng` would train every prompt in the other mode).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox

log = logging.getLogger(__name__)

# apply_chat_template's own arguments, which prompt_text sets or which are no template variable.
RESERVED_KWARGS = frozenset(
    {"conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize", "padding",
     "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
     "tokenizer_kwargs", "sanitize_control_tokens"}
)  # fmt: skip
# Arguments apply_chat_template takes by name: `chat_template` picks one of the tokenizer's named templates.
NAMED_KWARGS = frozenset({"tools", "documents", "chat_template"})


class TemplateRefused(ValueError):
    """The tokenizer's chat template raised on these messages."""


def prompt_text(
    tokenizer, prompt: str | list[dict], chat_template: bool, template_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, bool]:
    """(the text to tokenise, whether it went through the chat template) of a prompt: a message list (or,
    with `chat_template`, a string as one user message) is rendered with the generation prompt and the
    template's variables `template_kwargs`; a string is itself.

    Raises:
      TemplateRefused: the chat template refuses the messages (its own message quoted).
    """
    if not (isinstance(prompt, list) or chat_template):
        return prompt, False
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    except jinja2.TemplateError as e:
        raise TemplateRefused(f"the tokenizer's chat template refuses the prompt: {e}") from None
    return text, True


# Stands for the completion when a chat template is rendered to find the text around it: private-use
# characters, which no template writes (nor trims or splits).
PLACEHOLDER = "\ue000copg-completion\ue001"


def split_around(text: str, placeholder_text: str) -> tuple[str, str, str] | None:
    """(before, completion as rendered, after): `text`, a chat template's rendering with the completion, cut
    where the same rendering with `PLACEHOLDER` for the completion has the text around it; None where the
    template does not render the completion once, at one place."""
    parts = placeholder_text.split(PLACEHOLDER)
    if len(parts) == 2 and text.startswith(parts[0]) and text.endswith(parts[1]):
        before, after = parts
        if len(before) + len(after) <= len(text):
            return before, text[len(before) : len(text) - len(after)], after
    return None


def rendered_answers(
    tokenizer, prompt: str | list[dict], answers: list[str], template_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """Each of `answers` (completions of `prompt`, a message list or a string as one user message) as the
    chat template writes it as the assistant's answer, where that differs from it in leading and trailing
    whitespace only: Llama 3's and Gemma's templates trim an answer, so its chat never shows the space a
    logged completion starts with (HH's " Sure") or the newline it ends with. Every other answer is itself: a
    template that rewrites more (one that drops reasoning before </think>) is not followed, nor one that
    refuses the conversation or does not write the answer as one piece of text."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    kwargs = template_kwargs or {}

    def render(answer: str) -> str:
        return tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False, **kwargs
        )

    if all(a == a.strip() for a in answers):  # nothing a trim could change
        return list(answers)
    try:
        placeholder_text = render(PLACEHOLDER)
    except Exception:  # noqa: BLE001 - a template refusing the answered conversation: answers as they are
        return list(answers)
    out = []
    for answer in answers:
        written = answer
        if answer != answer.strip():
            try:
                span = split_around(render(answer), placeholder_text)
            except Exception:  # noqa: BLE001 - as above
                span = None
            if span is not None and span[1].strip() == answer.strip():
                written = span[1]
        out.append(written)
    return out


class _Generation(jinja2.ext.Extension):
    """Parses transformers' `{% generation %}...{% endgeneration %}` block (it marks the assistant's tokens)
    as its body, so that a template using it can be read."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def template_variables(template: str) -> frozenset[str]:
    """The variables chat template `template` reads from its caller (messages, add_generation_prompt, ...)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[_Generation, jinja2.ext.loopcontrols])
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


def refuse_reserved(template_kwargs: Mapping[str, Any], setting: str) -> None:
    """Refuses apply_chat_template's own arguments (RESERVED_KWARGS) given as template variables.

    Raises:
      ValueError: naming `setting`.key.
    """
    reserved = sorted(RESERVED_KWARGS & set(template_kwargs))
    if reserved:
        raise ValueError(f"{setting}.{reserved[0]}: set by copg itself, not a chat template variable")


def warn_untemplated(template_kwargs: Mapping[str, Any], setting: str) -> None:
    """Warns that the template variables `template_kwargs` (named `setting`) are set, where no prompt goes
    through the chat template (nothing renders them)."""
    if template_kwargs:
        log.warning("%s: set, but no prompt goes through the chat template (they are text)", setting)


def check_template_kwargs(tokenizer, template_kwargs: Mapping[str, Any], setting: str) -> None:
    """Refuses chat-template variables that the tokenizer's template would not read (module docstring).

    A template this module cannot parse (a filter only its own environment has) is warned of, not checked.

    Raises:
      ValueError: naming `setting`.key: one of apply_chat_template's own arguments (RESERVED_KWARGS), a
        variable the template never reads (with those it reads), or variables for a tokenizer without a chat
        template.
    """
    if not template_kwargs:
        return
    refuse_reserved(template_kwargs, setting)
    name = template_kwargs.get("chat_template")
    named = getattr(tokenizer, "chat_template", None)
    if isinstance(name, str) and "{" not in name and not (isinstance(named, dict) and name in named):
        # not a template's text: transformers would render the name itself as the template
        have = f"its named ones: {sorted(named)}" if isinstance(named, dict) else "it has one, unnamed"
        raise ValueError(f"{setting}.chat_template: the tokenizer has no template {name!r} ({have})")
    try:
        template = tokenizer.get_chat_template(name, template_kwargs.get("tools"))
    except ValueError as e:  # no chat template, or no default one
        raise ValueError(f"{setting}: {str(e).splitlines()[0]}") from None
    try:
        reads = template_variables(template)
    except jinja2.TemplateError as e:  # what transformers' own environment may still render
        log.warning("%s: the chat template's variables cannot be read (%s); not checked", setting, e)
        return
    unread = sorted(set(template_kwargs) - reads - NAMED_KWARGS)
    if unread:
        shown = ", ".join(sorted(reads - {"messages"}))
        raise ValueError(
            f"{setting}.{unread[0]}: the tokenizer's chat template never reads it: it would change nothing "
            f"(the template's variables: {shown})"
        )
