"""``AlignedChatModel``: any LangChain chat model, with its latest human message rewritten by a prompter."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar, copy_context
from typing import Any, cast
from uuid import uuid4

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, ensure_config
from langchain_core.runnables.utils import coro_with_context
from langchain_core.tools import BaseTool
from pydantic import model_validator

from alignpro_plugins.gate import GateDecision, RetryGate
from alignpro_plugins.langchain.runnable import AlignProRunnable

#: Environment variable read when no ``prompter=`` is given: an artifact folder or a base model name.
PROMPTER_ENV = "ALIGNPRO_PROMPTER"

# The config of the current call, put here by invoke/ainvoke/stream/astream: BaseChatModel passes only
# callbacks, tags and metadata on to _generate/_stream, so `configurable` (e.g. ENABLED_CONFIG_KEY) would be
# lost. stream() also calls _stream without its run manager: its config carries a pre-assigned run id so
# _stream can still nest its child runs.
_CALL_CONFIG: ContextVar[tuple[Any, RunnableConfig] | None] = ContextVar("alignpro_call_config", default=None)
# Config keys the rewrite and the inner call inherit (run_name and run_id name this model's own run only).
_INHERITED_KEYS = ("configurable", "recursion_limit", "max_concurrency")


class AlignedChatModel(BaseChatModel):
    """Wrap a chat model (``llm``) so the latest human message is rewritten by an Align-Pro prompter.

    ```python
    aligned = AlignedChatModel(llm=ChatOpenAI(model="gpt-4o-mini"), prompter="runs/prompter")
    aligned.invoke("tea benefits?")
    ```

    ``prompter`` is an :class:`AlignProRunnable`, a loaded ``Prompter``, an artifact folder or a base model
    name (default: ``$ALIGNPRO_PROMPTER``); a path meant as a local folder that holds no prompter raises
    ``FileNotFoundError`` here. System, AI and tool messages reach ``llm`` unchanged; the answer,
    streaming, usage metadata and tool calls come from ``llm``. ``bind_tools`` and
    ``with_structured_output`` are delegated to ``llm``. ``temperature``, ``max_tokens`` and ``stop``, when
    set, are passed on to ``llm`` with every call, and the call's ``configurable`` reaches the prompter and
    ``llm`` (``{"alignpro_enabled": False}`` switches the rewrite off for one call). A failing prompter never
    fails the call (unless its runnable has ``on_error="raise"``): the original messages are sent and the
    reason is recorded in the ``alignpro_rewrite`` run.
    """

    llm: Runnable
    """The frozen target: a chat model (or a runnable from messages to an AIMessage)."""
    prompter: AlignProRunnable
    enabled: bool = True
    """False sends messages unchanged (make it switchable per call with ``configurable_fields``)."""
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    streaming: bool = False
    retry_gate: Any = None
    """A :class:`~alignpro_plugins.gate.RetryGate`: ``llm`` answers the original messages first, and the prompter's
    rewrite is sent only when the gate scores that answer below its threshold; the higher-scored answer is kept.
    Streaming then yields the kept answer as one chunk (it must be scored before it is shown)."""

    @model_validator(mode="before")
    @classmethod
    def _coerce_prompter(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        spec = values.get("prompter")
        if spec is None:
            spec = os.environ.get(PROMPTER_ENV)
            if not spec:
                raise ValueError(
                    f"AlignedChatModel needs prompter=... (an AlignProRunnable, a Prompter, an artifact folder "
                    f"or a base model name) or the environment variable {PROMPTER_ENV}"
                )
        return {**values, "prompter": AlignProRunnable.from_spec(spec)}

    @model_validator(mode="after")
    def _check_retry_gate(self) -> AlignedChatModel:
        if self.retry_gate is not None and not isinstance(self.retry_gate, RetryGate):
            raise ValueError(
                f"retry_gate must be a RetryGate (RetryGate(reward, threshold) or RetryGate.for_budget(...)), got "
                f"{type(self.retry_gate).__name__}"
            )
        return self

    @property
    def prompter_path(self) -> str | None:
        """The artifact folder (or None for a zero-shot or in-memory prompter)."""
        return self.prompter.prompter_path

    @property
    def model_name(self) -> str:
        """``alignpro[<prompter>]:<inner model>``: identifies answers, e.g. in target caches."""
        return f"alignpro[{self.prompter._spec()}]:{self._inner_name()}"

    def _inner(self) -> BaseChatModel | None:
        llm = self.llm.bound if isinstance(self.llm, RunnableBinding) else self.llm
        return llm if isinstance(llm, BaseChatModel) else None

    def _inner_name(self) -> str:
        inner = self._inner()
        if inner is not None:
            name = inner._get_ls_params().get("ls_model_name")
            if isinstance(name, str) and name:
                return name
            return inner._llm_type
        return self.llm.get_name()

    @property
    def _llm_type(self) -> str:
        return "alignpro-aligned-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        inner = self._inner()
        return {
            "llm": inner._identifying_params if inner is not None else self.llm.get_name(),
            "llm_type": inner._llm_type if inner is not None else type(self.llm).__name__,
            "prompter": self.prompter._spec(),
            "mode": self.prompter.mode,
            "enabled": self.enabled,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        inner = self._inner()
        params = LangSmithParams(**(inner._get_ls_params(stop=stop, **kwargs) if inner is not None else {}))
        # Provider and model name of the wrapped model, so cost tracking keeps working.
        params.setdefault("ls_provider", "alignpro")
        params["ls_model_type"] = "chat"
        if isinstance(kwargs.get("model"), str):
            params["ls_model_name"] = kwargs["model"]
        elif not isinstance(params.get("ls_model_name"), str):
            params["ls_model_name"] = self._inner_name()
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        merged_stop = self._stop(stop)
        if merged_stop:
            params["ls_stop"] = merged_stop
        return params

    # ------------------------------------------------------------------ helpers
    def _call_config(self) -> RunnableConfig | None:
        call = _CALL_CONFIG.get()
        return call[1] if call is not None and call[0] is self else None

    def _child_config(self, run_manager: Any, *, async_: bool = False) -> RunnableConfig:
        """Config for the rewrite and the inner call: children of this model's run, with its configurable."""
        manager_cls = AsyncCallbackManager if async_ else CallbackManager
        config = self._call_config()
        values: dict[str, Any] = dict(config or {})
        inherited = {k: values[k] for k in _INHERITED_KEYS if k in values}
        if run_manager is not None:
            child = _child_manager(manager_cls, run_manager, run_manager.run_id)
            return cast(RunnableConfig, {**inherited, "callbacks": child})
        if config is not None and config.get("run_id") is not None:
            manager = manager_cls.configure(
                config.get("callbacks"),
                self.callbacks,
                self.verbose,
                config.get("tags"),
                self.tags,
                config.get("metadata"),
                self.metadata,
            )
            child = _child_manager(manager_cls, manager, config["run_id"])
            return cast(RunnableConfig, {**inherited, "callbacks": child})
        return ensure_config()  # e.g. inside a chain step: attach to the enclosing run

    def _stop(self, stop: list[str] | None) -> list[str] | None:
        merged = stop if stop is not None else self.stop
        return list(merged) if merged else None  # some APIs reject an empty stop list

    def _inner_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        defaults = {
            k: v
            for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens))
            if v is not None
        }
        return {**defaults, **kwargs}

    def _rewrite(self, messages: list[BaseMessage], config: RunnableConfig) -> list[BaseMessage]:
        return self.prompter.invoke(messages, config) if self.enabled else messages

    async def _arewrite(self, messages: list[BaseMessage], config: RunnableConfig) -> list[BaseMessage]:
        return await self.prompter.ainvoke(messages, config) if self.enabled else messages

    def _call_llm(
        self,
        prompt: list[BaseMessage],
        stop: list[str] | None,
        config: RunnableConfig,
        kwargs: dict[str, Any],
    ) -> ChatResult:
        if isinstance(self.llm, BaseChatModel):
            # generate() keeps every generation and llm_output (invoke() keeps only the message).
            res = self.llm.generate(
                [prompt],
                stop=self._stop(stop),
                callbacks=config.get("callbacks"),
                **self._inner_kwargs(kwargs),
            )
            return ChatResult(generations=list(res.generations[0]), llm_output=res.llm_output)  # type: ignore[arg-type]
        out = self.llm.invoke(prompt, config, stop=self._stop(stop), **self._inner_kwargs(kwargs))
        return ChatResult(generations=[ChatGeneration(message=_as_ai_message(out))])

    async def _acall_llm(
        self,
        prompt: list[BaseMessage],
        stop: list[str] | None,
        config: RunnableConfig,
        kwargs: dict[str, Any],
    ) -> ChatResult:
        if isinstance(self.llm, BaseChatModel):
            res = await self.llm.agenerate(
                [prompt],
                stop=self._stop(stop),
                callbacks=config.get("callbacks"),
                **self._inner_kwargs(kwargs),
            )
            return ChatResult(generations=list(res.generations[0]), llm_output=res.llm_output)  # type: ignore[arg-type]
        out = await self.llm.ainvoke(prompt, config, stop=self._stop(stop), **self._inner_kwargs(kwargs))
        return ChatResult(generations=[ChatGeneration(message=_as_ai_message(out))])

    def _gate_first(
        self, messages: list[BaseMessage], first: ChatResult
    ) -> tuple[str | None, GateDecision | None]:
        """The original prompt text and the gate's verdict on the first answer (None: nothing to score)."""
        gate = cast(RetryGate, self.retry_gate)
        answer = first.generations[0].message
        x = _latest_human_text(messages)
        if x is None or (isinstance(answer, AIMessage) and answer.tool_calls):
            return None, None  # a tool call or a turn without human text: nothing the reward model can score
        score = gate.score(x, answer.text)
        return x, GateDecision(first_score=score, threshold=gate.threshold, retried=gate.wants_retry(score))

    def _gate_choose(
        self, x: str, decision: GateDecision, first: ChatResult, second: ChatResult
    ) -> ChatResult:
        gate = cast(RetryGate, self.retry_gate)
        decision.retry_score = gate.score(x, second.generations[0].message.text)
        if decision.retry_score > decision.first_score:
            decision.kept = "retry"
            return _with_gate(second, decision)
        return _with_gate(first, decision)

    def _gated_generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        config: RunnableConfig,
        kwargs: dict[str, Any],
    ) -> ChatResult:
        first = self._call_llm(messages, stop, config, kwargs)
        x, decision = self._gate_first(messages, first)
        if x is None or decision is None or not decision.retried:
            return _with_gate(first, decision)
        prompt = self._rewrite(messages, config)
        if prompt == messages:  # the prompter passed x through (its reason is in the rewrite run)
            return _with_gate(first, decision.not_retried("the prompter kept x"))
        return self._gate_choose(x, decision, first, self._call_llm(prompt, stop, config, kwargs))

    async def _agated_generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        config: RunnableConfig,
        kwargs: dict[str, Any],
    ) -> ChatResult:
        first = await self._acall_llm(messages, stop, config, kwargs)
        x, decision = self._gate_first(messages, first)
        if x is None or decision is None or not decision.retried:
            return _with_gate(first, decision)
        prompt = await self._arewrite(messages, config)
        if prompt == messages:
            return _with_gate(first, decision.not_retried("the prompter kept x"))
        return self._gate_choose(x, decision, first, await self._acall_llm(prompt, stop, config, kwargs))

    def _gated(self) -> bool:
        return self.retry_gate is not None and self.enabled

    # ------------------------------------------------------------------ BaseChatModel hooks
    def _should_stream(self, *, async_api: bool, run_manager: Any = None, **kwargs: Any) -> bool:
        # On invoke BaseChatModel would call _stream without the run manager, losing the nesting of the
        # rewrite; _generate streams itself instead (see _wants_stream).
        if run_manager is not None:
            return False
        return super()._should_stream(async_api=async_api, run_manager=run_manager, **kwargs)

    def _wants_stream(self, async_api: bool, run_manager: Any, kwargs: dict[str, Any]) -> bool:
        return run_manager is not None and super()._should_stream(
            async_api=async_api, run_manager=run_manager, **kwargs
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self._gated():  # the answer is scored before anyone sees it, so it is not streamed
            return self._gated_generate(messages, stop, self._child_config(run_manager), kwargs)
        if self._wants_stream(False, run_manager, kwargs):  # streaming=True or a streaming handler
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        config = self._child_config(run_manager)
        return self._call_llm(self._rewrite(messages, config), stop, config, kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self._gated():
            return await self._agated_generate(
                messages, stop, self._child_config(run_manager, async_=True), kwargs
            )
        if self._wants_stream(True, run_manager, kwargs):
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        config = self._child_config(run_manager, async_=True)
        return await self._acall_llm(await self._arewrite(messages, config), stop, config, kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        config = self._child_config(run_manager)
        if self._gated():
            yield _one_chunk(self._gated_generate(messages, stop, config, kwargs), run_manager)
            return
        prompt = self._rewrite(messages, config)
        for chunk in self.llm.stream(prompt, config, stop=self._stop(stop), **self._inner_kwargs(kwargs)):
            gen = ChatGenerationChunk(message=_as_chunk(chunk))
            if run_manager:
                run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        config = self._child_config(run_manager, async_=True)
        if self._gated():
            gen = _one_chunk(await self._agated_generate(messages, stop, config, kwargs), None)
            if run_manager:
                await run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen
            return
        prompt = await self._arewrite(messages, config)
        async for chunk in self.llm.astream(
            prompt, config, stop=self._stop(stop), **self._inner_kwargs(kwargs)
        ):
            gen = ChatGenerationChunk(message=_as_chunk(chunk))
            if run_manager:
                await run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen

    # ------------------------------------------------------------------ entry points
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        config = ensure_config(config)
        token = _CALL_CONFIG.set((self, config))
        try:
            return super().invoke(input, config, stop=stop, **kwargs)
        finally:
            _CALL_CONFIG.reset(token)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        config = ensure_config(config)
        token = _CALL_CONFIG.set((self, config))
        try:
            return await super().ainvoke(input, config, stop=stop, **kwargs)
        finally:
            _CALL_CONFIG.reset(token)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid4()  # known up front: the parent of our child runs
        ctx = copy_context()
        ctx.run(_CALL_CONFIG.set, (self, config))
        iterator = super().stream(input, config, stop=stop, **kwargs)
        try:
            while True:
                try:
                    chunk = ctx.run(next, iterator)
                except StopIteration:
                    return
                yield chunk
        finally:
            ctx.run(iterator.close)  # type: ignore[attr-defined]

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid4()
        ctx = copy_context()
        ctx.run(_CALL_CONFIG.set, (self, config))
        iterator = super().astream(input, config, stop=stop, **kwargs)

        async def step() -> AIMessageChunk:
            return await iterator.__anext__()

        try:
            while True:
                try:
                    chunk = await coro_with_context(step(), ctx)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ delegation
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools are formatted by ``llm``; the aligned model passes them through on every call."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.llm.bind_tools(tools, **kwargs)  # type: ignore[attr-defined]
        if isinstance(bound, RunnableBinding) and bound.bound is self.llm:
            return self.bind(**bound.kwargs)
        return self.model_copy(update={"llm": bound})

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """``llm``'s structured output, fed the rewritten prompt."""
        structured = self.llm.with_structured_output(schema, include_raw=include_raw, **kwargs)  # type: ignore[attr-defined]
        if not self.enabled:
            return structured
        return self.prompter | structured


def _latest_human_text(messages: list[BaseMessage]) -> str | None:
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return m.text or None
    return None


def _with_gate(result: ChatResult, decision: GateDecision | None) -> ChatResult:
    """The result with the gate's decision in its message's response_metadata["alignpro_gate"]."""
    if decision is None:
        return result
    gen = result.generations[0]
    message = gen.message.model_copy(
        update={"response_metadata": {**gen.message.response_metadata, "alignpro_gate": decision.as_dict()}}
    )
    return ChatResult(
        generations=[
            ChatGeneration(message=message, generation_info=gen.generation_info),
            *result.generations[1:],
        ],
        llm_output=result.llm_output,
    )


def _one_chunk(result: ChatResult, run_manager: CallbackManagerForLLMRun | None) -> ChatGenerationChunk:
    message = result.generations[0].message
    chunk = AIMessageChunk(
        content=message.content,
        response_metadata=message.response_metadata,
        usage_metadata=getattr(message, "usage_metadata", None),
        tool_call_chunks=[
            {
                "name": c["name"],
                "args": json.dumps(c["args"]),
                "id": c.get("id"),
                "index": i,
                "type": "tool_call_chunk",
            }
            for i, c in enumerate(getattr(message, "tool_calls", []) or [])
        ],
        id=message.id,
        chunk_position="last",
    )
    gen = ChatGenerationChunk(message=chunk)
    if run_manager:
        run_manager.on_llm_new_token(gen.text, chunk=gen)
    return gen


def _child_manager(manager_cls: type, parent: Any, parent_run_id: Any) -> Any:
    # LLM run managers have no get_child(); build the same child manager by hand so the rewrite and the
    # inner model's run nest under the aligned model's run.
    child = manager_cls(handlers=[], parent_run_id=parent_run_id)
    child.set_handlers(parent.inheritable_handlers)
    child.add_tags(parent.inheritable_tags)
    # ls_* keys describe the chat model run itself (provider, model name), not its children.
    child.add_metadata({k: v for k, v in parent.inheritable_metadata.items() if not k.startswith("ls_")})
    return child


def _as_ai_message(out: Any) -> AIMessage:
    if isinstance(out, AIMessage):
        return out
    if isinstance(out, BaseMessage):
        return AIMessage(content=out.content)
    return AIMessage(content=str(out))


def _as_chunk(out: Any) -> AIMessageChunk:
    if isinstance(out, AIMessageChunk):
        return out
    if isinstance(out, BaseMessage):
        return AIMessageChunk(content=out.content)
    return AIMessageChunk(content=str(out))
