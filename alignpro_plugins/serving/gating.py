"""The retry gate (or rerank) in the proxy: x is answered first, the prompter's rewrite only where the reward
model scores that answer below the threshold (always, for rerank), and the better-scored answer is returned.

The flow is :meth:`RetryGate.achoose`; this module only says how to ask the upstream and how to build the
retry input. A gated answer is scored before anyone sees it, so it is never streamed from the upstream: a
streaming client gets the chosen answer as one server-sent-events chunk (plus the finish chunk).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from alignpro_plugins.gate import GateDecision, RetryGate
from alignpro_plugins.serving.rewriting import (
    EXTENSION_FIELD,
    REWRITTEN,
    RewriteOutcome,
    Rewriter,
    Timings,
    latest_user_text,
    rewrite_latest_user,
)
from alignpro_plugins.serving.upstream import Upstream, relayed_headers

GATE_HEADER = "x-alignpro-gate"
NOT_NEEDED = "skipped:gate_not_needed"  # the answer to x scored at or above the threshold


@dataclass
class Answer:
    """One upstream answer, kept whole so it can be returned as the upstream sent it."""

    status: int
    headers: dict[str, str]
    content: bytes
    json: Any

    @classmethod
    def of(cls, resp: httpx.Response) -> Answer:
        try:
            parsed = resp.json()
        except ValueError:
            parsed = None
        return cls(resp.status_code, relayed_headers(resp), resp.content, parsed)


def answer_text(answer: Answer) -> str | None:
    """What the reward scores: the first choice's text (None for an error or a tool call)."""
    if answer.status != 200 or not isinstance(answer.json, dict):
        return None
    choices = answer.json.get("choices") or [{}]
    message = choices[0].get("message") or {}
    if message.get("tool_calls") or not isinstance(message.get("content"), str):
        return None
    return str(message["content"])


@dataclass
class GatedAnswer:
    answer: Answer
    outcome: RewriteOutcome
    decision: GateDecision | None
    kept_retry: bool

    def header_value(self) -> str | None:
        if self.decision is None:
            return None
        return "; ".join(f"{k}={_short(v)}" for k, v in self.decision.as_dict().items())

    def extension(self) -> dict[str, Any]:
        ext = self.outcome.extension()
        ext["sent"] = self.outcome.sent if self.kept_retry else self.outcome.original
        # JSON has no infinity: rerank's threshold is written "inf".
        ext["gate"] = (
            {
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in self.decision.as_dict().items()
            }
            if self.decision is not None
            else None
        )
        return ext


def _short(value: Any) -> str:
    return (
        f"{value:+.4f}"
        if isinstance(value, float)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


async def gated_answer(
    gate: RetryGate,
    upstream: Upstream,
    body: dict[str, Any],
    authorization: str | None,
    rewriter: Rewriter,
    mode: str | None,
    timings: Timings,
) -> GatedAnswer:
    """Answer one chat request through the gate (the upstream is asked without streaming)."""
    messages = body["messages"]
    x = latest_user_text(messages)
    rewrites: list[RewriteOutcome] = []

    async def ask(inputs: list[list[Any]]) -> list[Answer]:
        calls = [
            upstream.post("/chat/completions", {**body, "messages": m, "stream": False}, authorization)
            for m in inputs
        ]
        with timings.measure("upstream"):
            return [Answer.of(r) for r in await asyncio.gather(*calls)]

    async def retries(positions: list[int]) -> list[list[list[Any]]]:
        with timings.measure("rewrite"):
            outcome = await rewrite_latest_user(messages, rewriter, mode)
        rewrites.append(outcome)
        return [[outcome.messages] if outcome.status == REWRITTEN else []]

    if x is None:  # nothing the reward model can score against: the request goes up as it is
        [answer] = await ask([messages])
        return GatedAnswer(answer, await rewrite_latest_user(messages, rewriter, mode), None, False)
    [result] = await gate.achoose([x], [messages], ask, retries, text=answer_text)
    outcome = rewrites[0] if rewrites else RewriteOutcome(messages, NOT_NEEDED, mode, x, x)
    return GatedAnswer(result.answer, outcome, result.decision, result.kept > 0)


def completion_as_events(answer: dict[str, Any]) -> Iterator[bytes]:
    """A chat completion as the server-sent events of a stream: its content in one chunk per choice, the finish."""
    base: dict[str, Any] = {
        k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer
    }
    base["object"] = "chat.completion.chunk"
    for choice in answer.get("choices", []):
        message = choice.get("message") or {}
        delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
        chunk: dict[str, Any] = {
            **base,
            "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}],
        }
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        end = {"index": choice.get("index", 0), "delta": {}, "finish_reason": choice.get("finish_reason")}
        last: dict[str, Any] = {**base, "choices": [end]}
        if EXTENSION_FIELD in answer:
            last[EXTENSION_FIELD] = answer[EXTENSION_FIELD]
        yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n".encode()
    yield b"data: [DONE]\n\n"
