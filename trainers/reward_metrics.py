"""What the reward stage measures on preference pairs: pairwise accuracy (all and length-matched pairs), how often
a reward prefers the longer answer, and the length penalty fitted for ``length_control="penalty"``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from alignpro_plugins.data import PreferencePair

# Two answers are "length-matched" when their word counts differ by at most this share of the longer one.
LENGTH_MATCHED_TOLERANCE = 0.2
# The length penalty is fitted on at most this many training answers (chosen and rejected of half as many pairs).
LENGTH_PENALTY_FIT_ANSWERS = 2000

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
ScoredPairs = tuple[list[float], list[float]]  # (chosen scores, rejected scores)


def word_count(text: str) -> int:
    return len(text.split())


def length_matched(pair: PreferencePair, tolerance: float = LENGTH_MATCHED_TOLERANCE) -> bool:
    """Chosen and rejected differ in word count by at most ``tolerance`` of the longer one."""
    a, b = word_count(pair.chosen), word_count(pair.rejected)
    return abs(a - b) <= tolerance * max(a, b)


def score_pairs(reward: Scorer, pairs: Sequence[PreferencePair]) -> ScoredPairs:
    """(chosen scores, rejected scores). Each distinct (prompt, answer) is scored once: AlpacaEval's pairs repeat
    a reference answer across most pairs of a prompt."""
    items = list(dict.fromkeys((p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)))
    scores = reward([x for x, _ in items], [y for _, y in items]) if items else []
    by_item = dict(zip(items, scores, strict=True))
    return [by_item[p.prompt, p.chosen] for p in pairs], [by_item[p.prompt, p.rejected] for p in pairs]


def pairwise_metrics(
    pairs: Sequence[PreferencePair],
    chosen: Sequence[float],
    rejected: Sequence[float],
    tolerance: float = LENGTH_MATCHED_TOLERANCE,
) -> dict[str, Any]:
    """Accuracy (chosen scored strictly above rejected) on all pairs and on length-matched ones, and, over the
    pairs whose answers differ in word count, how often the scores and the labels prefer the longer answer.

    A rate with no pairs to measure on is nan.
    """
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    matched = [ok for ok, p in zip(right, pairs, strict=True) if length_matched(p, tolerance)]
    longer_scored, longer_labelled = [], []
    for p, c, r in zip(pairs, chosen, rejected, strict=True):
        words_chosen, words_rejected = word_count(p.chosen), word_count(p.rejected)
        if words_chosen != words_rejected:
            chosen_is_longer = words_chosen > words_rejected
            longer_labelled.append(chosen_is_longer)
            longer_scored.append(c > r if chosen_is_longer else r > c)
    return {
        "pairwise_accuracy": _share(right),
        "pairwise_accuracy_length_matched": _share(matched),
        "n_pairs": len(right),
        "n_pairs_length_matched": len(matched),
        "longer_preferred_rate": _share(longer_scored),
        "labels_longer_preferred_rate": _share(longer_labelled),
    }


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def answer_token_counts(tokenizer: Any, answers: Sequence[str]) -> list[int]:
    """Tokens of each answer alone, untruncated: what a length penalty charges for."""
    return [len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]


def fit_length_penalty(scores: ScoredPairs, token_counts: tuple[Sequence[int], Sequence[int]]) -> float:
    """β: the slope of score on answer tokens within each (chosen, rejected) pair.

    Bradley-Terry training fixes only the score differences within a pair; each prompt's offset is free, so a
    slope pooled across prompts would take in offsets that happen to follow answer length.
    """
    (chosen, rejected), (chosen_tokens, rejected_tokens) = scores, token_counts
    n = len(chosen)
    if not n == len(rejected) == len(chosen_tokens) == len(rejected_tokens) or n < 1:
        raise ValueError(
            f"a length penalty needs >= 1 pair and a score and token count per answer, got {n} chosen and "
            f"{len(rejected)} rejected scores, {len(chosen_tokens)} and {len(rejected_tokens)} token counts"
        )
    if all(c == r for c, r in zip(chosen_tokens, rejected_tokens, strict=True)):
        raise ValueError(
            "cannot fit a length penalty: in every training pair both answers have the same token count; "
            "use length_control='none' or train on pairs whose answers differ in length"
        )
    beta = pooled_length_slope(
        [s for pair in zip(chosen, rejected, strict=True) for s in pair],
        [t for pair in zip(chosen_tokens, rejected_tokens, strict=True) for t in pair],
        group=2,
    )
    if not math.isfinite(beta):
        raise ValueError(
            f"the fitted length penalty is not finite ({beta}): the reward's scores are not finite"
        )
    return beta


def pooled_length_slope(rewards: Sequence[float], lengths: Sequence[float], group: int) -> float:
    """Slope of reward on answer length within groups (consecutive runs of ``group`` answers to one prompt):
    Σ Δr·Δl / Σ Δl², deviations from each group's mean; 0 when no group's lengths vary."""
    num = den = 0.0
    for s in range(0, len(rewards), group):
        rs, ls = rewards[s : s + group], lengths[s : s + group]
        mr, ml = sum(rs) / len(rs), sum(ls) / len(ls)
        num += sum((r - mr) * (n - ml) for r, n in zip(rs, ls, strict=True))
        den += sum((n - ml) ** 2 for n in ls)
    return num / den if den > 0 else 0.0


def length_penalty_sample(
    pairs: Sequence[PreferencePair], seed: int, limit: int | None = None
) -> list[PreferencePair]:
    """The training pairs whose answers fit the penalty (and give the training-accuracy sample): a seeded sample of
    up to LENGTH_PENALTY_FIT_ANSWERS / 2 pairs (and at most ``limit``)."""
    k = min(len(pairs), LENGTH_PENALTY_FIT_ANSWERS // 2, limit or len(pairs))
    return random.Random(seed).sample(list(pairs), k)
