"""LangChain runnables, DSPy LMs and plain Python callables as the frozen target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alignpro_plugins.targets.base import FrozenTarget


def _message_text(out: Any) -> str:
    content = getattr(out, "content", out)
    if isinstance(content, list):  # content blocks
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return str(content)


class LangChainTarget(FrozenTarget):
    """Any LangChain Runnable that maps a str (or messages) to a message or str: chat models, chains."""

    def __init__(self, runnable: Any, *, name: str | None = None, max_concurrency: int | None = 8) -> None:
        super().__init__()
        self.runnable = runnable
        self._name = (
            name
            or getattr(runnable, "model_name", None)
            or getattr(runnable, "model", None)
            or type(runnable).__name__
        )
        self.max_concurrency = max_concurrency

    @property
    def identity(self) -> str:
        return f"langchain:{self._name}"

    def _collect(self, prompts: list[str], outs: list[Any]) -> list[str]:
        return [
            self._failed(o, p) if isinstance(o, BaseException) else _message_text(o).strip()
            for p, o in zip(prompts, outs, strict=True)
        ]

    def _generate(self, prompts: list[str]) -> list[str]:
        outs = self.runnable.batch(
            prompts, config={"max_concurrency": self.max_concurrency}, return_exceptions=True
        )
        return self._collect(prompts, outs)

    async def _agenerate(self, prompts: list[str]) -> list[str]:
        outs = await self.runnable.abatch(
            prompts, config={"max_concurrency": self.max_concurrency}, return_exceptions=True
        )
        return self._collect(prompts, outs)


class DSPyTarget(FrozenTarget):
    """Any ``dspy.LM`` (or BaseLM): each prompt is sent as one user message."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    @property
    def identity(self) -> str:
        return f"dspy:{getattr(self.lm, 'model', type(self.lm).__name__)}"

    @property
    def settings(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (getattr(self.lm, "kwargs", {}) or {}).items()
            if isinstance(v, (int, float, str))
        }

    def _ask(self, prompt: str) -> str:
        # DSPy 3.4+: an explicit lm15 Request (the legacy messages= call is deprecated and goes away in 3.5).
        try:
            from dspy.lm15 import Message, Request
        except ImportError:  # older DSPy
            Request = None  # type: ignore[assignment,misc]
        if (
            Request is not None
            and isinstance(getattr(self.lm, "model", None), str)
            and hasattr(self.lm, "engine")
        ):
            response = self.lm(Request(model=self.lm.model, messages=(Message.user(prompt),)))
            return str(response.text or "").strip()
        out = self.lm(prompt)  # plain-string calls stay supported and return a list of outputs
        first = out[0] if isinstance(out, list) and out else out
        return str(first.get("text", "") if isinstance(first, dict) else first).strip()

    def _generate(self, prompts: list[str]) -> list[str]:
        answers = []
        for p in prompts:
            try:
                answers.append(self._ask(p))
            except Exception as exc:
                answers.append(self._failed(exc, p))
        return answers


class CallableTarget(FrozenTarget):
    """A Python function: ``fn(list[str]) -> list[str]`` when ``batched`` else ``fn(str) -> str``."""

    def __init__(self, fn: Callable[..., Any], *, batched: bool = False, name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.batched = batched
        self._name = name or getattr(fn, "__qualname__", repr(fn))

    @property
    def identity(self) -> str:
        return f"callable:{self._name}"

    def _generate(self, prompts: list[str]) -> list[str]:
        if self.batched:
            try:
                out = list(self.fn(prompts))
                if len(out) != len(prompts):
                    raise ValueError(f"batched target returned {len(out)} answers for {len(prompts)} prompts")
                return [str(a) for a in out]
            except Exception as exc:
                return [self._failed(exc, p) for p in prompts]
        answers = []
        for p in prompts:
            try:
                answers.append(str(self.fn(p)))
            except Exception as exc:
                answers.append(self._failed(exc, p))
        return answers
