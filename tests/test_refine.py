"""Sequential Align-Pro: a refinement prompter ρ(x'' | x, y₀), its gate flow, training and evaluation (issue 41)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Request

from alignpro_plugins import guard
from alignpro_plugins.engine import Generation
from alignpro_plugins.gate import PROMPTER_KEPT_X, RetryGate
from alignpro_plugins.manifest import (
    DEFAULT_INSTRUCTIONS,
    DEFAULT_REFINE_ANSWER_TOKENS,
    DEFAULT_REFINE_INSTRUCTION,
    GenerationDefaults,
    Manifest,
)
from alignpro_plugins.prompter import CLIPPED_MARK, Prompter
from alignpro_plugins.refining import first_answer, first_answers
from alignpro_plugins.testing import build_tiny_prompter, tiny_causal_lm

PROMPT = "What are the benefits of green tea?"
SHORT = "It is healthy."  # a thin first answer
LONG = "Green tea holds antioxidants, may help focus, and has less caffeine than coffee. " * 2


def refine_prompter(*, answer_tokens: int | None = None, **generation) -> Prompter:
    """A tiny refine-mode prompter (random weights: its own output is scripted where it matters)."""
    model, tok = tiny_causal_lm(0, varied=True)
    manifest = Manifest(
        base_model="tiny",
        mode="refine",
        generation=GenerationDefaults(**{"max_new_tokens": 8, **generation}),
        similarity_model=None,
        refine_answer_tokens=answer_tokens,
    )
    return Prompter(model.eval(), tok, manifest, similarity=None)


def guidance_for(query: str) -> str:
    """What the scripted refinement prompter writes: it names what the first answer in its query lacked."""
    shown = query.split("First answer:\n", 1)[1]
    if shown.startswith(SHORT):
        return "The answer was too thin: list three concrete benefits with one example each."
    if shown.startswith("BROKEN"):
        return "again " * 40  # a repetition loop: the guard rejects it
    return ""  # nothing lacking: no change


def script(pr: Prompter, by_query=guidance_for) -> list[str]:
    """Replace the prompter's model by scripted outputs; returns the queries it was asked."""
    asked: list[str] = []

    def generate_call(queries, settings, num_return_sequences=1):
        asked.extend(queries)
        return [[Generation(by_query(q), True, 1, 1)] * num_return_sequences for q in queries]

    pr.engine.generate_call = generate_call  # type: ignore[method-assign]
    return asked


@pytest.fixture
def refiner():
    pr = refine_prompter()
    yield pr
    pr.close()


# ---------------------------------------------------------------------------------------------- the meta-prompt
def test_the_meta_prompt_holds_x_and_the_first_answer_clipped_to_the_manifest_budget():
    pr = refine_prompter(answer_tokens=12)
    query = pr.format_query(PROMPT, answer=LONG)
    shown = pr.engine.tokenizer.decode(pr.engine.token_ids([LONG])[0][:12]).rstrip()
    assert f"Request:\n{PROMPT}\n\nFirst answer:\n{shown}{CLIPPED_MARK}" in query
    assert LONG not in query and pr.clip_answer(LONG) == shown + CLIPPED_MARK
    # An answer within the budget is shown whole, unmarked; the slots are filled once ("{answer}" in x stays).
    odd = "Explain the {answer} placeholder."
    assert f"Request:\n{odd}\n\nFirst answer:\nTea.<|im_end|>" in pr.format_query(odd, answer="Tea.")
    # The same function formats training and inference: rewrite_results asks exactly this query.
    asked = script(pr)
    pr.refine_results([PROMPT], [LONG])
    assert asked == [query]
    pr.close()


def test_a_refine_manifest_gets_the_default_meta_prompt_and_budget_and_checks_its_own():
    m = Manifest(base_model="tiny", mode="refine")
    assert m.instructions["refine"] == DEFAULT_REFINE_INSTRUCTION
    assert m.refine_answer_tokens == DEFAULT_REFINE_ANSWER_TOKENS
    assert m.instructions["augment"] == DEFAULT_INSTRUCTIONS["augment"]
    with pytest.raises(ValueError, match=r"mode 'refine' must contain '\{answer\}'"):
        Manifest(base_model="tiny", mode="refine", instructions={"refine": "Improve: {prompt}"})
    with pytest.raises(ValueError, match="refine_answer_tokens must be null or an integer >= 1"):
        Manifest(base_model="tiny", mode="refine", refine_answer_tokens=0)
    # A prompt-only manifest is written as before: no refine template, no budget key.
    plain = json.loads(Manifest(base_model="tiny").to_json())
    assert "refine_answer_tokens" not in plain and "refine" not in plain["instructions"]


def test_rewrite_on_a_refine_prompter_says_it_needs_the_first_answer(refiner):
    with pytest.raises(
        ValueError, match=r"refinement prompter \(mode 'refine'\).*refine\(prompt, first_answer\)"
    ):
        refiner.rewrite(PROMPT)
    with pytest.raises(ValueError, match="needs that answer"):
        asyncio.run(refiner.arewrite_results([PROMPT]))
    with pytest.raises(ValueError, match="answer= is read in refine mode only"):
        refiner.format_query(PROMPT, "augment", answer=SHORT)
    with pytest.raises(ValueError, match="got 2 prompts but 1 first answers"):
        refiner.refine_results([PROMPT, "tea?"], [SHORT])
    with pytest.raises(TypeError, match=r"str first answers only: first_answers\[0\] is None"):
        refiner.refine_results([PROMPT], [None])  # type: ignore[list-item]


def test_refinements_follow_the_first_answer_and_a_failing_one_passes_x_through(refiner):
    script(refiner)
    thin, fine, broken = refiner.refine_results([PROMPT] * 3, [SHORT, LONG, "BROKEN answer"])
    assert thin.rewritten and thin.mode == "refine"
    assert thin.text == f"{PROMPT}\n\n{thin.generated}" and "too thin" in thin.generated
    # Nothing lacking: no change; a repetition loop: rejected by the intent guard. Both pass x through, saying why.
    assert (fine.text, fine.fallback_reason) == (PROMPT, guard.NO_CHANGE)
    assert (broken.text, broken.fallback_reason) == (PROMPT, guard.REPETITION)
    assert refiner.refine(PROMPT, SHORT) == thin.text == asyncio.run(refiner.arefine(PROMPT, SHORT))
    assert refiner.refine_batch([PROMPT, PROMPT], [SHORT, LONG]) == [thin.text, PROMPT]
    assert asyncio.run(refiner.arefine_batch([PROMPT], [SHORT])) == [thin.text]
    # An empty prompt falls back before any generation, as in the other modes.
    assert refiner.refine_results([""], [SHORT])[0].fallback_reason == guard.EMPTY_INPUT


def test_inside_a_gate_step_rewrite_reads_the_first_answers(refiner):
    script(refiner)
    with first_answers({PROMPT: SHORT, "tea?": LONG}):
        thin, fine = refiner.rewrite_results([PROMPT, "tea?"])
        assert first_answer("unknown") is None  # several answers: only exact prompts match
    assert thin.rewritten and fine.fallback_reason == guard.NO_CHANGE
    with first_answers({PROMPT: SHORT}):  # one gated request: its answer is the answer to each of its parts
        assert refiner.rewrite("part of the request") == "part of the request\n\n" + thin.generated


def test_a_refine_artifact_saves_loads_and_refines(tmp_path):
    folder, base_dir = build_tiny_prompter(tmp_path)
    trained = Prompter.from_pretrained(folder, similarity=None)
    trained.manifest = trained.manifest.for_mode("refine")
    trained.manifest.refine_answer_tokens = 40
    out = trained.save_pretrained(tmp_path / "refine")
    data = json.loads((out / "alignpro.json").read_text())
    assert data["mode"] == "refine" and data["refine_answer_tokens"] == 40
    assert data["instructions"]["refine"] == DEFAULT_REFINE_INSTRUCTION
    loaded = Prompter.from_pretrained(out, similarity=None)
    assert loaded.manifest == trained.manifest
    assert loaded.refine_results([PROMPT], [SHORT]) == trained.refine_results([PROMPT], [SHORT])
    with pytest.raises(ValueError, match="needs that answer"):
        loaded.rewrite(PROMPT)
    # Plain tools: the folder's chat template renders [user x, assistant y0] as the prompter's query.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": SHORT}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == loaded.format_query(PROMPT, answer=SHORT)
    with pytest.raises(Exception, match="refinement prompter"):
        tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False)
    trained.close()
    loaded.close()


# ---------------------------------------------------------------------------------------------- the gate's flow
class Script:
    """A target that answers x briefly and x'' at length, a length reward that records what it scored."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.scored: list[tuple[str, str]] = []

    def answer(self, x: str) -> str:
        return LONG if "\n\n" in x else SHORT if "tea" in x else LONG

    def ask(self, inputs: list[str]) -> list[str]:
        self.asked.append(list(inputs))
        return [self.answer(x) for x in inputs]

    async def aask(self, inputs: list[str]) -> list[str]:
        await asyncio.sleep(0)
        return self.ask(inputs)

    def reward(self, prompts: list[str], answers: list[str]) -> list[float]:
        self.scored += list(zip(prompts, answers, strict=True))
        return [float(len(a)) for a in answers]


PROMPTS = ["green tea benefits?", "why is the sky blue?", "tea or coffee?"]


def refine_retries(pr: Prompter, prompts: list[str]):
    """The retry inputs an adapter builds: the prompter's output for x, or none when it kept x."""

    def retries(positions: list[int]) -> list[list[str]]:
        return [[r.text] if r.rewritten else [] for r in pr.rewrite_results([prompts[j] for j in positions])]

    return retries


def test_the_gate_refines_only_below_the_threshold_and_keeps_the_better_answer(refiner):
    asked_prompter = script(refiner)
    s = Script()
    results = RetryGate(s.reward, 20.0).choose(PROMPTS, PROMPTS, s.ask, refine_retries(refiner, PROMPTS))
    # x first; only the two thin answers (length 14 < 20) are refined, in one prompter batch and one target call.
    assert len(s.asked) == 2 and s.asked[0] == PROMPTS
    assert len(asked_prompter) == 2 and all(f"First answer:\n{SHORT}" in q for q in asked_prompter)
    refined = [x for x in s.asked[1]]
    assert [x.split("\n\n")[0] for x in refined] == [PROMPTS[0], PROMPTS[2]]
    # The reward scored every answer against the ORIGINAL x, never x''.
    assert [p for p, _ in s.scored] == [*PROMPTS, PROMPTS[0], PROMPTS[2]]
    assert [r.answer for r in results] == [LONG, LONG, LONG]
    assert [len(r.candidates) for r in results] == [2, 1, 2]  # target calls per prompt
    assert results[0].decision.kept == "retry" and results[0].input == refined[0]
    assert results[1].decision.as_dict() == {
        "first_score": float(len(LONG)),
        "threshold": 20.0,
        "retried": False,
        "kept": "first",
    }


def test_the_gate_keeps_the_first_answer_when_it_scores_higher_and_skips_a_kept_x(refiner):
    script(refiner)
    s = Script()
    shorter_is_better = RetryGate.rerank(lambda prompts, answers: [-float(len(a)) for a in answers])
    [result] = shorter_is_better.choose(PROMPTS[:1], PROMPTS[:1], s.ask, refine_retries(refiner, PROMPTS[:1]))
    assert len(s.asked) == 2 and result.answer == SHORT and result.decision.kept == "first"
    # A first answer the prompter finds nothing lacking in: x is kept, no second target call.
    s2 = Script()
    [kept] = RetryGate.rerank(s2.reward).choose(["sky?"], ["sky?"], s2.ask, refine_retries(refiner, ["sky?"]))
    assert len(s2.asked) == 1 and kept.decision.reason == PROMPTER_KEPT_X


def test_the_async_gate_refines_as_the_sync_one_does(refiner):
    script(refiner)
    sync, asyn = Script(), Script()
    gate = RetryGate(sync.reward, 20.0)
    want = gate.choose(PROMPTS, PROMPTS, sync.ask, refine_retries(refiner, PROMPTS))

    async def aretries(positions: list[int]) -> list[list[str]]:
        results = await refiner.arewrite_results([PROMPTS[j] for j in positions])
        return [[r.text] if r.rewritten else [] for r in results]

    got = asyncio.run(RetryGate(asyn.reward, 20.0).achoose(PROMPTS, PROMPTS, asyn.aask, aretries))
    assert sync.asked == asyn.asked and sync.scored == asyn.scored
    assert [(r.answer, r.kept, r.decision) for r in got] == [(r.answer, r.kept, r.decision) for r in want]


def test_without_a_reward_the_gate_always_refines_and_keeps_the_refined_answer(refiner):
    script(refiner)
    s = Script()
    results = RetryGate.always().choose(PROMPTS, PROMPTS, s.ask, refine_retries(refiner, PROMPTS))
    assert s.scored == [] and len(s.asked) == 2
    assert [r.kept for r in results] == [1, 0, 1]  # the sky answer was fine: the prompter kept x
    assert results[0].decision.as_dict() == {"threshold": float("inf"), "retried": True, "kept": "retry"}
    assert results[1].decision.reason == PROMPTER_KEPT_X
    with pytest.raises(ValueError, match="reward is None"):
        RetryGate(None, 0.5)


# ---------------------------------------------------------------------------------------------- the adapters
def test_aligned_chat_model_refines_through_the_gate_with_a_refine_prompter(refiner):
    """No new plumbing: a refine-mode prompter and a gate are all AlignedChatModel needs."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from alignpro_plugins.langchain import AlignedChatModel

    asked_prompter = script(refiner)
    sent: list[str] = []

    class Target(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "script"

        def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
            x = next(m.text for m in reversed(messages) if isinstance(m, HumanMessage))
            sent.append(x)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(Script().answer(x)))])

    scored: list[tuple[str, str]] = []

    def reward(prompts, answers):
        scored.extend(zip(prompts, answers, strict=True))
        return [float(len(a)) for a in answers]

    aligned = AlignedChatModel(llm=Target(), prompter=refiner, retry_gate=RetryGate(reward, 20.0))
    answer = aligned.invoke("tea or coffee?")
    assert sent[0] == "tea or coffee?" and sent[1].startswith("tea or coffee?\n\nThe answer was too thin")
    assert len(sent) == 2 and f"First answer:\n{SHORT}" in asked_prompter[0]  # x'' written from (x, y0)
    assert answer.content == LONG and answer.response_metadata["alignpro_gate"]["kept"] == "retry"
    assert [p for p, _ in scored] == ["tea or coffee?"] * 2  # both answers scored against the original x
    # Async: the same flow, the first answer reaches the prompter through the awaited retry step.
    sent.clear()
    assert asyncio.run(aligned.ainvoke("tea or coffee?")).content == LONG and len(sent) == 2
    # A good first answer is kept without asking the prompter.
    sent.clear()
    asked_prompter.clear()
    assert aligned.invoke("why is the sky blue?").content == LONG and sent == ["why is the sky blue?"]
    assert asked_prompter == []


def test_dspy_module_refines_through_the_gate_with_a_refine_prompter(refiner):
    import dspy
    from dspy.utils import DummyLM

    from alignpro_plugins.dspy import AlignProModule, get_gate

    asked_prompter = script(refiner)
    lm = DummyLM({"too thin": {"answer": LONG}, "": {"answer": SHORT}})
    module = AlignProModule(
        dspy.Predict("question -> answer"),
        refiner,
        retry_gate=RetryGate(lambda prompts, answers: [float(len(a)) for a in answers], 20.0),
    )
    with dspy.context(lm=lm):
        pred = module(question="Benefits of green tea?")
    assert pred.answer == LONG.strip() and len(lm.history) == 2
    assert f"Request:\nBenefits of green tea?\n\nFirst answer:\n{SHORT}" in asked_prompter[0]
    assert get_gate(pred)["kept"] == "retry"


def test_the_proxy_refines_through_its_gate_with_a_refine_prompter(refiner):
    import httpx
    from fastapi import FastAPI

    from alignpro_plugins.serving.app import create_app
    from alignpro_plugins.serving.upstream import Upstream
    from tests.servers import ThreadedUvicorn

    asked_prompter = script(refiner)
    sent: list[str] = []
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        x = (await request.json())["messages"][-1]["content"]
        sent.append(x)
        message = {"role": "assistant", "content": Script().answer(x)}
        return {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}

    gate = RetryGate(lambda prompts, answers: [float(len(a)) for a in answers], 20.0)
    with ThreadedUvicorn(upstream) as up:
        with ThreadedUvicorn(create_app(refiner, Upstream(up.base_url), gate=gate)) as proxy:
            body = {"model": "m", "messages": [{"role": "user", "content": "tea or coffee?"}]}
            resp = httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == LONG
    assert sent[0] == "tea or coffee?" and sent[1].startswith("tea or coffee?\n\nThe answer was too thin")
    assert f"First answer:\n{SHORT}" in asked_prompter[0]
    assert resp.json()["alignpro"]["gate"]["kept"] == "retry"
