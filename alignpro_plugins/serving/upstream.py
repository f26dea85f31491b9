"""The forwarding client: one pooled ``httpx.AsyncClient`` to the upstream OpenAI-compatible endpoint.

Requests and answers are relayed as bytes (status, body and the headers a client acts on), so an upstream
error reaches the client exactly as the upstream sent it. The key sent upstream is the client's own
``Authorization`` header, else the configured key; neither is ever logged or put in an error message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alignpro_plugins.extras import require
from alignpro_plugins.targets.remote import public_url

try:
    import httpx
except ImportError:  # the [serve] extra: say how to install it
    require("httpx", "alignpro serve")
    raise

logger = logging.getLogger("alignpro_plugins.serving")

# Upstream response headers a client may act on (rate limits, request ids); everything else is the proxy's.
RELAYED_RESPONSE_HEADERS = ("retry-after", "x-request-id")
RELAYED_RESPONSE_PREFIXES = ("x-ratelimit-", "openai-")


class Upstream:
    """The upstream endpoint ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), with pooled connections."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_connections: int = 256,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"upstream must be an http(s) URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1; "
                f"got {public_url(base_url)!r}"
            )
        self._parts = parts
        self.public_url = public_url(base_url.rstrip("/"))
        self._api_key = api_key or None  # kept private: never logged, never in a repr
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def url(self, path: str) -> str:
        """``path`` (e.g. ``/chat/completions``) under the base URL, before its query string (Azure-style)."""
        p = self._parts
        return urlunsplit((p.scheme, p.netloc, p.path.rstrip("/") + path, p.query, ""))

    def headers(self, client_authorization: str | None) -> dict[str, str]:
        auth = client_authorization or (f"Bearer {self._api_key}" if self._api_key else None)
        return {"Authorization": auth} if auth else {}

    async def post(self, path: str, body: Mapping[str, Any], authorization: str | None) -> httpx.Response:
        """POST a JSON body; the whole answer is read."""
        return await self._client.post(self.url(path), json=body, headers=self.headers(authorization))

    async def open_stream(
        self, path: str, body: Mapping[str, Any], authorization: str | None
    ) -> httpx.Response:
        """POST a JSON body and return as soon as the headers arrive; the caller reads and closes the body."""
        request = self._client.build_request(
            "POST", self.url(path), json=body, headers=self.headers(authorization)
        )
        return await self._client.send(request, stream=True)

    async def get(self, path: str, authorization: str | None) -> httpx.Response:
        return await self._client.get(self.url(path), headers=self.headers(authorization))

    async def aclose(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"Upstream({self.public_url!r})"


def relayed_headers(response: httpx.Response) -> dict[str, str]:
    """The upstream response headers passed back to the client (content type, rate limits, request id)."""
    out = {
        k: v
        for k, v in response.headers.items()
        if k.lower() in RELAYED_RESPONSE_HEADERS or k.lower().startswith(RELAYED_RESPONSE_PREFIXES)
    }
    if "content-type" in response.headers:
        out["content-type"] = response.headers["content-type"]
    return out
