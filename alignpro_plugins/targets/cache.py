"""Answers cached by (target identity, generation settings, prompt), optionally persisted as jsonl."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.jsonl import append_jsonl, read_jsonl_rows
from alignpro_plugins.targets.base import FrozenTarget, TargetError, TargetRequest, as_request, as_requests


class CachedTarget(FrozenTarget):
    """Caches answers by (target identity, generation settings, prompt); optionally persisted as jsonl.

    A request's context is part of its key (the target may answer from it); its original prompt is not (the
    target answers what it sees), so a request without context shares the entry of its plain prompt.
    """

    def __init__(self, target: FrozenTarget, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.target = target
        self.stats = target.stats
        self._cache: dict[str, str] = {}
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        if self._path and self._path.exists():
            for row in read_jsonl_rows(self._path, required=("key", "answer")):
                self._cache[row["key"]] = row["answer"]

    @property
    def identity(self) -> str:
        return self.target.identity

    @property
    def settings(self) -> dict[str, Any]:
        return self.target.settings

    def key(self, prompt: str | TargetRequest) -> str:
        request = as_request(prompt)
        # A plain prompt's key is the one earlier versions wrote, so existing cache files stay valid.
        parts: list[Any] = [self.target.identity, self.target.settings, request.prompt]
        if request.context is not None:
            parts.append(dict(request.context))
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cached(self, prompt: str | TargetRequest) -> str | None:
        """The stored answer for ``prompt`` under this target and settings, without generating one."""
        return self._cache.get(self.key(prompt))

    def _split(self, requests: list[TargetRequest]) -> tuple[list[str], list[TargetRequest]]:
        """Each request's key, and one request per key not cached yet."""
        keys = [self.key(r) for r in requests]
        todo = {k: r for k, r in zip(keys, requests, strict=True) if k not in self._cache}
        self.stats.cache_hits += len(requests) - sum(1 for k in keys if k not in self._cache)
        return keys, list(todo.values())

    def _store(self, todo: list[TargetRequest], answers: Sequence[str | None]) -> None:
        with self._lock:
            rows = []
            for request, answer in zip(todo, answers, strict=True):
                if answer is None or answer == "" and self.target.stats.failures:
                    continue  # do not cache failures; retry next time
                k = self.key(request)
                self._cache[k] = answer
                rows.append(json.dumps({"key": k, "answer": answer}))
            if self._path and rows:
                append_jsonl(self._path, rows)

    def _generate(self, prompts: list[str]) -> list[str]:
        return self.generate(prompts)

    def generate(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        keys, todo = self._split(as_requests(prompts))
        if todo:
            try:
                self._store(todo, self.target.generate(todo))
            except TargetError as exc:
                raise self._partly_answered(keys, todo, exc) from None
        return [self._cache.get(k, "") for k in keys]

    async def agenerate(self, prompts: Sequence[str | TargetRequest]) -> list[str]:
        keys, todo = self._split(as_requests(prompts))
        if todo:
            try:
                self._store(todo, await self.target.agenerate(todo))
            except TargetError as exc:
                raise self._partly_answered(keys, todo, exc) from None
        return [self._cache.get(k, "") for k in keys]

    def _partly_answered(self, keys: list[str], todo: list[TargetRequest], exc: TargetError) -> TargetError:
        """Cache the answers that arrived; the error again, its answers lined up with the caller's prompts."""
        self._store(todo, exc.answers)
        failed = {self.key(r) for r, a in zip(todo, exc.answers, strict=True) if a is None}
        message = f"{exc} (the answers that arrived are cached: calling again asks only for the rest)"
        return TargetError(message, [None if k in failed else self._cache.get(k) for k in keys])
