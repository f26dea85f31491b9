"""``AlignedChatModel``: any LangChain chat model, with its latest human message rewritten by a prompter."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import Context, ContextVar, copy_context
from pathlib import Path
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
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, ensure_config
from langchain_core.runnables.utils import coro_with_context
from langchain_core.tools import BaseTool
from pydantic import model_validator

from alignpro_plugins.gate import GateResult, RetryGate
from alignpro_plugins.langchain.runnable import AlignProRunnable
from alignpro_plugins.manifest import MANIFEST_NAME

#: Environment variable read when no ``prompter=`` is given: an artifact folder or a base model name.
PROMPTER_ENV = "ALIGNPRO_PROMPTER"

# The config of the current call, put here by invoke/ainvoke/stream/astream: BaseChatModel passes only
# callbacks, tags and metadata on to _generate/_stream, so `configurable` (e.g. ENABLED_CONFIG_KEY) would be
# lost. stream() also calls _stream without its run manager: its config carries a pre-assigned run id so
# _stream can still nest its child runs.
_CALL_CONFIG: ContextVar[tuple[Any, RunnableConfig] | None] = ContextVar("alignpro_call_config", default=None)
# Config keys the rewrite and the inner call inherit (run_name and run_id name this model's own run only).
_INHERITED_KEYS = ("configurable", "recursion_limit", "max_concurrency")


def _mode_before_loading(runnable: AlignProRunnable) -> str | None:
    """The mode the prompter rewrites in: the runnable's, a loaded prompter's, or a local artifact's manifest
    (None when it cannot be known without loading it)."""
    if runnable.mode is not None:
        return runnable.mode
    if runnable.prompter is not None:
        return getattr(getattr(runnable.prompter, "manifest", None), "mode", None)
    if runnable.prompter_path is None:
        return None  # a zero-shot base model: the runnable's mode or augment
    manifest = Path(runnable.prompter_path) / MANIFEST_NAME  # a packaged prompter's name: known once loaded
    return json.loads(manifest.read_text()).get("mode") if manifest.is_file() else None


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
        if self.retry_gate is None and _mode_before_loading(self.prompter) == "refine":
            raise ValueError(
                "a refinement prompter (mode 'refine') needs a retry gate: it writes from llm's first answer, "
                "which only the gate hands it; pass retry_gate=RetryGate.rerank(reward) (keep the better answer) "
                "or retry_gate=RetryGate.always() (keep the refined one)"
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

    def _llm_kwargs(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What every call to ``llm`` gets: the stop list and this model's temperature / max_tokens, then the
        call's kwargs."""
        defaults = {
            k: v
            for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens))
            if v is not None
        }
        return {"stop": self._stop(stop), **defaults, **kwargs}

    def _rewrite(self, messages: list[BaseMessage], config: RunnableConfig) -> list[BaseMessage]:
        return self.prompter.invoke(messages, config) if self.enabled else messages

    async def _arewrite(self, messages: list[BaseMessage], config: RunnableConfig) -> list[BaseMessage]:
        return await self.prompter.ainvoke(messages, config) if self.enabled else messages

    def _call_llm(
        self, prompt: list[BaseMessage], config: RunnableConfig, kwargs: dict[str, Any]
    ) -> ChatResult:
        if isinstance(self.llm, BaseChatModel):
            # generate() keeps every generation and llm_output (invoke() keeps only the message).
            return _first(self.llm.generate([prompt], callbacks=config.get("callbacks"), **kwargs))
        return _as_result(self.llm.invoke(prompt, config, **kwargs))

    async def _acall_llm(
        self, prompt: list[BaseMessage], config: RunnableConfig, kwargs: dict[str, Any]
    ) -> ChatResult:
        if isinstance(self.llm, BaseChatModel):
            return _first(await self.llm.agenerate([prompt], callbacks=config.get("callbacks"), **kwargs))
        return _as_result(await self.llm.ainvoke(prompt, config, **kwargs))

    # ------------------------------------------------------------------ retry gate (the flow is RetryGate's)
    def _gated(self) -> bool:
        return self.retry_gate is not None and self.enabled

    def _gated_generate(
        self, messages: list[BaseMessage], config: RunnableConfig, kwargs: dict[str, Any]
    ) -> ChatResult:
        x = _latest_human_text(messages)
        if x is None:  # a turn without human text: nothing the reward model can score
            return self._call_llm(messages, config, kwargs)
        [result] = cast(RetryGate, self.retry_gate).choose(
            [x],
            [messages],
            lambda prompts: [self._call_llm(p, config, kwargs) for p in prompts],
            lambda _: [_changed(messages, self._rewrite(messages, config))],
            text=_scorable_text,
        )
        return _with_gate(result)

    async def _agated_generate(
        self, messages: list[BaseMessage], config: RunnableConfig, kwargs: dict[str, Any]
    ) -> ChatResult:
        x = _latest_human_text(messages)
        if x is None:
            return await self._acall_llm(messages, config, kwargs)

        async def ask(prompts: list[list[BaseMessage]]) -> list[ChatResult]:
            return [await self._acall_llm(p, config, kwargs) for p in prompts]

        async def retries(_: list[int]) -> list[list[list[BaseMessage]]]:
            return [_changed(messages, await self._arewrite(messages, config))]

        [result] = await cast(RetryGate, self.retry_gate).achoose(
            [x], [messages], ask, retries, text=_scorable_text
        )
        return _with_gate(result)

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
        if not self._gated() and self._wants_stream(False, run_manager, kwargs):
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        config, llm_kwargs = self._child_config(run_manager), self._llm_kwargs(stop, kwargs)
        if self._gated():  # the answer is scored before anyone sees it, so it is not streamed
            return self._gated_generate(messages, config, llm_kwargs)
        return self._call_llm(self._rewrite(messages, config), config, llm_kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not self._gated() and self._wants_stream(True, run_manager, kwargs):
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        config, llm_kwargs = self._child_config(run_manager, async_=True), self._llm_kwargs(stop, kwargs)
        if self._gated():
            return await self._agated_generate(messages, config, llm_kwargs)
        return await self._acall_llm(await self._arewrite(messages, config), config, llm_kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        config, llm_kwargs = self._child_config(run_manager), self._llm_kwargs(stop, kwargs)
        if self._gated():
            chunks: Iterable[Any] = [_one_chunk(self._gated_generate(messages, config, llm_kwargs))]
        else:
            chunks = self.llm.stream(self._rewrite(messages, config), config, **llm_kwargs)
        for chunk in chunks:
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
        config, llm_kwargs = self._child_config(run_manager, async_=True), self._llm_kwargs(stop, kwargs)
        if self._gated():
            chunks: AsyncIterator[Any] = _aiter(
                [_one_chunk(await self._agated_generate(messages, config, llm_kwargs))]
            )
        else:
            chunks = self.llm.astream(await self._arewrite(messages, config), config, **llm_kwargs)
        async for chunk in chunks:
            gen = ChatGenerationChunk(message=_as_chunk(chunk))
            if run_manager:
                await run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen

    # ------------------------------------------------------------------ entry points
    # Each puts its config where _generate / _stream can read it (see _CALL_CONFIG); stop and the call's other
    # kwargs go on to BaseChatModel as they came.
    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        config = ensure_config(config)
        with self._calling(config):
            return super().invoke(input, config, **kwargs)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        config = ensure_config(config)
        with self._calling(config):
            return await super().ainvoke(input, config, **kwargs)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        config, ctx = self._stream_context(config)
        iterator = super().stream(input, config, **kwargs)
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
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        config, ctx = self._stream_context(config)
        iterator = super().astream(input, config, **kwargs)

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

    @contextmanager
    def _calling(self, config: RunnableConfig) -> Iterator[None]:
        token = _CALL_CONFIG.set((self, config))
        try:
            yield
        finally:
            _CALL_CONFIG.reset(token)

    def _stream_context(self, config: RunnableConfig | None) -> tuple[RunnableConfig, Context]:
        """The config, with a run id known up front (the parent of our child runs), set in a context of its own:
        a generator's steps may run in different contexts, so each step is run in this one."""
        config = ensure_config(config)
        config["run_id"] = config.get("run_id") or uuid4()
        ctx = copy_context()
        ctx.run(_CALL_CONFIG.set, (self, config))
        return config, ctx

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


def _changed(messages: list[BaseMessage], prompt: list[BaseMessage]) -> list[list[BaseMessage]]:
    """The retry input: the rewritten messages, or none when the prompter passed x through (its reason is in
    the rewrite run)."""
    return [] if prompt == messages else [prompt]


def _scorable_text(result: ChatResult) -> str | None:
    """What the gate's reward scores: the answer's text (None for a tool call: nothing the reward can score)."""
    message = result.generations[0].message
    return None if isinstance(message, AIMessage) and message.tool_calls else message.text


def _with_gate(gated: GateResult[Any, ChatResult]) -> ChatResult:
    """The kept result with the gate's decision in its message's response_metadata["alignpro_gate"]."""
    result, decision = gated.answer, gated.decision
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


def _one_chunk(result: ChatResult) -> AIMessageChunk:
    """A whole answer as the last (and only) chunk of a stream."""
    message = result.generations[0].message
    return AIMessageChunk(
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


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _child_manager(manager_cls: type, parent: Any, parent_run_id: Any) -> Any:
    # LLM run managers have no get_child(); build the same child manager by hand so the rewrite and the
    # inner model's run nest under the aligned model's run.
    child = manager_cls(handlers=[], parent_run_id=parent_run_id)
    child.set_handlers(parent.inheritable_handlers)
    child.add_tags(parent.inheritable_tags)
    # ls_* keys describe the chat model run itself (provider, model name), not its children.
    child.add_metadata({k: v for k, v in parent.inheritable_metadata.items() if not k.startswith("ls_")})
    return child


def _first(result: LLMResult) -> ChatResult:
    """The ChatResult of a one-prompt generate()."""
    return ChatResult(generations=list(result.generations[0]), llm_output=result.llm_output)  # type: ignore[arg-type]


def _as_result(out: Any) -> ChatResult:
    """A runnable's output as a ChatResult (an AIMessage as it is; other messages and values as their text)."""
    if not isinstance(out, AIMessage):
        out = AIMessage(content=out.content if isinstance(out, BaseMessage) else str(out))
    return ChatResult(generations=[ChatGeneration(message=out)])


def _as_chunk(out: Any) -> AIMessageChunk:
    if isinstance(out, AIMessageChunk):
        return out
    if isinstance(out, BaseMessage):
        return AIMessageChunk(content=out.content)
    return AIMessageChunk(content=str(out))
