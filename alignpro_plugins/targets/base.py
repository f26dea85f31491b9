"""The frozen-target interface: the LLM whose weights we never touch, behind one small interface."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger("alignpro_plugins.targets")
T = TypeVar("T")


@dataclass(frozen=True, init=False)
class TargetRequest:
    """One input to a frozen target: what it sees, the user's prompt it stands for, and framework context.

    ``prompt`` is x' (the rewrite, or x itself); ``original`` is the user's x, which rewards score against
    (default: ``prompt``); ``context`` is whatever a framework target needs beyond the text, e.g. a DSPy
    example's other input fields. A plain string means ``TargetRequest(prompt=that string)``.
    """

    prompt: str
    original: str
    context: Mapping[str, Any] | None

    def __init__(
        self, prompt: str, original: str | None = None, context: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"TargetRequest.prompt must be a str, got {type(prompt).__name__}")
        if original is not None and not isinstance(original, str):
            raise TypeError(f"TargetRequest.original must be a str or None, got {type(original).__name__}")
        if context is not None and not isinstance(context, Mapping):
            raise TypeError(f"TargetRequest.context must be a mapping or None, got {type(context).__name__}")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "original", prompt if original is None else original)
        object.__setattr__(self, "context", context)


def as_request(item: str | TargetRequest) -> TargetRequest:
    """A target input as a :class:`TargetRequest` (a plain string is its own original)."""
    if isinstance(item, TargetRequest):
        return item
    if isinstance(item, str):
        return TargetRequest(item)
    raise TypeError(f"a target input is a str or a TargetRequest, got {type(item).__name__}: {item!r:.80}")


def as_requests(items: Sequence[str | TargetRequest]) -> list[TargetRequest]:
    if isinstance(items, (str, TargetRequest)):
        raise TypeError("prompts are a list of str or TargetRequest; wrap a single prompt in a list")
    return [as_request(item) for item in items]


@dataclass
class TargetStats:
    calls: int = 0
    failures: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TargetError(RuntimeError):
    """Some prompts got no answer (each failure already counted in the target's ``stats``).

    ``answers`` lines up with the prompts: the answer, or None where the request failed. Inference lets this
    raise; training code that scores a failed answer as an empty one says so with :meth:`answers_or_empty`.
    """

    def __init__(self, message: str, answers: list[str | None]) -> None:
        super().__init__(message)
        self.answers = answers

    def answers_or_empty(self) -> list[str]:
        return ["" if a is None else a for a in self.answers]


class FrozenTarget(ABC):
    """Answers prompts: plain strings or :class:`TargetRequest` objects, one answer string each.

    Subclasses implement ``_generate`` (texts in, answers out) and may add a native ``_agenerate``; a target that
    uses a request's original prompt or context overrides ``_answer`` (and ``_aanswer``) instead.
    """

    def __init__(self) -> None:
        self.stats = TargetStats()

    @property
    @abstractmethod
    def identity(self) -> str:
        """Stable name of the model behind this target (used in cache keys and reports)."""

    @property
    def settings(self) -> dict[str, Any]:
        """Generation settings that change answers (used in cache keys)."""
        return {}

    def generate(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        return self._counted(self._answer, as_requests(prompts))

    async def agenerate(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        requests = as_requests(prompts)
        start = time.perf_counter()
        try:
            return await self._aanswer(requests)
        finally:
            self.stats.seconds += time.perf_counter() - start
            self.stats.calls += len(requests)

    def __call__(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        return self.generate(prompts)

    def _counted(self, call: Callable[[list[Any]], list[T]], prompts: Sequence[Any]) -> list[T]:
        """Run ``call`` on the prompts, adding its time and the prompt count to ``stats``."""
        start = time.perf_counter()
        try:
            answers = call(list(prompts))
        finally:
            self.stats.seconds += time.perf_counter() - start
        self.stats.calls += len(prompts)
        return answers

    def _answer(self, requests: list[TargetRequest]) -> list[str]:
        return self._generate([r.prompt for r in requests])

    async def _aanswer(self, requests: list[TargetRequest]) -> list[str]:
        if type(self)._answer is not FrozenTarget._answer:
            # A target that reads the requests, with no async path of its own: its sync one, in a worker thread.
            return await asyncio.to_thread(self._answer, requests)
        return await self._agenerate([r.prompt for r in requests])

    @abstractmethod
    def _generate(self, prompts: list[str]) -> list[str]: ...

    async def _agenerate(self, prompts: list[str]) -> list[str]:
        # Local models run in a worker thread so the event loop stays free.
        return await asyncio.to_thread(self._generate, prompts)

    def _failed(self, exc: BaseException, prompt: str) -> str:
        self.stats.failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "target %s failed on a prompt (%d failures so far): %s", self.identity, self.stats.failures, exc
        )
        return ""
