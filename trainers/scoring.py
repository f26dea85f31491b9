"""r(x, target(x')): the one place where rewrites meet the frozen target and the reward.

Both the SFT bootstrap (best-of-K) and the RL stage score candidate rewrites here, so the reward is always the
frozen target's answer to the rewrite, scored against the ORIGINAL prompt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignpro_plugins.prompter import Prompter, RewriteResult
from alignpro_plugins.rewards import RewardFunction
from alignpro_plugins.targets import FrozenTarget, TargetError, TargetRequest


@dataclass
class ScoreBatch:
    rewards: list[float]
    results: list[RewriteResult]
    answers: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fallback_rate(self) -> float:
        return sum(not r.rewritten for r in self.results) / max(len(self.results), 1)


class RewriteScorer:
    def __init__(
        self,
        prompter: Prompter,
        target: FrozenTarget,
        reward: RewardFunction,
        contexts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.prompter = prompter
        self.target = target
        self.reward = reward
        # Per original prompt x, the framework context its requests carry (e.g. a DSPy example's other inputs).
        self.contexts = dict(contexts or {})

    def score_texts(
        self, originals: Sequence[str], target_inputs: Sequence[str]
    ) -> tuple[list[float], list[str], dict]:
        requests = [
            TargetRequest(x_prime, original=x, context=self.contexts.get(x))
            for x, x_prime in zip(originals, target_inputs, strict=True)
        ]
        t0 = time.perf_counter()
        try:
            answers = self.target.generate(requests)
        except TargetError as exc:  # counted in target.stats; training scores a missing answer as empty
            answers = exc.answers_or_empty()
        t1 = time.perf_counter()
        rewards = self.reward(requests, answers)
        t2 = time.perf_counter()
        return rewards, answers, {"target_s": t1 - t0, "reward_s": t2 - t1}

    def score(
        self,
        originals: Sequence[str],
        generations: Sequence[str],
        hit_limits: Sequence[bool] | None = None,
        mode: str | None = None,
    ) -> ScoreBatch:
        """Guard each raw prompter generation (fallback = original prompt), answer, and score against x."""
        mode = mode or self.prompter.manifest.mode
        hit_limits = hit_limits or [False] * len(generations)
        results = [
            self.prompter.finalize(x, g, h, mode)
            for x, g, h in zip(originals, generations, hit_limits, strict=True)
        ]
        rewards, answers, timings = self.score_texts(originals, [r.text for r in results])
        return ScoreBatch(rewards, results, answers, timings)
