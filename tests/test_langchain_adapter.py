"""AlignProRunnable and AlignedChatModel logic, with fake chat models and the tiny prompter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, FakeListChatModel, GenericFakeChatModel
from langchain_core.load import dumpd, load
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableConfig, RunnableLambda, RunnableSequence
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langchain_core.utils.function_calling import convert_to_openai_tool

from alignpro_plugins import guard
from alignpro_plugins.engine import Generation
from alignpro_plugins.gate import RetryGate
from alignpro_plugins.langchain import (
    ACCEPTED_INPUTS,
    ENABLED_CONFIG_KEY,
    GENERATION_KEYS,
    NO_HUMAN_MESSAGE,
    NO_TEXT_CONTENT,
    REWRITE_RUN_NAME,
    AlignedChatModel,
    AlignProRunnable,
    ChatLocalTransformers,
    PrompterError,
    RewriteRecorder,
)
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.targets import LangChainTarget, as_target

GUIDANCE = "Be thorough and give an example."


# ---------------------------------------------------------------------- helpers (also used by other files)
class StubPrompter(Prompter):
    """A real Prompter (batcher, guard, compose) whose model output is fixed: only generation is stubbed.

    ``batches`` records the size of every generate call, so tests can see the batching.
    """

    guidance = GUIDANCE

    def stub_generate(self, queries, settings, num_return_sequences=1, **kwargs) -> list[list[Generation]]:
        self.batches.append(len(queries))
        return [[Generation(self.guidance_for(q), True, 0, 0)] * num_return_sequences for q in queries]

    def guidance_for(self, query: str) -> str:
        return self.guidance

    @classmethod
    def build(cls, base_dir: str, **kwargs: Any) -> StubPrompter:
        p = cls.from_base(base_dir, similarity=None, **kwargs)
        p.batches = []
        p.engine.generate = p.stub_generate  # type: ignore[method-assign]
        return p


class EchoChatModel(BaseChatModel):
    """Answers with the text of the last human message it received; records what it was sent."""

    seen: ClassVar[list[list[BaseMessage]]] = []
    seen_kwargs: ClassVar[list[dict[str, Any]]] = []

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        self.seen.append(list(messages))
        self.seen_kwargs.append(dict(kwargs))
        return next(m.text for m in reversed(messages) if isinstance(m, HumanMessage))

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self._answer(messages, kwargs)))])

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        await asyncio.sleep(0)  # a real await point, so concurrent calls interleave
        return self._generate(messages, stop, **kwargs)

    def _stream(
        self, messages, stop=None, run_manager: CallbackManagerForLLMRun | None = None, **kwargs
    ) -> Iterator[ChatGenerationChunk]:
        words = self._answer(messages, kwargs).split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=word if last else word + " ", chunk_position="last" if last else None
                )
            )

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        names = [convert_to_openai_tool(t)["function"]["name"] for t in tools]
        return self.bind(tools=names, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema, *, include_raw=False, **kwargs):
        def parse(value: Any) -> dict[str, Any]:
            text = value if isinstance(value, str) else value[-1].text
            return {"schema": schema, "prompt": text}

        return RunnableLambda(parse)


def run_tree(run, depth: int = 0) -> list[tuple[int, str, Any]]:
    rows = [(depth, run.name, run)]
    for child in run.child_runs:
        rows += run_tree(child, depth + 1)
    return rows


def rewrite_runs(collector: RunCollectorCallbackHandler) -> list[Any]:
    return [r for root in collector.traced_runs for _, name, r in run_tree(root) if name == REWRITE_RUN_NAME]


@pytest.fixture(scope="module")
def stub(tiny_lm_dir) -> StubPrompter:
    return StubPrompter.build(tiny_lm_dir)


@pytest.fixture
def rewriter(stub) -> AlignProRunnable:
    stub.batches.clear()
    return AlignProRunnable(stub)


@pytest.fixture(scope="module")
def tiny_prompter(tiny_lm_dir) -> Prompter:
    return Prompter.from_base(tiny_lm_dir, similarity=None)


def augmented(text: str) -> str:
    return f"{text}\n\n{GUIDANCE}"


# ---------------------------------------------------------------------- input kinds
def test_str_and_string_prompt_value(rewriter):
    assert rewriter.invoke("Tell me about tea") == augmented("Tell me about tea")
    out = rewriter.invoke(StringPromptValue(text="Tell me about tea"))
    assert isinstance(out, StringPromptValue) and out.text == augmented("Tell me about tea")


def test_only_latest_human_message_text_changes(rewriter):
    image = {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    messages = [
        SystemMessage("You are terse."),
        HumanMessage("first question", id="h1"),
        AIMessage("first answer"),
        ToolMessage("42", tool_call_id="call-1"),
        HumanMessage([{"type": "text", "text": "What is in this picture?"}, image], id="h2", name="ann"),
        AIMessage("thinking"),
    ]
    out = rewriter.invoke(messages)
    assert isinstance(out, list) and len(out) == len(messages)
    for i in (0, 1, 2, 3, 5):
        assert out[i] == messages[i]
    latest = out[4]
    assert isinstance(latest, HumanMessage) and latest.id == "h2" and latest.name == "ann"
    assert latest.content == [{"type": "text", "text": augmented("What is in this picture?")}, image]
    assert messages[4].content[0]["text"] == "What is in this picture?"  # the input is not mutated


def test_a_multi_part_message_has_its_last_text_part_rewritten_in_place(rewriter):
    # Issue 39 item 6: the text parts were merged into the first one, moving text across the image.
    image = {"type": "image", "url": "u"}
    msg = HumanMessage(["part one", image, {"type": "text", "text": "part two", "id": "t2"}])
    recorder = RewriteRecorder()
    out = rewriter.invoke([msg], config={"callbacks": [recorder]})[0]
    assert out.content == ["part one", image, {"type": "text", "text": augmented("part two"), "id": "t2"}]
    assert recorder.records[-1]["original"] == "part two"  # the prompter saw the last text part alone
    two_texts = rewriter.invoke(HumanMessage([{"type": "text", "text": "one"}, "two", image]))
    assert two_texts.content == [{"type": "text", "text": "one"}, augmented("two"), image]


def test_chat_prompt_value_message_likes_and_chat_message(rewriter):
    value = ChatPromptValue(messages=[SystemMessage("s"), HumanMessage("q")])
    out = rewriter.invoke(value)
    assert isinstance(out, ChatPromptValue)
    assert out.messages == [SystemMessage("s"), HumanMessage(augmented("q"))]
    likes = rewriter.invoke([("system", "s"), ("human", "q")])
    assert likes == [SystemMessage("s"), HumanMessage(augmented("q"))]
    role_user = rewriter.invoke([ChatMessage(role="user", content="q")])
    assert role_user[0].content == augmented("q") and role_user[0].role == "user"
    assert rewriter.invoke(HumanMessage("q")) == HumanMessage(augmented("q"))


def test_message_likes_come_back_as_messages_whether_rewritten_or_not(rewriter):
    # The output type must not depend on whether the prompter's output was used.
    rewritten = rewriter.invoke([("system", "s"), ("human", "q")])
    passed = rewriter.invoke([("system", "s"), ("ai", "a")])  # nothing to rewrite
    disabled = rewriter.invoke(
        [{"role": "user", "content": "q"}], config={"configurable": {ENABLED_CONFIG_KEY: False}}
    )
    empty = rewriter.invoke([("human", "  ")])  # the prompter's own fallback (empty_input)
    assert rewritten == [SystemMessage("s"), HumanMessage(augmented("q"))]
    assert passed == [SystemMessage("s"), AIMessage("a")]
    assert disabled == [HumanMessage("q")] and empty == [HumanMessage("  ")]
    for out in (rewritten, passed, disabled, empty):
        assert isinstance(out, list) and all(isinstance(m, BaseMessage) for m in out)
    # A tuple of messages comes back as a list too, and so does a nested value under input_key.
    assert rewriter.invoke((SystemMessage("s"), AIMessage("a"))) == [SystemMessage("s"), AIMessage("a")]
    assert rewriter.invoke({"input": [("ai", "a")], "k": 1}) == {"input": [AIMessage("a")], "k": 1}
    assert rewriter.invoke({"input": [("human", "q")], "k": 1}) == {
        "input": [HumanMessage(augmented("q"))],
        "k": 1,
    }
    messages = [SystemMessage("s"), AIMessage("a")]
    assert rewriter.invoke(messages) is messages  # a list of messages passes through as is


def test_dict_input_and_input_key(stub):
    r = AlignProRunnable(stub, input_key="question")
    out = r.invoke({"question": "q", "context": "ctx"})
    assert out == {"question": augmented("q"), "context": "ctx"}
    assert r.invoke({"question": [HumanMessage("q")]}) == {"question": [HumanMessage(augmented("q"))]}


def test_a_dict_without_the_input_key_is_a_value_error_naming_the_key_and_the_keys_given(stub):
    # Issue 39 item 6: it was a KeyError; a key of another type must not break the message either.
    r = AlignProRunnable(stub, input_key="question")
    with pytest.raises(ValueError, match=r"without its input key 'question' \(keys given: \['input', 3\]\)"):
        r.invoke({"input": "q", 3: "x"})
    assert isinstance(r.batch([{"input": "q"}], return_exceptions=True)[0], ValueError)


def test_an_empty_batch_asks_nothing(rewriter, stub):
    assert rewriter.batch([]) == [] and asyncio.run(rewriter.abatch([])) == [] and stub.batches == []


@pytest.mark.parametrize("bad", [3, None, b"bytes", {1, 2}, [object()]])
def test_unsupported_inputs_raise_type_error_naming_accepted_types(rewriter, bad):
    with pytest.raises(TypeError) as info:
        rewriter.invoke(bad)
    message = str(info.value)
    for kind in ("str", "PromptValue", "list of messages", "dict"):
        assert kind in message


def test_nothing_to_rewrite_passes_through_with_reason(rewriter):
    recorder = RewriteRecorder()
    no_human = [SystemMessage("s"), AIMessage("a")]
    assert rewriter.invoke(no_human, config={"callbacks": [recorder]}) == no_human
    only_image = [HumanMessage([{"type": "image_url", "image_url": {"url": "u"}}])]
    assert rewriter.invoke(only_image, config={"callbacks": [recorder]}) == only_image
    assert rewriter.invoke("   ", config={"callbacks": [recorder]}) == "   "
    reasons = [r["fallback_reason"] for r in recorder.records]
    assert reasons == [NO_HUMAN_MESSAGE, NO_TEXT_CONTENT, guard.EMPTY_INPUT]
    assert all(not r["changed"] for r in recorder.records)


# ---------------------------------------------------------------------- batching, async, streaming
def test_batch_calls_the_prompter_once_with_all_texts(tiny_prompter, monkeypatch):
    calls: list[list[str]] = []
    sizes: list[int] = []
    real_results, real_raw = tiny_prompter.rewrite_results, tiny_prompter.engine.generate

    def spy_results(prompts, **kw):
        calls.append(list(prompts))
        return real_results(prompts, **kw)

    def spy_raw(queries, *a, **kw):
        sizes.append(len(queries))
        return real_raw(queries, *a, **kw)

    monkeypatch.setattr(tiny_prompter, "rewrite_results", spy_results)
    monkeypatch.setattr(tiny_prompter.engine, "generate", spy_raw)
    r = AlignProRunnable(tiny_prompter, generation_kwargs={"max_new_tokens": 8})
    inputs = [
        "first",
        StringPromptValue(text="second"),
        [HumanMessage("third")],
        {"input": "fourth"},
        "fifth",
    ]
    outs = r.batch(inputs)
    assert calls == [["first", "second", "third", "fourth", "fifth"]]
    assert sizes == [5]  # one real batched generate for the whole batch
    assert [type(o) for o in outs] == [str, StringPromptValue, list, dict, str]


def test_batch_reports_bad_inputs_per_item(rewriter):
    outs = rewriter.batch(["ok", 3], return_exceptions=True)
    assert outs[0] == augmented("ok") and isinstance(outs[1], TypeError)
    with pytest.raises(TypeError):
        rewriter.batch(["ok", 3])


async def test_ainvoke_abatch_and_astream(rewriter, stub):
    assert await rewriter.ainvoke("q") == augmented("q")
    stub.batches.clear()
    outs = await rewriter.abatch(["a", "b", "c"])
    assert outs == [augmented("a"), augmented("b"), augmented("c")]
    assert stub.batches == [3]
    chunks = [c async for c in rewriter.astream([HumanMessage("q")])]
    assert chunks == [[HumanMessage(augmented("q"))]]


def test_stream_yields_the_rewritten_input_once(rewriter):
    assert list(rewriter.stream("q")) == [augmented("q")]


def test_chain_streams_tokens_from_the_llm(rewriter):
    prompt = ChatPromptTemplate.from_messages([("system", "sys"), ("human", "{q}")])
    chain = prompt | rewriter | EchoChatModel()
    tokens = [c.content for c in chain.stream({"q": "tell me more"})]
    assert len(tokens) > 3 and "".join(tokens) == augmented("tell me more")


# ---------------------------------------------------------------------- tracing and config
def test_traced_child_run_with_callbacks_tags_metadata_and_run_name(rewriter):
    collector = RunCollectorCallbackHandler()
    prompt = PromptTemplate.from_template("{q}")
    chain = prompt | rewriter.with_config(run_name="improve_prompt", tags=["align"])
    out = chain.invoke(
        {"q": "Tell me about tea"},
        config={"callbacks": [collector], "tags": ["req"], "metadata": {"user": "u7"}},
    )
    assert out.text == augmented("Tell me about tea")
    rows = run_tree(collector.traced_runs[0])
    names = [name for _, name, _ in rows]
    assert names == ["RunnableSequence", "PromptTemplate", "improve_prompt", REWRITE_RUN_NAME]
    parent, child = rows[2][2], rows[3][2]
    assert child.parent_run_id == parent.id
    assert "align" in parent.tags and "req" in child.tags
    assert child.extra["metadata"]["user"] == "u7"
    assert child.inputs == {"input": "Tell me about tea"}
    assert child.outputs == {
        "original": "Tell me about tea",
        "rewritten": augmented("Tell me about tea"),
        "changed": True,
        "fallback_reason": None,
        "mode": "augment",
        "generated": GUIDANCE,
    }


def test_batch_traces_one_child_run_per_input(rewriter):
    collector = RunCollectorCallbackHandler()
    rewriter.batch(["a", "b"], config={"callbacks": [collector]})
    assert [r.outputs["original"] for r in rewrite_runs(collector)] == ["a", "b"]
    assert all(r.name == "AlignProRunnable" for r in collector.traced_runs)


def test_switched_off_with_configurable_fields(rewriter, stub, monkeypatch):
    loads: list[Any] = []
    monkeypatch.setattr(Prompter, "from_base", classmethod(lambda cls, *a, **k: loads.append(a)))
    switchable = rewriter.configurable_fields(
        enabled=ConfigurableField(id="alignpro_enabled", name="Align-Pro rewriting")
    )
    recorder = RewriteRecorder()
    off = {"configurable": {"alignpro_enabled": False}, "callbacks": [recorder]}
    assert switchable.invoke("q", config=off) == "q"
    assert switchable.invoke("q") == augmented("q")
    assert switchable.with_config(configurable={"alignpro_enabled": False}).invoke("q") == "q"
    assert recorder.records[0]["fallback_reason"] == guard.DISABLED
    assert loads == []  # the configured copy reuses the loaded prompter
    # The key also works without configurable_fields, and the field can be set directly.
    assert rewriter.invoke("q", config={"configurable": {ENABLED_CONFIG_KEY: False}}) == "q"
    assert AlignProRunnable(stub, enabled=False).invoke("q") == "q"


# ---------------------------------------------------------------------- failures never break a chain
def test_prompter_exception_passes_the_original_through(stub, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(stub, "rewrite_results", boom)
    r = AlignProRunnable(stub)
    collector = RunCollectorCallbackHandler()
    chain = r | EchoChatModel()
    answer = chain.invoke([SystemMessage("s"), HumanMessage("q")], config={"callbacks": [collector]})
    assert answer.content == "q"
    (run,) = rewrite_runs(collector)
    assert run.outputs["fallback_reason"] == "prompter_error: RuntimeError: boom"
    assert run.outputs["rewritten"] == "q" and run.error is None


async def test_async_prompter_exception_passes_through(stub, monkeypatch):
    async def boom(*a, **k):
        raise ValueError("bad")

    monkeypatch.setattr(stub, "arewrite_results", boom)
    recorder = RewriteRecorder()
    outs = await AlignProRunnable(stub).abatch(["a", "b"], config={"callbacks": [recorder]})
    assert outs == ["a", "b"]
    assert [r["fallback_reason"] for r in recorder.records] == ["prompter_error: ValueError: bad"] * 2


def test_unloadable_prompter_passes_through(tmp_path):
    r = AlignProRunnable(prompter_path=str(tmp_path / "missing"))  # loaded lazily: fails at first call
    recorder = RewriteRecorder()
    assert r.invoke("q", config={"callbacks": [recorder]}) == "q"
    assert recorder.records[0]["fallback_reason"].startswith("prompter_error: FileNotFoundError")
    with pytest.raises(FileNotFoundError):
        AlignProRunnable.from_pretrained(tmp_path / "missing")  # eager: a bad path fails at construction


def test_on_error_raise_lets_with_fallbacks_and_with_retry_act(stub, monkeypatch):
    calls: list[list[str]] = []

    def boom(prompts, **kwargs):
        calls.append(list(prompts))
        raise RuntimeError("prompter down")

    monkeypatch.setattr(stub, "rewrite_results", boom)
    strict = AlignProRunnable(stub, on_error="raise")
    collector = RunCollectorCallbackHandler()
    with pytest.raises(RuntimeError, match="prompter down"):  # the original exception
        strict.invoke("q", config={"callbacks": [collector]})
    (run,) = rewrite_runs(collector)
    assert "prompter down" in run.error and collector.traced_runs[0].error
    fallback = strict.with_fallbacks([RunnableLambda(lambda x: f"unrewritten: {x}")])
    assert fallback.invoke("q") == "unrewritten: q"
    calls.clear()
    with pytest.raises(RuntimeError):
        strict.with_retry(stop_after_attempt=3, wait_exponential_jitter=False).invoke("q")
    assert len(calls) == 3
    outs = strict.batch(["a", "b"], return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outs)
    # The default still passes the input through and says why.
    assert AlignProRunnable(stub).invoke("q") == "q"


async def test_on_error_raise_async(stub, monkeypatch):
    async def boom(*a, **k):
        raise ValueError("bad")

    monkeypatch.setattr(stub, "arewrite_results", boom)
    with pytest.raises(ValueError, match="bad"):
        await AlignProRunnable(stub, on_error="raise").ainvoke("q")
    assert await AlignProRunnable(stub).ainvoke("q") == "q"


class FailingPrompter(StubPrompter):
    def stub_generate(self, queries, settings, num_return_sequences=1, **kwargs) -> list[list[Generation]]:
        raise RuntimeError("out of memory")


def test_on_error_raise_covers_failures_the_prompter_reports_as_results(tiny_lm_dir):
    # Prompter.rewrite_results never raises for a failed generation: it returns a prompter_error result.
    stub = FailingPrompter.build(tiny_lm_dir)
    recorder = RewriteRecorder()
    assert AlignProRunnable(stub).invoke("q", config={"callbacks": [recorder]}) == "q"
    assert recorder.records[0]["fallback_reason"].startswith("prompter_error")
    strict = AlignProRunnable(stub, on_error="raise")
    with pytest.raises(PrompterError, match="out of memory"):
        strict.invoke("q")
    outs = strict.batch(["a", "   "], return_exceptions=True)
    # The empty prompt never reached generation (empty_input is a guard fallback, not a failure).
    assert isinstance(outs[0], PrompterError) and outs[1] == "   "
    # Guard rejections and switching off never raise.
    assert strict.invoke("q", config={"configurable": {ENABLED_CONFIG_KEY: False}}) == "q"
    assert AlignProRunnable.from_base(tiny_lm_dir, on_error="raise", similarity=None).on_error == "raise"


def test_guard_rejection_passes_through(tiny_prompter):
    # The random tiny model never ends a sentence within 8 tokens: the guard rejects it as truncated.
    recorder = RewriteRecorder()
    r = AlignProRunnable(tiny_prompter, generation_kwargs={"max_new_tokens": 8})
    assert r.invoke("What is tea?", config={"callbacks": [recorder]}) == "What is tea?"
    assert recorder.records[0]["fallback_reason"] == guard.TRUNCATED


def test_constructor_validation(stub):
    with pytest.raises(ValueError, match="needs a prompter"):
        AlignProRunnable()
    with pytest.raises(ValueError, match="mode"):
        AlignProRunnable(stub, mode="paraphrase")
    with pytest.raises(ValueError, match="on_error"):
        AlignProRunnable(stub, on_error="ignore")


def test_unknown_generation_kwargs_fail_at_construction_naming_the_accepted_keys(stub, tiny_lm_dir):
    # Before: every call fell back with "prompter_error: TypeError ..." and the chain never rewrote anything.
    with pytest.raises(ValueError, match="max_new_token") as info:
        AlignProRunnable(stub, generation_kwargs={"max_new_token": 8})
    assert "max_new_tokens" in str(info.value) and "temperature" in str(info.value)
    with pytest.raises(ValueError, match="top_k"):
        AlignProRunnable.from_base(tiny_lm_dir, generation_kwargs={"top_k": 5})
    assert set(GENERATION_KEYS) == {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "repetition_penalty",
    }
    r = AlignProRunnable(stub, generation_kwargs={"max_new_tokens": 8, "do_sample": False})
    assert r.invoke("q") == augmented("q")


# ---------------------------------------------------------------------- construction and serialization
def test_from_pretrained_and_serialization_round_trip(stub, tmp_path):
    folder = stub.save_pretrained(tmp_path / "artifact")
    r = AlignProRunnable.from_pretrained(folder, mode="augment", generation_kwargs={"max_new_tokens": 8})
    data = dumpd(r)
    assert data["type"] == "constructor"
    assert data["id"] == ["alignpro_plugins", "langchain", "AlignProRunnable"]
    assert data["kwargs"]["prompter_path"] == str(folder)
    json.dumps(data)  # plain JSON: no model objects inside
    restored = load(data, valid_namespaces=["alignpro_plugins"], allowed_objects=[AlignProRunnable])
    assert isinstance(restored, AlignProRunnable)
    assert restored.get_prompter() is r.get_prompter()  # shared, not reloaded
    assert restored.invoke("What is tea?") == r.invoke("What is tea?")
    assert dumpd(AlignProRunnable(stub))["type"] == "not_implemented"


def test_from_base_builds_a_zero_shot_prompter(tiny_lm_dir):
    r = AlignProRunnable.from_base(tiny_lm_dir, mode="rewrite", similarity=None)
    assert r.get_prompter().manifest.mode == "rewrite" and r.base_model == tiny_lm_dir
    assert dumpd(r)["kwargs"]["base_model"] == tiny_lm_dir


# ---------------------------------------------------------------------- AlignedChatModel
@pytest.fixture
def echo() -> EchoChatModel:
    EchoChatModel.seen = []
    EchoChatModel.seen_kwargs = []
    return EchoChatModel()


def test_aligned_model_sends_the_rewritten_prompt(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub)
    history = [SystemMessage("sys"), HumanMessage("old"), AIMessage("reply"), HumanMessage("new question")]
    answer = aligned.invoke(history)
    assert isinstance(answer, AIMessage) and answer.content == augmented("new question")
    sent = echo.seen[-1]
    assert sent[:3] == history[:3] and sent[3].content == augmented("new question")


def test_aligned_model_traces_rewrite_and_inner_call_under_its_run(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub)
    for call in (
        lambda cfg: aligned.invoke("q", config=cfg),
        lambda cfg: list(aligned.stream("q", config=cfg)),
    ):
        collector = RunCollectorCallbackHandler()
        call({"callbacks": [collector], "tags": ["t"], "metadata": {"k": "v"}})
        rows = run_tree(collector.traced_runs[0])
        assert [(d, n) for d, n, _ in rows] == [
            (0, "AlignedChatModel"),
            (1, "AlignProRunnable"),
            (2, REWRITE_RUN_NAME),
            (1, "EchoChatModel"),
        ]
        assert rows[2][2].outputs["rewritten"] == augmented("q")
        assert rows[3][2].tags == ["t"] and rows[3][2].extra["metadata"]["k"] == "v"


async def test_aligned_model_async_and_streaming(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub)
    assert (await aligned.ainvoke("q")).content == augmented("q")
    chunks = [c async for c in aligned.astream("tell me about tea")]
    assert len(chunks) > 3 and chunks[-1].chunk_position == "last"
    assert "".join(c.content for c in chunks) == augmented("tell me about tea")
    sync_chunks = list(aligned.stream("tell me about tea"))
    assert "".join(c.content for c in sync_chunks) == augmented("tell me about tea")
    recorder = RewriteRecorder()
    [c async for c in aligned.astream("q", config={"callbacks": [recorder]})]
    assert recorder.records[-1]["rewritten"] == augmented("q")


def test_aligned_model_streaming_flag_and_fake_list_model(stub):
    aligned = AlignedChatModel(llm=FakeListChatModel(responses=["abc"]), prompter=stub, streaming=True)
    tokens: list[tuple[Any, str]] = []

    class Tokens(BaseCallbackHandler):
        def on_llm_new_token(self, token, *, run_id, parent_run_id=None, **kwargs):
            tokens.append((parent_run_id, token))

    assert aligned.invoke("q", config={"callbacks": [Tokens()]}).content == "abc"
    # The aligned (root) run streamed the inner model's tokens as they came.
    assert "".join(t for parent, t in tokens if parent is None) == "abc"


async def test_aligned_model_stream_events_when_invoked_inside_a_node(stub, echo):
    # e.g. a LangGraph node calling model.invoke() under astream_events: tokens still stream from the
    # aligned model's own run, and the rewrite is nested under it.
    aligned = AlignedChatModel(llm=echo, prompter=stub)
    node = RunnableLambda(lambda x: aligned.invoke(x["q"]).content)
    events = [e async for e in node.astream_events({"q": "tell me about tea"}, version="v2")]
    streamed = "".join(
        e["data"]["chunk"].content
        for e in events
        if e["event"] == "on_chat_model_stream" and e["name"] == "AlignedChatModel"
    )
    assert streamed == augmented("tell me about tea")
    (end,) = [e for e in events if e["event"] == "on_chain_end" and e["name"] == REWRITE_RUN_NAME]
    assert end["data"]["output"]["rewritten"] == augmented("tell me about tea")
    assert events[-1]["data"]["output"] == augmented("tell me about tea")


def test_aligned_model_passes_settings_and_tools_through(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub, temperature=0.2, max_tokens=7, stop=["END"])
    aligned.invoke("q")
    assert echo.seen_kwargs[-1]["temperature"] == 0.2 and echo.seen_kwargs[-1]["max_tokens"] == 7
    params = aligned._get_ls_params()
    assert params["ls_model_name"] == "echo" and params["ls_stop"] == ["END"]
    assert aligned._get_ls_params(model="other")["ls_model_name"] == "other"

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tooled = aligned.bind_tools([add], tool_choice="any")
    assert tooled.invoke("q").content == augmented("q")
    assert echo.seen_kwargs[-1]["tools"] == ["add"] and echo.seen_kwargs[-1]["tool_choice"] == "any"


def test_aligned_model_structured_output_gets_the_rewrite(stub, echo):
    structured = AlignedChatModel(llm=echo, prompter=stub).with_structured_output({"title": "Answer"})
    assert isinstance(structured, RunnableSequence)
    assert structured.invoke("q") == {"schema": {"title": "Answer"}, "prompt": augmented("q")}


def test_aligned_model_can_be_switched_off(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub).configurable_fields(
        enabled=ConfigurableField(id="alignpro_enabled")
    )
    assert aligned.invoke("q", config={"configurable": {"alignpro_enabled": False}}).content == "q"
    assert aligned.invoke("q").content == augmented("q")


async def test_aligned_model_passes_configurable_to_the_prompter_and_the_inner_model(stub, echo):
    # No configurable_fields: the ENABLED_CONFIG_KEY must still reach the prompter from a direct call.
    aligned = AlignedChatModel(llm=echo, prompter=stub)
    off = {"configurable": {ENABLED_CONFIG_KEY: False}}
    recorder = RewriteRecorder()
    assert aligned.invoke("q", config={**off, "callbacks": [recorder]}).content == "q"
    assert (await aligned.ainvoke("q", config=off)).content == "q"
    assert "".join(c.content for c in aligned.stream("a b", config=off)) == "a b"
    assert "".join([c.content async for c in aligned.astream("a b", config=off)]) == "a b"
    assert [m.content for m in aligned.batch(["x", "y"], config=off)] == ["x", "y"]
    assert [m.content for m in await aligned.abatch(["x"], config=off)] == ["x"]
    assert recorder.records[0]["fallback_reason"] == guard.DISABLED
    assert aligned.invoke("q").content == augmented("q")  # the next call is rewritten again

    # A configurable inner model gets the call's configurable too; run_name stays on the aligned run only.
    def who(messages: Any, config: RunnableConfig, **kwargs: Any) -> AIMessage:
        return AIMessage(str(config["configurable"].get("who")))

    switchable = RunnableLambda(who)
    collector = RunCollectorCallbackHandler()
    out = AlignedChatModel(llm=switchable, prompter=stub).invoke(
        "q", config={"configurable": {"who": "me"}, "run_name": "mine", "callbacks": [collector]}
    )
    assert out.content == "me"
    names = [name for _, name, _ in run_tree(collector.traced_runs[0])]
    assert names[0] == "mine" and names.count("mine") == 1


def test_aligned_model_survives_a_failing_prompter(stub, echo, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("prompter down")

    monkeypatch.setattr(stub, "rewrite_results", boom)
    recorder = RewriteRecorder()
    answer = AlignedChatModel(llm=echo, prompter=stub).invoke("q", config={"callbacks": [recorder]})
    assert answer.content == "q"
    assert recorder.records[0]["fallback_reason"] == "prompter_error: RuntimeError: prompter down"


def test_aligned_model_prompter_specs(stub, tmp_path, monkeypatch, tiny_lm_dir):
    folder = str(stub.save_pretrained(tmp_path / "artifact"))
    llm = GenericFakeChatModel(messages=iter(["x"]))
    assert AlignedChatModel(llm=llm, prompter=folder).prompter_path == folder
    assert (
        AlignedChatModel(llm=llm, prompter=tiny_lm_dir).prompter.base_model == tiny_lm_dir
    )  # a model folder
    assert AlignedChatModel(llm=llm, prompter="smollm2-135m-instruct").prompter.base_model is not None
    with pytest.raises(FileNotFoundError, match="alignpro.json"):
        AlignedChatModel(llm=llm, prompter=str(tmp_path / "nope"))
    monkeypatch.setenv("ALIGNPRO_PROMPTER", folder)
    assert AlignedChatModel(llm=llm).prompter_path == folder
    monkeypatch.delenv("ALIGNPRO_PROMPTER")
    with pytest.raises(ValueError, match="ALIGNPRO_PROMPTER"):
        AlignedChatModel(llm=llm)
    with pytest.raises(TypeError, match="prompter must be"):
        AlignedChatModel(llm=llm, prompter=42)
    assert "echo" in AlignedChatModel(llm=EchoChatModel(), prompter=stub).model_name


def test_local_looking_prompter_paths_without_a_prompter_fail_at_construction(tmp_path, monkeypatch):
    # Before: a misspelt folder was taken as a hub id (or loaded lazily) and every call passed through.
    llm = EchoChatModel()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        "runs/prompter": "does not exist",  # runs/ is a local folder: not a hub id
        "runs/rl/prompter": "does not exist",
        "./prompter": "does not exist",
        "../prompter": "does not exist",
        str(tmp_path / "nope"): "does not exist",
        "runs/empty": "has no alignpro.json",
        "notes.txt": "is a file",
    }
    for spec, problem in cases.items():
        with pytest.raises(FileNotFoundError) as info:
            AlignedChatModel(llm=llm, prompter=spec)
        message = str(info.value)
        assert repr(spec) in message and problem in message, message
        assert "alignpro.json" in message and "config.json" in message  # what a prompter folder holds
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AlignedChatModel(llm=llm, prompter=tmp_path / "runs" / "prompter")  # a Path is always local
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AlignProRunnable.from_spec("runs/prompter")
    monkeypatch.setenv("ALIGNPRO_PROMPTER", "runs/prompter")
    with pytest.raises(FileNotFoundError, match="runs/prompter"):
        AlignedChatModel(llm=llm)
    # A hub id is still accepted and loaded lazily (nothing is fetched here).
    monkeypatch.setenv("ALIGNPRO_PROMPTER", "SomeOrg/some-prompter-base")
    hub = AlignedChatModel(llm=llm)
    assert hub.prompter.base_model == "SomeOrg/some-prompter-base" and hub.prompter.prompter is None


# ---------------------------------------------------------------------- load: 200 concurrent calls
class TaggingPrompter(StubPrompter):
    """Guidance names the request it was generated for, so a mix-up inside a batch would show."""

    def guidance_for(self, query: str) -> str:
        return "Guidance for " + query.split("Request:\n", 1)[1].split("<|im_end|>", 1)[0].strip() + "."


async def test_200_concurrent_ainvoke_none_lost(tiny_lm_dir, echo):
    prompter = TaggingPrompter.build(tiny_lm_dir)
    aligned = AlignedChatModel(llm=echo, prompter=prompter)
    questions = [f"request {i} about topic {i * 7 % 13}" for i in range(200)]
    answers = await asyncio.gather(*(aligned.ainvoke(q) for q in questions))
    assert len(answers) == 200
    for q, a in zip(questions, answers, strict=True):
        assert a.content == f"{q}\n\nGuidance for {q}."
    assert sum(prompter.batches) == 200 and max(prompter.batches) > 1  # micro-batched, nothing dropped
    assert len(echo.seen) == 200


async def test_200_concurrent_ainvoke_with_real_tiny_generation(tiny_prompter, echo):
    aligned = AlignedChatModel(
        llm=echo, prompter=AlignProRunnable(tiny_prompter, generation_kwargs={"max_new_tokens": 4})
    )
    questions = [f"question number {i}?" for i in range(200)]
    answers = await asyncio.gather(*(aligned.ainvoke(q) for q in questions))
    # Each answer is its own question (the guard rejects most random tiny outputs; any kept one is appended).
    for q, a in zip(questions, answers, strict=True):
        assert a.content == q or a.content.startswith(q + "\n\n")


# ---------------------------------------------------------------------- targets.LangChainTarget
def test_langchain_target_over_aligned_and_local_models(stub, echo, tiny_lm_dir):
    target = LangChainTarget(AlignedChatModel(llm=echo, prompter=stub))
    assert target.generate(["a", "b"]) == [augmented("a"), augmented("b")]
    assert asyncio.run(target.agenerate(["c"])) == [augmented("c")]
    assert target.identity.startswith("langchain:alignpro[") and target.stats.failures == 0

    local = as_target(ChatLocalTransformers(model=tiny_lm_dir, max_tokens=4))
    assert isinstance(local, LangChainTarget)
    answers = local.generate(["hello", "tea?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert local.identity == f"langchain:{tiny_lm_dir}" and local.stats.failures == 0


# ---------------------------------------------------------------------- ChatLocalTransformers (tiny model)
def test_local_model_batches_concurrent_calls_and_reports_usage(tiny_lm_dir):
    llm = ChatLocalTransformers(model=tiny_lm_dir, max_tokens=5, batch_size=4)
    model = llm._get_engine().model
    sizes: list[int] = []
    busy = threading.Event()
    real = model.generate

    def spy(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        busy.wait()  # generation is busy: the other calls queue up and must share the next batch
        return real(*args, **kwargs)

    model.generate = spy
    results: list[AIMessage] = [None] * 4  # type: ignore[list-item]

    def call(i: int) -> None:
        results[i] = llm.invoke(f"hello {i}")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        busy.set()
        for t in threads:
            t.join()
    finally:
        del model.generate
    assert sum(sizes) == 4 and max(sizes) > 1
    for msg in results:
        usage = msg.usage_metadata
        assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 5
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        assert msg.response_metadata["model_name"] == tiny_lm_dir


def test_local_model_stream_matches_invoke(tiny_lm_dir):
    llm = ChatLocalTransformers(model=tiny_lm_dir, max_tokens=12)
    full = llm.invoke("Say something")
    chunks = list(llm.stream("Say something"))
    assert "".join(c.content for c in chunks) == full.content
    assert chunks[-1].chunk_position == "last"
    assert [c.usage_metadata for c in chunks if c.usage_metadata] == [full.usage_metadata]


def test_local_model_rejects_images_and_bad_settings(tiny_lm_dir):
    llm = ChatLocalTransformers(model=tiny_lm_dir, max_tokens=2)
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "u"}}])])
    with pytest.raises(ValueError):
        ChatLocalTransformers(model=tiny_lm_dir, temperature=-1)
    assert llm.get_num_tokens("abc") == 3  # its own (byte-level) tokenizer, not GPT-2's


# ---------------------------------------------------------------------- lazy import
def test_core_package_imports_without_langchain():
    code = (
        "import sys\n"
        "sys.modules['langchain_core'] = None\n"  # makes `import langchain_core` fail
        "import alignpro_plugins, alignpro_plugins.targets\n"
        "try:\n"
        "    import alignpro_plugins.langchain\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR:" in out.stdout
    assert "pip install 'alignpro-plugins[langchain]'" in out.stdout


# ---------------------------------------------------------------------- retry gate
def _length_gate(threshold: float) -> RetryGate:
    return RetryGate(lambda prompts, answers: [float(len(a)) for a in answers], threshold)


def test_gate_keeps_a_good_first_answer_without_calling_the_prompter(stub, echo):
    stub.batches.clear()
    aligned = AlignedChatModel(llm=echo, prompter=stub, retry_gate=_length_gate(5.0))
    answer = aligned.invoke("a long enough question")
    assert answer.content == "a long enough question" and len(echo.seen) == 1 and stub.batches == []
    gate = answer.response_metadata["alignpro_gate"]
    assert gate == {"first_score": 22.0, "threshold": 5.0, "retried": False, "kept": "first"}


def test_gate_retries_a_poor_answer_with_the_rewrite_and_keeps_the_better(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub, retry_gate=_length_gate(100.0))
    answer = aligned.invoke([SystemMessage("sys"), HumanMessage("tea?")])
    assert [m[-1].content for m in echo.seen] == ["tea?", augmented("tea?")]  # x first, then the rewrite
    assert answer.content == augmented("tea?")  # the longer (higher-scored) answer
    gate = answer.response_metadata["alignpro_gate"]
    assert gate["retried"] and gate["kept"] == "retry" and gate["retry_score"] > gate["first_score"] == 4.0
    # A reward that prefers the first answer keeps it, after asking both.
    shorter = RetryGate(lambda prompts, answers: [-float(len(a)) for a in answers], threshold=0.0)
    echo.seen.clear()
    kept = AlignedChatModel(llm=echo, prompter=stub, retry_gate=shorter).invoke("tea?")
    assert kept.content == "tea?" and len(echo.seen) == 2
    assert kept.response_metadata["alignpro_gate"]["kept"] == "first"


async def test_gate_async_and_streaming_yield_the_kept_answer(stub, echo):
    aligned = AlignedChatModel(llm=echo, prompter=stub, retry_gate=_length_gate(100.0))
    assert (await aligned.ainvoke("tea?")).content == augmented("tea?")
    chunks = list(aligned.stream("tea?"))
    assert len(chunks) == 1 and chunks[0].content == augmented("tea?")  # scored before it is shown
    assert chunks[0].response_metadata["alignpro_gate"]["kept"] == "retry"
    achunks = [c async for c in aligned.astream("tea?")]
    assert "".join(c.content for c in achunks) == augmented("tea?")


def test_gate_with_the_rewrite_switched_off_or_a_pass_through(stub, echo, monkeypatch):
    off = AlignedChatModel(llm=echo, prompter=stub, retry_gate=_length_gate(100.0), enabled=False)
    assert off.invoke("tea?").content == "tea?" and len(echo.seen) == 1
    monkeypatch.setattr(type(stub), "guidance_for", lambda self, q: "")  # the prompter keeps x as it is
    echo.seen.clear()
    out = AlignedChatModel(llm=echo, prompter=stub, retry_gate=_length_gate(100.0)).invoke("tea?")
    assert out.content == "tea?" and len(echo.seen) == 1  # no second call for the same input
    assert out.response_metadata["alignpro_gate"]["reason"] == "the prompter kept x"


def test_retry_gate_validation_and_budget():
    with pytest.raises(ValueError, match="retry_gate must be a RetryGate"):
        AlignedChatModel(llm=EchoChatModel(), prompter="smollm2-135m-instruct", retry_gate=0.5)
    with pytest.raises(ValueError, match="threshold must be a number"):
        RetryGate(lambda p, a: [0.0] * len(a), float("nan"))
    gate = RetryGate.for_budget(
        lambda ps, ans: [float(len(a)) for a in ans], ["a", "b", "c", "d"], ["x", "xx", "xxx", "xxxx"], 0.5
    )
    assert gate.wants_retry(2.0) and not gate.wants_retry(3.0)
    with pytest.raises(ValueError, match="one answer per prompt"):
        RetryGate.for_budget(lambda ps, ans: [0.0] * len(ans), ["a"], [], 0.5)


def test_rerank_gate_asks_both_inputs_however_good_the_first_answer(stub, echo):
    rerank = RetryGate.rerank(lambda prompts, answers: [1e6 - len(a) for a in answers])  # shorter is better
    assert rerank.wants_retry(1e300)
    answer = AlignedChatModel(llm=echo, prompter=stub, retry_gate=rerank).invoke("tea?")
    assert [m[-1].content for m in echo.seen] == ["tea?", augmented("tea?")]
    assert answer.content == "tea?" and answer.response_metadata["alignpro_gate"]["kept"] == "first"


def test_gate_never_keeps_a_retry_answered_with_a_tool_call(stub):
    call = AIMessage("", tool_calls=[{"name": "search", "args": {"q": "tea"}, "id": "c1"}])
    llm = GenericFakeChatModel(messages=iter([AIMessage("ok"), call]))
    scored: list[str] = []

    def reward(prompts, answers):
        scored.extend(answers)
        return [0.0] * len(answers)

    out = AlignedChatModel(llm=llm, prompter=stub, retry_gate=RetryGate(reward, 1.0)).invoke("tea?")
    assert out.content == "ok" and scored == ["ok"]  # the tool call had no text to score
    gate = out.response_metadata["alignpro_gate"]
    assert gate["retried"] and gate["kept"] == "first" and "retry_score" not in gate


# ---------------------------------------------------------------------- property: any user text
# Any code point, control characters and lone surrogates included (json.loads('"\\ud800"') makes one).
ANY_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=80),
    st.text(st.characters(categories=["Cc", "Cs", "Zs", "Po"]), max_size=12),
)
# What a chain may hand the runnable by mistake: scalars, bytes, and lists, tuples and dicts of them.
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=6) | ANY_TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(
            st.one_of(st.sampled_from(["input", "role", "content"]), ANY_TEXT, st.integers()),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PICTURE = {"type": "image", "url": "https://example.org/cat.png"}


def prompter_text(prompter: Prompter, text: str) -> str:
    """What the prompter makes of this text on its own: the rewrite, or the text itself when it falls back."""
    (result,) = prompter.rewrite_results([text])
    assert result.text.startswith(text.rstrip())  # augment mode keeps the user's text in front
    return result.text


@PROPERTY
@given(text=ANY_TEXT)
def test_any_text_as_str_dict_or_messages_comes_back_as_the_prompters_result(stub, text):
    r = AlignProRunnable(stub)
    expected = prompter_text(stub, text)
    assert r.invoke(text) == expected
    assert r.invoke(StringPromptValue(text=text)).text == expected
    assert r.invoke({"input": text, "other": text}) == {"input": expected, "other": text}
    messages = [
        SystemMessage(text),
        AIMessage(text),
        HumanMessage(["Look:", PICTURE, {"type": "text", "text": text}]),
    ]
    out = asyncio.run(r.ainvoke(messages))
    assert out[:2] == messages[:2]  # only the latest human message's last text part changes
    assert out[2].content == ["Look:", PICTURE, {"type": "text", "text": expected}]
    assert r.invoke([("human", text)]) == [HumanMessage(expected)]


@PROPERTY
@given(value=ANY_VALUE)
def test_any_input_is_rewritten_passed_through_or_refused_with_a_clear_error(stub, value):
    r = AlignProRunnable(stub)
    try:
        r.invoke(value)
    except TypeError as exc:
        assert f"AlignProRunnable accepts {ACCEPTED_INPUTS}" in str(exc)
    except ValueError as exc:
        assert "AlignProRunnable got a dict without its input key 'input' (keys given: " in str(exc)
