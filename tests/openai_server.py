"""A minimal but real OpenAI-compatible chat-completions server for tests (stdlib only, loopback).

``llama-cpp-python`` has no prebuilt wheel on this index (building it takes 5-11 minutes), so the target tests
talk HTTP to this server instead: a ``ThreadingHTTPServer`` in a daemon thread that answers
``POST /v1/chat/completions`` (and ``GET /v1/models``) in the OpenAI response shape. It answers with a
deterministic echo or any responder (e.g. :func:`transformers_responder` around a tiny local model), can return
scripted HTTP errors (with headers such as ``Retry-After``) for the first requests, fail a share of all
requests at random (seeded), echo the credentials it received in its error bodies (as careless servers do),
can check a bearer key, and records every request (with the connection it came on) and the peak number of
requests in flight.

Standalone: ``python -m tests.openai_server [--model DIR] [--port 8000]``.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]


def echo_responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """Deterministic: ``echo: <last user message>``."""
    user = [m["content"] for m in messages if m.get("role") == "user"]
    return f"echo: {user[-1] if user else ''}"


def transformers_responder(model: Any, tokenizer: Any) -> Responder:
    """Answer with a local transformers model through its chat template (greedy, ``max_tokens`` honoured)."""
    from alignpro_plugins.targets import TransformersTarget

    lock = threading.Lock()

    def respond(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        user = [m["content"] for m in messages if m.get("role") == "user"][-1]
        with lock:
            target = TransformersTarget(
                model,
                tokenizer,
                max_new_tokens=int(body.get("max_tokens") or 128),
                system_prompt=system,
                name="served",
            )
            return target.generate([user])[0]

    return respond


@dataclass
class Recorded:
    path: str  # without the query string
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    query: str = ""
    peer: tuple[str, int] | None = None  # the client's address and port: one per connection


Failure = int | tuple[int, dict[str, str]]  # an HTTP status, or a status and the response headers to send


@dataclass
class OpenAIServer:
    """``with OpenAIServer(...) as server: OpenAICompatibleTarget(server.base_url, "tiny")``."""

    responder: Responder = echo_responder
    failures: Sequence[Failure] = ()  # returned, in order, for the first len(failures) requests
    fail_rate: float = 0.0  # then this share of requests gets HTTP 500, drawn per request index from seed
    seed: int = 0
    echo_secrets: bool = False  # error bodies repeat the Authorization header and the query string received
    delay: float = 0.0  # seconds each successful request takes
    api_key: str | None = None  # when set, requests without "Bearer <api_key>" get 401
    model_name: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        self._httpd = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ request handling
    def _handle(
        self, path: str, query: str, headers: dict[str, str], body: dict[str, Any], peer: tuple[str, int]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            index = len(self.requests)
            record = Recorded(path, headers, body, 200, query, peer)
            self.requests.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        echoed = (
            f" (received Authorization: {headers.get('authorization')}; query: {query})"
            if self.echo_secrets
            else ""
        )
        try:
            if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
                record.status = 401
                return 401, _error("Incorrect API key provided." + echoed, "invalid_request_error"), {}
            if index < len(self.failures):
                failure = self.failures[index]
                record.status, extra = failure if isinstance(failure, tuple) else (failure, {})
                return record.status, _error(f"scripted failure {index}{echoed}", "server_error"), extra
            if random.Random(self.seed * 1_000_003 + index).random() < self.fail_rate:
                record.status = 500
                return 500, _error(f"random failure {index}{echoed}", "server_error"), {}
            if self.delay:
                time.sleep(self.delay)
            try:
                content = self.responder(body.get("messages", []), body)
            except Exception as exc:  # a broken model is a 500, like a real server
                record.status = 500
                return 500, _error(f"{type(exc).__name__}: {exc}", "server_error"), {}
            return (
                200,
                {
                    "id": f"chatcmpl-{index}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", self.model_name),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                },
                {},
            )
        finally:
            with self._lock:
                self._in_flight -= 1

    def statuses(self) -> list[int]:
        return [r.status for r in self.requests]


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
            else:
                self._send(404, _error(f"no route {self.path}", "not_found"))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            if path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route {self.path}", "not_found"))
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._send(400, _error("body is not JSON", "invalid_request_error"))
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = server._handle(path, query, headers, body, self.client_address[:2])
            self._send(status, payload, extra)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local causal-LM folder (default: echo)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    responder: Responder = echo_responder
    if args.model:
        from alignpro_plugins.engine import load_causal_lm

        model, tok, _ = load_causal_lm(args.model)
        responder = transformers_responder(model, tok)
    server = OpenAIServer(responder=responder, port=args.port, api_key=args.api_key).start()
    print(f"serving on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
