"""``ChatLocalTransformers``: a LangChain chat model over a local transformers causal LM.

A thin wrapper: messages become a chat for :class:`~alignpro_plugins.engine.GenerationEngine`, which
micro-batches non-streaming calls from many threads or coroutines and streams real tokens. Loaded models are
shared by every instance that names the same model, device and dtype.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from alignpro_plugins.engine import Generation, GenerationEngine, GenerationSettings

_ENGINES: dict[tuple[str, str | None, str | None], GenerationEngine] = {}
_ENGINES_LOCK = threading.Lock()


def _shared_engine(name: str, device: str | None, dtype: str | None, batch_size: int) -> GenerationEngine:
    key = (name, device, dtype)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine, _ = GenerationEngine.load(name, device=device, dtype=dtype, name=f"alignpro-chat:{name}")
            _ENGINES[key] = engine
        engine.max_batch_size = max(engine.max_batch_size, batch_size)
        return engine


def clear_model_cache() -> None:
    """Drop every model loaded by :class:`ChatLocalTransformers` (they reload on next use)."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.close()
        _ENGINES.clear()


def _finish_reason(out: Generation) -> str:
    return "stop" if out.ended else "length"


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, ChatMessage):
        return message.role
    return message.type


def _text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") in ("tool_call", "tool_use", "reasoning"):
            continue
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"ChatLocalTransformers reads text only; got a {kind!r} content part")
    return "".join(texts)


class ChatLocalTransformers(BaseChatModel):
    """A chat model over a local transformers causal LM, e.g. the packaged SmolLM2-135M-Instruct.

    ```python
    llm = ChatLocalTransformers(model="smollm2-135m-instruct", max_tokens=64)
    llm.invoke("Name three green vegetables.")
    ```

    Greedy when ``temperature`` is 0. ``timeout`` caps generation time (seconds). Reports
    ``usage_metadata`` and streams real tokens. No tool calling, structured output or images.
    """

    model_name: str = Field(default="smollm2-135m-instruct", alias="model")
    """A packaged model name (see ``alignpro_plugins.models``), a local folder or a hub id."""
    temperature: float = 0.0
    max_tokens: int = 256
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    streaming: bool = False
    batch_size: int = 8
    """Largest micro-batch of concurrent non-streaming calls."""
    device: str | None = "auto"
    dtype: str | None = "auto"

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    _engine: GenerationEngine | None = PrivateAttr(default=None)

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError("temperature must be >= 0")
        return v

    @field_validator("max_tokens", "batch_size")
    @classmethod
    def _check_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @property
    def _llm_type(self) -> str:
        return "local-transformers"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="transformers",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ------------------------------------------------------------------ engine
    def _get_engine(self) -> GenerationEngine:
        if self._engine is None:  # loaded on first use: constructing the chat model stays cheap
            self._engine = _shared_engine(self.model_name, self.device, self.dtype, self.batch_size)
        return self._engine

    async def _aget_engine(self) -> GenerationEngine:
        # Loading takes seconds: keep it off the event loop.
        return self._engine if self._engine is not None else await asyncio.to_thread(self._get_engine)

    def get_token_ids(self, text: str) -> list[int]:
        return self._get_engine().token_ids([text])[0]

    def _settings(self, stop: list[str] | None, kwargs: dict[str, Any]) -> GenerationSettings:
        stops = stop if stop is not None else self.stop
        temperature = float(kwargs.get("temperature", self.temperature))
        top_p = kwargs.get("top_p", self.top_p)
        return GenerationSettings(
            max_new_tokens=int(kwargs.get("max_tokens") or self.max_tokens),
            do_sample=temperature > 0,  # greedy at 0
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,  # 1.0 and top_k=0: no filter beyond what is asked
            top_k=0,
            repetition_penalty=kwargs.get("repetition_penalty", self.repetition_penalty),
            stop=tuple(s for s in (stops or []) if s),
            max_time=kwargs.get("timeout", self.timeout),
        )

    def _prompt(self, engine: GenerationEngine, messages: list[BaseMessage]) -> str:
        return engine.format_chat([{"role": _role(m), "content": _text_of(m)} for m in messages])

    def _message(self, out: Generation) -> AIMessage:
        return AIMessage(
            content=out.text,
            usage_metadata=self._usage(out),
            response_metadata={"model_name": self.model_name, "finish_reason": _finish_reason(out)},
        )

    @staticmethod
    def _usage(out: Generation) -> UsageMetadata:
        return UsageMetadata(
            input_tokens=out.input_tokens,
            output_tokens=out.output_tokens,
            total_tokens=out.input_tokens + out.output_tokens,
        )

    # ------------------------------------------------------------------ BaseChatModel hooks
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = self._get_engine()
        # Micro-batched: concurrent calls (batch(), threads) share one generate().
        out = engine.submit(self._prompt(engine, messages), self._settings(stop, kwargs)).result()
        return ChatResult(generations=[ChatGeneration(message=self._message(out))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = await self._aget_engine()
        fut = engine.submit(self._prompt(engine, messages), self._settings(stop, kwargs))
        out = await asyncio.wrap_future(fut)
        return ChatResult(generations=[ChatGeneration(message=self._message(out))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Generator[ChatGenerationChunk, None, None]:
        engine = self._get_engine()
        for item in engine.stream(self._prompt(engine, messages), self._settings(stop, kwargs)):
            if isinstance(item, str):
                if not item:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
                if run_manager:
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
            else:
                # The only chunk with usage and model_name: merged chunks must not double-count them.
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="",
                        chunk_position="last",
                        usage_metadata=self._usage(item),
                        response_metadata={
                            "model_name": self.model_name,
                            "finish_reason": _finish_reason(item),
                        },
                    )
                )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        await self._aget_engine()
        iterator = self._stream(messages, stop=stop, **kwargs)
        try:
            while True:
                # Each next() blocks on the generation thread; run it off the event loop.
                chunk = await asyncio.to_thread(next, iterator, None)
                if chunk is None:
                    break
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await asyncio.to_thread(iterator.close)
