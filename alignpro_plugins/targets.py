"""Frozen targets: the LLM whose weights we never touch, behind one small interface.

``generate(prompts) -> answers`` (and ``agenerate``). Backends: a local transformers model (batched, KV
cache), any OpenAI-compatible endpoint, any LangChain Runnable / chat model, any DSPy LM, or a Python
callable. ``CachedTarget`` caches answers by (target, prompt, generation settings). A failed call is counted
and logged, and yields an empty answer instead of crashing a training run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from alignpro_plugins.batching import plan_batches
from alignpro_plugins.manifest import weights_hash

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")

OPENAI_HOST = "api.openai.com"
# How much of a rejected request's response body goes into the error (enough for the server's message).
ERROR_BODY_CHARS = 300
_MAX_MALFORMED_WARNINGS = 5


def public_url(url: str) -> str:
    """``url`` without what may hold a secret: ``user:password@`` and the query string (``?key=...``).

    A URL without either comes back unchanged, so identities (and the cache keys built on them) stay stable.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def read_jsonl_rows(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a jsonl file this package appends to, skipping (with a warning naming ``path:line``) any
    line that does not parse or lacks a ``required`` key: a run killed mid-write leaves a cut-off last line,
    and resuming must not fail on it."""
    rows: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)  # bytes: a multi-byte character cut in half fails this line only
            except ValueError as exc:
                bad.append((lineno, f"invalid JSON: {exc}"))
                continue
            missing = [k for k in required if k not in row] if isinstance(row, dict) else None
            if missing is None or missing:
                what = f"missing {missing}" if missing else f"expected an object, got {type(row).__name__}"
                bad.append((lineno, what))
                continue
            rows.append(row)
    for lineno, why in bad[:_MAX_MALFORMED_WARNINGS]:
        logger.warning(
            "%s:%d: skipping a malformed line (%s); an interrupted run can leave one", path, lineno, why
        )
    if len(bad) > _MAX_MALFORMED_WARNINGS:
        logger.warning("%s: skipped %d more malformed lines", path, len(bad) - _MAX_MALFORMED_WARNINGS)
    return rows


def append_jsonl(path: Path, lines: Sequence[str]) -> None:
    """Append JSON lines, first ending a last line that an interrupted run left without its newline (else the
    first new row would be glued to it and lost too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write("".join(line + "\n" for line in lines).encode("utf-8"))


@dataclass
class TargetStats:
    calls: int = 0
    failures: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
        # Local models run in a worker thread so the event loop stays free.
        return await asyncio.to_thread(self.generate, prompts)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return self.generate(prompts)

    @abstractmethod
    def _generate(self, prompts: list[str]) -> list[str]: ...

    def _failed(self, exc: BaseException, prompt: str) -> str:
        self.stats.failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "target %s failed on a prompt (%d failures so far): %s", self.identity, self.stats.failures, exc
        )
        return ""


class TransformersTarget(FrozenTarget):
    """A local causal LM answering through its chat template; batched, greedy by default.

    ``dtype="auto"`` loads bf16 on a CUDA GPU that supports it and fp32 elsewhere. ``"bfloat16"`` on a CPU with
    native bf16 (AMX, recent Xeons) answers faster, but the answers are another model's: compare before you
    switch (benchmarks/bench_target_backends.py). The dtype is part of the answer cache's key.
    """

    def __init__(
        self,
        model: str | Any = "smollm2-135m-instruct",
        tokenizer: Any | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 16,
        system_prompt: str | None = None,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__()
        from alignpro_plugins.prompter import _select_device, _select_dtype, load_causal_lm

        self._weights: str | None = None
        if isinstance(model, str):
            dev = _select_device(device)
            self.model, self.tokenizer, path = load_causal_lm(
                model, device=dev, dtype=_select_dtype(dtype, dev)
            )
            self._name = name or model
            # Cached answers are keyed by identity: a folder whose weights change in place is another target.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # a hub id: no folder to hash
                self._weights = weights_hash(path).removeprefix("sha256:")[:12]
        else:
            if tokenizer is None:
                raise TypeError("TransformersTarget(model=<PreTrainedModel>) also needs tokenizer=...")
            self.model, self.tokenizer = model, tokenizer
            self._name = name or str(getattr(model.config, "_name_or_path", None) or type(model).__name__)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return f"transformers:{self._name}" + (f"@{self._weights}" if self._weights else "")

    @property
    def settings(self) -> dict[str, Any]:
        # Another dtype gives other answers, so it is part of the cache key; fp32 (the CPU default) leaves the key
        # as it always was, so existing caches stay valid.
        dtype = str(getattr(self.model, "dtype", "torch.float32")).removeprefix("torch.")
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "system": self.system_prompt,
        } | ({} if dtype == "float32" else {"dtype": dtype})

    def format(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"User: {prompt}\nAssistant:"

    def _generate(self, prompts: list[str]) -> list[str]:
        return [answer for answer, _ in self._generate_ended(prompts)]

    def generate_ended(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer, ended): ``ended`` is False where generation stopped at ``max_new_tokens``, not at EOS.

        Training on an answer that was cut off must not teach the model to stop there (see kl-optimum
        distillation), so trainers that fit the model to its own answers need to know which ones were cut.
        """
        return self._counted(self._generate_ended, prompts)

    def _stop_ids(self) -> set[int]:
        """The token ids ``generate`` stops on (its generation config's EOS ids)."""
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])

    def _generate_ended(self, prompts: list[str]) -> list[tuple[str, bool]]:
        import torch

        texts = [self.format(p) for p in prompts]
        if not texts:
            return []
        eos = self._stop_ids()
        # Calls grouped by prompt length so that few rows are padded far (see plan_batches); order restored.
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        answers: list[tuple[str, bool]] = [("", True)] * len(texts)
        sample = self.temperature > 0
        for idx in plan_batches(lengths, new_tokens=self.max_new_tokens, max_rows=self.batch_size):
            try:
                enc = self.tokenizer(
                    [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                )
                enc = {k: v.to(self.model.device) for k, v in enc.items()}
                with self._lock, torch.inference_mode():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=sample,
                        temperature=self.temperature if sample else None,
                        top_p=None,
                        top_k=None,
                        pad_token_id=self.tokenizer.pad_token_id,
                        use_cache=True,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for i, ids in zip(idx, new, strict=True):
                    ended = any(int(t) in eos for t in ids)  # a cut answer holds no EOS (nor EOS padding)
                    answers[i] = (self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ended)
            except Exception as exc:  # e.g. out of memory: count it, keep going
                for i in idx:  # not an answer that ended: nothing here for a trainer to learn to stop on
                    answers[i] = (self._failed(exc, prompts[i]), False)
        return answers


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


def _message_text(out: Any) -> str:
    content = getattr(out, "content", out)
    if isinstance(content, list):  # content blocks
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return str(content)


class LangChainTarget(FrozenTarget):
    """Any LangChain Runnable that maps a str (or messages) to a message or str: chat models, chains."""

    def __init__(self, runnable: Any, *, name: str | None = None, max_concurrency: int | None = 8) -> None:
        super().__init__()
        self.runnable = runnable
        self._name = (
            name
            or getattr(runnable, "model_name", None)
            or getattr(runnable, "model", None)
            or type(runnable).__name__
        )
        self.max_concurrency = max_concurrency

    @property
    def identity(self) -> str:
        return f"langchain:{self._name}"

    def _collect(self, prompts: list[str], outs: list[Any]) -> list[str]:
        return [
            self._failed(o, p) if isinstance(o, BaseException) else _message_text(o).strip()
            for p, o in zip(prompts, outs, strict=True)
        ]

    def _generate(self, prompts: list[str]) -> list[str]:
        outs = self.runnable.batch(
            prompts, config={"max_concurrency": self.max_concurrency}, return_exceptions=True
        )
        return self._collect(prompts, outs)

    async def agenerate(self, prompts: Sequence[str]) -> list[str]:
        outs = await self.runnable.abatch(
            list(prompts), config={"max_concurrency": self.max_concurrency}, return_exceptions=True
        )
        self.stats.calls += len(prompts)
        return self._collect(list(prompts), outs)


class DSPyTarget(FrozenTarget):
    """Any ``dspy.LM`` (or BaseLM): each prompt is sent as one user message."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    @property
    def identity(self) -> str:
        return f"dspy:{getattr(self.lm, 'model', type(self.lm).__name__)}"

    @property
    def settings(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (getattr(self.lm, "kwargs", {}) or {}).items()
            if isinstance(v, (int, float, str))
        }

    def _ask(self, prompt: str) -> str:
        # DSPy 3.4+: an explicit lm15 Request (the legacy messages= call is deprecated and goes away in 3.5).
        try:
            from dspy.lm15 import Message, Request
        except ImportError:  # older DSPy
            Request = None  # type: ignore[assignment,misc]
        if (
            Request is not None
            and isinstance(getattr(self.lm, "model", None), str)
            and hasattr(self.lm, "engine")
        ):
            response = self.lm(Request(model=self.lm.model, messages=(Message.user(prompt),)))
            return str(response.text or "").strip()
        out = self.lm(prompt)  # plain-string calls stay supported and return a list of outputs
        first = out[0] if isinstance(out, list) and out else out
        return str(first.get("text", "") if isinstance(first, dict) else first).strip()

    def _generate(self, prompts: list[str]) -> list[str]:
        answers = []
        for p in prompts:
            try:
                answers.append(self._ask(p))
            except Exception as exc:
                answers.append(self._failed(exc, p))
        return answers


class CallableTarget(FrozenTarget):
    """A Python function: ``fn(list[str]) -> list[str]`` when ``batched`` else ``fn(str) -> str``."""

    def __init__(self, fn: Callable[..., Any], *, batched: bool = False, name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.batched = batched
        self._name = name or getattr(fn, "__qualname__", repr(fn))

    @property
    def identity(self) -> str:
        return f"callable:{self._name}"

    def _generate(self, prompts: list[str]) -> list[str]:
        if self.batched:
            try:
                out = list(self.fn(prompts))
                if len(out) != len(prompts):
                    raise ValueError(f"batched target returned {len(out)} answers for {len(prompts)} prompts")
                return [str(a) for a in out]
            except Exception as exc:
                return [self._failed(exc, p) for p in prompts]
        answers = []
        for p in prompts:
            try:
                answers.append(str(self.fn(p)))
            except Exception as exc:
                answers.append(self._failed(exc, p))
        return answers


class CachedTarget(FrozenTarget):
    """Caches answers by (target identity, generation settings, prompt); optionally persisted as jsonl."""

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

    def key(self, prompt: str) -> str:
        blob = json.dumps([self.target.identity, self.target.settings, prompt], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cached(self, prompt: str) -> str | None:
        """The stored answer for ``prompt`` under this target and settings, without generating one."""
        return self._cache.get(self.key(prompt))

    def _split(self, prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        keys = [self.key(p) for p in prompts]
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys, strict=True) if k not in self._cache))
        self.stats.cache_hits += len(prompts) - sum(1 for k in keys if k not in self._cache)
        return keys, todo

    def _store(self, todo: list[str], answers: list[str]) -> None:
        with self._lock:
            rows = []
            for p, a in zip(todo, answers, strict=True):
                if a == "" and self.target.stats.failures:
                    continue  # do not cache failures; retry next time
                k = self.key(p)
                self._cache[k] = a
                rows.append(json.dumps({"key": k, "answer": a}))
            if self._path and rows:
                append_jsonl(self._path, rows)

    def _generate(self, prompts: list[str]) -> list[str]:
        keys, todo = self._split(prompts)
        if todo:
            self._store(todo, self.target.generate(todo))
        return [self._cache.get(k, "") for k in keys]

    def generate(self, prompts: Sequence[str]) -> list[str]:
        return self._generate(list(prompts))

    async def agenerate(self, prompts: Sequence[str]) -> list[str]:
        keys, todo = self._split(prompts)
        if todo:
            self._store(todo, await self.target.agenerate(todo))
        return [self._cache.get(k, "") for k in keys]


def as_target(obj: Any, **kwargs: Any) -> FrozenTarget:
    """Coerce a model name/path, LangChain Runnable, DSPy LM or callable into a :class:`FrozenTarget`."""
    if isinstance(obj, FrozenTarget):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return TransformersTarget(str(obj), **kwargs)
    module = type(obj).__module__
    if module.startswith("langchain") or hasattr(obj, "abatch") and hasattr(obj, "invoke"):
        return LangChainTarget(obj, **kwargs)
    if (
        module.startswith("dspy")
        or hasattr(obj, "forward")
        and hasattr(obj, "model")
        and hasattr(obj, "history")
    ):
        return DSPyTarget(obj)
    if callable(obj):
        return CallableTarget(obj, **kwargs)
    raise TypeError(
        "A frozen target must be a model name or path, a FrozenTarget, a LangChain Runnable or chat model, a "
        f"DSPy LM, or a callable; got {type(obj).__name__}"
    )


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


__all__ = [
    "CachedTarget",
    "CallableTarget",
    "DSPyTarget",
    "FrozenTarget",
    "LangChainTarget",
    "OpenAICompatibleTarget",
    "TargetStats",
    "TransformersTarget",
    "as_target",
]
