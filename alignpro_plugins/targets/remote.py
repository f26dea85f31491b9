"""Any OpenAI-compatible chat endpoint as the frozen target, through the official ``openai`` client."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from alignpro_plugins.targets.base import FrozenTarget, TargetError

logger = logging.getLogger("alignpro_plugins.targets")

OPENAI_HOST = "api.openai.com"
# How much of a rejected request's response body goes into the error (enough for the server's message).
ERROR_BODY_CHARS = 300
RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx
# A server asking for a longer wait (Retry-After) fails the request instead of stalling a run for minutes.
MAX_RETRY_AFTER = 120.0
MAX_BACKOFF = 60.0
# Request fields the target sets itself; extra_body may not override them (the cache key would lie).
_OWN_FIELDS = ("model", "messages", "stream", "max_tokens", "temperature", "top_p", "seed", "stop")


def public_url(url: str) -> str:
    """``url`` without what may hold a secret: ``user:password@`` and the query string (``?key=...``).

    A URL without either comes back unchanged, so identities (and the cache keys built on them) stay stable.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a response asks the client to wait: ``Retry-After-Ms``, else ``Retry-After`` in seconds or
    as an HTTP date; None when there is no usable value."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return None


class OpenAICompatibleTarget(FrozenTarget):
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, hosted APIs); concurrent, retried.

    Built on the official ``openai`` client: one client per target (pooled keep-alive connections; one per
    event loop for ``agenerate``), at most ``concurrency`` requests in flight per call. Timeouts, connection
    errors, HTTP 408/409/429 and 5xx are retried up to ``max_retries`` times, waiting what the server's
    ``Retry-After`` asks (up to ``MAX_RETRY_AFTER`` seconds) or else ``backoff * 2**attempt`` with jitter. Other
    4xx errors are not retried. A prompt that still has no answer is counted in ``stats.failures`` and the call
    raises :class:`TargetError` once every prompt is done; its ``answers`` hold the answers that did arrive
    (None where a request failed). A failure is never returned as an empty answer.

    ``top_p``, ``seed``, ``stop`` and ``extra_body`` (other JSON fields, e.g. vLLM's ``top_k``) are sent when
    given, and are part of :attr:`settings` (the cache key) only then.

    The key sent as ``Authorization: Bearer``: ``api_key`` when given, else the environment variable named by
    ``api_key_env``, else ``$OPENAI_API_KEY`` but only for ``https://api.openai.com`` (an OpenAI key must not
    reach a third-party or local server), else none. ``user:password@`` in ``base_url`` is sent as Basic auth
    (it takes precedence over the key), and a query string (``?api_key=...``) is added to each request below
    the HTTP client's request logging. The key, the password and the query never appear in a log line (at any
    level of ``httpx``, ``httpcore`` or ``openai`` logging), a repr, an identity or an error message; an error
    body that echoes them is redacted.
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
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
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
        self._query = parts.query
        self._basic = (
            "Basic "
            + base64.b64encode(
                f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            ).decode()
            if parts.username is not None or parts.password is not None
            else None
        )
        # Kept private and never logged or put in reprs.
        self._api_key = self._choose_key(api_key, api_key_env)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stop = [stop] if isinstance(stop, str) else list(stop) if stop is not None else None
        self.extra_body = dict(extra_body) if extra_body is not None else None
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self._check_settings()
        self._secrets = self._find_secrets(parts)
        self._client_lock = threading.Lock()
        self._sync_client: Any = None
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _check_settings(self) -> None:
        def refuse(name: str, accepted: str) -> None:
            raise ValueError(f"{name} must be {accepted}, got {getattr(self, name)!r}")

        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            refuse("top_p", "None or a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            refuse("seed", "None or an integer")
        if self.stop is not None and not (self.stop and all(isinstance(s, str) and s for s in self.stop)):
            refuse("stop", "None, a non-empty string or a non-empty list of them")
        if self.extra_body is not None:
            clash = sorted(k for k in self.extra_body if k in _OWN_FIELDS)
            if clash:
                raise ValueError(
                    f"extra_body may not set {clash}: the target sets them itself; pass them as arguments "
                    f"({', '.join(f'{k}=' for k in clash if k not in ('model', 'messages', 'stream'))}...)"
                )
        for name, ok, accepted in (
            ("concurrency", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            ("max_retries", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
            ("timeout", lambda v: isinstance(v, (int, float)) and v > 0, "a number of seconds > 0"),
            ("backoff", lambda v: isinstance(v, (int, float)) and v >= 0, "a number of seconds >= 0"),
        ):
            if isinstance(getattr(self, name), bool) or not ok(getattr(self, name)):
                refuse(name, accepted)

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

    def _find_secrets(self, parts: Any) -> list[str]:
        """What an error body must not show, longest first (a secret may contain a shorter one)."""
        found = {self._api_key, parts.password, unquote(parts.password or ""), self._query}
        found.update(value for _, value in parse_qsl(self._query) if len(value) >= 4)
        if self._basic:
            found.update((self._basic, self._basic.split(" ", 1)[1]))
        return sorted((s for s in found if s), key=len, reverse=True)

    def _headers(self) -> dict[str, str]:
        """The authorization header the requests carry (none without a key or URL credentials)."""
        if self._basic:
            return {"Authorization": self._basic}
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _excerpt(self, text: str) -> str:
        """The start of an error response, on one line, without our secrets (some servers echo them)."""
        text = " ".join(text.split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + "…"

    def __repr__(self) -> str:
        return f"OpenAICompatibleTarget(base_url={self._public_url!r}, model={self.model!r})"

    @property
    def identity(self) -> str:
        return f"openai:{self._public_url}:{self.model}"

    @property
    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "system": self.system_prompt,
        }
        # Only when set: a target without them keeps the cache keys earlier versions wrote.
        optional = {"top_p": self.top_p, "seed": self.seed, "stop": self.stop, "extra_body": self.extra_body}
        settings.update({k: v for k, v in optional.items() if v is not None})
        return settings

    # ------------------------------------------------------------------ clients
    def _client_options(self, *, is_async: bool) -> dict[str, Any]:
        import httpx2
        import openai

        limits = httpx2.Limits(max_connections=None, max_keepalive_connections=self.concurrency)
        if self._query:
            transport = _transport_classes()[is_async](self._query, limits)
            options: dict[str, Any] = {"transport": transport}
        else:  # the default transport (which honours proxy settings from the environment)
            options = {"limits": limits}
        client_class = openai.DefaultAsyncHttpxClient if is_async else openai.DefaultHttpxClient
        public = urlsplit(self._public_url)
        return {
            # The key is given explicitly (possibly ""), so the client never reads $OPENAI_API_KEY itself.
            "api_key": self._api_key,
            "admin_api_key": "",  # not used by chat completions; "" keeps $OPENAI_ADMIN_KEY unread
            "base_url": urlunsplit((public.scheme, public.netloc, public.path, "", "")),
            "max_retries": 0,  # retried here, with Retry-After and this target's backoff
            "timeout": self.timeout,
            # Never send $OPENAI_ORG_ID / $OPENAI_PROJECT_ID: this may not be OpenAI (the old client never did).
            "default_headers": {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit},
            "http_client": client_class(follow_redirects=False, **options),
        }

    def _client(self) -> Any:
        import openai

        with self._client_lock:
            if self._sync_client is None:
                self._sync_client = openai.OpenAI(**self._client_options(is_async=False))
            return self._sync_client

    def _aclient(self) -> Any:
        import openai

        loop = asyncio.get_running_loop()
        with self._client_lock:  # an async client's connections belong to the event loop that opened them
            client = self._async_clients.get(loop)
            if client is None:
                client = self._async_clients[loop] = openai.AsyncOpenAI(**self._client_options(is_async=True))
            return client

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        with self._client_lock:
            if self._sync_client is not None:
                self._sync_client.close()
            self._sync_client = None
            self._async_clients.clear()

    # ------------------------------------------------------------------ requests
    def _request(self, prompt: str) -> dict[str, Any]:
        import openai

        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        optional = {"top_p": self.top_p, "seed": self.seed, "stop": self.stop, "extra_body": self.extra_body}
        request.update({k: v for k, v in optional.items() if v is not None})
        # No key and no URL credentials: no Authorization header at all (the client would insist on one).
        request["extra_headers"] = self._headers() or {"Authorization": openai.omit}
        return request

    def _generate(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(prompts)), "alignpro-openai") as pool:
            outcomes = list(pool.map(self._ask, prompts))
        return self._answers(prompts, outcomes)

    async def _agenerate(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        client = self._aclient()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(prompt: str) -> str | BaseException:
            async with sem:
                return await self._aask(client, prompt)

        outcomes = await asyncio.gather(*(one(p) for p in prompts))
        return self._answers(prompts, list(outcomes))

    def _ask(self, prompt: str) -> str | BaseException:
        """One prompt's answer, retried; the error when it has none."""
        client = self._client()
        request = self._request(prompt)
        for attempt in range(self.max_retries + 1):
            try:
                return _content(client.chat.completions.create(**request))
            except Exception as exc:
                error, delay = self._after_failure(exc, attempt)
                if delay is None:
                    return error
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns")

    async def _aask(self, client: Any, prompt: str) -> str | BaseException:
        request = self._request(prompt)
        for attempt in range(self.max_retries + 1):
            try:
                return _content(await client.chat.completions.create(**request))
            except Exception as exc:
                error, delay = self._after_failure(exc, attempt)
                if delay is None:
                    return error
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns")

    def _after_failure(self, exc: Exception, attempt: int) -> tuple[RuntimeError, float | None]:
        """The error to report for a failed attempt, and how long to wait before the next (None: give up)."""
        import openai

        wait: float | None = None
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status not in RETRIED_STATUSES and status < 500:
                # A rejected key, unknown model or bad request: retrying cannot help, and the server's message
                # says which it was.
                detail = self._excerpt(exc.response.text)
                return RuntimeError(
                    f"HTTP {status} from {self._public_url} (not retried)" + (f": {detail}" if detail else "")
                ), None
            error = RuntimeError(f"HTTP {status} from {self._public_url}")
            wait = retry_after(exc.response.headers)
            if wait is not None and wait > MAX_RETRY_AFTER:
                return RuntimeError(
                    f"HTTP {status} from {self._public_url}: the server asks to retry after {wait:.0f} s, "
                    f"more than the {MAX_RETRY_AFTER:.0f} s this target waits"
                ), None
        elif isinstance(exc, openai.APITimeoutError):
            error = RuntimeError(f"no answer from {self._public_url} within {self.timeout} s")
        elif isinstance(exc, openai.APIConnectionError):
            error = RuntimeError(f"cannot connect to {self._public_url}")
        else:  # e.g. a response without choices
            error = RuntimeError(
                f"unusable response from {self._public_url}: {type(exc).__name__}: {self._excerpt(str(exc))}"
            )
        if attempt >= self.max_retries:
            return error, None
        if wait is None:
            wait = min(self.backoff * 2**attempt * (0.5 + random.random()), MAX_BACKOFF)
        return error, wait

    def _answers(self, prompts: list[str], outcomes: list[str | BaseException]) -> list[str]:
        """The answers, or TargetError (after counting each failure) when any prompt has none."""
        answers: list[str | None] = []
        first: BaseException | None = None
        for prompt, outcome in zip(prompts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._failed(outcome, prompt)
                first = first or outcome
                answers.append(None)
            else:
                answers.append(outcome)
        if first is not None:
            failed = sum(a is None for a in answers)
            raise TargetError(
                f"{failed} of {len(prompts)} prompts got no answer from {self.identity} after up to "
                f"{self.max_retries} retries; first error: {first}",
                answers,
            )
        return [a for a in answers if a is not None]


def _content(completion: Any) -> str:
    if not getattr(completion, "choices", None):
        raise ValueError("the response has no choices")
    return str(completion.choices[0].message.content or "").strip()


def _with_query(request: Any, query: str) -> Any:
    """A copy of ``request`` whose URL also carries ``query``; the original (which the HTTP client logs) has none."""
    import httpx2

    url = str(request.url) + ("&" if request.url.query else "?") + query
    return httpx2.Request(
        request.method, url, headers=request.headers, stream=request.stream, extensions=request.extensions
    )


@functools.cache
def _transport_classes() -> tuple[type, type]:
    """(sync, async) transports that add the base URL's query string to each request they send."""
    import httpx2

    class QueryTransport(httpx2.BaseTransport):
        def __init__(self, query: str, limits: Any) -> None:
            self._query, self._inner = query, httpx2.HTTPTransport(limits=limits)

        def handle_request(self, request: Any) -> Any:
            return self._inner.handle_request(_with_query(request, self._query))

        def close(self) -> None:
            self._inner.close()

    class AsyncQueryTransport(httpx2.AsyncBaseTransport):
        def __init__(self, query: str, limits: Any) -> None:
            self._query, self._inner = query, httpx2.AsyncHTTPTransport(limits=limits)

        async def handle_async_request(self, request: Any) -> Any:
            return await self._inner.handle_async_request(_with_query(request, self._query))

        async def aclose(self) -> None:
            await self._inner.aclose()

    return QueryTransport, AsyncQueryTransport
