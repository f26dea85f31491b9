"""End to end with the packaged SmolLM2: a zero-shot prompter rewriting for a real local chat model."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from alignpro_plugins.langchain import (
    AlignedChatModel,
    AlignProRunnable,
    ChatLocalTransformers,
    RewriteRecorder,
)
from alignpro_plugins.targets import LangChainTarget

pytestmark = pytest.mark.real_models

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
# Greedy decoding: the zero-shot prompter adds guidance to this question (checked on this model).
QUESTION = "What are the health benefits of green tea?"


class ChatInputs(BaseCallbackHandler):
    """Records the messages each chat model run received."""

    def __init__(self) -> None:
        self.messages: list[list[Any]] = []

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.messages.append(messages[0])


@pytest.fixture(scope="module")
def rewriter() -> AlignProRunnable:
    return AlignProRunnable.from_base(SMOLLM2, generation_kwargs={"max_new_tokens": 48})


@pytest.fixture(scope="module")
def llm() -> ChatLocalTransformers:
    return ChatLocalTransformers(model=SMOLLM2, max_tokens=16)


def test_chain_sends_the_rewritten_prompt_to_the_model(rewriter, llm):
    prompt = ChatPromptTemplate.from_messages([("system", "You are a helpful assistant."), ("human", "{q}")])
    chain = prompt | rewriter | llm | StrOutputParser()
    recorder, inputs = RewriteRecorder(), ChatInputs()
    answer = chain.invoke({"q": QUESTION}, config={"callbacks": [recorder, inputs]})
    (record,) = recorder.records
    assert record["fallback_reason"] is None and record["changed"]
    assert record["rewritten"].startswith(QUESTION + "\n\n") and len(record["generated"]) > 20
    (sent,) = inputs.messages
    assert sent[0].content == "You are a helpful assistant."
    assert sent[1].content == record["rewritten"]
    assert isinstance(answer, str) and answer.strip()


async def test_aligned_model_end_to_end(rewriter, llm):
    aligned = AlignedChatModel(llm=llm, prompter=rewriter)
    recorder, inputs = RewriteRecorder(), ChatInputs()
    message = await aligned.ainvoke(QUESTION, config={"callbacks": [recorder, inputs]})
    assert message.content and message.usage_metadata["output_tokens"] > 0
    # The outer run saw the user's text; the inner model got the rewrite.
    assert [m[-1].content for m in inputs.messages] == [QUESTION, recorder.records[0]["rewritten"]]
    assert recorder.records[0]["rewritten"] != QUESTION
    chunks = [c async for c in aligned.astream(QUESTION)]
    assert "".join(c.content for c in chunks) == message.content  # greedy: same answer streamed


def test_local_model_stream_equals_invoke_and_honours_stop(llm):
    full = llm.invoke("Name three green vegetables.")
    chunks = list(llm.stream("Name three green vegetables."))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == full.content
    assert (
        sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata)
        == (full.usage_metadata["output_tokens"])
    )
    counting = ChatLocalTransformers(model=SMOLLM2, max_tokens=24)
    stopped = counting.invoke("Count from 1 to 10, separated by commas.", stop=["4"])
    assert stopped.content.startswith("1, 2, 3") and "4" not in stopped.content
    assert stopped.response_metadata["finish_reason"] == "stop"
    streamed = "".join(
        c.content for c in counting.stream("Count from 1 to 10, separated by commas.", stop=["4"])
    )
    assert streamed == stopped.content


def test_langchain_target_over_the_local_model(llm):
    target = LangChainTarget(llm)
    answers = target.generate(["Name a fruit.", "Name a color."])
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert all(a.strip() for a in asyncio.run(target.agenerate(["Name an animal."])))
    assert target.identity == f"langchain:{SMOLLM2}" and target.stats.failures == 0


def test_example_script_smoke(capsys):
    spec = importlib.util.spec_from_file_location("langchain_chain", ROOT / "examples" / "langchain_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert f"question : {QUESTION}" in out and "prompter : " in out
    answer = out.split("answer   :", 1)[1].strip()
    assert answer
