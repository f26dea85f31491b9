"""A prompter whose generation runs on an OpenAI-compatible server (the exported model under vLLM).

:class:`RemoteEngine` has :class:`~alignpro_plugins.engine.GenerationEngine`'s interface, so the remote
prompter is an ordinary :class:`~alignpro_plugins.prompter.Prompter`: it formats each query locally (the
export's tokenizer and the template ``Prompter.format_query`` uses), sends the formatted text to
``/v1/completions``, and applies the same precheck, intent guard and fallbacks to what comes back. No model
weights are loaded in this process; concurrent rewrites are in flight together and the server batches them.

    prompter = remote_prompter("runs/prompter-merged", "http://127.0.0.1:8001/v1", "prompter")
    prompter.rewrite("Tell me about tea")
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from alignpro_plugins.engine import Generation, GenerationSettings, plain_chat_text
from alignpro_plugins.extras import require
from alignpro_plugins.manifest import Manifest
from alignpro_plugins.targets.remote import public_url

try:
    import httpx
except ImportError:  # the [serve] extra: say how to install it
    require("httpx", "a remote prompter")
    raise

RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)
MAX_RETRY_AFTER_S = 30.0


class RemoteEngine:
    """Generation on an OpenAI-compatible ``/v1/completions`` endpoint, with GenerationEngine's interface."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        *,
        max_positions: int | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 64,
        max_retries: int = 2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = public_url(self.base_url)
        self.served_model = model
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.model = None  # no local weights (Prompter reads .model for its repr and save_pretrained)
        self.max_retries = max_retries
        self._api_key = api_key or None  # never logged, never in a repr or an error
        self._timeout = timeout
        self._concurrency = concurrency
        self._encode_lock = threading.Lock()
        # One event loop in a daemon thread owns the pooled client: sync and async callers both get Futures.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="alignpro-remote-engine", daemon=True
        )
        self._thread.start()
        self._client: httpx.AsyncClient | None = None  # opened on the engine's loop
        self._semaphore: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ GenerationEngine's text interface
    def format_chat(self, messages: Sequence[dict[str, str]], *, plain: Any = plain_chat_text) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return plain(messages)
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        with self._encode_lock:
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation
    def submit(self, text: str, settings: GenerationSettings) -> Future[Generation]:
        """One formatted text; the request is sent at once (the server batches concurrent requests)."""
        future = asyncio.run_coroutine_threadsafe(self._complete(text, settings, 1), self._loop)
        out: Future[Generation] = Future()

        def done(f: Future[list[Generation]]) -> None:
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                out.set_result(f.result()[0])

        future.add_done_callback(done)
        return out

    def generate(
        self,
        texts: Sequence[str],
        settings: GenerationSettings | Any,
        num_return_sequences: int = 1,
        *,
        max_rows: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Per text, its ``num_return_sequences`` generations (the request's ``n``), in order."""
        if not isinstance(settings, GenerationSettings):
            settings = GenerationSettings.from_defaults(settings)
        futures = [
            asyncio.run_coroutine_threadsafe(self._complete(t, settings, num_return_sequences), self._loop)
            for t in texts
        ]
        rows: list[Any] = []
        for f in futures:
            try:
                rows.append(f.result())
            except Exception as exc:
                if not return_exceptions:
                    raise
                rows.append(exc)
        return rows

    def request_body(self, text: str, settings: GenerationSettings, n: int) -> dict[str, Any]:
        """The completions request for one formatted text: the prompter's decoding settings, nothing added."""
        body: dict[str, Any] = {
            "model": self.served_model,
            "prompt": text,
            "max_tokens": settings.max_new_tokens,
            "n": n,
            "add_special_tokens": False,  # the query is complete, as the local engine encodes it (vLLM)
        }
        if settings.do_sample:
            knobs = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
            body.update({k: v for k, v in knobs.items() if v is not None})
            if settings.seed is not None:
                body["seed"] = settings.seed
        else:
            body["temperature"] = 0.0  # greedy
        if settings.repetition_penalty is not None:
            body["repetition_penalty"] = settings.repetition_penalty
        if settings.stop:
            body["stop"] = list(settings.stop)
        return body

    async def _complete(self, text: str, settings: GenerationSettings, n: int) -> list[Generation]:
        if self._client is None:  # created on the engine's loop, which it is bound to
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                timeout=self._timeout, headers=headers, limits=httpx.Limits(max_connections=self._concurrency)
            )
            self._semaphore = asyncio.Semaphore(self._concurrency)
        assert self._semaphore is not None
        body = self.request_body(text, settings, n)
        async with self._semaphore:
            for attempt in range(self.max_retries + 1):
                resp = await self._client.post(f"{self.base_url}/completions", json=body)
                if resp.status_code not in RETRIED_STATUSES or attempt == self.max_retries:
                    break
                await asyncio.sleep(_retry_delay(resp, attempt))
        if resp.status_code != 200:
            detail = " ".join(resp.text.split())[:300]
            raise RuntimeError(f"HTTP {resp.status_code} from {self.public_url}/completions: {detail}")
        data = resp.json()
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        usage = data.get("usage") or {}
        n_in = int(usage.get("prompt_tokens") or 0)
        n_out = int(usage.get("completion_tokens") or 0) // max(1, len(choices))
        # "length": cut at max_tokens (the guard's truncation check); "stop": EOS or a stop string.
        return [
            Generation(c.get("text") or "", c.get("finish_reason") != "length", n_in, n_out) for c in choices
        ]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __repr__(self) -> str:
        return f"RemoteEngine({self.public_url!r}, model={self.served_model!r})"


def _retry_delay(resp: httpx.Response, attempt: int) -> float:
    """The server's ``Retry-After`` (seconds or an HTTP date), capped; else exponential backoff."""
    value = resp.headers.get("retry-after")
    if value:
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            if when is not None:
                return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))
    return 0.5 * 2**attempt


def remote_prompter(
    export_dir: str | os.PathLike[str],
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    similarity: Any = "default",
    timeout: float = 120.0,
    concurrency: int = 64,
) -> Any:
    """A :class:`~alignpro_plugins.prompter.Prompter` generating on ``base_url``, which serves the export in
    ``export_dir`` (written by ``alignpro export``) under the name ``model``.

    The export folder gives the manifest (mode, instruction, guard, generation settings), the tokenizer and the
    query template; its weights are not loaded here.
    """
    from transformers import AutoTokenizer

    from alignpro_plugins.export import EXPORT_MANIFEST
    from alignpro_plugins.prompter import Prompter

    folder = Path(export_dir)
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an exported prompter ({EXPORT_MANIFEST} is missing); write one with "
            "`alignpro export PROMPTER_DIR --out DIR` and serve DIR"
        )
    info = json.loads(path.read_text(encoding="utf-8"))
    manifest = Manifest.from_dict(info["manifest"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = info.get("query_chat_template")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    engine = RemoteEngine(
        base_url,
        model,
        tokenizer,
        max_positions=config.get("max_position_embeddings"),
        api_key=api_key,
        timeout=timeout,
        concurrency=concurrency,
    )
    return Prompter(None, None, manifest, similarity=similarity, engine=engine)
