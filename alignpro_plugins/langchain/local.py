"""``ChatLocalTransformers``: a LangChain chat model over a local transformers causal LM.

Non-streaming calls from many threads or coroutines are micro-batched into one ``generate`` call; streaming
uses ``TextIteratorStreamer`` (one sequence at a time). Loaded models are shared by every instance that
names the same model, device and dtype.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Settings:
    """Generation settings; calls with equal settings may share a batch."""

    max_new_tokens: int
    temperature: float
    top_p: float | None
    repetition_penalty: float | None
    stop: tuple[str, ...]
    max_time: float | None


@dataclass
class _Output:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _stopping_criteria(tokenizer: Any, stop: Sequence[str], prompt_len: int, cancel: threading.Event | None):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        """Per-row stop when the newly generated text contains a stop string."""

        def __init__(self) -> None:
            # A stop string spans at most one token per byte, plus a partial token at each end.
            self.window = max(len(s.encode()) for s in stop) + 2

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            tails = input_ids[:, prompt_len:][:, -self.window :]
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    class Cancelled(StoppingCriteria):
        """Stops a streaming generation whose consumer went away or saw a stop string."""

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            flag = cancel is not None and cancel.is_set()
            return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

    criteria: list[Any] = []
    if stop:
        criteria.append(StopOnStrings())
    if cancel is not None:
        criteria.append(Cancelled())
    return StoppingCriteriaList(criteria)


class _Runtime:
    """One loaded model + tokenizer, its generation lock and its micro-batcher."""

    def __init__(self, name: str, device: str | None, dtype: str | None, batch_size: int) -> None:
        from alignpro_plugins.batching import MicroBatcher
        from alignpro_plugins.prompter import _select_device, _select_dtype, load_causal_lm

        dev = _select_device(device)
        self.model, self.tokenizer, self.path = load_causal_lm(
            name, device=dev, dtype=_select_dtype(dtype, dev)
        )
        self.tokenizer.padding_side = "left"  # batched decoder-only generation needs left padding
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.lock = threading.Lock()
        self.batcher: MicroBatcher[str, _Output] = MicroBatcher(
            self._generate_batch, max_batch_size=batch_size, name=f"alignpro-chat:{name}"
        )

    # ------------------------------------------------------------------ formatting
    def format(self, messages: list[dict[str, str]]) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:
                # Strict templates (e.g. alternating roles only): merge same-role runs, fold system in.
                return tok.apply_chat_template(
                    _merge_roles(messages), tokenize=False, add_generation_prompt=True
                )
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _gen_kwargs(self, s: _Settings) -> dict[str, Any]:
        tok = self.tokenizer
        kwargs: dict[str, Any] = dict(
            max_new_tokens=s.max_new_tokens,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            use_cache=True,
        )
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None)
        else:  # greedy; unset sampling knobs so transformers does not warn about them
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if s.repetition_penalty is not None:
            kwargs["repetition_penalty"] = s.repetition_penalty
        if s.max_time is not None:
            kwargs["max_time"] = s.max_time
        return kwargs

    # ------------------------------------------------------------------ batched generation
    def _generate_batch(self, settings: Any, prompts: list[str]) -> list[_Output]:
        import torch

        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        criteria = _stopping_criteria(tok, settings.stop, prompt_len, None)
        with self.lock, torch.inference_mode():
            out = self.model.generate(**enc, stopping_criteria=criteria, **self._gen_kwargs(settings))
        pad_id = self._gen_kwargs(settings)["pad_token_id"]
        results = []
        for i, row in enumerate(out[:, prompt_len:].tolist()):
            end = next((j + 1 for j, t in enumerate(row) if t in self.eos_ids), None)
            ids = row if end is None else row[:end]
            while end is None and ids and ids[-1] == pad_id:  # a row stopped early is padded afterwards
                ids = ids[:-1]
            text, stopped = _cut_at_stop(tok.decode(ids, skip_special_tokens=True), settings.stop)
            finish = "stop" if end is not None or stopped else "length"
            n_in = int(enc["attention_mask"][i].sum())
            results.append(_Output(text, n_in, len(ids), finish))
        return results

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt: str, settings: _Settings) -> Iterator[str | _Output]:
        """Yield text pieces as they are generated, then one final :class:`_Output` with the counts."""
        import torch
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        eos_ids = self.eos_ids

        class CountingStreamer(TextIteratorStreamer):
            n_generated = 0
            last_token: int | None = None

            def put(self, value: Any) -> None:
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    flat = value.reshape(-1).tolist()
                    self.n_generated += len(flat)
                    self.last_token = flat[-1] if flat else self.last_token
                super().put(value)

        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        n_in = int(enc["input_ids"].shape[1])
        streamer = CountingStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        criteria = _stopping_criteria(tok, settings.stop, n_in, cancel)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.lock, torch.inference_mode():
                    self.model.generate(
                        **enc, streamer=streamer, stopping_criteria=criteria, **self._gen_kwargs(settings)
                    )
            except BaseException as exc:  # surface in the consumer instead of hanging it
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="alignpro-chat-stream", daemon=True)
        thread.start()
        stop = [s for s in settings.stop if s]
        hold = max((len(s) for s in stop), default=1) - 1  # chars that may be the start of a stop string
        pending = ""
        stopped = False
        try:
            for piece in streamer:
                pending += piece
                if stop:
                    cut, stopped = _cut_at_stop(pending, stop)
                    if stopped:
                        if cut:
                            yield cut
                        pending = ""
                        cancel.set()
                        break
                    safe = len(pending) - hold
                    if safe > 0:
                        yield pending[:safe]
                        pending = pending[safe:]
                elif pending:
                    yield pending
                    pending = ""
            if pending and not stopped:
                yield pending
        finally:
            cancel.set()  # consumer stopped early: end the generation at the next token
            thread.join()
        if errors:
            raise errors[0]
        finished = stopped or streamer.last_token in eos_ids or streamer.n_generated < settings.max_new_tokens
        yield _Output("", n_in, streamer.n_generated, "stop" if finished else "length")

    def close(self) -> None:
        self.batcher.close()


def _merge_roles(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    for m in messages:
        if m["role"] == "system":
            continue
        role = "user" if m["role"] in ("user", "tool") else "assistant"
        if merged and merged[-1]["role"] == role:
            merged[-1] = {"role": role, "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append({"role": role, "content": m["content"]})
    if system and merged and merged[0]["role"] == "user":
        merged[0] = {"role": "user", "content": f"{system}\n\n{merged[0]['content']}"}
    return merged


_RUNTIMES: dict[tuple[str, str | None, str | None], _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def _get_runtime(name: str, device: str | None, dtype: str | None, batch_size: int) -> _Runtime:
    key = (name, device, dtype)
    with _RUNTIMES_LOCK:
        rt = _RUNTIMES.get(key)
        if rt is None:
            rt = _RUNTIMES[key] = _Runtime(name, device, dtype, batch_size)
        rt.batcher.max_batch_size = max(rt.batcher.max_batch_size, batch_size)
        return rt


def clear_model_cache() -> None:
    """Drop every model loaded by :class:`ChatLocalTransformers` (they reload on next use)."""
    with _RUNTIMES_LOCK:
        for rt in _RUNTIMES.values():
            rt.close()
        _RUNTIMES.clear()


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

    _rt: _Runtime | None = PrivateAttr(default=None)

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

    # ------------------------------------------------------------------ runtime
    def _runtime(self) -> _Runtime:
        if self._rt is None:  # loaded on first use: constructing the chat model stays cheap
            self._rt = _get_runtime(self.model_name, self.device, self.dtype, self.batch_size)
        return self._rt

    async def _aruntime(self) -> _Runtime:
        # Loading takes seconds: keep it off the event loop.
        return self._rt if self._rt is not None else await asyncio.to_thread(self._runtime)

    def get_token_ids(self, text: str) -> list[int]:
        return self._runtime().tokenizer(text, add_special_tokens=False)["input_ids"]

    def _settings(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Settings:
        stops = stop if stop is not None else self.stop
        return _Settings(
            max_new_tokens=int(kwargs.get("max_tokens") or self.max_tokens),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=kwargs.get("top_p", self.top_p),
            repetition_penalty=kwargs.get("repetition_penalty", self.repetition_penalty),
            stop=tuple(s for s in (stops or []) if s),
            max_time=kwargs.get("timeout", self.timeout),
        )

    def _prompt(self, rt: _Runtime, messages: list[BaseMessage]) -> str:
        return rt.format([{"role": _role(m), "content": _text_of(m)} for m in messages])

    def _message(self, out: _Output) -> AIMessage:
        return AIMessage(
            content=out.text,
            usage_metadata=self._usage(out),
            response_metadata={"model_name": self.model_name, "finish_reason": out.finish_reason},
        )

    @staticmethod
    def _usage(out: _Output) -> UsageMetadata:
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
        rt = self._runtime()
        # Through the micro-batcher: concurrent calls (batch(), threads) share one generate().
        out = rt.batcher.submit(self._settings(stop, kwargs), self._prompt(rt, messages)).result()
        return ChatResult(generations=[ChatGeneration(message=self._message(out))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        rt = await self._aruntime()
        fut = rt.batcher.submit(self._settings(stop, kwargs), self._prompt(rt, messages))
        out = await asyncio.wrap_future(fut)
        return ChatResult(generations=[ChatGeneration(message=self._message(out))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Generator[ChatGenerationChunk, None, None]:
        rt = self._runtime()
        for item in rt.stream(self._prompt(rt, messages), self._settings(stop, kwargs)):
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
                            "finish_reason": item.finish_reason,
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
        await self._aruntime()
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
