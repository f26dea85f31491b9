"""RetryGate.choose / achoose: the one gate and rerank flow behind AlignedChatModel, AlignProModule and evaluation."""

from __future__ import annotations

import asyncio

import pytest

from alignpro_plugins.gate import PROMPTER_KEPT_X, RetryGate


class Script:
    """A target that answers ``input.upper()``, a prompter that appends '!' (or keeps x), a length reward."""

    def __init__(self, keep: frozenset[str] = frozenset()) -> None:
        self.asked: list[list[str]] = []
        self.retried: list[list[int]] = []
        self.scored: list[list[tuple[str, str]]] = []
        self.keep = keep

    def reward(self, prompts: list[str], answers: list[str]) -> list[float]:
        self.scored.append(list(zip(prompts, answers, strict=True)))
        return [float(len(a)) for a in answers]

    def ask(self, inputs: list[str]) -> list[str]:
        self.asked.append(list(inputs))
        return [x.upper() for x in inputs]

    def retries(self, prompts: list[str]):
        def more(positions: list[int]) -> list[list[str]]:
            self.retried.append(list(positions))
            return [[] if prompts[j] in self.keep else [prompts[j] + "!"] for j in positions]

        return more


PROMPTS = ["ab", "abcd", "abc"]


def test_only_answers_below_the_threshold_are_asked_again_in_one_call():
    s = Script()
    results = RetryGate(s.reward, 3.5).choose(PROMPTS, PROMPTS, s.ask, s.retries(PROMPTS))
    assert s.asked == [PROMPTS, ["ab!", "abc!"]]  # x first, then the retries of the two short answers
    assert s.retried == [[0, 2]]
    assert s.scored[1] == [("ab", "AB!"), ("abc", "ABC!")]  # retries are scored against the original x
    assert [r.answer for r in results] == ["AB!", "ABCD", "ABC!"]
    assert [len(r.candidates) for r in results] == [2, 1, 2]
    assert results[0].decision.as_dict() == {
        "first_score": 2.0,
        "threshold": 3.5,
        "retried": True,
        "retry_score": 3.0,
        "kept": "retry",
    }
    assert results[1].decision.as_dict() == {
        "first_score": 4.0,
        "threshold": 3.5,
        "retried": False,
        "kept": "first",
    }
    assert results[0].input == "ab!" and results[1].input == "abcd"


def test_a_tie_keeps_the_answer_to_x_and_the_best_of_several_retries_wins():
    def reward(prompts, answers):
        return [{"A": 1.0, "A1": 1.0, "A2": 3.0, "A3": 2.0}[a] for a in answers]

    gate = RetryGate(reward, 2.0)
    [tie] = gate.choose(["a"], ["a"], lambda xs: [x.upper() for x in xs], lambda _: [["a1"]])
    assert tie.answer == "A" and tie.decision.kept == "first" and tie.decision.retry_score == 1.0
    [best] = gate.choose(["a"], ["a"], lambda xs: [x.upper() for x in xs], lambda _: [["a1", "a2", "a3"]])
    assert best.answer == "A2" and best.kept == 2 and best.decision.retry_score == 3.0


def test_no_retry_input_means_no_second_call_and_says_why():
    s = Script(keep=frozenset({"ab"}))
    [result] = RetryGate(s.reward, 10.0).choose(["ab"], ["ab"], s.ask, s.retries(["ab"]))
    assert s.asked == [["ab"]] and result.answer == "AB"
    assert result.decision.retried is False and result.decision.reason == PROMPTER_KEPT_X


def test_rerank_asks_every_prompt_again():
    s = Script()
    results = RetryGate.rerank(s.reward).choose(PROMPTS, PROMPTS, s.ask, s.retries(PROMPTS))
    assert s.retried == [[0, 1, 2]] and all(r.decision.kept == "retry" for r in results)


def test_an_answer_without_text_is_never_scored_or_kept():
    scored: list[list[str]] = []

    def reward(prompts, answers):
        scored.append(list(answers))
        return [float(len(a)) for a in answers]

    gate = RetryGate(reward, 100.0)
    text = lambda answer: answer if isinstance(answer, str) else None  # noqa: E731 - None: e.g. a tool call
    [first] = gate.choose(
        ["x"], ["x"], lambda xs: [{"tool": "call"}], lambda _: pytest.fail("not retried"), text=text
    )
    assert first.decision is None and first.answer == {"tool": "call"} and scored == []
    [kept] = gate.choose(
        ["x"], ["x"], lambda xs: ["a" if x == "x" else {"tool": 1} for x in xs], lambda _: [["y"]], text=text
    )
    assert kept.answer == "a" and kept.decision.retried and "retry_score" not in kept.decision.as_dict()
    assert scored == [["a"]]  # the unscorable retry never reached the reward


def test_the_async_flow_asks_and_decides_exactly_as_the_sync_one():
    sync, async_ = Script(), Script()
    expected = RetryGate(sync.reward, 3.5).choose(PROMPTS, PROMPTS, sync.ask, sync.retries(PROMPTS))

    async def ask(inputs):
        await asyncio.sleep(0)
        return async_.ask(inputs)

    async def retries(positions):
        return async_.retries(PROMPTS)(positions)

    got = asyncio.run(RetryGate(async_.reward, 3.5).achoose(PROMPTS, PROMPTS, ask, retries))
    assert got == expected and async_.asked == sync.asked and async_.scored == sync.scored


def test_one_input_per_prompt_is_required():
    with pytest.raises(ValueError, match="got 2 prompts but 1 inputs"):
        RetryGate(lambda p, a: [0.0] * len(a), 0.0).choose(["a", "b"], ["a"], list, list)
