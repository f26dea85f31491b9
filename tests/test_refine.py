"""Sequential Align-Pro: a refinement prompter ρ(x'' | x, y₀), its gate flow, training and evaluation."""

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


def test_a_refinement_tokenizes_the_first_answer_once(refiner):
    script(refiner)
    tokenized: list[str] = []
    token_ids = refiner.engine.token_ids
    refiner.engine.token_ids = lambda texts: tokenized.extend(texts) or token_ids(texts)  # type: ignore[method-assign]
    refiner.refine_results([PROMPT], [LONG])
    assert tokenized.count(LONG) == 1  # clipped once for the query that is checked and generated from
    with first_answers({PROMPT: LONG}):
        assert len(refiner.sample_rewrites([PROMPT], 2)[0]) == 2
    assert tokenized.count(LONG) == 2


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
    # One prompt that is not a str: the error names the batch methods of refining.
    for call in (refiner.refine, lambda x, y: asyncio.run(refiner.arefine(x, y))):
        with pytest.raises(
            TypeError, match=r"one str prompt here, got list.*to refine_batch / refine_results"
        ):
            call([PROMPT], SHORT)
        with pytest.raises(
            TypeError, match=r"one str first answer here, got None.*refine_batch / refine_results"
        ):
            call(PROMPT, None)


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


def test_the_adapters_refuse_a_refine_prompter_without_a_retry_gate(refiner, tmp_path):
    """Without a gate no first answer ever reaches it: refused when the adapter is built, not on every call."""
    import dspy
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from alignpro_plugins.dspy import AlignProModule
    from alignpro_plugins.langchain import AlignedChatModel, AlignProRunnable
    from alignpro_plugins.serving.app import create_app
    from alignpro_plugins.serving.upstream import Upstream

    needs_gate = r"needs a retry gate.*RetryGate\.rerank\(reward\).*RetryGate\.always\(\)"
    llm = FakeListChatModel(responses=["an answer"])
    folder, _ = build_tiny_prompter(tmp_path)  # an augment artifact, saved again as a refine one
    augment = Prompter.from_pretrained(folder, similarity=None)
    augment.manifest = augment.manifest.for_mode("refine")
    refine_folder = str(augment.save_pretrained(tmp_path / "refine"))
    augment.manifest = augment.manifest.for_mode("augment")
    for prompter in (refiner, refine_folder, AlignProRunnable(prompter_path=str(folder), mode="refine")):
        with pytest.raises(ValueError, match=needs_gate):
            AlignedChatModel(llm=llm, prompter=prompter)
    with pytest.raises(ValueError, match=needs_gate):
        AlignProModule(dspy.Predict("question -> answer"), refiner)
    upstream = Upstream("http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match=needs_gate):
        create_app(refiner, upstream)
    with pytest.raises(ValueError, match=needs_gate):
        create_app(augment, upstream, mode="refine")
    # With a gate each is built; a prompt-only prompter needs none.
    always = RetryGate.always()
    assert AlignedChatModel(llm=llm, prompter=refine_folder, retry_gate=always).retry_gate is always
    assert AlignedChatModel(llm=llm, prompter=str(folder)).retry_gate is None
    assert AlignProModule(dspy.Predict("question -> answer"), refiner, retry_gate=always).retry_gate is always
    create_app(refiner, upstream, gate=always)
    create_app(augment, upstream)
    augment.close()


# ---------------------------------------------------------------------------------------------- training
TRAIN_PROMPTS = [
    "write a poem about the sea",
    "what is green tea?",
    "explain python code",
    "list two numbers",
]
LIST_TEMPLATE = "Respond with a numbered list of at least five detailed points."
TINY_TRAIN = dict(
    target_max_new_tokens=6,
    per_device_train_batch_size=2,
    report_to="none",
    save_steps=1000,
    logging_steps=1,
    disable_tqdm=True,
)


def frozen_target(x: str) -> str:
    """The frozen model: its answer names the input it was given (so y0 and every y1 are told apart)."""
    return f"answer to {x}"


class KnownPreferences:
    """A reward with known preferences: a poem wants the list template, every other prompt its first answer."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompts, answers):
        self.prompts += list(prompts)
        return [
            (10.0 if LIST_TEMPLATE in a else 0.0) if "poem" in x else (5.0 if a == frozen_target(x) else 0.0)
            for x, a in zip(prompts, answers, strict=True)
        ]


def _refine_sft(tiny_lm_dir, out, **kw):
    from trainers.sft_config import AlignProSFTConfig

    settings = dict(
        mode="refine",
        num_candidates=2,
        prompter_max_new_tokens=6,
        templates=[LIST_TEMPLATE, "Be brief."],
        refine_answer_tokens=64,
        fit_check_prompts=2,
        max_steps=1,
        **TINY_TRAIN,
    )
    return AlignProSFTConfig(output_dir=str(out), base_model=tiny_lm_dir, **{**settings, **kw})


def test_first_answers_the_target_failed_to_give_are_counted_and_logged(caplog):
    import logging
    from types import SimpleNamespace

    from alignpro_plugins.targets import TargetError
    from trainers import kl_optimum

    class FailsOnBad:
        def generate(self, requests):
            raise TargetError("no answer", [None if "bad" in r.original else "y0" for r in requests])

    scorer = SimpleNamespace(target=FailsOnBad(), contexts={})
    with caplog.at_level(logging.WARNING, logger="trainers.kl_optimum"):
        answers = kl_optimum.first_answers(scorer, ["good", "bad one", "bad two", "bad one"])
    assert answers == {"good": "y0", "bad one": "", "bad two": ""}  # shown as empty, as before
    assert "2 of 3 first answers y0 failed" in caplog.text


def test_the_refine_bootstrap_trains_on_x_and_y0_and_keeps_the_best_candidate(tiny_lm_dir, tmp_path):
    from trainers.sft_trainer import AlignProSFTTrainer

    folder, _ = build_tiny_prompter(tmp_path / "prompt-only")  # an augment prompter: its guidance joins
    reward = KnownPreferences()
    cfg = _refine_sft(tiny_lm_dir, tmp_path / "sft", prompt_only_prompter=str(folder))
    trainer = AlignProSFTTrainer(cfg, prompts=TRAIN_PROMPTS, target=frozen_target, reward=reward)
    asked = []
    generate = trainer.prompter.engine.generate
    trainer.prompter.engine.generate = lambda queries, *a, **k: (
        asked.extend(queries) or generate(queries, *a, **k)
    )
    pairs = trainer.sft_pairs()
    # Every sampled refinement was drawn from a query that shows x and its first answer y0 = target(x).
    assert asked and all(
        any(f"Request:\n{x}\n\nFirst answer:\n{frozen_target(x)}" in q for x in TRAIN_PROMPTS) for q in asked
    )
    rows = [json.loads(line) for line in (tmp_path / "sft" / "bootstrap.jsonl").read_text().splitlines()]
    only = Prompter.from_pretrained(folder, similarity=None).rewrite_results(TRAIN_PROMPTS)
    for x, row, guidance in zip(TRAIN_PROMPTS, rows, only, strict=True):
        assert row["first_answer"] == frozen_target(x)
        texts = [c["text"] for c in row["candidates"]]
        # K samples, the prompt-only prompter's guidance, the templates, and no change (answered as y0 itself).
        assert len(texts) == 2 + 1 + 2 + 1 and texts[3:] == [LIST_TEMPLATE, "Be brief.", ""]
        assert texts[2] == (guidance.generated if guidance.rewritten else "")
        assert row["candidates"][-1]["shown"] == x
    # The best candidate by r(x, target(x'')): the list for the poem, no change (y0) for every other prompt.
    assert pairs == [(x, LIST_TEMPLATE if "poem" in x else "") for x in TRAIN_PROMPTS]
    assert set(reward.prompts) == set(TRAIN_PROMPTS)  # always scored against the original x
    # SFT rows: the query shows (x, y0); the completion is the kept refinement.
    data = trainer.dataset(pairs)
    for row in data:
        x = next(x for x in TRAIN_PROMPTS if f"Request:\n{x}\n\n" in row["prompt"])
        assert f"First answer:\n{frozen_target(x)}" in row["prompt"]
        assert row["completion"] == (LIST_TEMPLATE if "poem" in x else "")
    trained = trainer.train()
    saved = Manifest.load(tmp_path / "sft")
    assert saved.mode == "refine" and saved.refine_answer_tokens == 64
    assert saved.provenance["stages"][-1]["bootstrap"]["prompt_only_prompter"] == str(folder)
    assert trained.manifest.mode == "refine"


def test_a_bootstrap_win_is_labelled_by_the_candidate_that_won_not_its_text(tiny_lm_dir, tmp_path):
    from trainers.sft_trainer import AlignProSFTTrainer

    folder, _ = build_tiny_prompter(tmp_path / "prompt-only")
    quote = "Quote your sources for every claim."

    def reward(prompts, answers):  # the target echoes x'': a candidate that holds a wanted text scores
        return [10.0 if LIST_TEMPLATE in a or quote in a else 0.0 for a in answers]

    cfg = _refine_sft(tiny_lm_dir, tmp_path / "sft", prompt_only_prompter=str(folder))
    trainer = AlignProSFTTrainer(cfg, prompts=TRAIN_PROMPTS[:3], target=frozen_target, reward=reward)
    # Rows as candidates() lays them out: 2 samples, the prompt-only guidance, the 2 templates, no change.
    rows = {
        TRAIN_PROMPTS[0]: [LIST_TEMPLATE, "Be vivid."],  # a sample that equals a template wins first
        TRAIN_PROMPTS[1]: ["Be vivid.", "Be calm."],  # the prompt-only text, equal to a template, wins
        TRAIN_PROMPTS[2]: [quote, "Be calm."],  # a sample that equals the prompt-only text wins first
    }
    prompt_only = {TRAIN_PROMPTS[0]: "Be calm.", TRAIN_PROMPTS[1]: LIST_TEMPLATE, TRAIN_PROMPTS[2]: quote}
    trainer.candidates = lambda prompts: [  # type: ignore[method-assign]
        [(g, False) for g in [*rows[x], prompt_only[x], LIST_TEMPLATE, "Be brief.", ""]] for x in prompts
    ]
    trainer.sft_pairs()
    logged = [json.loads(line) for line in (tmp_path / "sft" / "bootstrap.jsonl").read_text().splitlines()]
    assert [row["kind"] for row in logged] == ["sampled", "prompt_only", "sampled"]
    assert trainer.bootstrap_stats["winners"] == {
        "sampled": 2,
        "template": 0,
        "no_change": 0,
        "prompt_only": 1,
    }


def test_refine_training_settings_are_checked(tiny_lm_dir, tmp_path):
    from trainers.sft_config import AlignProSFTConfig
    from trainers.sft_trainer import AlignProSFTTrainer

    with pytest.raises(ValueError, match="prompt_only_prompter is a refine-mode setting.*set mode='refine'"):
        AlignProSFTConfig(output_dir=str(tmp_path), prompt_only_prompter="x", **TINY_TRAIN)
    needs_bootstrap = r"drop the pairs \(pairs_data, or pairs= in code\) and bootstrap from prompts"
    with pytest.raises(ValueError, match=needs_bootstrap):
        AlignProSFTConfig(output_dir=str(tmp_path), mode="refine", pairs_data="pairs.jsonl", **TINY_TRAIN)
    with pytest.raises(ValueError, match=needs_bootstrap):
        AlignProSFTTrainer(_refine_sft(tiny_lm_dir, tmp_path), pairs=[("x", "y")])
    folder, _ = build_tiny_prompter(tmp_path / "p")
    rewrite = Prompter.from_pretrained(folder, similarity=None)
    rewrite.manifest = rewrite.manifest.for_mode("rewrite")
    rewrite.save_pretrained(tmp_path / "rewrite")
    trainer = AlignProSFTTrainer(
        _refine_sft(tiny_lm_dir, tmp_path / "o", prompt_only_prompter=str(tmp_path / "rewrite")),
        prompts=TRAIN_PROMPTS[:2],
        target=frozen_target,
        reward=KnownPreferences(),
    )
    with pytest.raises(ValueError, match="only an augment-mode prompter's guidance can be a candidate"):
        trainer.sft_pairs()


@pytest.fixture
def refine_sft_dir(tiny_lm_dir, tmp_path):
    from trainers.sft_trainer import AlignProSFTTrainer

    cfg = _refine_sft(tiny_lm_dir, tmp_path / "sft", max_steps=2)
    AlignProSFTTrainer(cfg, prompts=TRAIN_PROMPTS, target=frozen_target, reward=KnownPreferences()).train()
    return str(tmp_path / "sft")


def test_kl_optimum_in_refine_mode_runs_a_round_anchored_on_the_refine_sft_prompter(refine_sft_dir, tmp_path):
    from trainers.kl_optimum_config import KLOptimumConfig
    from trainers.kl_optimum_trainer import KLOptimumTrainer

    seen: list[str] = []

    def target(x: str) -> str:
        seen.append(x)
        return frozen_target(x)

    reward = KnownPreferences()
    cfg = KLOptimumConfig(
        output_dir=str(tmp_path / "rl"),
        sft_prompter=refine_sft_dir,
        beta=0.5,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-2,
        anchors=["", LIST_TEMPLATE],
        validation_prompts=1,
        **TINY_TRAIN,
    )
    trainer = KLOptimumTrainer(cfg, prompts=TRAIN_PROMPTS, target=target, reward=reward)
    assert trainer.mode == "refine"
    asked: list[str] = []
    generate = trainer.prompter.engine.generate
    trainer.prompter.engine.generate = lambda queries, *a, **k: (
        asked.extend(queries) or generate(queries, *a, **k)
    )
    trainer.train()
    # Every query (samples, the deployed refinement, validation) showed x and its first answer.
    assert asked and all(
        any(f"Request:\n{x}\n\nFirst answer:\n{frozen_target(x)}" in q for x in TRAIN_PROMPTS) for q in asked
    )
    assert set(reward.prompts) <= set(TRAIN_PROMPTS)  # rewards score the final answer against x
    assert all(any(t.startswith(x) for x in TRAIN_PROMPTS) for t in seen)  # x'' = x + guidance, or x
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and "val_reward" in rows[0]
    assert rows[1]["samples"] == 3 * (2 + 1 + 2)  # K samples + the deployed refinement + 2 anchors per prompt
    loaded = Prompter.from_pretrained(tmp_path / "rl", similarity=None)
    assert loaded.manifest.mode == "refine" and loaded.manifest.refine_answer_tokens == 64
    assert loaded.manifest.provenance["stages"][-1]["algorithm"] == "kl-optimum"


def test_grpo_queries_in_refine_mode_show_the_first_answer(refine_sft_dir, tmp_path):
    from trainers.rl_config import AlignProRLConfig
    from trainers.rl_trainer import AlignProRLTrainer

    cfg = AlignProRLConfig(
        output_dir=str(tmp_path / "grpo"),
        sft_prompter=refine_sft_dir,
        num_generations=2,
        max_completion_length=6,
        max_steps=1,
        **TINY_TRAIN,
    )
    trainer = AlignProRLTrainer(
        cfg, prompts=TRAIN_PROMPTS[:2], target=frozen_target, reward=KnownPreferences()
    )
    data = trainer.dataset()
    assert data["original"] == TRAIN_PROMPTS[:2]
    for x, query in zip(data["original"], data["prompt"], strict=True):
        assert query == trainer.prompter.format_query(x, answer=frozen_target(x))


# ---------------------------------------------------------------------------------------------- evaluation
EVAL_PROMPTS = ["green tea benefits?", "why is the sky blue?", "tea or coffee?", "iced tea recipe?"]


def test_refine_and_keep_better_records_calls_refinements_and_the_kept_answer(refiner, tmp_path):
    from alignpro_plugins.evaluation import Evaluator, FrozenAlone, RefineAndKeepBetter
    from alignpro_plugins.rewards import CallableReward
    from alignpro_plugins.targets import CallableTarget

    asked_prompter = script(refiner)
    sent: list[str] = []

    def answer(x: str) -> str:
        sent.append(x)
        return Script().answer(x)

    scored: list[str] = []

    def length(prompts, answers):
        scored.extend(prompts)
        return [float(len(a)) for a in answers]

    judges = {
        "len": CallableReward(length, name="len"),
        "words": CallableReward(lambda ps, ans: [float(len(a.split())) for a in ans], name="words"),
    }
    configs = [
        FrozenAlone(),
        RefineAndKeepBetter(prompter=refiner),
        RefineAndKeepBetter(prompter=refiner, threshold=20.0, name="refine-gated"),
    ]
    ev = Evaluator(EVAL_PROMPTS, CallableTarget(answer, name="t"), judges, out_dir=tmp_path, focus="refine")
    report = ev.run(configs)
    always = {r["prompt"]: r for r in report.records if r["config"] == "refine"}
    gated = {r["prompt"]: r for r in report.records if r["config"] == "refine-gated"}
    for x in EVAL_PROMPTS:
        thin = "tea" in x
        # Always: every first answer went to the prompter; x'' was asked where it wrote guidance (2 calls).
        assert always[x]["k"] == (2 if thin else 1) and always[x]["answer"] == LONG
        assert always[x]["refinement"]["fallback_reason"] == (None if thin else guard.NO_CHANGE)
        # Gated at 20: only the thin (14-character) first answers were refined.
        assert gated[x]["k"] == (2 if thin else 1)
        assert (gated[x]["refinement"] is None) == (not thin)
        if thin:  # the refined input is x plus the guidance, and its (longer) answer was kept
            assert always[x]["input"] == f"{x}\n\n{always[x]['refinement']['guidance']}"
            assert always[x]["kept"] == 1 and len(always[x]["candidates"]) == 2
    requests = [q.split("Request:\n")[1].split("\n")[0] for q in asked_prompter]
    assert sorted(requests) == sorted(EVAL_PROMPTS + [x for x in EVAL_PROMPTS if "tea" in x])
    assert all(
        (f"First answer:\n{SHORT}" in q) == ("tea" in x)
        for q, x in zip(asked_prompter, requests, strict=True)
    )
    assert set(scored) <= set(EVAL_PROMPTS)  # every answer scored against the original x
    summary = report.summary["configs"]
    assert summary["refine"]["target_calls_per_prompt"] == pytest.approx(1.75)
    assert summary["refine"]["refinements"] == {
        "prompts": 4,
        "refined": 4,
        "kept_x": 1,
        "distinct": 1,
        "most_common": [[guidance_for(f"First answer:\n{SHORT}").lower(), 3]],
    }
    assert summary["refine-gated"]["refinements"]["refined"] == 3
    assert summary["refine"]["outputs"]["distinct"] == 2 and summary["refine"]["outputs"]["n"] == 4
    assert summary["refine"]["selection"]["prompts_chosen_between"] == 3
    assert "| refine |" in report.to_markdown()
    # Resumed: the records (refinements included) are reused, nothing is asked again.
    sent.clear()
    again = Evaluator(
        EVAL_PROMPTS, CallableTarget(answer, name="t"), judges, out_dir=tmp_path, focus="refine"
    )
    assert again.run(configs).summary["configs"]["refine"]["refinements"] == summary["refine"]["refinements"]
    assert sent == []


def test_a_refine_step_that_lost_the_first_answer_stops_naming_the_prompt(refiner, tmp_path, monkeypatch):
    from alignpro_plugins import evaluation
    from alignpro_plugins.evaluation import Evaluator, FrozenAlone, RefineAndKeepBetter
    from alignpro_plugins.rewards import CallableReward
    from alignpro_plugins.targets import CallableTarget

    asked_prompter = script(refiner)
    monkeypatch.setattr(evaluation, "first_answer", lambda x: None)  # the gate step handed no first answer
    judge = {"len": CallableReward(lambda ps, ans: [float(len(a)) for a in ans], name="len")}
    ev = Evaluator(EVAL_PROMPTS[:1], CallableTarget(Script().answer, name="t"), judge, out_dir=tmp_path)
    with pytest.raises(
        RuntimeError, match="no first answer to refine for the prompt 'green tea benefits\\?'"
    ):
        ev.run([FrozenAlone(), RefineAndKeepBetter(prompter=refiner)])
    assert asked_prompter == []  # not refined from an empty answer


def test_refine_and_keep_better_needs_a_refine_prompter_and_a_number(tmp_path):
    from alignpro_plugins.evaluation import RefineAndKeepBetter

    folder, _ = build_tiny_prompter(tmp_path)
    augment = Prompter.from_pretrained(folder, similarity=None)
    with pytest.raises(ValueError, match=r"needs a refinement prompter \(mode 'refine'\), got 'augment'"):
        RefineAndKeepBetter(prompter=augment)
    with pytest.raises(ValueError, match="threshold must be a number"):
        RefineAndKeepBetter(prompter=refine_prompter(), threshold=float("nan"))
