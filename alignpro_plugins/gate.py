"""RetryGate: ask the frozen target again, with the prompter's rewrite, only when its answer to x scores poorly.

A prompter that rewrites every prompt moves good and poor answers alike. A gate spends the extra target call
only where the reward model (the one the prompter was trained against) scores the answer to the original prompt
below a threshold, and then keeps whichever answer scores higher. ``RetryGate.rerank`` has no threshold: the
rewrite is always asked too.

The flow is written once, here: :meth:`RetryGate.choose` (and :meth:`RetryGate.achoose`) asks the target with
x, scores the answers, asks again with the retry inputs where the score is below the threshold, and keeps the
best-scored answer. ``AlignedChatModel(retry_gate=...)``, ``AlignProModule(retry_gate=...)`` and the evaluation's
``WithRetryGate`` configuration only say how to ask their target and how to build a retry input.

Refinement: while the retry inputs are built, each prompt's first answer is known to the prompter
(:func:`alignpro_plugins.refining.first_answers`), so a refinement prompter (mode ``"refine"``) given to any of
those adapters writes x'' from (x, y₀) — answer x → y₀, refine where r(x, y₀) is low (or always), answer x'' →
y₁, keep the better by r(·, x) — with no other change. :meth:`RetryGate.always` refines every prompt and keeps
y₁ when there is no reward model to compare the answers.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from alignpro_plugins.refining import first_answers
from alignpro_plugins.rewards import RewardFunction, as_reward

I = TypeVar("I")  # noqa: E741 - what the target is asked with (messages, a program's inputs, a TargetInput)
A = TypeVar("A")  # what the target answers

#: ``GateDecision.reason`` when the answer to x scored low but there was no other input to ask.
PROMPTER_KEPT_X = "the prompter kept x"

#: ``score(prompts, answers)``: the reward's score of each answer against its original prompt (None: no text).
Score = Callable[[list[str], list[Any]], Sequence[float | None]]


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

    first_score: float | None  # None: a gate with no reward (RetryGate.always)
    threshold: float
    retried: bool
    retry_score: float | None = None  # the best retry's score (None: no retry answer could be scored)
    kept: str = "first"  # "first" or "retry"
    reason: str | None = None  # why no retry was made although the score was low

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def not_retried(self, reason: str) -> GateDecision:
        """This decision, but no retry was made (the score was low, yet there was nothing new to ask)."""
        return replace(self, retried=False, reason=reason)


@dataclass
class Candidate(Generic[I, A]):
    """One input the target was asked with, its answer, and the reward's score of that answer against x."""

    input: I
    answer: A
    score: float | None  # None: the answer has no text the reward can score (e.g. a tool call)


@dataclass
class GateResult(Generic[I, A]):
    """One prompt through the gate: the answer to x first, then each retry's; ``kept`` indexes the chosen one.

    ``decision`` is None when the answer to x could not be scored (it is then the only candidate).
    """

    candidates: list[Candidate[I, A]]
    decision: GateDecision | None
    kept: int = 0

    @property
    def answer(self) -> A:
        return self.candidates[self.kept].answer

    @property
    def input(self) -> I:
        return self.candidates[self.kept].input


@dataclass
class _Ask:
    inputs: list[Any]


@dataclass
class _Retries:
    positions: list[int]
    first_answers: dict[str, str]  # x -> the text of its first answer, for a refinement prompter


# The gate's flow yields what it needs (answers to inputs, retry inputs for positions) and is sent the results,
# so one generator serves the sync and the async driver.
_Flow = Generator[_Ask | _Retries, Any, list[GateResult]]


class RetryGate:
    """Retry when ``reward(x, answer) < threshold``; keep the higher-scored of the answers.

    ``reward`` is a reward-model folder, a :class:`RewardFunction` or ``fn(prompts, answers) -> scores``.
    Set ``threshold`` with :meth:`for_budget` (or :func:`retry_threshold`) on prompts you do not evaluate on.
    ``reward=None`` (see :meth:`always`) asks again every time and keeps the retry's answer.
    """

    def __init__(self, reward: Any, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(
                f"threshold must be a number (retry_threshold() computes one), got {threshold!r}"
            )
        if reward is None and threshold != math.inf:
            raise ValueError(
                f"threshold {threshold!r} compares the reward's score of the first answer, but reward is None: "
                "give a reward (a reward-model folder or a function), or use RetryGate.always() to ask again "
                "every time"
            )
        self.reward: RewardFunction | None = None if reward is None else as_reward(reward)
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

        Twice the target calls; compare it with best-of-2 sampling, which spends as many (docs/benchmarks.md,
        "Deployment modes").
        """
        return cls(reward, float("inf"))

    @classmethod
    def always(cls) -> RetryGate:
        """A gate with no reward model: x is answered, the retry input (a refinement prompter's x'' written from
        that answer) always asked too, and the retry's answer kept — x's only where the prompter kept x.

        Two target calls and nothing to compare them by; with a reward model, :meth:`rerank` keeps the better.
        """
        return cls(None, float("inf"))

    def wants_retry(self, score: float) -> bool:
        return score < self.threshold

    # ------------------------------------------------------------------ the flow
    def choose(
        self,
        prompts: Sequence[str],
        inputs: Sequence[I],
        ask: Callable[[list[I]], Sequence[A]],
        retries: Callable[[list[int]], Sequence[Sequence[I]]],
        *,
        text: Callable[[A], str | None] | None = None,
        score: Score | None = None,
    ) -> list[GateResult[I, A]]:
        """Answer each prompt through the gate.

        ``prompts`` are the original texts x the reward scores answers against; ``inputs`` what the target is
        first asked with (one per prompt). ``ask(inputs)`` answers a list of inputs; ``retries(positions)`` gives,
        for each position of a prompt whose answer scored below the threshold, the inputs to ask next (none: the
        prompter kept x, and no second call is made). ``text(answer)`` is what the reward scores (None: it cannot
        be scored; an unscored answer to x is returned without a retry, an unscored retry is never kept). Give
        ``score(prompts, answers)`` instead to score some other way (the evaluation scores every judge at once).
        """
        return _run(self._flow(prompts, inputs, score or self._scorer(text), text), ask, retries)

    async def achoose(
        self,
        prompts: Sequence[str],
        inputs: Sequence[I],
        ask: Callable[[list[I]], Awaitable[Sequence[A]]],
        retries: Callable[[list[int]], Awaitable[Sequence[Sequence[I]]]],
        *,
        text: Callable[[A], str | None] | None = None,
        score: Score | None = None,
    ) -> list[GateResult[I, A]]:
        """:meth:`choose` with an async ``ask`` and ``retries`` (the reward is called as it is, in this thread)."""
        return await _arun(self._flow(prompts, inputs, score or self._scorer(text), text), ask, retries)

    def _flow(
        self,
        prompts: Sequence[str],
        inputs: Sequence[Any],
        score: Score,
        text: Callable[[Any], str | None] | None,
    ) -> _Flow:
        prompts, inputs = list(prompts), list(inputs)
        if len(prompts) != len(inputs):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(inputs)} inputs; give one input per prompt"
            )
        answers = list((yield _Ask(inputs)))
        texts = [a if text is None else text(a) for a in answers]
        results = [
            GateResult([Candidate(x, a, s)], self._decide(s, isinstance(t, str)))
            for x, a, s, t in zip(inputs, answers, score(prompts, answers), texts, strict=True)
        ]
        below = [j for j, r in enumerate(results) if r.decision is not None and r.decision.retried]
        if not below:
            return results
        seen = {prompts[j]: t for j in below if isinstance(t := texts[j], str)}
        more = list((yield _Retries(below, seen)))
        asked = [(j, x) for j, xs in zip(below, more, strict=True) for x in xs]
        if asked:
            answers = list((yield _Ask([x for _, x in asked])))
            scores = score([prompts[j] for j, _ in asked], answers)
            for (j, x), a, s in zip(asked, answers, scores, strict=True):
                results[j].candidates.append(Candidate(x, a, s))
        for j in below:
            _settle(results[j], scored=self.reward is not None)
        return results

    def _decide(self, score: float | None, has_text: bool) -> GateDecision | None:
        if self.reward is None and score is None:  # no reward: every answer with text is refined
            return (
                GateDecision(first_score=None, threshold=self.threshold, retried=True) if has_text else None
            )
        if score is None:
            return None
        return GateDecision(first_score=score, threshold=self.threshold, retried=self.wants_retry(score))

    def _scorer(self, text: Callable[[Any], str | None] | None) -> Score:
        def score(prompts: list[str], answers: list[Any]) -> list[float | None]:
            texts: list[str | None] = [a if text is None else text(a) for a in answers]
            todo = [(m, t) for m, t in enumerate(texts) if t is not None]
            out: list[float | None] = [None] * len(answers)
            if todo and self.reward is not None:  # one reward call for every answer it can score
                scored = self.reward([prompts[m] for m, _ in todo], [t for _, t in todo])
                for (m, _), s in zip(todo, scored, strict=True):
                    out[m] = float(s)
            return out

        return score

    def __repr__(self) -> str:
        if self.reward is None:
            return "RetryGate.always()"
        return f"RetryGate(reward={self.reward.identity!r}, threshold={self.threshold:+.4f})"


def _settle(result: GateResult, *, scored: bool = True) -> None:
    """Keep the best-scored candidate (the first of equals, so x's answer wins a tie) and say so in the decision;
    with no reward (``scored=False``), the last retry's."""
    decision = result.decision
    assert decision is not None
    if len(result.candidates) == 1:
        result.decision = decision.not_retried(PROMPTER_KEPT_X)
        return
    if not scored:
        result.kept = len(result.candidates) - 1
        decision.kept = "retry"
        return
    scored_at = [m for m, c in enumerate(result.candidates) if c.score is not None]
    result.kept = max(scored_at, key=lambda m: result.candidates[m].score)  # type: ignore[arg-type, return-value]
    retry_scores = [c.score for c in result.candidates[1:] if c.score is not None]
    decision.retry_score = max(retry_scores) if retry_scores else None
    decision.kept = "retry" if result.kept else "first"


def _run(flow: _Flow, ask: Callable, retries: Callable) -> list[GateResult]:
    request = next(flow)
    try:
        while True:
            if isinstance(request, _Ask):
                got = ask(request.inputs)
            else:
                with first_answers(request.first_answers):  # what a refinement prompter reads
                    got = retries(request.positions)
            request = flow.send(got)
    except StopIteration as done:
        return done.value


async def _arun(flow: _Flow, ask: Callable, retries: Callable) -> list[GateResult]:
    request = next(flow)
    try:
        while True:
            if isinstance(request, _Ask):
                got = await ask(request.inputs)
            else:
                with first_answers(request.first_answers):
                    got = await retries(request.positions)
            request = flow.send(got)
    except StopIteration as done:
        return done.value
