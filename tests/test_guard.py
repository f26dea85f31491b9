"""The intent guard on its own: span extraction and every reason ``check_rewrite`` can return."""

from __future__ import annotations

import pytest

from alignpro_plugins import guard
from alignpro_plugins.guard import GuardConfig, check_rewrite

CFG = GuardConfig()


def check(original: str, rewrite: str, *, mode: str = "rewrite", hit: bool = False, **kw):
    return check_rewrite(
        original, rewrite, mode=mode, hit_token_limit=hit, config=kw.pop("config", CFG), **kw
    )


# ---------------------------------------------------------------------------------------------- spans
def test_protected_spans_finds_each_kind_once():
    text = (
        'Fix `x = 1` in ```\nprint("hi")\n``` then see https://example.com/a?b=1 and "quoted words".\n'
        "Use 3.14 and 42% twice: 42%.\nA) first option\nB. second option\n- a bullet"
    )
    spans = guard.protected_spans(text)
    assert '```\nprint("hi")\n```' in spans
    assert "`x = 1`" in spans
    assert "https://example.com/a?b=1" in spans
    assert '"quoted words"' in spans
    assert "3.14" in spans and "42%" in spans
    assert "A) first option" in spans and "B. second option" in spans
    assert "- a bullet" not in spans  # bullets are not options
    assert len(spans) == len(set(spans))  # de-duplicated ("42%" appears twice)
    # The number inside the code block and the URL is not extracted separately.
    assert "1" not in spans


def test_protected_spans_empty_for_plain_prose():
    assert guard.protected_spans("Tell me about green tea") == []


def test_missing_spans_lists_only_lost_ones():
    original = 'Convert "hello world" to 7 languages'
    assert guard.missing_spans(original, 'Translate "hello world" into 7 languages, please.') == []
    assert guard.missing_spans(original, "Translate hello world into 7 languages.") == ['"hello world"']


# ---------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    ("text", "expected"),
    [("...!?", True), ("  -- ** ", True), ("😀😀", True), ("a.", False), ("٣", False), ("", True)],
)
def test_is_only_punctuation(text, expected):
    assert guard.is_only_punctuation(text) is expected


def test_has_repetition_loop():
    assert guard.has_repetition_loop("please answer the question " * 5)
    assert guard.has_repetition_loop("a" * 25)
    assert not guard.has_repetition_loop("a" * 24)
    assert not guard.has_repetition_loop("please answer the question " * 3)
    assert not guard.has_repetition_loop(
        "Explain the health benefits of green tea in three short paragraphs."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Be concise. Use a list and", "Be concise."),
        ("First do this! Then? maybe th", "First do this! Then?"),
        ("Complete sentence.", "Complete sentence."),
        ("no sentence end at all", ""),
        ("Line one.\nline two without end", "Line one."),
    ],
)
def test_trim_to_sentence(text, expected):
    assert guard.trim_to_sentence(text) == expected


# ---------------------------------------------------------------------------------------------- reasons
def test_valid_rewrite_passes_and_is_stripped():
    assert check("Tell me about tea", "  Explain the history of tea.  ") == (
        "Explain the history of tea.",
        None,
    )


def test_empty_rewrite_vs_no_change():
    assert check("Tell me about tea", "  \n ", mode="rewrite") == ("", guard.EMPTY_REWRITE)
    assert check("Tell me about tea", "", mode="augment") == ("", guard.NO_CHANGE)


def test_only_punctuation():
    assert check("Tell me about tea", "?!...")[1] == guard.ONLY_PUNCTUATION


def test_repetition_loop():
    assert check("Tell me about tea", "tell me about tea " * 6, mode="augment")[1] == guard.REPETITION


def test_truncated_when_limit_hit_without_sentence_end():
    assert check("Tell me about tea", "Explain the history of", hit=True) == ("", guard.TRUNCATED)


def test_limit_hit_keeps_complete_sentences():
    cleaned, reason = check("Tell me about tea", "Explain the history of tea. Also the", hit=True)
    assert (cleaned, reason) == ("Explain the history of tea.", None)


def test_too_long_depends_on_mode():
    original = "Tell me about tea"  # 17 chars: rewrite limit 17 * 4 + 400 = 468, augment limit 400
    text = "Explain tea: " + " ".join(f"aspect{i}" for i in range(50)) + "."
    assert 400 < len(text) <= 468
    assert check(original, text, mode="rewrite")[1] is None
    assert check(original, text, mode="augment")[1] == guard.TOO_LONG
    assert (
        check(original, text + " Also cover brewing temperature and steeping time.", mode="rewrite")[1]
        == guard.TOO_LONG
    )


def test_length_limits_follow_config():
    cfg = GuardConfig(max_length_ratio=1.0, max_length_slack=0)
    assert check("Tell me about tea", "Tell me all about tea.", config=cfg)[1] == guard.TOO_LONG


@pytest.mark.parametrize(
    ("original", "bad", "good"),
    [
        (
            "Explain ```\nx = [i for i in y]\n```",
            "Explain the list comprehension.",
            "Explain ```\nx = [i for i in y]\n``` step by step.",
        ),
        (
            "What does `git rebase -i` do?",
            "What does interactive rebase do?",
            "Explain what `git rebase -i` does.",
        ),
        (
            'Translate "Ich bin ein Berliner"',
            "Translate the sentence into English.",
            'Translate "Ich bin ein Berliner" into English.',
        ),
        (
            "Summarise https://example.org/post?id=7",
            "Summarise the post.",
            "Summarise the page https://example.org/post?id=7 briefly.",
        ),
        (
            "Give 12 reasons to visit Oslo in 2025",
            "Give reasons to visit Oslo.",
            "List 12 reasons to visit Oslo in 2025.",
        ),
        (
            "Which is a fruit?\nA) apple\nB) stone",
            "Which of these is a fruit: apple or stone?",
            "Pick the fruit.\nA) apple\nB) stone",
        ),
    ],
    ids=["code-block", "inline-code", "quoted", "url", "numbers", "options"],
)
def test_protected_span_lost(original, bad, good):
    assert check(original, bad)[1] == guard.PROTECTED_SPAN
    assert check(original, good)[1] is None
    assert check(original, bad, config=GuardConfig(check_protected_spans=False))[1] is None
    # Augment mode keeps the original prompt, so spans cannot be lost there.
    assert check(original, bad, mode="augment")[1] is None


def test_semantic_drift_uses_similarity_in_rewrite_mode_only():
    seen = []

    def similarity(a, b):
        seen.append((list(a), list(b)))
        return [0.2]

    assert check("Tell me about tea", "Write a poem about cars.", similarity=similarity)[1] == guard.DRIFT
    assert seen == [(["Tell me about tea"], ["Write a poem about cars."])]
    assert check("Tell me about tea", "Write a poem.", mode="augment", similarity=similarity)[1] is None
    assert len(seen) == 1
    high = check("Tell me about tea", "Tell me about green tea.", similarity=lambda a, b: [0.9])
    assert high == ("Tell me about green tea.", None)
    strict = GuardConfig(min_similarity=0.95)
    assert (
        check("Tell me about tea", "Tell me about tea.", similarity=lambda a, b: [0.9], config=strict)[1]
        == guard.DRIFT
    )
