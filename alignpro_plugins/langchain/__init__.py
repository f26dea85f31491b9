"""LangChain integration: rewrite prompts with an Align-Pro prompter inside any chain or chat model.

* :class:`AlignProRunnable` — a serializable link for ``prompt | AlignProRunnable | llm`` chains.
* :class:`AlignedChatModel` — wraps any chat model; the latest human message is rewritten before it is sent.
* :class:`ChatLocalTransformers` — a chat model over a local transformers causal LM (e.g. SmolLM2).
* :class:`RewriteRecorder` — a callback handler that collects what the prompter did in each call.
* :class:`PrompterError` — raised for a prompter failure by a runnable with ``on_error="raise"``.

Needs ``langchain-core`` (``pip install 'alignpro-plugins[langchain]'``); the rest of the package does not.
"""

from __future__ import annotations

from alignpro_plugins.extras import require

require("langchain_core", "alignpro_plugins.langchain")

from alignpro_plugins.langchain.chat_model import PROMPTER_ENV, AlignedChatModel
from alignpro_plugins.langchain.local import ChatLocalTransformers, clear_model_cache
from alignpro_plugins.langchain.runnable import (
    ACCEPTED_INPUTS,
    ENABLED_CONFIG_KEY,
    GENERATION_KEYS,
    NO_HUMAN_MESSAGE,
    NO_TEXT_CONTENT,
    REWRITE_RUN_NAME,
    AlignProRunnable,
    PrompterError,
    RewriteRecorder,
)

__all__ = [
    "ACCEPTED_INPUTS",
    "ENABLED_CONFIG_KEY",
    "GENERATION_KEYS",
    "NO_HUMAN_MESSAGE",
    "NO_TEXT_CONTENT",
    "PROMPTER_ENV",
    "REWRITE_RUN_NAME",
    "AlignProRunnable",
    "AlignedChatModel",
    "ChatLocalTransformers",
    "PrompterError",
    "RewriteRecorder",
    "clear_model_cache",
]
