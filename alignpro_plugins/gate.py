"""RetryGate: ask the frozen target again, with the prompter's rewrite, only when its answer to x scores poorly.

A prompter that rewrites every prompt moves good and poor answers alike. A gate spends the extra target call
only where the reward model (the one the prompter was trained against) scores the answer to the original prompt
below a threshold, and then keeps whichever answer scores higher. `AlignedChatModel(retry_gate=...)` uses it;
`evaluation.GatedRetry` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignpro_plugins.rewards import RewardFunction, as_reward


def retry_threshold(first_scores: Sequence[float], retry_share: float) -> float:
    """The score below which ``retry_share`` of these answers fall: a gate's threshold for that budget.

    Compute it from the reward's scores of the frozen model's answers on prompts you will not evaluate on (e.g.
    held-out training prompts); the share of retried prompts elsewhere follows how the reward scores them there.
    """
    if not 0.0 <= retry_share <= 1.0:
        raise ValueError(f"retry_share must be in [0, 1] (the share of answers to retry), got {retry_share}")
    scores = sorted(float(v) for v in first_scores)
    if not scores:
        raise ValueError("retry_threshold needs the reward's scores of at least one answer")
    k = round(retry_share * len(scores))
    if k == 0:
        return float("-inf")
    if k >= len(scores):
        return float("inf")
    return (scores[k - 1] + scores[k]) / 2  # k answers fall strictly below it


@dataclass
class GateDecision:
    """What the gate saw and did for one prompt (recorded in the answer's ``response_metadata``)."""

    first_score: float
    threshold: float
    retried: bool
    retry_score: float | None = None
    kept: str = "first"  # "first" or "retry"
    reason: str | None = None  # why no retry was made although the score was low

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def not_retried(self, reason: str) -> GateDecision:
        """This decision, but no retry was made (the score was low, yet there was nothing new to ask)."""
        return GateDecision(**{**self.as_dict(), "retried": False, "reason": reason})


class RetryGate:
    """Retry when ``reward(x, answer) < threshold``; keep the higher-scored of the two answers.

    ``reward`` is a reward-model folder, a :class:`RewardFunction` or ``fn(prompts, answers) -> scores``.
    Set ``threshold`` with :meth:`for_budget` (or :func:`retry_threshold`) on prompts you do not evaluate on.
    """

    def __init__(self, reward: Any, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(
                f"threshold must be a number (retry_threshold() computes one), got {threshold!r}"
            )
        self.reward: RewardFunction = as_reward(reward)
        self.threshold = float(threshold)

    @classmethod
    def for_budget(
        cls, reward: Any, prompts: Sequence[str], answers: Sequence[str], retry_share: float
    ) -> RetryGate:
        """A gate that would retry ``retry_share`` of these (prompt, frozen answer) pairs."""
        if len(prompts) != len(answers):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt"
            )
        scorer = as_reward(reward)
        return cls(scorer, retry_threshold(scorer(list(prompts), list(answers)), retry_share))

    @classmethod
    def rerank(cls, reward: Any) -> RetryGate:
        """A gate with no threshold: x is answered, and the rewrite too whenever the prompter changes x; the better
        answer is kept.

        Twice the target calls for the highest win rate of the three modes (prompter alone, gated, rerank): see
        docs/benchmarks.md, "Confirmation ... the last 152 prompts".
        """
        return cls(reward, float("inf"))

    def score(self, prompt: str, answer: str) -> float:
        return float(self.reward([prompt], [answer])[0])

    def wants_retry(self, score: float) -> bool:
        return score < self.threshold

    def __repr__(self) -> str:
        return f"RetryGate(reward={self.reward.identity!r}, threshold={self.threshold:+.4f})"
