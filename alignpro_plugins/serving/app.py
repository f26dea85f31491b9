"""The ASGI app of ``alignpro serve``: an OpenAI-compatible proxy that puts a prompter in front of a model.

``POST /v1/chat/completions`` (streamed or not): the latest user message is rewritten or augmented by the
prompter, the request goes to the upstream endpoint, and its answer comes back as the upstream sent it, plus
what the prompter did: the ``x-alignpro-rewrite`` response header (``rewritten``, ``fallback:<reason>`` or
``skipped:<reason>``) and, in a JSON answer, an ``alignpro`` field with the original and forwarded text.
``GET /v1/models`` is the upstream's list. Concurrent requests share the prompter's batched generation
(``Prompter`` micro-batches concurrent calls). An upstream error comes back with its own status and body.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from alignpro_plugins.extras import require

try:
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
except ImportError as exc:  # the [serve] extra: say how to install it
    require(exc.name or "fastapi", "alignpro serve")
    raise

from alignpro_plugins.gate import RetryGate
from alignpro_plugins.serving.gating import GATE_HEADER, GatedAnswer, completion_as_events, gated_answer
from alignpro_plugins.serving.rewriting import (
    EXTENSION_FIELD,
    HEADER,
    TIMING_HEADER,
    RewriteOutcome,
    Rewriter,
    Timings,
    rewrite_latest_user,
)
from alignpro_plugins.serving.upstream import Upstream, relayed_headers

logger = logging.getLogger("alignpro_plugins.serving")


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the OpenAI shape, so OpenAI clients show its message."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
        headers=headers,
    )


def create_app(
    rewriter: Rewriter,
    upstream: Upstream,
    *,
    mode: str | None = None,
    upstream_model: str | None = None,
    gate: RetryGate | None = None,
) -> FastAPI:
    """The proxy app. ``mode`` overrides the prompter's manifest mode; ``upstream_model`` replaces the model
    name clients send (when the upstream serves one model under a name clients need not know); with ``gate``
    the prompter is asked only where the gate retries (see :mod:`alignpro_plugins.serving.gating`)."""
    if gate is None and (mode or getattr(getattr(rewriter, "manifest", None), "mode", None)) == "refine":
        raise ValueError(
            "a refinement prompter (mode 'refine') needs a retry gate: it writes from the upstream's first "
            "answer, which only the gate hands it; serve it with --gate-reward and --rerank "
            "(RetryGate.rerank(reward)) or --gate-threshold, or pass create_app(gate=RetryGate.rerank(reward) or "
            "RetryGate.always())"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    app = FastAPI(title="alignpro proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.upstream_url = upstream.public_url
    app.state.rewriter = rewriter

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            resp = await upstream.get("/models", request.headers.get("authorization"))
        except httpx.HTTPError as exc:
            return _unreachable(upstream, exc)
        return Response(resp.content, status_code=resp.status_code, headers=relayed_headers(resp))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"the request body is not JSON: {exc}", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error_response(
                400,
                "expected a JSON object with a 'messages' list (an OpenAI chat completions request)",
                "invalid_request_error",
            )
        if upstream_model is not None:
            body = {**body, "model": upstream_model}
        authorization = request.headers.get("authorization")
        stream = body.get("stream") is True
        timings = Timings()
        if gate is not None:
            try:
                gated = await gated_answer(gate, upstream, body, authorization, rewriter, mode, timings)
                response = _gated_response(gated, stream)
            except httpx.HTTPError as exc:
                response = _unreachable(upstream, exc)
        else:
            with timings.measure("rewrite"):
                outcome = await rewrite_latest_user(body["messages"], rewriter, mode)
            forwarded = {**body, "messages": outcome.messages}
            try:
                with timings.measure("upstream"):  # a stream: until its headers
                    if stream:
                        response = await _relay_stream(upstream, forwarded, authorization, outcome)
                    else:
                        response = await _relay(upstream, forwarded, authorization, outcome)
            except httpx.HTTPError as exc:
                response = _unreachable(upstream, exc, {HEADER: outcome.header_value})
        response.headers[TIMING_HEADER] = timings.header_value()
        logger.info(
            "chat/completions -> %d (%s) in %.3fs",
            response.status_code,
            response.headers.get(HEADER, "-"),
            time.perf_counter() - start,
        )
        return response

    return app


async def _relay(
    upstream: Upstream, body: dict[str, Any], authorization: str | None, outcome: RewriteOutcome
) -> Response:
    resp = await upstream.post("/chat/completions", body, authorization)
    headers = {**relayed_headers(resp), HEADER: outcome.header_value}
    if resp.status_code == 200:
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            answer[EXTENSION_FIELD] = outcome.extension()
            headers.pop("content-type", None)  # JSONResponse sets it for the re-encoded body
            return JSONResponse(answer, status_code=200, headers=headers)
    return Response(resp.content, status_code=resp.status_code, headers=headers)


async def _relay_stream(
    upstream: Upstream, body: dict[str, Any], authorization: str | None, outcome: RewriteOutcome
) -> Response:
    resp = await upstream.open_stream("/chat/completions", body, authorization)
    headers = {**relayed_headers(resp), HEADER: outcome.header_value}
    if resp.status_code >= 400:  # an error is one JSON body, not a stream
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
        return Response(content, status_code=resp.status_code, headers=headers)
    media_type = headers.pop("content-type", "text/event-stream")
    return StreamingResponse(
        resp.aiter_bytes(),
        status_code=resp.status_code,
        headers=headers,
        media_type=media_type,
        background=BackgroundTask(resp.aclose),
    )


def _gated_response(gated: GatedAnswer, stream: bool) -> Response:
    answer = gated.answer
    headers = {**answer.headers, HEADER: gated.outcome.header_value}
    gate_header = gated.header_value()
    if gate_header is not None:
        headers[GATE_HEADER] = gate_header
    if answer.status != 200 or not isinstance(answer.json, dict):
        return Response(answer.content, status_code=answer.status, headers=headers)
    headers.pop("content-type", None)
    body = {**answer.json, EXTENSION_FIELD: gated.extension()}
    if stream:
        events = list(completion_as_events(body))
        return StreamingResponse(iter(events), headers=headers, media_type="text/event-stream")
    return JSONResponse(body, headers=headers)


def _unreachable(upstream: Upstream, exc: httpx.HTTPError, headers: dict[str, str] | None = None) -> Response:
    """502 (or 504 on a timeout) naming the upstream, without its credentials."""
    status = 504 if isinstance(exc, httpx.TimeoutException) else 502
    logger.warning("upstream %s failed: %s", upstream.public_url, type(exc).__name__)
    return error_response(
        status,
        f"the upstream {upstream.public_url} did not answer ({type(exc).__name__})",
        "upstream_error",
        headers,
    )
