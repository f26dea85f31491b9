"""The frozen-target interface: the LLM whose weights we never touch, behind one small interface."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger("alignpro_plugins.targets")
T = TypeVar("T")


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
    """Answers prompts. Subclasses implement ``_generate`` and/or ``_agenerate``."""

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

    def generate(self, prompts: Sequence[str]) -> list[str]:
        return self._counted(self._generate, prompts)

    def _counted(self, call: Callable[[list[str]], list[T]], prompts: Sequence[str]) -> list[T]:
        """Run ``call`` on the prompts, adding its time and the prompt count to ``stats``."""
        start = time.perf_counter()
        try:
            answers = call(list(prompts))
        finally:
            self.stats.seconds += time.perf_counter() - start
        self.stats.calls += len(prompts)
        return answers

    async def agenerate(self, prompts: Sequence[str]) -> list[str]:
        start = time.perf_counter()
        try:
            return await self._agenerate(list(prompts))
        finally:
            self.stats.seconds += time.perf_counter() - start
            self.stats.calls += len(prompts)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return self.generate(prompts)

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
