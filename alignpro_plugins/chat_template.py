"""A chat template that turns a user message into the prompter's query, for tools that know only chat templates.

Both the prompter artifact (``Prompter.save_pretrained``) and the merged export (``alignpro export``) save the
prompter's tokenizer with this template, so ``tokenizer.apply_chat_template([{"role": "user", "content": p}],
add_generation_prompt=True)`` equals ``Prompter.format_query(p)``: plain transformers + PEFT, vLLM or llama.cpp
then see exactly the text the prompter sees. The template the prompter itself renders its query with (the
base tokenizer's own) is kept separately: ``query_chat_template`` in ``alignpro.json`` / the export manifest.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignpro_plugins.manifest import REFINE_SLOTS, Manifest

# Prompts the template is checked on: plain, multi-line, with template-like characters, and empty.
PROBE_PROMPTS = (
    "What are the health benefits of green tea?",
    'Write a poem about the sea.\nUse "waves" twice, and {braces} or {% tags %}.',
    "",
)
# First answers a refine-mode template is checked on (shorter than any answer budget, so none is clipped).
PROBE_ANSWERS = ("Green tea has antioxidants.\nIt may help {focus}.", "")


def _jinja_string(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja unescapes JSON's escapes; non-ASCII stays literal)."""
    return json.dumps(text, ensure_ascii=False)


def query_template(tokenizer: Any) -> str | None:
    """The chat template ``Prompter.format_query`` renders with: the tokenizer's default one, or None (plain)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: apply_chat_template uses the default one
        template = template.get("default")
    return template or None


def prompter_chat_template(
    base_template: str | None, manifest: Manifest, mode: str, *, fold_system: bool = False
) -> str:
    """A chat template that renders ``messages`` as the prompter's query for their latest user message.

    ``base_template`` is the prompter tokenizer's own template (None when it has none); the result replaces
    the conversation by [system prompt, instruction with the prompt], then renders the base template, so
    ``apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)`` equals
    ``Prompter.format_query(p, mode)``. ``fold_system``: the base template refuses a system message, so the
    system prompt opens the user turn (as ``Prompter`` formats for such templates). A conversation without a
    user message is an error.

    Refine mode reads the first answer too: the assistant message after the latest user message (a
    conversation without one is an error). The template shows it whole; ``Prompter`` cuts it to the manifest's
    ``refine_answer_tokens`` first, so a client that sends longer answers cuts them to that many tokens itself.
    """
    if mode == "refine":
        # The slots are filled in one pass, as Prompter.format_query does: a prompt holding "{answer}" stays.
        pieces = REFINE_SLOTS.split(manifest.instructions[mode])
        parts = [
            _jinja_string(p) if i % 2 == 0 else f"alignpro.{p}" for i, p in enumerate(pieces) if i % 2 or p
        ]
        instruction = f"({' ~ '.join(parts)})"
    else:
        instruction = (
            f"({_jinja_string(manifest.instructions[mode])} | replace('{{prompt}}', alignpro.prompt))"
        )
    system = manifest.system_prompt
    if fold_system:
        folded = f"{_jinja_string(system + chr(10) * 2)} ~ " if system else ""
        messages = f"[{{'role': 'user', 'content': {folded}{instruction}}}]"
    else:
        messages = (
            f"[{{'role': 'system', 'content': {_jinja_string(system)}}}, "
            f"{{'role': 'user', 'content': {instruction}}}]"
        )
    # One line, no whitespace between tags: nothing here may add or trim a character of the base output.
    if mode == "refine":
        head = (
            "{% set alignpro = namespace(prompt=none, answer=none) %}"
            "{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% set alignpro.prompt = message['content'] %}{% set alignpro.answer = none %}"
            "{% elif message['role'] == 'assistant' and alignpro.prompt is not none %}"
            "{% set alignpro.answer = message['content'] %}{% endif %}{% endfor %}"
            "{% if alignpro.answer is none %}{{ raise_exception('this model is an alignpro refinement prompter: "
            "it reads the latest user message and the assistant answer after it, and the conversation has no "
            "such answer') }}{% endif %}"
        )
    else:
        head = (
            "{% set alignpro = namespace(prompt=none) %}"
            "{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% set alignpro.prompt = message['content'] %}{% endif %}{% endfor %}"
            "{% if alignpro.prompt is none %}{{ raise_exception('this model is an alignpro prompter: it rewrites "
            "the latest user message, and the conversation has none') }}{% endif %}"
        )
    head += f"{{% set messages = {messages} %}}"
    if base_template is None:  # Prompter.format_query's plain-text format
        return (
            head + "{{ messages[0]['content'] }}\n\n{{ messages[1]['content'] }}\n\n"
            "{% if add_generation_prompt %}Answer:\n{% endif %}"
        )
    return head + base_template


def _refuses_system(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` rejects a system message (``Prompter`` then folds the system prompt in)."""
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:
        return True
    return False


def checked_chat_template(
    tokenizer: Any, manifest: Manifest, mode: str, format_query: Callable[..., str]
) -> str:
    """The prompter chat template for ``tokenizer``, checked to render ``format_query`` on the probe prompts
    (refine mode: ``format_query(prompt, answer)`` on the probe prompts and answers)."""
    base = query_template(tokenizer)
    fold = base is not None and _refuses_system(tokenizer, base)
    template = prompter_chat_template(base, manifest, mode, fold_system=fold)
    probe = copy.deepcopy(tokenizer)
    probe.chat_template = template
    check_chat_template(probe, format_query, refine=mode == "refine")
    return template


def check_chat_template(tokenizer: Any, format_query: Callable[..., str], *, refine: bool = False) -> None:
    """``tokenizer``'s chat template formats a user message exactly as ``format_query``; a ValueError if not.

    ``refine``: the conversation is a user message and the assistant's answer, formatted as
    ``format_query(prompt, answer)``.
    """
    for prompt in PROBE_PROMPTS:
        for answer in PROBE_ANSWERS if refine else (None,):
            messages = [{"role": "user", "content": prompt}]
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
            got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            want = format_query(prompt) if answer is None else format_query(prompt, answer)
            if got != want:
                raise ValueError(
                    "the prompter's chat template does not reproduce its query "
                    f"(prompt {prompt!r}{'' if answer is None else f', answer {answer!r}'}): expected {want!r}, "
                    f"the template gives {got!r}"
                )


def save_tokenizer(tokenizer: Any, template: str, folder: Path) -> None:
    """Save a copy of ``tokenizer`` with ``template`` as its chat template (``tokenizer`` stays unchanged)."""
    saved = copy.deepcopy(tokenizer)
    saved.chat_template = template
    saved.save_pretrained(str(folder))
