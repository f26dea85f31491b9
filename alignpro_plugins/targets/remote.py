"""Any OpenAI-compatible chat endpoint as the frozen target."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alignpro_plugins.targets.base import FrozenTarget

logger = logging.getLogger("alignpro_plugins.targets")

OPENAI_HOST = "api.openai.com"
# How much of a rejected request's response body goes into the error (enough for the server's message).
ERROR_BODY_CHARS = 300


def public_url(url: str) -> str:
    """``url`` without what may hold a secret: ``user:password@`` and the query string (``?key=...``).

    A URL without either comes back unchanged, so identities (and the cache keys built on them) stay stable.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class OpenAICompatibleTarget(FrozenTarget):
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, hosted APIs); concurrent, retried.

    The key sent as ``Authorization: Bearer``: ``api_key`` when given, else the environment variable named by
    ``api_key_env``, else ``$OPENAI_API_KEY`` but only for ``https://api.openai.com`` (an OpenAI key must not
    reach a third-party or local server), else none. The key is never logged, put in a repr, an identity or an
    error message.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        system_prompt: str | None = None,
        concurrency: int = 8,
        max_retries: int = 3,
        timeout: float = 120.0,
        backoff: float = 0.5,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        # Identities, reprs and errors show the URL without credentials: they reach logs and manifests.
        self._public_url = public_url(self.base_url)
        parts = urlsplit(self.base_url)
        # The path is extended before the query string (e.g. Azure's ?api-version=...), not after it.
        self._endpoint = urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/") + "/chat/completions", parts.query, "")
        )
        # Kept private and never logged or put in reprs.
        self._api_key = self._choose_key(api_key, api_key_env)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff

    def _choose_key(self, api_key: str | None, api_key_env: str | None) -> str:
        if api_key is not None and api_key_env is not None:
            raise ValueError("give api_key or api_key_env (the name of a variable holding it), not both")
        if api_key is not None:
            return api_key
        if api_key_env is not None:
            value = os.environ.get(api_key_env, "")
            if not value:
                logger.warning("api_key_env=%r is not set or empty: no API key is sent", api_key_env)
            return value
        parts = urlsplit(self.base_url)
        if parts.scheme == "https" and parts.hostname == OPENAI_HOST:
            return os.environ.get("OPENAI_API_KEY", "")
        if os.environ.get("OPENAI_API_KEY"):
            logger.info(
                "not sending $OPENAI_API_KEY to %s (only to https://%s); pass api_key= or api_key_env= "
                "if this endpoint needs a key",
                self._public_url,
                OPENAI_HOST,
            )
        return ""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _excerpt(self, text: str) -> str:
        """The start of an error response, on one line, without our secrets (some servers echo them)."""
        text = " ".join(text.split())
        parts = urlsplit(self.base_url)
        for secret in (self._api_key, parts.password, parts.query):
            if secret:
                text = text.replace(secret, "***")
        return text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + "…"

    def __repr__(self) -> str:
        return f"OpenAICompatibleTarget(base_url={self._public_url!r}, model={self.model!r})"

    @property
    def identity(self) -> str:
        return f"openai:{self._public_url}:{self.model}"

    @property
    def settings(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "system": self.system_prompt}

    def _generate(self, prompts: list[str]) -> list[str]:
        return _run_sync(self._agenerate(prompts))

    async def agenerate(self, prompts: Sequence[str]) -> list[str]:
        start = time.perf_counter()
        try:
            return await self._agenerate(list(prompts))
        finally:
            self.stats.seconds += time.perf_counter() - start
            self.stats.calls += len(prompts)

    async def _agenerate(self, prompts: list[str]) -> list[str]:
        import httpx

        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self._headers()) as client:

            async def one(prompt: str) -> str:
                messages = (
                    [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
                ) + [{"role": "user", "content": prompt}]
                body = {
                    "model": self.model,
                    "messages": messages,
                    "max_tokens": self.max_tokens,
                    "temperature": self.temperature,
                }
                last: BaseException | None = None
                async with sem:
                    for attempt in range(self.max_retries + 1):
                        try:
                            resp = await client.post(self._endpoint, json=body)
                            if resp.status_code >= 500 or resp.status_code in (408, 429):
                                raise RuntimeError(f"HTTP {resp.status_code} from {self._public_url}")
                            if resp.status_code >= 400:
                                # A rejected key, unknown model or bad request: retrying cannot help, and
                                # the server's message says which it was.
                                detail = self._excerpt(resp.text)
                                last = RuntimeError(
                                    f"HTTP {resp.status_code} from {self._public_url} (not retried)"
                                    + (f": {detail}" if detail else "")
                                )
                                break
                            return str(resp.json()["choices"][0]["message"]["content"] or "").strip()
                        except Exception as exc:
                            last = exc
                            if attempt < self.max_retries:
                                await asyncio.sleep(self.backoff * 2**attempt * (0.5 + random.random()))
                assert last is not None
                return self._failed(last, prompt)

            return list(await asyncio.gather(*(one(p) for p in prompts)))


def _run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, even when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict[str, Any] = {}

    def runner() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=runner)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
