"""The intent guard: decide whether a prompter's output may replace (or extend) the user's prompt.

Every check returns a short reason code; the caller passes the original prompt through when one fires.
Reason codes are part of the public API (they appear in results, LangChain run metadata and eval records).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Public reason codes.
EMPTY_INPUT = "empty_input"
INPUT_TOO_LONG = "input_too_long"
EMPTY_REWRITE = "empty_rewrite"
ONLY_PUNCTUATION = "only_punctuation"
REPETITION = "repetition_loop"
TRUNCATED = "truncated"
TOO_LONG = "rewrite_too_long"
DRIFT = "semantic_drift"
PROTECTED_SPAN = "protected_span_lost"
PROMPTER_ERROR = "prompter_error"
DISABLED = "disabled"
NO_CHANGE = "no_change"

_CODE_BLOCK = re.compile(r"```.*?```", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
# A URL ends before trailing sentence punctuation ("see https://x.org/a." keeps the period out).
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"')\]]*[^\s<>\"')\].,;:!?]")
_QUOTED = re.compile(r"\"[^\"\n]{1,200}\"|“[^”\n]{1,200}”")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,:/]\d+)*%?")
_OPTION = re.compile(r"(?m)^\s*(?:\(?[A-Ha-h1-8][).:]|[-*•])\s+\S.*$")


def protected_spans(text: str) -> list[str]:
    """Spans a rewrite must reproduce verbatim: code, URLs, quotes, numbers, multiple-choice options."""
    spans: list[str] = []
    rest = text
    for pattern in (_CODE_BLOCK, _INLINE_CODE, _URL, _QUOTED):
        spans += [m.group(0) for m in pattern.finditer(rest)]
        rest = pattern.sub(" ", rest)
    spans += [
        m.group(0).strip() for m in _OPTION.finditer(rest) if re.match(r"\s*\(?[A-Ha-h1-8][).:]", m.group(0))
    ]
    spans += [m.group(0) for m in _NUMBER.finditer(rest)]
    return [s for s in dict.fromkeys(spans) if s.strip()]


def missing_spans(original: str, rewrite: str) -> list[str]:
    return [s for s in protected_spans(original) if s not in rewrite]


def is_only_punctuation(text: str) -> bool:
    return not any(unicodedata.category(ch)[0] in "LN" for ch in text)


def has_repetition_loop(text: str, n: int = 4, max_repeats: int = 3) -> bool:
    """True when some word n-gram repeats more than ``max_repeats`` times, or one char run dominates."""
    if re.search(r"(.)\1{24,}", text):
        return True
    words = text.lower().split()
    if len(words) < n * (max_repeats + 1):
        return False
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return grams.most_common(1)[0][1] > max_repeats


def trim_to_sentence(text: str) -> str:
    """Cut a generation that hit the token limit back to its last complete sentence ('' if none)."""
    text = text.rstrip()
    cut = max(text.rfind(p) for p in (". ", "! ", "? ", ".\n", "!\n", "?\n"))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1].rstrip() if cut > 0 else ""


@dataclass
class GuardConfig:
    max_length_ratio: float = 4.0  # rewrite may be at most this many times the prompt length ...
    max_length_slack: int = 400  # ... plus this many characters
    min_similarity: float = 0.5  # rewrite mode: cosine similarity floor between x and x'
    check_protected_spans: bool = True


def check_rewrite(
    original: str,
    rewrite: str,
    *,
    mode: str,
    hit_token_limit: bool,
    config: GuardConfig,
    similarity: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
) -> tuple[str, str | None]:
    """Clean a raw prompter output and return ``(cleaned, reason)``; ``reason`` is None when it passes."""
    text = rewrite.strip()
    if hit_token_limit:
        text = trim_to_sentence(text)
        if not text:
            return "", TRUNCATED
    if not text:
        return "", NO_CHANGE if mode == "augment" else EMPTY_REWRITE
    if is_only_punctuation(text):
        return text, ONLY_PUNCTUATION
    if has_repetition_loop(text):
        return text, REPETITION
    limit = (len(original) if mode == "rewrite" else 0) * config.max_length_ratio + config.max_length_slack
    if len(text) > limit:
        return text, TOO_LONG
    if mode == "rewrite":
        if config.check_protected_spans and missing_spans(original, text):
            return text, PROTECTED_SPAN
        if similarity is not None and similarity([original], [text])[0] < config.min_similarity:
            return text, DRIFT
    return text, None
