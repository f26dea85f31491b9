"""A DSPy LM over a local transformers causal LM, and an adapter for models too small for DSPy's markers.

The LM is a plain ``dspy.LM`` with a custom engine (DSPy's supported extension point since 3.4): the engine
turns one canonical ``dspy.lm15.Request`` into one ``Response``. DSPy keeps its own cache, retries, history
and callbacks around it. Subclassing ``BaseLM.forward`` is deprecated in DSPy 3.4 and removed in 3.5.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import weakref
from pathlib import Path
from typing import Any

import dspy
from dspy.adapters.chat_adapter import ChatAdapter, field_header_pattern
from dspy.adapters.utils import format_field_value, parse_value
from dspy.lm15 import (
    InvalidRequestError,
    Message,
    Request,
    Response,
    TextPart,
    UnsupportedFeatureError,
    Usage,
    response_to_events,
)
from dspy.utils.exceptions import AdapterParseError

from alignpro_plugins.engine import GenerationEngine, GenerationSettings, folder_weights_hash


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(p, "text", "") or "" for p in system)


_LOADED: weakref.WeakValueDictionary[str, TransformersEngine] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


class TransformersEngine:
    """lm15 engine: a local causal LM answering through its chat template (one request at a time), a thin
    wrapper over :class:`~alignpro_plugins.engine.GenerationEngine`.

    The engine is borrowed by every ``dspy.LM`` (and every copy of one) that uses it, so deep copies share it
    instead of duplicating the weights.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        device: str | None = "auto",
        dtype: str | None = "auto",
        max_new_tokens: int = 256,
    ) -> None:
        self.model_name = str(model)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.engine, self.path = GenerationEngine.load(
            self.model_name, device=device, dtype=dtype, name=f"alignpro-dspy:{self.model_name}"
        )

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # --- persistence: DSPy saves a custom engine as its class path + this JSON state -------------------------
    def dump_state(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": self.device,
            "dtype": self.dtype,
            "max_new_tokens": self.max_new_tokens,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> TransformersEngine:
        # The sync and async engines of one saved LM name the same model: load it once.
        key = json.dumps(state, sort_keys=True, default=str)
        with _LOADED_LOCK:
            engine = _LOADED.get(key)
            if engine is None:
                engine = cls(**state)
                _LOADED[key] = engine
        return engine

    def __deepcopy__(self, memo: dict[int, Any]) -> TransformersEngine:
        return self  # DSPy deep-copies programs often; never copy the weights

    # --- the engine contract ------------------------------------------------------------------------------
    def _messages(self, request: Request) -> list[dict[str, str]]:
        messages = []
        system = _system_text(request.system)
        if system.strip():
            messages.append({"role": "system", "content": system})
        for m in request.messages:
            if m.text is None:
                raise UnsupportedFeatureError(
                    f"{self.model_name}: only text messages are supported (got parts "
                    f"{sorted({p.type for p in m.parts})})"
                )
            if m.role not in ("user", "assistant", "developer"):
                raise UnsupportedFeatureError(f"{self.model_name}: role {m.role!r} is not supported")
            # Chat templates of small models know system/user/assistant only.
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text})
        return messages

    def complete(self, request: Request) -> Response:
        if request.tools:
            raise UnsupportedFeatureError(f"{self.model_name}: tool calling is not supported")
        cfg = request.config
        text = self.engine.format_chat(self._messages(request))
        n_in = len(self.engine.token_ids([text])[0])
        limit = self.engine.max_positions
        max_new = int(cfg.max_tokens or self.max_new_tokens)
        if limit is not None and n_in >= limit:
            raise InvalidRequestError(
                f"{self.model_name}: prompt of {n_in} tokens exceeds the context ({limit})"
            )
        if limit is not None:
            max_new = max(1, min(max_new, limit - n_in))
        settings = GenerationSettings(
            max_new_tokens=max_new,
            do_sample=bool(cfg.temperature and cfg.temperature > 0),
            temperature=cfg.temperature,
            # Unset top_p / top_k mean no filter (1.0 and 0), not the model's defaults.
            top_p=1.0 if cfg.top_p is None else cfg.top_p,
            top_k=0 if cfg.top_k is None else cfg.top_k,
            stop=tuple(s for s in cfg.stop or () if s),
            seed=cfg.seed,
        )
        ((out,),) = self.engine.generate([text], settings)
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant((TextPart(out.text.strip()),)),
            finish_reason="stop" if out.ended else "length",
            usage=Usage(input_tokens=out.input_tokens, output_tokens=out.output_tokens),
        )

    def stream(self, request: Request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"TransformersEngine(model={self.model_name!r})"


class AsyncTransformersEngine:
    """The async twin DSPy needs for ``acall``: runs the sync engine in a worker thread."""

    def __init__(self, sync: TransformersEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request):
        for event in await asyncio.to_thread(lambda: list(self.sync.stream(request))):
            yield event

    async def aclose(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncTransformersEngine:
        return cls(TransformersEngine.load_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncTransformersEngine:
        return self


def _model_label(engine: TransformersEngine) -> str:
    name = Path(engine.model_name).name if Path(engine.model_name).is_dir() else engine.model_name
    digest = folder_weights_hash(engine.path)
    # The weights' hash is part of the model string because DSPy's response cache is keyed by it: two
    # different local models saved under the same folder name must not share cached answers.
    return f"local/{name}@{digest.split(':')[-1][:12]}" if digest else f"local/{name}"


def LocalTransformersLM(  # noqa: N802 - reads like the class it stands for
    model: str | TransformersEngine = "smollm2-135m-instruct",
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    cache: bool = True,
    device: str | None = "auto",
    dtype: str | None = "auto",
    **kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` answering with a local transformers causal LM; fully offline.

    ``model`` is a packaged name (``"smollm2-135m-instruct"``), a local folder, or a ready
    :class:`TransformersEngine` to share one loaded model between several LMs. Greedy by default.
    Programs saved with this LM attached record the engine's class and model; load them with
    ``allow_unsafe_lm_state=True``.
    """
    engine = (
        model
        if isinstance(model, TransformersEngine)
        else TransformersEngine(model, device=device, dtype=dtype, max_new_tokens=max_tokens)
    )
    return dspy.LM(
        _model_label(engine),
        engine=engine,
        async_engine=AsyncTransformersEngine(engine),
        max_tokens=max_tokens,
        temperature=temperature,
        cache=cache,
        num_retries=0,  # a local model does not fail transiently
        **kwargs,
    )


def _is_default_instructions(signature: Any) -> bool:
    return textwrap.dedent(signature.instructions).strip().startswith("Given the fields")


class SimpleFieldAdapter(ChatAdapter):
    """A ChatAdapter for models too small to follow DSPy's ``[[ ## field ## ]]`` format.

    ``parse`` returns ``{the_single_output_field: completion.strip()}`` (values of typed fields are parsed when
    possible); output that does contain DSPy's markers is parsed the normal way. With several output fields
    (e.g. ``ChainOfThought``'s reasoning + answer), unmarked output goes to the LAST field and the others are
    empty. With ``plain=True`` (default) prompts are plain too: the instructions as system message (omitted
    when they are DSPy's generic "Given the fields ..." text) and the input value(s) as the user message, so a
    small chat model simply answers the request. The JSON-adapter fallback is off: it would only make a
    second call that a small model cannot satisfy either.
    """

    def __init__(self, *, plain: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)
        self.plain = plain

    def format(
        self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        # lm15 refuses an empty system prompt; plain mode leaves it empty for DSPy's generic instructions.
        return [
            m for m in messages if not (m.get("role") == "system" and not str(m.get("content", "")).strip())
        ]

    def format_system_message(self, signature: Any) -> str:
        if not self.plain:
            return super().format_system_message(signature)
        return "" if _is_default_instructions(signature) else textwrap.dedent(signature.instructions).strip()

    def format_user_message_content(
        self,
        signature: Any,
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        if not self.plain:
            return super().format_user_message_content(signature, inputs, prefix, suffix, main_request)
        fields = [(k, info) for k, info in signature.input_fields.items() if k in inputs]
        values = [(k, format_field_value(field_info=info, value=inputs[k])) for k, info in fields]
        body = values[0][1] if len(values) == 1 else "\n\n".join(f"{k}: {v}" for k, v in values)
        return "\n\n".join(x for x in (prefix, body, suffix) if x).strip()

    def format_assistant_message_content(
        self, signature: Any, outputs: dict[str, Any], missing_field_message: str | None = None
    ) -> str:
        if not self.plain:
            return super().format_assistant_message_content(signature, outputs, missing_field_message)
        names = list(signature.output_fields)
        values = [(k, outputs.get(k, missing_field_message)) for k in names]
        return str(values[0][1]) if len(values) == 1 else "\n\n".join(f"{k}: {v}" for k, v in values)

    def _call_postprocess(
        self, processed_signature: Any, original_signature: Any, outputs: list[Any], *args, **kwargs
    ):
        # An empty completion is a legitimate (bad) answer from a small model, not a format error: let it
        # through as an empty field so a metric can score it, instead of failing the whole program call.
        def nonempty(out: Any) -> Any:
            if isinstance(out, dict):
                return out if out.get("text") or out.get("tool_calls") else {**out, "text": " "}
            return out or " "

        outputs = [nonempty(o) for o in outputs]
        return super()._call_postprocess(processed_signature, original_signature, outputs, *args, **kwargs)

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        if field_header_pattern.search(completion):
            try:
                return super().parse(signature, completion)
            except AdapterParseError:
                pass  # markers but not the expected ones: treat as plain text
        names = list(signature.output_fields)
        text = completion.strip()
        out: dict[str, Any] = {k: "" for k in names[:-1]}
        annotation = signature.output_fields[names[-1]].annotation
        try:
            out[names[-1]] = text if annotation is str else parse_value(text, annotation)
        except (ValueError, TypeError) as exc:
            raise AdapterParseError(
                adapter_name="SimpleFieldAdapter",
                signature=signature,
                lm_response=completion,
                message=f"cannot parse {text!r} as {annotation}: {exc}",
            ) from exc
        return out
