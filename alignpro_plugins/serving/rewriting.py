"""Rewrite the latest user message of a chat request with a prompter, and say what was done.

The prompter sees only the text of the latest ``user`` message (a string, or the text parts of a list of
content parts); earlier turns, the system message and non-text parts go upstream untouched. Whatever happens
to the prompter, the request still goes upstream: a failure passes the original message through and the
outcome says why.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from alignpro_plugins import guard

logger = logging.getLogger("alignpro_plugins.serving")

HEADER = "x-alignpro-rewrite"
TIMING_HEADER = "server-timing"  # the standard header: milliseconds in the prompter and waiting upstream
EXTENSION_FIELD = "alignpro"
REWRITTEN = "rewritten"
# Statuses besides "rewritten": "fallback:<reason>" (the prompter ran but its output was not used, or it
# failed) and "skipped:<reason>" (there was nothing for it to rewrite).
NO_USER_MESSAGE = "no_user_message"
NO_TEXT = "no_text"
HEADER_REASON_CHARS = 200


class Rewriter(Protocol):
    """What the proxy needs from a prompter: :meth:`Prompter.arewrite_results` or a remote twin."""

    async def arewrite_results(self, prompts: Sequence[str], *, mode: str | None = None) -> list[Any]: ...


@dataclass
class Timings:
    """Seconds one request spent in the prompter and waiting for the upstream (the ``server-timing`` header)."""

    rewrite: float = 0.0
    upstream: float = 0.0

    @contextlib.contextmanager
    def measure(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - start)

    def header_value(self) -> str:
        return f"rewrite;dur={self.rewrite * 1000:.1f}, upstream;dur={self.upstream * 1000:.1f}"


@dataclass(frozen=True)
class RewriteOutcome:
    """The messages to forward and what the prompter did to them."""

    messages: list[Any]
    status: str  # "rewritten", "fallback:<reason>" or "skipped:<reason>"
    mode: str | None = None
    original: str | None = None
    sent: str | None = None  # the latest user text forwarded upstream
    fallback_reason: str | None = None

    @property
    def header_value(self) -> str:
        """The status as one short printable-ASCII line (an exception message may hold anything)."""
        text = re.sub(r"[^\x20-\x7e]+", " ", self.status).strip()
        return text[: len("fallback:") + HEADER_REASON_CHARS]

    def extension(self) -> dict[str, Any]:
        """The ``alignpro`` field added to a JSON answer."""
        return {
            "rewrite": self.status,
            "mode": self.mode,
            "original": self.original,
            "sent": self.sent,
            "fallback_reason": self.fallback_reason,
        }


def _latest_user(messages: list[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return None


def _text_of(content: Any) -> str | None:
    """The text of a message's content: the string, or its text parts joined; None when it has no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    return None


def _with_text(content: Any, text: str) -> Any:
    """``content`` whose text is now ``text``: a string, or the parts with one text part where the first was."""
    if isinstance(content, str):
        return text
    out: list[Any] = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            if not any(isinstance(p, dict) and p.get("type") == "text" for p in out):
                out.append({**part, "text": text})
        else:
            out.append(part)
    return out


def latest_user_text(messages: list[Any]) -> str | None:
    """The text of the latest user message (None: no user message, or one without text)."""
    index = _latest_user(messages)
    return None if index is None else _text_of(messages[index].get("content"))


async def rewrite_latest_user(messages: list[Any], rewriter: Rewriter, mode: str | None) -> RewriteOutcome:
    """Rewrite (or augment) the latest user message; never raises for what the prompter does."""
    index = _latest_user(messages)
    if index is None:
        return RewriteOutcome(messages, f"skipped:{NO_USER_MESSAGE}", mode)
    original = _text_of(messages[index].get("content"))
    if original is None:
        return RewriteOutcome(messages, f"skipped:{NO_TEXT}", mode)
    try:
        result = (await rewriter.arewrite_results([original], mode=mode))[0]
    except Exception as exc:  # e.g. a remote prompter that is down: the request still goes upstream
        reason = f"{guard.PROMPTER_ERROR}: {type(exc).__name__}: {exc}"
        logger.warning("prompter failed (%s); passing the message through", reason)
        return RewriteOutcome(messages, f"fallback:{reason}", mode, original, original, reason)
    if result.fallback_reason is not None:
        return RewriteOutcome(
            messages,
            f"fallback:{result.fallback_reason}",
            result.mode,
            original,
            original,
            result.fallback_reason,
        )
    forwarded = list(messages)
    forwarded[index] = {**messages[index], "content": _with_text(messages[index]["content"], result.text)}
    return RewriteOutcome(forwarded, REWRITTEN, result.mode, original, result.text)
