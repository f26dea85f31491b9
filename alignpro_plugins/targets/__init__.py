"""Frozen targets: the LLM whose weights we never touch, behind one small interface.

``generate(prompts) -> answers`` (and ``agenerate``); a prompt is a string or a ``TargetRequest`` (the target's
input, the user's original prompt, optional framework context). Backends: a local transformers model (batched, KV
cache), any OpenAI-compatible endpoint, any LangChain Runnable / chat model, any DSPy LM, or a Python
callable. ``CachedTarget`` caches answers by (target, prompt, generation settings). A failed call is counted
and logged. ``OpenAICompatibleTarget`` then raises ``TargetError`` (carrying the answers that did arrive; the
trainers score a missing one as an empty answer, as before); the other backends yield an empty answer.
"""

from __future__ import annotations

import os
from typing import Any

from alignpro_plugins.jsonl import append_jsonl, read_jsonl_rows
from alignpro_plugins.targets.base import FrozenTarget, TargetError, TargetRequest, TargetStats
from alignpro_plugins.targets.cache import CachedTarget
from alignpro_plugins.targets.frameworks import CallableTarget, DSPyTarget, LangChainTarget
from alignpro_plugins.targets.local import TransformersTarget
from alignpro_plugins.targets.remote import OpenAICompatibleTarget, public_url


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


__all__ = [
    "CachedTarget",
    "CallableTarget",
    "DSPyTarget",
    "FrozenTarget",
    "LangChainTarget",
    "OpenAICompatibleTarget",
    "TargetError",
    "TargetRequest",
    "TargetStats",
    "TransformersTarget",
    "append_jsonl",
    "as_target",
    "public_url",
    "read_jsonl_rows",
]
