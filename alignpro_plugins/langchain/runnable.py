"""``AlignProRunnable``: the prompter as a LangChain link (``prompt | AlignProRunnable | llm``)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import BaseMessage, ChatMessage, HumanMessage, convert_to_messages
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, model_validator

from alignpro_plugins import guard
from alignpro_plugins.manifest import MODES, GenerationDefaults
from alignpro_plugins.specs import classify_prompter_spec

logger = logging.getLogger(__name__)

#: Name of the traced child run that records one rewrite (original, rewritten, fallback reason).
REWRITE_RUN_NAME = "alignpro_rewrite"
#: ``config["configurable"][ENABLED_CONFIG_KEY] = False`` switches rewriting off for one call.
ENABLED_CONFIG_KEY = "alignpro_enabled"
#: Fallback reasons added by the LangChain adapter (the prompter's own codes live in ``guard``).
NO_HUMAN_MESSAGE = "no_human_message"
NO_TEXT_CONTENT = "no_text_content"
#: Keys ``generation_kwargs`` may set: the fields of the prompter's generation defaults.
GENERATION_KEYS = tuple(f.name for f in fields(GenerationDefaults))
ACCEPTED_INPUTS = (
    "str, a PromptValue (StringPromptValue or ChatPromptValue), a list of messages, a single message, "
    "or a dict holding one of these under `input_key`"
)

# Loaded prompters shared by every runnable built from the same spec: configurable_fields and
# deserialisation create new instances, which must not reload the model each time.
_PROMPTERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_RECENT: deque[Any] = deque(maxlen=2)  # the last loads stay alive even when no runnable holds them
_LOAD_LOCK = threading.Lock()


def _load_prompter(path: str | None, base_model: str | None, mode: str | None, kwargs: dict[str, Any]):
    from alignpro_plugins.prompter import Prompter

    # An artifact's mode is chosen per call, so it is not part of what gets loaded.
    load_mode = None if path is not None else (mode or "augment")
    key = json.dumps([path, base_model, load_mode, kwargs], sort_keys=True, default=repr)
    with _LOAD_LOCK:
        prompter = _PROMPTERS.get(key)
        if prompter is None:
            if path is not None:
                prompter = Prompter.from_pretrained(path, **kwargs)
            else:
                prompter = Prompter.from_base(
                    base_model or "smollm2-135m-instruct", mode=load_mode or "augment", **kwargs
                )
            _PROMPTERS[key] = prompter
        if prompter not in _RECENT:
            _RECENT.append(prompter)
        return prompter


@dataclass
class _Plan:
    """Where the text to rewrite sits in one input, and how to put the rewrite back."""

    original: Any
    text: str | None
    rebuild: Callable[[str], Any] | None
    reason: str | None = None  # why nothing is sent to the prompter (text is None)


def _is_human(message: BaseMessage) -> bool:
    return isinstance(message, HumanMessage) or (
        isinstance(message, ChatMessage) and message.role in ("user", "human")
    )


def _is_text_part(part: Any) -> bool:
    return isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text")


def _plan_message(message: BaseMessage) -> _Plan:
    if isinstance(message.content, str):
        return _Plan(message, message.content, lambda t: message.model_copy(update={"content": t}))
    content: list[Any] = list(message.content)
    at = next((i for i in range(len(content) - 1, -1, -1) if _is_text_part(content[i])), None)
    if at is None:
        return _Plan(message, None, None, NO_TEXT_CONTENT)
    part = content[at]
    text = part if isinstance(part, str) else str(part.get("text", ""))

    def rebuild(new: str) -> BaseMessage:
        # Only the last text part changes, in place: no text moves across an image or file part.
        parts = [*content[:at], new if isinstance(part, str) else {**part, "text": new}, *content[at + 1 :]]
        return message.model_copy(update={"content": parts})

    return _Plan(message, text, rebuild)


def _plan_messages(messages: list[BaseMessage], original: Any) -> _Plan:
    idx = next((i for i in range(len(messages) - 1, -1, -1) if _is_human(messages[i])), None)
    if idx is None:
        return _Plan(original, None, None, NO_HUMAN_MESSAGE)
    inner = _plan_message(messages[idx])
    if inner.text is None or inner.rebuild is None:
        return _Plan(original, None, None, inner.reason)
    rebuild_msg = inner.rebuild
    return _Plan(original, inner.text, lambda t: [*messages[:idx], rebuild_msg(t), *messages[idx + 1 :]])


def _enabled_in(config: RunnableConfig | None) -> bool:
    return bool((config or {}).get("configurable", {}).get(ENABLED_CONFIG_KEY, True))


def _error_reason(exc: BaseException) -> str:
    return f"{guard.PROMPTER_ERROR}: {type(exc).__name__}: {exc}"


class PrompterError(RuntimeError):
    """With ``on_error="raise"``: the prompter failed on this input (the reason is the fallback reason)."""


class AlignProRunnable(RunnableSerializable[Any, Any]):
    """Rewrite the user's latest prompt with an Align-Pro prompter; everything else passes through unchanged.

    Accepts a str, a ``StringPromptValue`` / ``ChatPromptValue``, a list of messages (or message-likes), a
    single message, or a dict (the value under ``input_key`` is rewritten) and returns the same kind, whether
    or not the text was rewritten. A list of message-likes (``("human", "...")`` tuples, role dicts, strings)
    always comes back as a list of ``BaseMessage``. In message inputs only the text of the latest human
    message changes; system, AI and tool messages and non-text content parts are untouched. When that message
    has several content parts (e.g. text, image, text), its last text part is the prompt: the prompter sees
    it alone and its rewrite replaces it in place, so the parts keep their order and no text moves across an
    image. A dict without ``input_key`` raises ``ValueError`` naming the key and the keys it has.

    Never breaks a chain by default: when the prompter fails, is switched off, or its output is rejected by
    the intent guard, the original input passes through. With ``on_error="raise"`` a prompter failure raises
    instead (so ``with_fallbacks`` / ``with_retry`` can act on it); guard rejections still pass through.
    Each call records a child run named ``alignpro_rewrite`` whose outputs hold ``original``, ``rewritten``,
    ``changed``, ``fallback_reason``, ``mode`` and ``generated``.

    Build it with :meth:`from_pretrained` (an artifact folder), :meth:`from_base` (a zero-shot prompter),
    or from a loaded :class:`~alignpro_plugins.prompter.Prompter` (``AlignProRunnable(prompter)``).
    Only the first two are serializable (``dumpd`` / ``load`` reload the model from the path or name).
    """

    prompter_path: str | None = None
    """Folder of a prompter artifact (``alignpro.json`` + adapter)."""
    base_model: str | None = None
    """Base model of a zero-shot prompter (a packaged name such as ``smollm2-135m-instruct`` or a path)."""
    mode: str | None = None
    """``augment`` or ``rewrite``; ``None`` uses the artifact's mode."""
    input_key: str = "input"
    """Key of the value to rewrite when the input is a dict."""
    enabled: bool = True
    """Set to False (or use ``configurable_fields``) to pass inputs through untouched."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the prompter's generation defaults, e.g. ``{"max_new_tokens": 48}``; the keys are
    ``GENERATION_KEYS`` (unknown keys raise ``ValueError`` here)."""
    on_error: Literal["passthrough", "raise"] = "passthrough"
    """``passthrough``: a failing prompter passes the input through (reason ``prompter_error: ...``);
    ``raise``: the prompter's exception propagates, for ``with_fallbacks`` / ``with_retry``."""
    prompter_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments for ``Prompter.from_pretrained`` / ``from_base`` (``similarity``, ``device``, ...)."""
    prompter: Any = Field(default=None, exclude=True)
    """The loaded :class:`~alignpro_plugins.prompter.Prompter` (loaded on first use when not given)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, prompter: Any = None, /, **kwargs: Any) -> None:
        if prompter is not None:
            kwargs["prompter"] = prompter
        super().__init__(**kwargs)

    @model_validator(mode="after")
    def _check(self) -> AlignProRunnable:
        if self.prompter is None and self.prompter_path is None and self.base_model is None:
            raise ValueError(
                "AlignProRunnable needs a prompter: use AlignProRunnable.from_pretrained(dir), "
                "AlignProRunnable.from_base('smollm2-135m-instruct') or AlignProRunnable(prompter)"
            )
        if self.prompter_path is not None and self.base_model is not None:
            raise ValueError("give prompter_path or base_model, not both")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # Checked here: at call time a bad key would only show as a prompter_error fallback on every call.
        unknown = sorted(set(self.generation_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(
                f"generation_kwargs has unknown keys {unknown}; accepted keys: {', '.join(GENERATION_KEYS)}"
            )
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        mode: str | None = None,
        input_key: str = "input",
        enabled: bool = True,
        generation_kwargs: dict[str, Any] | None = None,
        on_error: Literal["passthrough", "raise"] = "passthrough",
        **prompter_kwargs: Any,
    ) -> AlignProRunnable:
        """Load a prompter artifact folder now, so a bad path fails here and not inside a running chain."""
        options = {"input_key": input_key, "enabled": enabled, "on_error": on_error}
        return cls._loaded(str(path), None, mode, options, generation_kwargs, prompter_kwargs)

    @classmethod
    def from_base(
        cls,
        base_model: str = "smollm2-135m-instruct",
        *,
        mode: str = "augment",
        input_key: str = "input",
        enabled: bool = True,
        generation_kwargs: dict[str, Any] | None = None,
        on_error: Literal["passthrough", "raise"] = "passthrough",
        **prompter_kwargs: Any,
    ) -> AlignProRunnable:
        """A zero-shot prompter: the base model asked to improve prompts with the default instructions."""
        options = {"input_key": input_key, "enabled": enabled, "on_error": on_error}
        return cls._loaded(None, base_model, mode, options, generation_kwargs, prompter_kwargs)

    @classmethod
    def _loaded(
        cls,
        path: str | None,
        base_model: str | None,
        mode: str | None,
        options: dict[str, Any],
        generation_kwargs: dict[str, Any] | None,
        prompter_kwargs: dict[str, Any],
    ) -> AlignProRunnable:
        runnable = cls(
            prompter_path=path,
            base_model=base_model,
            mode=mode,
            generation_kwargs=generation_kwargs or {},
            prompter_kwargs=prompter_kwargs,
            **options,
        )
        runnable.get_prompter()
        return runnable

    @classmethod
    def from_spec(cls, spec: Any, **kwargs: Any) -> AlignProRunnable:
        """Coerce a runnable, a Prompter, an artifact folder, a model folder or a model name (loaded lazily).

        A folder with ``alignpro.json`` is an artifact; a folder with ``config.json``, a packaged name or a hub
        id is the base of a zero-shot prompter. A path meant as a local folder (it exists, is absolute, starts
        with ``./``, ``../`` or ``~``, or its first part is a local folder) that is neither raises
        ``FileNotFoundError`` now: loaded lazily, it would pass every prompt through unchanged.
        """
        if isinstance(spec, AlignProRunnable):
            return spec
        if isinstance(spec, (str, Path)):
            kind = classify_prompter_spec(spec)
            if kind == "artifact":
                return cls(prompter_path=str(spec), **kwargs)
            return cls(base_model=str(spec), **kwargs)  # a model folder, a packaged name or a hub id
        if hasattr(spec, "rewrite_results") and hasattr(spec, "arewrite_results"):
            return cls(spec, **kwargs)
        raise TypeError(
            "prompter must be an AlignProRunnable, a Prompter, a prompter artifact folder or a base model "
            f"name; got {type(spec).__name__}"
        )

    def get_prompter(self) -> Any:
        """The loaded Prompter (loads it on first use)."""
        if self.prompter is None:
            self.prompter = _load_prompter(
                self.prompter_path, self.base_model, self.mode, self.prompter_kwargs
            )
        return self.prompter

    # ------------------------------------------------------------------ serialization
    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["alignpro_plugins", "langchain"]

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        # A Prompter passed in as an object cannot be rebuilt from JSON; a path or a model name can.
        if self.prompter_path is None and self.base_model is None:
            return self.to_json_not_implemented()
        return super().to_json()

    def _spec(self) -> str:
        if self.prompter_path is not None:
            return self.prompter_path
        if self.base_model is not None:
            return f"base:{self.base_model}"
        return repr(self.prompter)

    # ------------------------------------------------------------------ input handling
    def _plan(self, value: Any, *, nested: bool = False) -> _Plan:
        if isinstance(value, str):
            return _Plan(value, value, lambda t: t)
        if isinstance(value, StringPromptValue):
            return _Plan(value, value.text, lambda t: StringPromptValue(text=t))
        if isinstance(value, ChatPromptValue):
            inner = _plan_messages(list(value.messages), value)
            return self._wrap(value, inner, lambda msgs: ChatPromptValue(messages=msgs))
        if isinstance(value, BaseMessage):
            if not _is_human(value):
                return _Plan(value, None, None, NO_HUMAN_MESSAGE)
            return _plan_message(value)
        if isinstance(value, dict) and not nested:
            if self.input_key not in value:
                raise ValueError(
                    f"AlignProRunnable got a dict without its input key {self.input_key!r} (keys given: "
                    f"{list(value)}); put the prompt under {self.input_key!r} or set input_key=... to the key "
                    "that holds it"
                )
            inner = self._plan(value[self.input_key], nested=True)
            # A nested list of message-likes passes through as messages too (see the list case below).
            given = value[self.input_key]
            original = value if inner.original is given else {**value, self.input_key: inner.original}
            return self._wrap(original, inner, lambda v: {**value, self.input_key: v})
        if isinstance(value, (list, tuple)) and not isinstance(value, str):
            if isinstance(value, list) and all(isinstance(m, BaseMessage) for m in value):
                return _plan_messages(value, value)
            if all(isinstance(m, BaseMessage) for m in value):
                messages = list(value)
            else:
                try:
                    messages = convert_to_messages(value)
                except Exception as exc:
                    raise TypeError(
                        f"AlignProRunnable accepts {ACCEPTED_INPUTS}; got a list it cannot read as messages ({exc})"
                    ) from exc
            # A rewrite returns list[BaseMessage]; a pass-through returns the same converted list, so the
            # output type does not depend on whether the prompter's output was used.
            return _plan_messages(messages, messages)
        raise TypeError(f"AlignProRunnable accepts {ACCEPTED_INPUTS}; got {type(value).__name__}")

    @staticmethod
    def _wrap(original: Any, inner: _Plan, outer: Callable[[Any], Any]) -> _Plan:
        if inner.text is None or inner.rebuild is None:
            return _Plan(original, None, None, inner.reason)
        rebuild = inner.rebuild
        return _Plan(original, inner.text, lambda t: outer(rebuild(t)))

    # ------------------------------------------------------------------ core
    def _prepare(self, inputs: list[Any], configs: list[RunnableConfig]):
        plans: list[_Plan | Exception] = []
        for value in inputs:
            try:
                plans.append(self._plan(value))
            except Exception as exc:  # reported on that input's own run
                plans.append(exc)
        enabled = [self.enabled and _enabled_in(c) for c in configs]
        todo = [i for i, p in enumerate(plans) if isinstance(p, _Plan) and p.text is not None and enabled[i]]
        return plans, enabled, todo

    def _prompter_mode(self) -> str | None:
        if self.mode is not None:
            return self.mode
        return self.prompter.manifest.mode if self.prompter is not None else None

    def _finish(
        self, plans, enabled, todo, results
    ) -> tuple[list[Any], list[dict[str, Any] | Exception | None]]:
        """Outputs and, per input, the rewrite run's record (or the error that ends it, on_error="raise")."""
        by_index = dict(zip(todo, results, strict=True))
        outputs: list[Any] = []
        records: list[dict[str, Any] | Exception | None] = []
        for i, plan in enumerate(plans):
            if isinstance(plan, Exception):
                outputs.append(plan)
                records.append(None)
                continue
            record = {
                "original": plan.text,
                "rewritten": plan.text,
                "changed": False,
                "fallback_reason": None,
                "mode": self._prompter_mode(),
                "generated": None,
            }
            out = plan.original
            error: Exception | None = None
            if not enabled[i]:
                record["fallback_reason"] = guard.DISABLED
            elif i not in by_index:
                record["fallback_reason"] = plan.reason
            else:
                res = by_index[i]
                record.update(mode=res.mode, generated=res.generated, fallback_reason=res.fallback_reason)
                if res.fallback_reason is None and plan.rebuild is not None:
                    try:
                        out = plan.rebuild(res.text)
                        record.update(rewritten=res.text, changed=res.text != plan.text)
                    except Exception as exc:  # never lose the user's input over a rebuild problem
                        record["fallback_reason"] = _error_reason(exc)
                        error = exc
            reason = record["fallback_reason"]
            failed = isinstance(reason, str) and reason.startswith(guard.PROMPTER_ERROR)
            if self.on_error == "raise" and failed:
                # The Prompter reports its own generation failures as results: raise those per input.
                failure = error or PrompterError(f"the prompter failed on this input: {reason}")
                outputs.append(failure)
                records.append(failure)
                continue
            outputs.append(out)
            records.append(record)
        return outputs, records

    def _rewrite(self, texts: list[str]) -> list[Any]:
        if not texts:
            return []
        try:
            return self.get_prompter().rewrite_results(texts, mode=self.mode, **self.generation_kwargs)
        except Exception as exc:
            return self._failed(texts, exc)

    async def _arewrite(self, texts: list[str]) -> list[Any]:
        if not texts:
            return []
        try:
            if self.prompter is None:  # loading takes seconds: keep it off the event loop
                await asyncio.to_thread(self.get_prompter)
            return await self.get_prompter().arewrite_results(texts, mode=self.mode, **self.generation_kwargs)
        except Exception as exc:
            return self._failed(texts, exc)

    def _failed(self, texts: Sequence[str], exc: Exception) -> list[Any]:
        """The prompter raised: re-raise it (on_error="raise") or pass every text through, saying why."""
        if self.on_error == "raise":
            raise exc
        from alignpro_plugins.prompter import RewriteResult

        logger.warning("prompter failed (%s: %s); passing the prompt through", type(exc).__name__, exc)
        mode = self._prompter_mode() or "augment"
        return [RewriteResult(t, t, mode, None, _error_reason(exc)) for t in texts]

    @staticmethod
    def _open_runs(plans: list[_Plan | Exception], run_manager: list[Any]) -> list[Any]:
        """One ``alignpro_rewrite`` child run per readable input (async managers return coroutines to await)."""
        return [
            None
            if isinstance(p, Exception)
            else rm.get_child().on_chain_start(None, {"input": p.text}, name=REWRITE_RUN_NAME)
            for p, rm in zip(plans, run_manager, strict=True)
        ]

    @staticmethod
    def _close_runs(children: list[Any], outcome: Exception | list[Any]) -> list[Any]:
        """End each child run with its record or its error (async managers return coroutines to await)."""
        ends = [outcome] * len(children) if isinstance(outcome, Exception) else outcome
        calls = []
        for child, end in zip(children, ends, strict=True):
            if child is not None:
                calls.append(
                    child.on_chain_error(end) if isinstance(end, Exception) else child.on_chain_end(end)
                )
        return calls

    def _process(self, inputs: list[Any], run_manager: list[Any], config: list[RunnableConfig]) -> list[Any]:
        plans, enabled, todo = self._prepare(inputs, config)
        children = self._open_runs(plans, run_manager)
        # One prompter call for the whole batch: the prompter generates it as real batches.
        try:
            results = self._rewrite([plans[i].text for i in todo])  # type: ignore[union-attr]
        except Exception as exc:  # on_error="raise": close the rewrite runs, then fail the call
            self._close_runs(children, exc)
            raise
        outputs, records = self._finish(plans, enabled, todo, results)
        self._close_runs(children, records)
        return outputs

    async def _aprocess(
        self, inputs: list[Any], run_manager: list[Any], config: list[RunnableConfig]
    ) -> list[Any]:
        plans, enabled, todo = self._prepare(inputs, config)
        children = [c if c is None else await c for c in self._open_runs(plans, run_manager)]
        try:
            results = await self._arewrite([plans[i].text for i in todo])  # type: ignore[union-attr]
        except Exception as exc:
            await _each(self._close_runs(children, exc))
            raise
        outputs, records = self._finish(plans, enabled, todo, results)
        await _each(self._close_runs(children, records))
        return outputs

    # ------------------------------------------------------------------ Runnable API
    def _invoke_one(self, value: Any, run_manager: Any, config: RunnableConfig, **_: Any) -> Any:
        return _raised(self._process([value], [run_manager], [config])[0])

    async def _ainvoke_one(self, value: Any, run_manager: Any, config: RunnableConfig, **_: Any) -> Any:
        return _raised((await self._aprocess([value], [run_manager], [config]))[0])

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke_one, input, config, run_type="prompt", **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke_one, input, config, run_type="prompt", **kwargs)

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        return self._batch_with_config(
            self._process, list(inputs), config, return_exceptions=return_exceptions, run_type="prompt"
        )

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        return await self._abatch_with_config(
            self._aprocess, list(inputs), config, return_exceptions=return_exceptions, run_type="prompt"
        )


def _raised(out: Any) -> Any:
    """One input's output, or its error raised (a batch returns errors in place)."""
    if isinstance(out, Exception):
        raise out
    return out


async def _each(calls: list[Any]) -> None:
    for call in calls:
        await call


class RewriteRecorder(BaseCallbackHandler):
    """Collects the ``alignpro_rewrite`` child runs: ``records`` is a list of their output dicts.

    ``chain.invoke(x, config={"callbacks": [recorder]})`` then ``recorder.records[-1]["rewritten"]``.
    """

    run_inline = True  # record in call order, also under async callback managers

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self._open: dict[UUID, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def on_chain_start(
        self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID, **kwargs: Any
    ) -> None:
        if kwargs.get("name") == REWRITE_RUN_NAME:
            with self._lock:
                self._open[run_id] = {"tags": kwargs.get("tags"), "metadata": kwargs.get("metadata")}

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            if self._open.pop(run_id, None) is not None and isinstance(outputs, dict):
                self.records.append(dict(outputs))

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self._open.clear()
