"""The first answers a refinement prompter reads while a gate asks again.

A refinement prompter (mode ``"refine"``) writes x'' from the prompt x AND the frozen model's first answer y₀.
:class:`~alignpro_plugins.gate.RetryGate` knows y₀ when it asks for a retry input; the adapters that build that
input (``AlignedChatModel``, ``AlignProModule``, the ``alignpro serve`` proxy) only call the prompter with x.
So the gate puts the first answers here for the duration of its retry step, and ``Prompter.rewrite_results``
in refine mode reads them: a refine-mode prompter works in every adapter with no new plumbing. Outside a gate,
call ``Prompter.refine(x, first_answer)`` (or open :func:`first_answers` yourself).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

_FIRST_ANSWERS: ContextVar[Mapping[str, str] | None] = ContextVar("alignpro_first_answers", default=None)


@contextmanager
def first_answers(answers: Mapping[str, str]) -> Iterator[None]:
    """Within this block (this thread or task, and the tasks it starts), ``answers[x]`` is x's first answer."""
    token = _FIRST_ANSWERS.set(dict(answers))
    try:
        yield
    finally:
        _FIRST_ANSWERS.reset(token)


def first_answer(prompt: str) -> str | None:
    """The first answer to ``prompt`` in the current gate step, or None when there is none.

    One gated request at a time is the adapters' case: when the step holds a single answer, it is the answer
    to every part of that request (e.g. each rewritten field of a DSPy program, whose answer is the program's).
    """
    answers = _FIRST_ANSWERS.get()
    if not answers:
        return None
    if prompt in answers:
        return answers[prompt]
    return next(iter(answers.values())) if len(answers) == 1 else None
